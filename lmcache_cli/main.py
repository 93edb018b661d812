"""Entry point of the `lmcache` command: root options, then the commands, one module each."""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Annotated, Any

import typer

from lmcache_cli.commands import bench, config, evict, get, lookup, ls, put, show, stats, verify, warm
from lmcache_cli.errors import EXIT_INTERRUPTED, ErrorReportingGroup, end_interrupted
from lmcache_cli.log_lines import install_log_handler
from lmcache_cli.output import OutputFormat
from lmcache_cli.state import STORE_ENV, CliState, check_exclusive
from lmcache_core import __version__

app = typer.Typer(
    name="lmcache",
    cls=ErrorReportingGroup,
    help="Put, get, list, inspect, warm, evict, verify and benchmark KV-cache chunks.",
    no_args_is_help=True,
    # Locals in a traceback may hold credentials (URLs, passwords): never print them.
    pretty_exceptions_show_locals=False,
    add_completion=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"lmcache {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    ctx: typer.Context,
    store: Annotated[
        str | None,
        typer.Option(
            "--store",
            metavar="URL",
            help=f"Store: a directory, file://, cpu://, redis://, s3://... (env {STORE_ENV}) "
            "[default: $XDG_CACHE_HOME/lmcache].",
            show_default=False,
        ),
    ] = None,
    config_file: Annotated[
        str | None,
        typer.Option(
            "--config",
            metavar="FILE",
            help="LMCache YAML describing a tiered store (env LMCACHE_CONFIG_FILE).",
            show_default=False,
        ),
    ] = None,
    format_: Annotated[
        OutputFormat, typer.Option("--format", metavar="human|json", help="human (tables) or json (for scripts); commands take it too.")
    ] = OutputFormat.human,
    quiet: Annotated[bool, typer.Option("--quiet", help="No messages or progress on stderr.")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """lmcache: look inside, move and measure KV-cache chunk stores."""
    check_exclusive(store, config_file)
    ctx.obj = CliState(store_option=store, config_option=config_file, fmt=format_, quiet=quiet)


for _module, _name in (
    (put, "put"), (get, "get"), (ls, "ls"), (show, "show"), (lookup, "lookup"), (warm, "warm"),
    (evict, "evict"), (verify, "verify"), (stats, "stats"), (bench, "bench"), (config, "config"),
):
    app.command(_name)(getattr(_module, _name))


#: After Ctrl-C the process ends within this many seconds even if the KeyboardInterrupt
#: was lost: torch, importing NumPy from C, swallows an exception raised in that import
#: (it warns "Failed to initialize NumPy" and goes on), and a warm caught there ran to
#: its end, with NumPy unusable. The command's own unwinding (``finally`` blocks) has
#: this long; then the process ends as ``main`` would have ended it.
INTERRUPT_GRACE_S = 2.0


def _on_sigint(signum: int, frame: Any) -> None:
    timer = threading.Timer(INTERRUPT_GRACE_S, end_interrupted)
    timer.daemon = True
    timer.start()
    raise KeyboardInterrupt


def install_interrupt_handler() -> None:
    """Ctrl-C raises KeyboardInterrupt, and ends the process ``INTERRUPT_GRACE_S`` later
    whatever became of it. Left alone where SIGINT is ignored or handled already."""
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _on_sigint)


def main() -> None:
    """Console-script entry point.

    On Ctrl-C the command's own thread has unwound (its ``finally`` blocks ran:
    bench removed what it wrote); worker threads may still wait on a remote that
    does not answer, and the interpreter would join them, each up to its timeout
    (warm to a blackholed Redis exited 10 s after Ctrl-C). What they abandon is
    safe (disk writes are temp files renamed into place, Redis writes staged),
    so the process ends now.
    """
    install_interrupt_handler()
    install_log_handler()
    try:
        app()
    except SystemExit as exc:
        if exc.code != EXIT_INTERRUPTED:
            raise
        sys.stderr.write("error: interrupted\n")
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(EXIT_INTERRUPTED)
