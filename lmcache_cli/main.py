"""Entry point of the `lmcache` command; composes the command modules."""

from __future__ import annotations

import typer

from lmcache_core import __version__

app = typer.Typer(
    name="lmcache",
    help="Put, get, list, inspect, warm, evict, verify and benchmark KV-cache chunks.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"lmcache {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """lmcache: KV-cache chunk store tool."""


def main() -> None:
    app()
