"""One table from exception type to a one-line message, and the group that applies it.

Every failure reaches the user as ``error: <what failed>; <what to do>`` on stderr
with exit code 1 (2 for usage errors). ``LMCACHE_DEBUG=1`` re-raises instead,
so the full traceback shows (without local variables, which may hold credentials).
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, Any, Callable

import typer
from typer.core import TyperGroup

from lmcache_cli.output import mask_secrets
from lmcache_core.errors import (
    ConfigError,
    CorruptChunkError,
    StoreDeniedError,
    StoreFullError,
    StoreUnavailableError,
)

if TYPE_CHECKING:
    from lmcache_core.store_ops import ChunkCheck

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report a command stopped by Ctrl-C


def end_interrupted(message: str = "error: interrupted\n") -> None:
    """Write ``message`` to stderr and end the process at once with ``EXIT_INTERRUPTED``
    (the last word of a Ctrl-C whose KeyboardInterrupt did not end it in time).
    Store warnings still held (``log_lines``) come first: they say why it hung."""
    try:
        try:
            from lmcache_cli.log_lines import release_store_warnings

            release_store_warnings(last=True)
        except BaseException:  # the process ends here whatever happens
            pass
        os.write(2, message.encode())
    finally:
        os._exit(EXIT_INTERRUPTED)


class CliError(Exception):
    """A failure the command diagnosed itself; ``message`` is the line to print."""

    def __init__(self, message: str, code: int = EXIT_FAILURE) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


def usage_error(message: str) -> CliError:
    """A bad argument or option combination (exit 2)."""
    return CliError(message, EXIT_USAGE)


def unusable_chunk(key: object, check: ChunkCheck, where: str) -> CliError:
    """The error for a chunk that cannot be shown or written: missing, unreadable or corrupt."""
    from lmcache_core import store_ops

    if check.status == store_ops.MISSING:
        return CliError(f"{key}: not in {where}; list keys with `lmcache ls`")
    if check.status == store_ops.UNVERIFIED:  # not the chunk's fault: never suggest removing it
        return CliError(f"{key}: {check.reason}; check the store and retry")
    return CliError(f"{key}: {check.reason}; remove it with `lmcache verify --fix`")


def _filename(exc: OSError) -> str:
    return f" {exc.filename}" if exc.filename else ""


def _io_error(exc: OSError) -> str:
    where = f" {exc.filename}:" if exc.filename else ""  # (a failed write names no file)
    return f"I/O error:{where} {exc.strerror or exc}; check the disk and the path"


# Checked in order: the first matching type wins, so subclasses come first.
ERROR_TABLE: list[tuple[type[BaseException], Callable[[Any], str]]] = [
    (CliError, lambda e: e.message),
    (ConfigError, lambda e: f"configuration: {e}; fix the store URL, config file or LMCACHE_* variable (see `lmcache config`)"),
    (CorruptChunkError, lambda e: f"corrupt chunk: {e}; run `lmcache verify --fix` to remove bad chunks"),
    (StoreDeniedError, lambda e: f"access denied: {e}; check the credentials in the URL and the user's rights"),
    (StoreUnavailableError, lambda e: f"store unavailable: {e}; check the URL and that the server is up"),
    (StoreFullError, lambda e: f"store full: {e}; free space with `lmcache evict --to-size SIZE`"),
    (ModuleNotFoundError, lambda e: f"missing Python package {e.name!r}; install it (pip install 'lmcache-toolkit[remote]' for redis/s3)"),
    (ImportError, lambda e: f"{e}"),
    (FileNotFoundError, lambda e: f"no such file or directory:{_filename(e)}; check the path"),
    (PermissionError, lambda e: f"permission denied:{_filename(e)}; check ownership or choose another --store"),
    (IsADirectoryError, lambda e: f"is a directory:{_filename(e)}; give a file path"),
    (NotADirectoryError, lambda e: f"not a directory:{_filename(e)}; a disk store is a directory, check the path"),
    (ConnectionError, lambda e: f"connection failed: {e}; check the URL and that the server is up"),
    (TimeoutError, lambda e: f"timed out: {e}; check the server, or raise remote_timeout"),
    (OSError, _io_error),
    (ValueError, lambda e: f"{e}"),
    (TypeError, lambda e: f"{e}"),
    (NotImplementedError, lambda e: f"not supported by this store: {e}"),
]


def one_line(text: str) -> str:
    """``text`` with its line breaks (and the indentation after them) folded into spaces."""
    return " ".join(part.strip() for part in text.splitlines() if part.strip())


def describe_error(exc: BaseException) -> tuple[str, int]:
    """The one-line message and exit code for an exception."""
    for etype, render in ERROR_TABLE:
        if isinstance(exc, etype):
            code = exc.code if isinstance(exc, CliError) else EXIT_FAILURE
            return one_line(mask_secrets(render(exc))), code
    return (
        one_line(mask_secrets(f"unexpected {type(exc).__name__}: {exc} (rerun with LMCACHE_DEBUG=1 for a traceback)")),
        EXIT_FAILURE,
    )


def debug_enabled() -> bool:
    return os.environ.get("LMCACHE_DEBUG", "").strip() not in ("", "0", "false", "no")


def _discard_stdout() -> None:
    """Point stdout at /dev/null so the final flush at exit cannot fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass  # not a real file (CliRunner): nothing will flush it at exit


