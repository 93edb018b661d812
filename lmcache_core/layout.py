"""Key <-> object path inside a store (shared by the disk tier and fsspec remotes).

    <fmt>/<model>/<world_size>-<worker_id>/<hash[:2]>/<chunk_hash>.safetensors

The model name is percent-encoded (everything but ``A-Za-z0-9._-``, and a leading
``.``), so it never holds ``/``, never is ``.`` or ``..``, and a name like
``../../etc`` cannot leave the store root. Encoded names longer than one path
component are split into components of at most ``_SEGMENT`` characters, each
but the last ending in ``+`` (a character the encoding never emits), so paths
stay within filesystem limits and remain reversible without reading the file.
Also the names of the temp files atomic writes go through, and which are stale.
Pure functions (and ``scan_store``, a read-only walk of a disk store); thread-safe.
"""

from __future__ import annotations

import functools
import itertools
import os
import socket
from typing import Iterator

from lmcache_core.chunk_format import SUFFIX
from lmcache_core.key import FORMATS, CacheEngineKey

_SAFE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-")
_SEGMENT = 200
_CONT = "+"
# Bound on an encoded model name (3 characters per UTF-8 byte of a valid key's
# at most 1024): keeps a chunk path under PATH_MAX (4096) below a root of < 800 characters.
MAX_ENCODED_MODEL_CHARS = 3072


# Memoised: every get and put maps its key to a path, a serving process has a
# handful of model names, and the loop below is per character (~35 us per get
# after a 32 MiB read had pushed it out of the CPU caches). Errors are not cached.
@functools.lru_cache(maxsize=256)
def encode_model(name: str) -> str:
    """Path-safe, reversible form of a model name (may contain ``/`` between segments).

    Raises:
        ValueError: the encoded name would exceed ``MAX_ENCODED_MODEL_CHARS``.
    """
    out: list[str] = []
    for i, ch in enumerate(name):
        if ch in _SAFE and not (ch == "." and i == 0):
            out.append(ch)
        else:
            out.extend(f"%{b:02X}" for b in ch.encode("utf-8"))
    encoded = "".join(out)
    if len(encoded) > MAX_ENCODED_MODEL_CHARS:
        raise ValueError(
            f"model_name: encodes to {len(encoded)} path characters, "
            f"more than {MAX_ENCODED_MODEL_CHARS} (too many non-ASCII characters)"
        )
    if len(encoded) <= _SEGMENT:
        return encoded
    segments: list[str] = []
    rest = encoded
    while len(rest) > _SEGMENT:
        cut = _cut_point(rest)
        segments.append(rest[:cut] + _CONT)
        rest = rest[cut:]
    if rest in (".", ".."):  # only after a cut inside a long run of dots
        previous = segments.pop()[: -len(_CONT)]
        segments.append(previous[:-2] + _CONT)
        rest = previous[-2:] + rest
    segments.append(rest)
    return "/".join(segments)


def _cut_point(rest: str) -> int:
    """Where the next segment of an encoded name longer than ``_SEGMENT`` ends."""
    cut = _SEGMENT - 1
    # Never split inside a %XX escape, and never start a segment with '.' (the
    # last segment must never be '.' or '..', a traversal).
    while rest[cut - 1] == "%" or rest[cut - 2] == "%" or rest[cut] == ".":
        cut -= 1
        if cut < 3:
            # A run of dots fills the segment: backing up further never ended (a
            # name like "m" + "." * 250 hung every put and get of its keys). Cut
            # inside the run; this segment ends with '+', so it is never '.' or '..'.
            cut = _SEGMENT - 1
            while rest[cut - 1] == "%" or rest[cut - 2] == "%":
                cut -= 1
            break
    return cut


def decode_model(encoded: str) -> str:
    """Inverse of ``encode_model``; ``ValueError`` when not a valid encoding."""
    parts = encoded.split("/")
    for p in parts[:-1]:
        if not p.endswith(_CONT):
            raise ValueError(f"not an encoded model name: {encoded!r:.80}")
    joined = "".join(p[:-1] for p in parts[:-1]) + parts[-1]
    raw = bytearray()
    i = 0
    while i < len(joined):
        ch = joined[i]
        if ch == "%":
            try:
                raw.append(int(joined[i + 1 : i + 3], 16))
            except ValueError:
                raise ValueError(f"bad escape in model name {encoded!r:.80}") from None
            i += 3
        elif ch in _SAFE:
            raw.extend(ch.encode())
            i += 1
        else:
            raise ValueError(f"unexpected {ch!r} in encoded model name")
    name = raw.decode("utf-8")
    if encode_model(name) != encoded:  # only the canonical spelling maps back
        raise ValueError(f"not the canonical encoding of {name!r:.80}")
    return name


