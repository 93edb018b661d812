"""Engine configuration and metadata, with LMCache's field names.

``LMCacheEngineConfig`` is built from defaults, a YAML file (LMCache's form) or
``LMCACHE_<FIELD>`` environment variables; every value is validated and the
source of each is remembered for ``lmcache config``. Instances are plain
dataclasses: immutable by convention, safe to share between threads.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping
from urllib.parse import quote, unquote, unquote_plus, urlsplit, urlunsplit

from lmcache_core.errors import ConfigError
from lmcache_core.key import FORMATS

logger = logging.getLogger(__name__)

GB = 1024**3
#: A disk budget of this many GB or more (an exabyte) is none: a store opened so (every
#: ``lmcache`` tool's, ``store_ops.Store``) never evicts, not even for a full disk.
UNLIMITED_GB = 1e9
ENV_PREFIX = "LMCACHE_"
CONFIG_FILE_ENV = "LMCACHE_CONFIG_FILE"

SERDE = "safetensors"
# LMCache's serde names that we map onto the one safe format.
_LEGACY_SERDE = {"torch": SERDE, "safetensor": SERDE, "safetensors": SERDE}
# LMCache fields that this toolkit reads but has no use for; accepted for compatibility.
_IGNORED_LMCACHE_FIELDS = frozenset(
    {
        "save_decode_cache",
        "enable_blending",
        "blend_recompute_ratio",
        "blend_min_tokens",
        "blend_separator",
        "blend_add_special_in_precomp",
    }
)
_DEVICE_RE = re.compile(r"cpu|cuda(:\d+)?")


@dataclass
class LMCacheEngineConfig:
    """Configuration of a store: which tiers, how big, where.

    Fields absent (``None``/0) switch a tier off: no remote, no disk.

    Attributes:
        chunk_size: tokens per chunk.
        local_device: memory tier device (``cpu``, ``cuda``, ``cuda:N``) or
            ``file://<dir>`` for a disk tier (LMCache's spelling).
        max_local_cache_size: memory-tier budget in GB (1 GB = 1024**3 bytes).
        remote_url: remote store URL (``redis://``, ``s3://``, ...) or None.
        remote_serde: chunk encoding; only ``safetensors`` (legacy names map to it).
        pipelined_backend: use ``LMCPipelinedRemoteBackend`` for the remote tier.
        local_disk: disk tier directory (path or ``file://``), or None.
        max_local_disk_size: disk-tier budget in GB; 0 means ``max_local_cache_size``.
        remote_timeout: seconds each remote call may take.
        prefetch: hybrid only: copy matching remote chunks into local tiers at start.
    """

    chunk_size: int = 256
    local_device: str | None = "cpu"
    max_local_cache_size: float = 5.0
    # repr=False: the URL may hold a password; __repr__ shows it masked.
    remote_url: str | None = field(default=None, repr=False)
    remote_serde: str = SERDE
    pipelined_backend: bool = False
    local_disk: str | None = None
    max_local_disk_size: float = 0.0
    remote_timeout: float = 5.0
    prefetch: bool = False
    sources: dict[str, str] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        for f in _fields():
            setattr(self, f.name, _coerce(f.name, getattr(self, f.name)))
        for f in _fields():
            self.sources.setdefault(f.name, "default")

    def __repr__(self) -> str:
        """Every field as the dataclass repr shows them, credentials in URLs masked."""
        shown = ", ".join(f"{f.name}={_masked_value(getattr(self, f.name))!r}" for f in _fields())
        return f"{type(self).__name__}({shown})"

    __str__ = __repr__

    # -- constructors --------------------------------------------------------------

    @classmethod
    def from_defaults(cls, **overrides: Any) -> LMCacheEngineConfig:
        """Defaults with keyword overrides; unknown fields raise ``ConfigError``."""
        values = _check_names(overrides, "keyword")
        cfg = cls(**values)
        for name in values:
            cfg.sources[name] = "argument"
        return cfg

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> LMCacheEngineConfig:
        """Read an LMCache-style YAML file."""
        import yaml

        p = Path(path)
        try:
            raw = yaml.safe_load(p.read_text(encoding="utf-8"))
        except OSError as exc:
            raise _error("config file", f"cannot read {p}: {exc.strerror or exc}") from exc
        except yaml.YAMLError as exc:
            raise _error("config file", f"{p} is not valid YAML: {exc}") from exc
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise _error("config file", f"{p} must hold a mapping of fields")
        values = _check_names(raw, f"file {p}")
        cfg = cls(**values)
        for name in values:
            cfg.sources[name] = f"file {p}"
        return cfg

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> LMCacheEngineConfig:
        """``LMCACHE_CONFIG_FILE`` (if set), then ``LMCACHE_<FIELD>`` overrides."""
        env = os.environ if environ is None else environ
        path = env.get(CONFIG_FILE_ENV)
        cfg = cls.from_file(path) if path else cls()
        overrides: dict[str, Any] = {}
        for f in _fields():
            var = ENV_PREFIX + f.name.upper()
            if var in env:
                overrides[f.name] = env[var]
        return cfg.replace(_source="environment", **overrides)

    def replace(self, _source: str = "argument", **overrides: Any) -> LMCacheEngineConfig:
        """A copy with some fields changed (validated), remembering their source."""
        values = _check_names(overrides, "keyword")
        sources = dict(self.sources)
        new = dataclasses.replace(self, sources=sources, **values)
        for name in values:
            new.sources[name] = _source if _source != "environment" else (
                f"env {ENV_PREFIX}{name.upper()}"
            )
        return new

    # -- derived values ------------------------------------------------------------

    @property
    def local_memory_device(self) -> str | None:
        """The memory tier's device, or None when ``local_device`` names a disk."""
        if self.local_device and not self.local_device.startswith("file://"):
            return self.local_device
        return None

    @property
    def disk_path(self) -> str | None:
        """The disk tier's directory: ``local_disk``, else ``local_device=file://<dir>``."""
        src = self.local_disk
        if not src and self.local_device and self.local_device.startswith("file://"):
            src = self.local_device
        if not src:
            return None
        return src[len("file://") :] if src.startswith("file://") else src

    @property
    def memory_budget_bytes(self) -> int:
        return int(self.max_local_cache_size * GB)

    @property
    def disk_budget_bytes(self) -> int:
        size = self.max_local_disk_size if self.max_local_disk_size > 0 else self.max_local_cache_size
        return int(size * GB)

    def to_dict(self, mask_secrets: bool = True) -> dict[str, Any]:
        """Field values, URLs with credentials masked unless asked otherwise."""
        out: dict[str, Any] = {}
        for f in _fields():
            value = getattr(self, f.name)
            if mask_secrets and isinstance(value, str) and "://" in value:
                value = mask_url(value)
            out[f.name] = value
        return out


def _error(name: str, message: str) -> ConfigError:
    """A ``ConfigError`` whose text can never carry a credential (see ``mask_secrets_in``)."""
    return ConfigError(mask_secrets_in(str(name)), mask_secrets_in(message))


def _shown(value: Any, limit: int = 80) -> str:
    """``repr(value)`` for an error message: credentials masked, at most ``limit`` characters."""
    text = repr(_masked_value(value))
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _fields() -> list[dataclasses.Field[Any]]:
    return [f for f in dataclasses.fields(LMCacheEngineConfig) if f.name != "sources"]


def _field_names() -> list[str]:
    return [f.name for f in _fields()]


def _check_names(values: Mapping[str, Any], where: str) -> dict[str, Any]:
    known = set(_field_names())
    out: dict[str, Any] = {}
    for name, value in values.items():
        if name in _IGNORED_LMCACHE_FIELDS:
            logger.warning("config field %s (from %s) is not used by lmcache toolkit; ignored", name, where)
            continue
        if name not in known:
            raise _error(str(name), f"unknown field (from {where}); accepted: {', '.join(sorted(known))}")
        out[name] = value
    return out


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _coerce(name: str, value: Any) -> Any:
    """Validate one field, parsing strings (from env or YAML) into its type."""
    if name == "chunk_size":
        n = _as_int(name, value)
        if n < 1:
            raise _error(name, f"must be >= 1, got {n}")
        return n
    if name in ("max_local_cache_size", "max_local_disk_size", "remote_timeout"):
        x = _as_float(name, value)
        if x < 0 or x != x or x == float("inf"):
            raise _error(name, f"must be a finite number >= 0, got {_shown(value)}")
        if name != "remote_timeout" and x > MAX_SIZE_GB:
            # The budgets are int(x * GB) bytes: 1e300 GB overflowed to inf there, late
            # (OverflowError when a backend opened), and C code wants them in an int64.
            raise _error(name, f"must be at most {MAX_SIZE_GB:.0f} GB (4 EiB), got {_shown(value)}")
        if name == "remote_timeout" and x == 0:
            raise _error(name, "must be > 0 seconds")
        if name == "remote_timeout" and x > MAX_REMOTE_TIMEOUT_S:
            # Connectors turn it into milliseconds and socket timeouts; 1e308 overflowed there.
            raise _error(name, f"must be at most {MAX_REMOTE_TIMEOUT_S:g} seconds, got {_shown(value)}")
        return x
    if name in ("pipelined_backend", "prefetch"):
        return _as_bool(name, value)
    if name == "local_device":
        if value is None or value == "":
            return None
        if not isinstance(value, str) or not (
            _DEVICE_RE.fullmatch(value) or (value.startswith("file://") and len(value) > 7)
        ):
            raise _error(name, f"{_shown(value)} is not one of cpu, cuda, cuda:N, file://<dir>")
        if value.startswith("file://"):
            check_file_url(value, name)
        return value
    if name == "local_disk":
        if value is None or value == "":
            return None
        if not isinstance(value, str):
            raise _error(name, "must be a directory path or file://<dir>")
        if value.startswith("file://"):
            # Kept as written (disk_path strips the scheme); "file://" alone names no
            # directory: it was accepted as disk_path '' and failed late, misleadingly.
            check_file_url(value, name)
        elif "://" in value:
            raise _error(name, f"must be a local directory, got {mask_url(value)}")
        else:
            check_store_path(value, name)
        return value
    if name == "remote_url":
        if isinstance(value, str):
            # urlsplit (the registry's, the connectors') ignores surrounding whitespace,
            # so a check that did not let " s3://key:secret@bucket" through unchecked.
            value = value.strip()
        if value is None or value == "":
            return None
        if not isinstance(value, str) or "://" not in value:
            raise _error(
                name, f"must be a URL such as redis://host:6379 or s3://bucket/prefix, got {_shown(value)}"
            )
        check_remote_url(value)
        return value
    if name == "remote_serde":
        if value == "cachegen":
            raise _error(
                name, "'cachegen' is not supported (it needs LMCache's GPU codec); use 'safetensors'"
            )
        if value not in _LEGACY_SERDE:
            raise _error(name, f"{_shown(value)} is not one of safetensors (legacy: torch, safetensor)")
        if value != SERDE:
            logger.warning("remote_serde=%r is stored as safe 'safetensors' chunks instead", value)
        return SERDE
    return value


#: A day: longer than any remote call should ever wait, far below what overflows.
MAX_REMOTE_TIMEOUT_S = 86400.0
#: Bound on the size fields (GB): 4 EiB, whose byte count still fits an int64. Above
#: any real budget; "unlimited" callers pass 1e9.
MAX_SIZE_GB = float(2**32)


def _as_int(name: str, value: Any) -> int:
    if isinstance(value, bool):
        raise _error(name, f"expected an integer, got {_shown(value)}")
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().lstrip("+-").isascii():
        try:  # isdigit() alone let "+-5" and "²" through to int(), which raised its own error
            return int(value)
        except ValueError:
            pass
    raise _error(name, f"expected an integer, got {_shown(value)}")


def _as_float(name: str, value: Any) -> float:
    if isinstance(value, bool):
        raise _error(name, f"expected a number, got {_shown(value)}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise _error(name, f"expected a number (GB or seconds), got {_shown(value)}") from None


def _as_bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if type(value) is int and value in (0, 1):
        return bool(value)  # YAML's ``pipelined_backend: 1``, as "1" from the environment
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise _error(name, f"expected true or false, got {_shown(value)}")


# Names (query parameters, option keys) whose values are secrets; ``sig`` is an Azure
# SAS signature, ``pw`` a password, ``connection_string`` an Azure one (its AccountKey).
_SECRET_NAME_RE = re.compile(
    r"secret|password|passwd|passphrase|token|key|credential|signature|auth|connection_?string|conn_?str"
    r"|^sig$|^pw$|^pwd$|^sas$",
    re.I,
)
_SCHEME_RE = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://")
# A URL given as a query value (``?endpoint_url=http://u:pw@host``): its '@' is not ours.
_NESTED_URL_RE = re.compile(r"=[A-Za-z][A-Za-z0-9+.\-]*://")
# Safety nets run over a whole masked URL, whatever its parse: the userinfo of any
# ``scheme://user:pw@`` in it, and ``name=value`` pairs with a secret-looking name,
# wherever a mistyped URL put them (a query whose '?' sat inside the password).
_EMBEDDED_USERINFO_RE = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<user>[^/?#@\s:\[]*):[^/?#@\s]*@")
_PAIR_RE = re.compile(r"(?P<lead>[?&#;])(?P<name>[^=&?#;\s]*)=(?P<value>[^&#\s]*)")
# ``redis://[user:pw@]host``: a usage template, not a URL. Its password is kept when it
# is a placeholder (the text names what goes there), masked otherwise.
_TEMPLATE_RE = re.compile(r"\[(?P<userinfo>[^\[\]@/?#\s]*)@\]")
_PLACEHOLDER_RE = re.compile(r"(?i)pw|pwd|pass(word)?|passwd|secret|token|key|\*+|\.\.\.|<[^<>]*>")
#: S3 URL schemes; their netloc is a bucket name, which can hold neither ':' nor '@'.
S3_SCHEMES = ("s3", "s3a", "fsspec+s3", "fsspec+s3a")
#: Google Cloud Storage schemes (gcsfs): the same, a bucket name.
GCS_SCHEMES = ("gs", "gcs", "fsspec+gs", "fsspec+gcs")
_CREDENTIALS_GO = {
    **dict.fromkeys(
        S3_SCHEMES,
        "an S3 URL takes no user:password (it would be sent as the bucket name); give S3 "
        "credentials the usual AWS way: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
        "AWS_PROFILE or ~/.aws/credentials",
    ),
    **dict.fromkeys(
        GCS_SCHEMES,
        "a GCS URL takes no user:password (it would be sent as the bucket name); give GCS "
        "credentials the usual Google way: GOOGLE_APPLICATION_CREDENTIALS or "
        "`gcloud auth application-default login`",
    ),
}
# A mistyped URL: ``scheme:`` with fewer than two slashes (``redis:/u:pw@h``,
# ``cache:6379/0``), or a leading ``//`` (``//u:pw@h``). Its authority follows.
_TYPO_SCHEME_RE = re.compile(r"//|[A-Za-z][A-Za-z0-9+.\-]*:/{0,2}")
# The separators of the segments ``_segment_userinfo`` looks at.
_SEGMENT_SPLIT_RE = re.compile(r"(/|\s)")


def _segment_userinfo(segment: str) -> tuple[int, int] | None:
    """Where ``user:pw@`` is in a segment with no '/' or whitespace: (its first ':', its
    last '@'), or None. The password runs to the segment's last '@', as in
    ``_mask_userinfo``. Linear: a regex tried at every position took 8 s on a 64 KB word."""
    colon = segment.find(":")
    if colon < 0:
        return None
    at = segment.rfind("@")
    return (colon, at) if at > colon else None


def _mask_segment_userinfo(text: str) -> str:
    """``user:pw@`` -> ``user:***@`` in every '/'- or whitespace-separated segment."""
    parts = _SEGMENT_SPLIT_RE.split(text)
    for i, part in enumerate(parts):
        found = _segment_userinfo(part)
        if found is not None:
            colon, at = found
            parts[i] = f"{part[:colon]}:***@{part[at + 1 :]}"
    return "".join(parts)


def _has_segment_userinfo(text: str) -> bool:
    return any(_segment_userinfo(part) is not None for part in _SEGMENT_SPLIT_RE.split(text))


# An authority that reads as ``host[:port]`` (a hostname or a bracketed IP literal).
_HOSTPORT_RE = re.compile(r"(?:[A-Za-z0-9._~%\-]+|\[[0-9A-Za-z:.%]+\])(?::\d{1,5})?")


def _mask_userinfo(authority: str) -> str:
    """``user:pw@host`` -> ``user:***@host``; ``token@host`` -> ``***@host`` (last ``@`` wins)."""
    if "@" not in authority:
        return authority
    userinfo, _, hostport = authority.rpartition("@")
    user, sep, _pw = userinfo.partition(":")
    return f"{user}:***@{hostport}" if sep else f"***@{hostport}"


def _first_delimiter(text: str, start: int = 0) -> int:
    """Index of the first ``/``, ``?`` or ``#`` in ``text[start:]``, or -1."""
    found = [i for i in (text.find(c, start) for c in "/?#") if i >= 0]
    return min(found) if found else -1


def _mask_authority(text: str) -> str:
    """A URL without its ``scheme://``: the userinfo of its authority masked."""
    end = _first_delimiter(text)
    end = len(text) if end < 0 else end
    return _mask_userinfo(text[:end]) + text[end:]


def _mask_schemeless(text: str) -> str:
    """A value without ``scheme://``: its userinfo masked wherever a mistyped URL put it.

    ``admin:pw@h`` (the authority's), ``redis:/admin:pw@h`` and ``//admin:pw@h`` (after
    a mistyped scheme), ``redis//admin:pw@h`` (any segment's ``user:pw@``). A path
    given as such (``/data/u:x@y``, ``./d``) is left alone: its ``@`` is a name's.
    """
    masked = _mask_authority(text)
    if masked == text:
        typo = _TYPO_SCHEME_RE.match(text)
        if typo is not None:
            masked = text[: typo.end()] + _mask_authority(text[typo.end() :])
    if _is_explicit_path(masked):
        return masked
    return _mask_segment_userinfo(masked)


def _is_explicit_path(text: str) -> bool:
    """``/abs``, ``./rel``, ``../rel``, ``~/...``: written as a path, not a URL (``//h`` is one)."""
    return (
        text in (".", "..")
        or text.startswith(("./", "../", "~"))
        or (text.startswith("/") and not text.startswith("//"))
    )


def check_store_path(path: str, name: str = "store URL") -> None:
    """Refuse a disk-store path that is almost certainly a mistyped URL.

    ``s3:/bucket/p``, ``redis:/u:pw@h:6379/0``, ``file:/abs``, ``cache:6379`` (a
    ``scheme:`` or ``host:port`` without ``//``), ``//u:pw@h`` and ``redis//u:pw@h``
    (``user:pw@`` in a segment) were taken for relative directories and created
    under the working directory, a password in a directory name. A directory really
    named so is given as ``./NAME`` or by its absolute path, which are always accepted.

    Raises:
        ConfigError: (field ``name``) the message shows the value masked and says
            what a URL and what such a directory look like.
    """
    text = path.strip()
    if not text or _is_explicit_path(text):
        return
    shown = mask_url(text)
    typo = _TYPO_SCHEME_RE.match(text)
    if typo is not None and typo.group(0) != "//":
        scheme = typo.group(0).rstrip("/")[:-1]
        if scheme.lower() == "file":
            raise _error(
                name,
                f"{shown}: a file URL takes three slashes, file:///abs/dir (or give the directory "
                "itself: /abs/dir, ./dir)",
            )
        rest = text[typo.end() :]
        meant = mask_url(f"{scheme}://{rest}") if typo.group(0).endswith("/") else "a URL"
        raise _error(
            name,
            f"{shown} looks like {meant} mistyped, not a directory: a store URL is "
            "scheme://..., e.g. redis://host:6379/0, s3://bucket/prefix, file:///abs/dir; "
            f"a directory with ':' in its name is given as ./{shown} (or its absolute path)",
        )
    first = text[2:].split("/", 1)[0] if typo is not None else ""
    if any(c in first for c in "@:") or _has_segment_userinfo(text):
        raise _error(
            name,
            f"{shown} looks like a mistyped URL with a password in it, not a directory: a store URL "
            "is scheme://[user:pw@]host..., e.g. redis://[user:pw@]host:6379/0; a directory "
            f"named so is given as ./{shown.lstrip('/')} (or its absolute path)",
        )


def check_file_url(url: str, name: str = "store URL") -> None:
    """Refuse a ``file://`` URL that names no directory, or not the one it seems to.

    ``file://<dir>`` is LMCache's spelling, relative for ``file://local_disk/``, so
    ``file://localhost/abs`` would be the relative ``localhost/abs``, and ``file://``
    alone no directory at all; the path is then checked as ``check_store_path`` does.

    Raises:
        ConfigError: (field ``name``) saying how to write it.
    """
    path = url[len("file://") :]
    if not path:
        raise _error(name, "file:// names no directory; give file:///abs/dir, file://rel/dir or a path")
    if path == "localhost" or path.startswith("localhost/"):
        raise _error(
            name,
            f"{mask_url(url)} would be the relative directory {mask_url(path)}: give "
            f"file:///{path[len('localhost/') :]} (or ./{mask_url(path)} if that is the one meant)",
        )
    check_store_path(path, name)


def store_kind(url: str) -> str:
    """``disk``, ``memory`` or ``remote`` for a store URL (a bare path is a disk store).

    Raises:
        ConfigError: a path that is a mistyped URL (``check_store_path``): ``s3:/b``,
            ``redis:/u:pw@h``, ``file:/abs``, ``cache:6379``, ``//u:pw@h``; a
            ``file://`` URL naming no directory or ``localhost`` (``check_file_url``).
    """
    if "://" not in url:
        check_store_path(url)
        return "disk"
    scheme = urlsplit(url).scheme.lower()
    if scheme == "file":
        if not url.startswith("file://"):
            # FILE:///x: every reader of the path strips "file://" as written; the
            # rest would be the relative directory "FILE:/x".
            raise _error("store URL", f"{mask_url(url)[:200]}: write the scheme in lower case, file:///dir")
        check_file_url(url)
        return "disk"
    if scheme in ("cpu", "cuda"):
        return "memory"
    return "remote"


def check_remote_url(url: str) -> None:
    """Refuse a remote URL that would send a credential where it does not belong.

    An S3 (or GCS) URL's netloc is the bucket: ``s3://AKIA:secret@bucket`` would reach
    S3 (and its error messages) as the bucket name ``AKIA:secret@bucket``. S3
    credentials come from the usual AWS places instead (README, "Store URLs"), GCS
    ones from Google's.

    Raises:
        ConfigError: (field ``remote_url``) an ``s3://`` or ``gs://`` URL with
            ``user:pw@`` in it; the message shows the URL masked and says where
            credentials go.
    """
    scheme, sep, rest = url.partition("://")
    end = _first_delimiter(rest)
    # Both readings: the text's, and urlsplit's, which the registry and the connectors
    # use (it drops surrounding whitespace and tabs anywhere: " s3://", "s\t3://").
    readings = [(scheme, rest if end < 0 else rest[:end])] if sep else []
    try:
        parts = urlsplit(url)
        readings.append((parts.scheme, parts.netloc))
    except ValueError:
        pass  # unbalanced brackets: the connector refuses it too; the text's reading stands
    for scheme, bucket in readings:
        why = _CREDENTIALS_GO.get(scheme.strip().lower())
        # ':' too: a secret with a '/' in it (AWS secrets often have one) ends the
        # bucket early, "s3://AKIA:abc/def@bucket" has no '@' before the first '/'.
        if why is not None and ("@" in bucket or ":" in bucket):
            raise _error("remote_url", f"{mask_url(url.strip())}: {why}")


def mask_url(url: str) -> str:
    """Replace the password (and secret query values) of a URL with ``***``.

    ``redis://user:pw@host:6379/0`` -> ``redis://user:***@host:6379/0``. A value
    with no ``scheme://`` is masked the same way, its authority being the text
    before the first ``/``, ``?`` or ``#``: ``admin:pw@h:6379`` -> ``admin:***@h:6379``;
    so is a mistyped one (``redis:/admin:pw@h``, ``//admin:pw@h``, ``redis//admin:pw@h``).
    Query values named like secrets (``secret``, ``password``, ``token``, ``key``,
    ``connection_string``, ...) become ``***``, and a URL given as a query value
    (``?endpoint_url=http://u:pw@h``) is masked in turn, as are the ``name=value``
    pairs inside a value (an Azure connection string's ``;AccountKey=``), percent-encoded
    or not. A usage template such as ``redis://[user:pw@]host`` is kept. A value that
    is a JSON (or Python, YAML flow) object or list, ``client_kwargs={"aws_secret_access_key":
    "..."}``, percent-encoded or not, has the values of its secret-named members masked.
    """
    masked = _mask_url_parts(_mask_json_values(url))
    masked = _EMBEDDED_USERINFO_RE.sub(lambda m: f"{m['scheme']}{m['user']}:***@", masked)
    return _PAIR_RE.sub(_mask_pair, masked)


# ``name={...}`` / ``name=[...]``: a value written as JSON (or a Python or YAML flow
# mapping), as fsspec's dict options (``client_kwargs``, ``config_kwargs``) are given in
# a URL. Its spaces and quotes split it into several words for ``mask_secrets_in``, and
# its members are ``"name": value``, not ``name=value``: neither pass saw its secrets.
_JSON_OPEN_RE = re.compile(r"=[ \t]*(?=[\[{])")
# A member's name, quoted or bare, and its ':' (spaces around it written as such, as
# ``+`` or ``%20``, the colon perhaps as ``%3A``: a value right after them was taken
# for the whole member, and the quoted secret after a ``%20`` was left).
_JSON_MEMBER_RE = re.compile(
    r"""(?P<q>["']?)(?P<name>[A-Za-z0-9_.\-]{1,200})(?P=q)(?:[ \t+]|%20)*(?::|%3[Aa])(?:[ \t+]|%20)*"""
)
# A bare (unquoted) member value ends at one of these.
_JSON_BARE_END = frozenset(",]}&#\"' \t\r\n")
#: Characters of one JSON value scanned at most; an unclosed one is masked that far.
_MAX_JSON_CHARS = 65536


def _json_value_end(text: str, start: int, limit: int) -> int:
    """Index just after the value that starts at ``text[start]``: a quoted string, a
    bracketed object or list (quotes inside respected), or a bare token. Unclosed: ``limit``."""
    first = text[start] if start < limit else ""
    if first in ("\"", "'"):
        i = start + 1
        while i < limit:
            if text[i] == "\\":
                i += 2
                continue
            if text[i] == first:
                return i + 1
            i += 1
        return limit
    if first in ("{", "["):
        depth = 0
        quote_char = ""
        i = start
        while i < limit:
            c = text[i]
            if quote_char:
                if c == "\\":
                    i += 1
                elif c == quote_char:
                    quote_char = ""
            elif c in ("\"", "'"):
                quote_char = c
            elif c in ("{", "["):
                depth += 1
            elif c in ("}", "]"):
                depth -= 1
                if depth == 0:
                    return i + 1
            i += 1
        return limit
    i = start
    while i < limit and text[i] not in _JSON_BARE_END:
        i += 1
    return i


def _mask_json_members(text: str, start: int, end: int) -> str:
    """``text[start:end]`` with the value of every secret-named member replaced by
    ``"***"`` (a quoted or bracketed value) or ``***`` (a bare one)."""
    out: list[str] = []
    pos = start
    while pos < end:
        m = _JSON_MEMBER_RE.search(text, pos, end)
        if m is None:
            break
        if not _SECRET_NAME_RE.search(m["name"]):
            out.append(text[pos : m.end()])
            pos = m.end()
            continue
        value_end = _json_value_end(text, m.end(), end)
        out.append(text[pos : m.end()])
        if value_end > m.end():
            out.append("***" if text[m.end()] not in "\"'[{" else '"***"')
        pos = value_end
    out.append(text[pos:end])
    return "".join(out)


def _mask_json_values(text: str) -> str:
    """Every ``name={...}`` or ``name=[...]`` value in ``text`` with its secret-named
    members masked (``_mask_json_members``); the rest exactly as it was."""
    if "={" not in text and "=[" not in text and not _JSON_OPEN_RE.search(text):
        return text
    out: list[str] = []
    pos = 0
    for m in _JSON_OPEN_RE.finditer(text):
        if m.start() < pos:
            continue  # inside a value already masked
        value_end = _json_value_end(text, m.end(), min(len(text), m.end() + _MAX_JSON_CHARS))
        out.append(text[pos : m.end()])
        out.append(_mask_json_members(text, m.end(), value_end))
        pos = value_end
    out.append(text[pos:])
    return "".join(out)


def _mask_encoded_json(value: str) -> str | None:
    """A query value that is a JSON object or list, percent-encoded (``%7B%22secret%22...``)
    or not, masked (``_mask_json_values``); None when it is none."""
    decoded = value
    # Decoded whole, up to three times (a URL quoted into a URL's query), whatever it
    # starts with: a browser leaves the braces and encodes the quotes
    # (``{%22aws_secret_access_key%22:%22...%22}``), and a ``+`` or ``%20`` before a
    # value hid the quoted secret after it. parse_qsl decodes all these for the connector.
    for _ in range(3):
        step = unquote_plus(decoded)
        if step == decoded:
            break
        decoded = step
    if decoded.lstrip()[:1] not in ("{", "["):
        return None
    masked = _mask_json_values("=" + decoded)[1:]
    if masked == decoded:
        return value
    return masked if decoded == value else quote(masked, safe=":/@*")


# Pairs nested in pairs' values are masked this deep; a value nested deeper is hidden
# whole. Unbounded, ``?a=a=a=...`` recursed once per '=': a RecursionError (inside an
# error message's masking) and quadratic time.
_MAX_PAIR_DEPTH = 4


def _pair_masker(depth: int) -> Callable[[re.Match[str]], str]:
    def mask(m: re.Match[str]) -> str:
        if _SECRET_NAME_RE.search(unquote(m["name"])):
            return f"{m['lead']}{m['name']}=***"
        value = m["value"]
        json_masked = _mask_encoded_json(value)
        if json_masked is not None:
            return f"{m['lead']}{m['name']}={json_masked}"
        if "=" not in value:
            return m.group(0)
        if depth >= _MAX_PAIR_DEPTH:
            return f"{m['lead']}{m['name']}=***"  # too deep to judge: never shown
        # The value may hold pairs of its own (``DefaultEndpointsProtocol=https;AccountKey=...``,
        # ``opts=password=x``): masked in turn.
        return f"{m['lead']}{m['name']}={_mask_pairs(value, depth + 1)}"

    return mask


_PAIR_MASKERS = [_pair_masker(depth) for depth in range(_MAX_PAIR_DEPTH + 1)]
_mask_pair = _PAIR_MASKERS[0]


def _mask_pairs(text: str, depth: int = 1) -> str:
    """Every ``name=value`` pair in ``text`` with a secret-looking name masked, the first
    one too (it has no ``?``, ``&``, ``#`` or ``;`` before it)."""
    if "=" not in text:
        return text
    return _PAIR_RE.sub(_PAIR_MASKERS[min(depth, _MAX_PAIR_DEPTH)], ";" + text)[1:]


def _mask_url_parts(url: str) -> str:
    if "://" not in url:
        return _mask_schemeless(url)
    scheme, _, rest = url.partition("://")
    template = _TEMPLATE_RE.match(rest)
    if template:
        user, sep, pw = template["userinfo"].partition(":")
        kept = template.group(0) if _PLACEHOLDER_RE.fullmatch(pw if sep else user) else (
            f"[{user}:***@]" if sep else "[***@]"
        )
        tail = _mask_url_parts(f"{scheme}://{rest[template.end() :]}")
        return f"{scheme}://{kept}{tail[len(scheme) + 3 :]}"
    # The '@' that may end a userinfo lies before any URL given as a query value.
    delimiter = _first_delimiter(rest)
    nested = _NESTED_URL_RE.search(rest, delimiter) if delimiter >= 0 else None
    at = rest.rfind("@", 0, nested.start() if nested else len(rest))
    head = rest[:at] if at > 0 else ""
    if ":" in head and any(c in head for c in "/?#") and not _at_in_query_value(rest, delimiter, at):
        # A password with an unencoded '/', '?' or '#' (a mistyped URL, just the kind
        # that gets printed): urlsplit would take part of it for the path, query or
        # fragment and print it. Mask everything up to that '@' instead; what follows
        # may have lost its '?' to the password, which the pair pass in mask_url covers.
        user = head.split(":", 1)[0]
        tail = _mask_url_parts(f"{scheme}://{rest[at + 1 :]}")
        return f"{scheme}://{user}:***@{tail[len(scheme) + 3 :]}"
    try:
        parts = urlsplit(url)
    except ValueError:
        # Unbalanced '[' or ']' (in a password, say): mask the authority as text and
        # keep the rest readable, rather than losing the whole message around it.
        return f"{scheme}://{_mask_authority(rest)}"
    netloc = _mask_userinfo(parts.netloc)
    query = parts.query
    if query:
        pairs = []
        for item in query.split("&"):
            k, eq, v = item.partition("=")
            if eq and _SECRET_NAME_RE.search(unquote(k)):
                v = "***"
            elif eq:
                v = _mask_query_value(v)
            else:
                k = _mask_query_value(k)  # "password%3Dx": a pair with its '=' encoded
            pairs.append(f"{k}{eq}{v}")
        query = "&".join(pairs)
    out = urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
    if not netloc and not out.startswith(f"{parts.scheme}://"):
        out = f"{parts.scheme}://{out[len(parts.scheme) + 1 :]}"  # unix:///path stays unix:///path
    return out


def _at_in_query_value(rest: str, delimiter: int, at: int) -> bool:
    """Whether the ``@`` at ``at`` (after the authority's end, ``delimiter``) lies in a
    query value (``cache:6379/0?client_name=svc@prod``) rather than ending a password
    with an unencoded ``/``, ``?`` or ``#`` in it (``user:pa/ss@host``).

    Either reading fits the text. The query's is taken only when the ``@`` is inside a
    ``name=value`` pair after a ``?`` and the authority reads as ``[userinfo@]host[:port]``,
    a port being 1-5 digits (``user:pa`` does not read so). Anything else stays masked
    as a password: a wrong host shown, but no secret (``host:notaport/0?a=b@c`` shows as
    ``host:***@c``). Taken for a query, a password would show only if it began with 1-5
    digits (``user:123/x?a=b@host``), or held an ``@`` (``user:p@ss/x?a=b@host``), and
    then a ``/``, ``?`` or ``#`` and a ``?name=`` before its last ``@``: not passwords
    anyone types, where a ``client_name=svc@prod`` is an everyday query.
    """
    query = rest.find("?", delimiter)
    if query < 0 or query > at:
        return False
    pair_start = max(rest.rfind("&", query, at), query) + 1
    if "=" not in rest[pair_start:at]:
        return False
    return _HOSTPORT_RE.fullmatch(rest[:delimiter].rpartition("@")[2]) is not None


# URLs nested in query values are masked this deep; deeper ones are hidden whole.
# Unbounded, ``?a=http://h?a=http://h?...`` recursed once per level: a RecursionError
# (inside an error message's masking).
_MAX_URL_NESTING = 4
_nesting = threading.local()


def _mask_query_value(value: str) -> str:
    """A query value that is itself a URL (``endpoint_url=http://u:pw@h``) or holds
    secret pairs (an Azure connection string's ``AccountKey=``), masked; percent-encoded
    ones too (``http%3A%2F%2Fu%3Apw%40h``, ``AccountKey%3D...``), shown decoded once masked."""
    depth = getattr(_nesting, "depth", 0)
    if depth >= _MAX_URL_NESTING:
        return "***"  # too deep to judge: never shown
    _nesting.depth = depth + 1
    try:
        return _mask_query_value_at_depth(value)
    finally:
        _nesting.depth = depth


def _mask_query_value_at_depth(value: str) -> str:
    json_masked = _mask_encoded_json(value)
    if json_masked is not None:
        # Masked whole: its words, split at the quotes, are no URLs to mask_secrets_in.
        return mask_secrets_in(json_masked)
    masked = mask_secrets_in(value)
    decoded = unquote(value)
    if decoded != value and ("@" in decoded or "?" in decoded or "=" in decoded):
        masked_decoded = _mask_pairs(mask_secrets_in(decoded))
        if masked_decoded != decoded:
            return quote(masked_decoded, safe=":/@*")
    return masked


# A run of text that may be a URL or a schemeless ``user:pw@host``: no spaces or quotes.
_WORD_RE = re.compile(r"[^\s'\"`]+")
# A chunk key, ``fmt@model@world_size@worker_id@hash`` (maybe after a Redis prefix):
# its '@'s separate fields, and a model name may hold a ':'.
_KEY_RE = re.compile(rf"(?:{'|'.join(FORMATS)})@[^@]*@\d+@\d+@[0-9a-f]{{1,128}}$")
_KEY_STARTS = tuple(f"{fmt}@" for fmt in FORMATS)
_OPENERS = {")": "(", "]": "[", "}": "{", ">": "<"}


def _split_trailing(word: str) -> tuple[str, str]:
    """``word`` less the punctuation that ends a sentence or a clause after it
    (``...&secret=x: list:``, ``(redis://h?token=x)``): that is the message's, not the URL's.

    A secret ending in one of these characters shows that one character; that is
    the price of keeping ``URL: reason`` readable.
    """
    end = len(word)
    while end > 0:
        c = word[end - 1]
        if c in ".,;:!" or (c in _OPENERS and word.count(_OPENERS[c], 0, end) < word.count(c, 0, end)):
            end -= 1
        else:
            break
    return word[:end], word[end:]


def _mask_word(word: str) -> str:
    if "@" not in word and "?" not in word:
        return word  # nothing to mask: file:///x, cpu:// and prose stay exactly as written
    m = _SCHEME_RE.search(word)  # a URL may follow punctuation: "[redis://...", "(s3://..."
    if m is not None:
        url, trailing = _split_trailing(word[m.start() :])
        return word[: m.start()] + mask_url(url) + trailing
    # No scheme: only ``user:pw@host`` (botocore quotes an S3 bucket so) is a credential;
    # a chunk key (``vllm@model:tag@1@0@hash``, or a mistyped one) and ``name@host`` are not.
    core, trailing = _split_trailing(word)
    bare = core.strip("()[]{}<>'\"")  # a key quoted or in brackets: "(vllm@qwen2:7b@1@0@ab)"
    key = _KEY_RE.search(bare)
    if (key is not None and "@" not in bare[: key.start()]) or bare.startswith(_KEY_STARTS):
        return word
    authority_end = _first_delimiter(core)
    authority = core if authority_end < 0 else core[:authority_end]
    if ":" in authority.rpartition("@")[0] or _TYPO_SCHEME_RE.match(core):
        # user:pw@host, or a URL with a mistyped scheme: redis:/u:pw@h, cache:6379/0?password=x
        masked = mask_url(core)
    else:
        # name@host stays (a mail address, a token-less '@'); redis//u:pw@h and x?token=t do not.
        masked = core if _is_explicit_path(core) else _mask_segment_userinfo(core)
        if "?" in masked:
            masked = _PAIR_RE.sub(_mask_pair, masked)
    return word if masked == core else masked + trailing


def mask_secrets_in(text: str) -> str:
    """``text`` with every URL-like word that holds a credential masked (``mask_url``).

    Words are runs without spaces or quotes. One with a ``scheme://`` and userinfo
    (``@``) or a query (``?``) is masked from its scheme on; one without a scheme
    when it has ``user:pw@`` (``admin:pw@h:6379``, ``AKIA:secret@bucket``, in any
    segment unless it is written as a path: ``redis//u:pw@h``), a mistyped scheme
    (``redis:/u:pw@h``, ``//u:pw@h``) or secret query pairs (``h:1/0?password=x``).
    Punctuation after a word (``URL: reason``) and everything else is left exactly
    as it was. A ``name={...}`` value written as JSON has its secret-named members
    masked first (``_mask_json_values``): its quotes and spaces would split it into words.
    """
    return _WORD_RE.sub(lambda m: _mask_word(m.group(0)), _mask_json_values(text))


def _masked_value(value: Any) -> Any:
    """``value`` with credentials masked, for reprs and messages.

    Strings holding userinfo or a query go through ``mask_url``; in mappings the
    value of a secret-looking key (password, secret, token, key, ...) becomes
    ``***``; lists, tuples and sets are masked item by item.
    """
    if isinstance(value, str):
        return mask_url(value) if ("@" in value or "?" in value) else value
    if isinstance(value, Mapping):
        return {
            k: "***" if isinstance(k, str) and _SECRET_NAME_RE.search(k) and v is not None else _masked_value(v)
            for k, v in value.items()
        }
    if isinstance(value, (list, tuple, set, frozenset)):
        return type(value)(_masked_value(v) for v in value)
    return value


@dataclass
class LMCacheEngineMetadata:
    """Who is caching: model, parallelism, KV layout. Immutable by convention.

    ``kv_shape`` is a full chunk's shape, ``(num_layers, 2, chunk_size, heads, head_size)``
    for fmt ``vllm``; ``kv_dtype`` a ``torch.dtype``.
    """

    model_name: str
    world_size: int = 1
    worker_id: int = 0
    fmt: str = "vllm"
    kv_dtype: Any = None
    kv_shape: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        from lmcache_core.key import FORMATS, MAX_WORLD_SIZE, CacheEngineKey

        if self.fmt not in FORMATS:
            raise _error("fmt", f"{_shown(self.fmt)} is not one of {', '.join(FORMATS)}")
        # Checked here, not first when a key is made: a world_size of "2" (from YAML or
        # an environment variable) matched no stored key's int 2, so a hybrid's prefetch
        # of this rank's chunks found none; 0 or a worker_id outside it failed only later.
        self.world_size = _as_int("world_size", self.world_size)
        if not 1 <= self.world_size < MAX_WORLD_SIZE:
            raise _error("world_size", f"must be in [1, {MAX_WORLD_SIZE}), got {_shown(self.world_size)}")
        self.worker_id = _as_int("worker_id", self.worker_id)
        if not 0 <= self.worker_id < self.world_size:
            raise _error("worker_id", f"must be in [0, world_size={self.world_size}), got {self.worker_id}")
        try:
            CacheEngineKey(self.fmt, self.model_name, self.world_size, self.worker_id, "0" * 64)
        except ValueError as exc:  # the model name's own rules (empty, '@', control characters)
            raise _error("model_name", str(exc).removeprefix("model_name: ")) from None
        if self.kv_shape is not None:
            self.kv_shape = tuple(int(d) for d in self.kv_shape)


@dataclass
class LMCacheMemPoolMetadata:
    """Shape and dtype of a full chunk and the memory budget (GB), for slot pools."""

    kv_shape: tuple[int, ...]
    kv_dtype: Any
    max_local_cache_size: float = 5.0

    def __post_init__(self) -> None:
        self.kv_shape = tuple(int(d) for d in self.kv_shape)
