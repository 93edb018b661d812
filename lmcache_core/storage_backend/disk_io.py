"""The disk tier's file I/O: open, write, fsync, replace, read, unlink (and rename away).

Every byte the disk tier moves goes through these few functions, so a test can
install a fault hook (``fault_hook``) and make any of them fail with EIO,
ENOSPC, ... exactly where a real disk would. With no hook installed each
function is the plain ``os``/``open`` call behind one ``is None`` test, and the
file objects handed out are the builtin ones, so the hot paths pay nothing.

The hook is process-global (it models the disk, which is shared too); install
it only from tests. Thread-safe.
"""

from __future__ import annotations

import errno as _errno
import os
import stat
import threading
from contextlib import contextmanager
from typing import Any, BinaryIO, Callable, Iterator

# A hook gets (operation, path) and raises OSError to fail that operation.
FaultHook = Callable[[str, str], None]
OPS = ("open", "write", "fsync", "replace", "read", "unlink")

_hook: FaultHook | None = None
_hook_lock = threading.Lock()


def set_fault_hook(hook: FaultHook | None) -> FaultHook | None:
    """Install ``hook`` (None removes it); returns the previous one."""
    global _hook
    with _hook_lock:
        previous, _hook = _hook, hook
    return previous


@contextmanager
def fault_hook(hook: FaultHook) -> Iterator[None]:
    """Install ``hook`` for the duration of a ``with`` block."""
    previous = set_fault_hook(hook)
    try:
        yield
    finally:
        set_fault_hook(previous)


class Fault:
    """A ready-made hook: fail ``op`` with ``errno`` on matching paths.

    Args:
        op: one of ``OPS``.
        err: the errno to raise (``errno.EIO``, ``errno.ENOSPC``, ...).
        after: let this many matching calls succeed first.
        times: fail at most this many calls (None: every one after ``after``).
        path_contains: only paths containing this text match.

    ``calls`` and ``failures`` count matching calls and injected failures.
    """

    def __init__(
        self,
        op: str,
        err: int = _errno.EIO,
        *,
        after: int = 0,
        times: int | None = None,
        path_contains: str = "",
    ) -> None:
        if op not in OPS:
            raise ValueError(f"op: {op!r} is not one of {', '.join(OPS)}")
        self.op, self.err, self.after, self.times = op, err, after, times
        self.path_contains = path_contains
        self.calls = 0
        self.failures = 0
        self._lock = threading.Lock()

    def __call__(self, op: str, path: str) -> None:
        if op != self.op or self.path_contains not in path:
            return
        with self._lock:
            self.calls += 1
            if self.calls <= self.after or (self.times is not None and self.failures >= self.times):
                return
            self.failures += 1
        raise OSError(self.err, f"injected {os.strerror(self.err)} on {op}", path)


class _FaultyFile:
    """A file whose write/read/readinto/preadinto consult the hook first (tests only).

    A failing write first writes half its bytes, as a real disk that fills up
    mid-write does, so callers are tested against torn temp files.
    """

    def __init__(self, f: Any, path: str) -> None:
        self._f = f
        self._path = path

    def write(self, data: Any) -> int | None:
        hook = _hook
        if hook is not None:
            try:
                hook("write", self._path)
            except OSError:
                view = memoryview(data).cast("B")
                self._f.write(view[: len(view) // 2])
                raise
        return self._f.write(data)  # type: ignore[no-any-return]

    def read(self, n: int = -1) -> bytes:
        hook = _hook
        if hook is not None:
            hook("read", self._path)
        return self._f.read(n)  # type: ignore[no-any-return]

    def readinto(self, buf: Any) -> int | None:
        hook = _hook
        if hook is not None:
            hook("read", self._path)
        return self._f.readinto(buf)  # type: ignore[no-any-return]

    def preadinto(self, buf: Any, offset: int) -> int:
        """``os.preadv`` at ``offset`` (the positional read the chunk reader uses on plain files)."""
        hook = _hook
        if hook is not None:
            hook("read", self._path)
        return os.preadv(self._f.fileno(), [buf], offset)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)

    def __enter__(self) -> _FaultyFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self._f.close()


#: errnos that mean "no room" for a write: a full disk, or a quota (EDQUOT: XFS project
#: quotas, per-user quotas on shared disks), a full store to the caller, not an I/O error.
FULL_ERRNOS = frozenset(e for e in (_errno.ENOSPC, getattr(_errno, "EDQUOT", None)) if e is not None)


def open_write(path: str, *, make_dir: bool = False) -> BinaryIO:
    """A new unbuffered file for writing (``wb``, buffering=0).

    ``make_dir``: make ``path``'s directory first, and once more if it went before the
    open (an operator's ``find -empty -delete``, or ``rm -rf`` of a store in use).
    """
    if make_dir:
        parent = os.path.dirname(path)
        os.makedirs(parent, exist_ok=True)
        try:
            return open_write(path)
        except FileNotFoundError:
            os.makedirs(parent, exist_ok=True)
    hook = _hook
    if hook is None:
        return open(path, "wb", buffering=0)
    hook("open", path)
    return _FaultyFile(open(path, "wb", buffering=0), path)  # type: ignore[return-value]


def open_read(path: str) -> BinaryIO:
    """An unbuffered file for reading (``rb``, buffering=0); only regular files open.

    Raises:
        OSError: ``EINVAL`` for a FIFO, device or socket at ``path``.
    """
    hook = _hook
    if hook is not None:
        hook("open", path)
    # The file object owns the descriptor from the start: with a bare fd wrapped later,
    # an interrupt just after open(fd) returned dropped the object (closing the fd) and
    # the clean-up closed it again (EBADF in place of the KeyboardInterrupt, or another
    # thread's newly opened file closed under it).
    f = open(path, "rb", buffering=0, opener=_open_nonblocking)
    try:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise OSError(_errno.EINVAL, "not a regular file", path)
    except BaseException:
        f.close()
        raise
    return f if hook is None else _FaultyFile(f, path)  # type: ignore[return-value]


def _open_nonblocking(path: str, flags: int) -> int:
    # O_NONBLOCK: a FIFO planted at a chunk path would otherwise block open() forever
    # (a hung get). It changes nothing for regular files.
    return os.open(path, flags | os.O_NONBLOCK)


def fsync(f: Any, path: str) -> None:
    """``os.fsync`` of an open file."""
    hook = _hook
    if hook is not None:
        hook("fsync", path)
    os.fsync(f.fileno())


def replace(src: str, dst: str) -> None:
    """``os.replace`` (atomic rename within one filesystem)."""
    hook = _hook
    if hook is not None:
        hook("replace", dst)
    os.replace(src, dst)


def rename_away(path: str, aside: str) -> None:
    """``os.rename(path, aside)``: takes whatever file is at ``path`` now out of sight, so
    that it can be looked at before it is deleted. To the hook it is the removal of
    ``path`` (op ``unlink``), which is what it is for the chunk path."""
    hook = _hook
    if hook is not None:
        hook("unlink", path)
    os.rename(path, aside)


def unlink(path: str) -> None:
    """``os.unlink``."""
    hook = _hook
    if hook is not None:
        hook("unlink", path)
    os.unlink(path)