def model_prefix(fmt: str, model_name: str) -> str:
    """Relative directory holding every chunk of one model and fmt (for listing)."""
    return f"{fmt}/{encode_model(model_name)}"


def rank_prefix(fmt: str, model_name: str, world_size: int, worker_id: int) -> str:
    """Relative directory holding every chunk of one model, fmt and rank (for listing).

    Unique to them: another model's directory never starts with it (every segment of
    an encoded name but the last ends with ``+``, which no other name part holds).
    """
    return f"{model_prefix(fmt, model_name)}/{world_size}-{worker_id}"


def disk_path(root: str, key: CacheEngineKey) -> str:
    """The chunk's file under a disk store's ``root`` (the path a disk tier reads and writes)."""
    rel = key_to_path(key)  # '/'-separated, never absolute, no '..'
    return f"{root.rstrip(os.sep)}{os.sep}{rel if os.sep == '/' else rel.replace('/', os.sep)}"


def key_to_path(key: CacheEngineKey) -> str:
    """Relative object path of a chunk, '/'-separated."""
    h = key.chunk_hash
    return (
        f"{model_prefix(key.fmt, key.model_name)}/{key.world_size}-{key.worker_id}/"
        f"{h[:2]}/{h}{SUFFIX}"
    )


def path_to_key(rel_path: str) -> CacheEngineKey:
    """Inverse of ``key_to_path``; ``ValueError`` for anything that is not a chunk path."""
    parts = rel_path.strip("/").split("/")
    if len(parts) < 5 or not parts[-1].endswith(SUFFIX):
        raise ValueError(f"not a chunk path: {rel_path!r:.120}")
    fmt, model_parts, rank, prefix, fname = parts[0], parts[1:-3], parts[-3], parts[-2], parts[-1]
    if fmt not in FORMATS:
        raise ValueError(f"not a chunk path (fmt {fmt!r:.20}): {rel_path!r:.120}")
    chunk_hash = fname[: -len(SUFFIX)]
    ws, dash, wid = rank.partition("-")
    if not dash or not ws.isdigit() or not wid.isdigit() or prefix != chunk_hash[:2]:
        raise ValueError(f"not a chunk path: {rel_path!r:.120}")
    key = CacheEngineKey(fmt, decode_model("/".join(model_parts)), int(ws), int(wid), chunk_hash)
    if key_to_path(key) != "/".join(parts):
        raise ValueError(f"not a canonical chunk path: {rel_path!r:.120}")
    return key


# -- temp files of atomic writes ---------------------------------------------------------

TEMP_SUFFIX = ".tmp"
# A temp file whose writer cannot be checked (another host or PID namespace) is only
# removed once it is this old: no single chunk write takes an hour.
STALE_TEMP_SECONDS = 3600.0


def _pid_namespace() -> str:
    """This process's PID namespace id (Linux), else ''."""
    try:
        return str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        return ""


