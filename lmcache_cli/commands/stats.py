"""`lmcache stats`: chunks and bytes in total, per model and per fmt."""

from __future__ import annotations

import typer

from lmcache_cli.output import Column
from lmcache_cli.state import FormatOption, get_state
from lmcache_cli.units import human_size, human_time


def stats(ctx: typer.Context, format_: FormatOption = None) -> None:
    """Count chunks and bytes, in total and per model and KV layout."""
    from lmcache_core import store_ops  # lazily: keeps `lmcache --help` fast

    state = get_state(ctx)
    out = state.output(format_)
    with state.open_store(must_exist=True) as store:
        report = store_ops.store_stats(store.entries())
        report["store"] = store.describe()
        if store.is_disk:
            temps = store.temp_files()
            report["temp_files"] = len(temps)
            report["temp_bytes"] = sum(t.size for t in temps)
    if out.json:
        out.data(report)
        return
    pairs = [
        ("store", report["store"]),
        ("chunks", report["chunks"]),
        ("bytes", f"{human_size(report['bytes'])} ({report['bytes']} B)"),
        ("oldest", human_time(report["oldest"])),
        ("newest", human_time(report["newest"])),
    ]
    if "temp_files" in report:
        pairs.append(("temp files", f"{report['temp_files']} ({human_size(report['temp_bytes'])})"))
    out.fields(pairs)
    for title, group in (("MODEL", report["models"]), ("FMT", report["fmts"])):
        if group:
            out.line()
            out.table(
                [Column(title), Column("CHUNKS", right=True), Column("SIZE", right=True)],
                [[g["name"], g["chunks"], human_size(g["bytes"])] for g in group],
            )