def _framework_kind(exc: BaseException) -> str | None:
    """``control`` (exit/abort), ``usage`` or ``other`` for Typer's (or click's) own
    exceptions, None for everything else. Duck-typed: Typer >= 0.16 vendors click,
    older Typer uses click itself, and the classes differ."""
    module = type(exc).__module__
    if not module.startswith(("typer", "click")):
        return None
    if type(exc).__name__ in ("Exit", "Abort"):
        return "control"
    if hasattr(exc, "format_message") and getattr(exc, "exit_code", None) == EXIT_USAGE:
        return "usage"
    return "other"


def _usage_exit(exc: Any, path: str) -> typer.Exit:
    """Print a usage error as one line; the ``Exit`` (code 2) to raise."""
    exc_ctx = getattr(exc, "ctx", None)
    if exc_ctx is not None:
        path = exc_ctx.command_path
    message = one_line(mask_secrets(exc.format_message()))
    sys.stderr.write(f"error: {message} (see `{path} --help`)\n")
    return typer.Exit(EXIT_USAGE)


class ErrorReportingGroup(TyperGroup):
    """Runs a command and turns any exception into one ``error:`` line and an exit code."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        # The root's own options (``lmcache --format xml ls``) are parsed here, before
        # ``invoke``: without this, click prints its multi-line usage block.
        try:
            return super().parse_args(ctx, args)
        except Exception as exc:
            if _framework_kind(exc) != "usage" or type(exc).__name__ == "NoArgsIsHelpError":
                raise  # bare `lmcache` prints the help, as before
            raise _usage_exit(exc, ctx.command_path) from None

    def invoke(self, ctx: Any) -> Any:
        from lmcache_cli.log_lines import release_store_warnings

        try:
            return self._invoke_reporting(ctx)
        finally:
            # Store warnings held while the command ran and not said by an error line
            # (see log_lines): after a success, an exit or an interrupt, all of them;
            # later ones (threads still running, the exit drain) print as they come.
            release_store_warnings(last=True)

    def _invoke_reporting(self, ctx: Any) -> Any:
        from lmcache_cli.log_lines import release_store_warnings

        try:
            result = super().invoke(ctx)
            sys.stdout.flush()  # a closed pipe must surface here, not at interpreter exit
            return result
        except KeyboardInterrupt:
            # Exit 130 whatever Typer does with it (0.12 prints "Aborted!" and exits 1);
            # main() then ends the process without joining worker threads.
            raise typer.Exit(EXIT_INTERRUPTED) from None
        except BrokenPipeError:
            # `lmcache ls | head`: the reader is gone; stop quietly, as other tools do.
            _discard_stdout()
            raise typer.Exit(EXIT_FAILURE) from None
        except Exception as exc:
            kind = _framework_kind(exc)
            if kind in ("control", "other"):
                raise
            if kind == "usage":
                raise _usage_exit(exc, ctx.command_path) from None
            if debug_enabled():
                raise
            message, code = describe_error(exc)
            release_store_warnings(message)  # those this line does not say come first
            sys.stderr.write(f"error: {message}\n")
            raise typer.Exit(code) from None