def _boot_id() -> str:
    """The first 8 hex digits of this host boot's random id (Linux), else ''."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            return "".join(c for c in f.read() if c in "0123456789abcdef")[:8]
    except (OSError, ValueError):
        return ""


# Who may test a temp file's pid for life: the same host boot *and* PID namespace. Two
# containers of one pod share a hostname but not their pids: one's store opening
# took the other's live temp files for a dead writer's (its pid absent here) and
# deleted them, failing those puts; and two pid-1 writers could pick the same name.
# The boot id: the initial PID namespace has the same inode on every Linux host, so
# two hosts of one hostname sharing an NFS store took each other's writers for their
# own. No '.' in it: temp names are split on '.'.
WRITER_ID = f"{socket.gethostname().replace('.', '_')}-{_boot_id()}-{_pid_namespace()}"
_temp_counter = itertools.count()  # next() is atomic: no lock a fork() could catch held


def temp_path(final: str) -> str:
    """A process- and thread-unique temp name in the same directory as ``final``.

    It starts with '.' and ends in ``TEMP_SUFFIX``, so it never looks like a chunk,
    and it names host (and its boot), PID namespace and pid, so a later scan can tell a dead
    writer's leftovers (``is_stale_temp``).
    """
    d, name = os.path.split(final)
    return os.path.join(d, f".{name}.{WRITER_ID}.{os.getpid()}.{next(_temp_counter)}{TEMP_SUFFIX}")


def is_temp_name(name: str) -> bool:
    return name.startswith(".") and name.endswith(TEMP_SUFFIX)


def is_stale_temp(name: str, mtime: float, now: float) -> bool:
    """A temp file whose writer is dead (same host and PID namespace, pid not running),
    or older than ``STALE_TEMP_SECONDS``."""
    parts = name[: -len(TEMP_SUFFIX)].rsplit(".", 3)
    if len(parts) == 4 and parts[1] == WRITER_ID and parts[2].isdigit():
        pid = int(parts[2])
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except OverflowError:
            pass  # no such pid could exist
        except PermissionError:  # there, owned by someone else: alive, unless a zombie
            if _is_zombie(pid):
                return True
        else:
            if _is_zombie(pid):
                return True
    return now - mtime > STALE_TEMP_SECONDS


def _is_zombie(pid: int) -> bool:
    """Whether ``pid`` has exited but not been reaped (state ``Z`` in ``/proc``).

    Signal 0 reaches a zombie, so a writer killed mid-put whose parent never reaps it
    (a container without an init) kept its temp file for ``STALE_TEMP_SECONDS``.
    False where ``/proc`` cannot say (not Linux, the pid gone meanwhile).
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat_line = f.read()
    except OSError:
        return False
    # "pid (comm) S ...": comm may hold spaces and parentheses; the state follows the last ")".
    return stat_line.rpartition(b")")[2].split()[:1] == [b"Z"]


def is_chunk_name(name: str) -> bool:
    """True for names that look like chunk objects (temp files never do)."""
    return name.endswith(SUFFIX) and not name.startswith(".")


def scan_store(
    root: str, *, special: bool = False
) -> Iterator[tuple[str, os.stat_result, CacheEngineKey | None]]:
    """Walk a disk store: (path, stat, key or None for files that are not chunks).

    With ``special``, entries named like chunks that are not regular files (FIFOs,
    devices, sockets, symlinks) are yielded too, with their ``lstat`` and key None.

    Every chunk in one directory shares fmt, model and rank, so the directory part
    of the path is decoded once (by the first chunk's ``path_to_key``) and the
    rest only need their file name checked: 10,000 chunks list in a fraction of the
    time a full decode per file takes, with the same result.
    """
    # A root ending in a separator ("/store/", or "/") had len(root) + 1 characters cut
    # from each path, a character of the relative path too: every chunk listed as key None.
    if root.endswith(os.sep):
        root = root.rstrip(os.sep) or os.sep
    stack = [root]
    prefix = len(root) if root.endswith(os.sep) else len(root) + 1
    suffix = len(SUFFIX)
    while stack:
        d = stack.pop()
        try:
            entries = list(os.scandir(d))
        except (FileNotFoundError, NotADirectoryError):
            continue
        template: tuple[str, str, int, int] | None = None  # (fmt, model, ws, wid) of this directory
        shard = os.path.basename(d)
        for e in entries:
            try:
                if e.is_dir(follow_symlinks=False):
                    stack.append(e.path)
                    continue
                if not e.is_file(follow_symlinks=False):
                    # symlinks and devices are never chunks; verify reports them
                    if special and is_chunk_name(e.name):
                        yield e.path, e.stat(follow_symlinks=False), None
                    continue
                st = e.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue  # removed by another process meanwhile
            key: CacheEngineKey | None = None
            if is_chunk_name(e.name):
                chunk_hash = e.name[:-suffix]
                try:
                    if template is not None and chunk_hash[:2] == shard:
                        key = CacheEngineKey(*template, chunk_hash)
                    else:
                        key = path_to_key(e.path[prefix:].replace(os.sep, "/"))
                        template = (key.fmt, key.model_name, key.world_size, key.worker_id)
                except ValueError:
                    key = None
            yield e.path, st, key
