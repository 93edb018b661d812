"""`lmcache verify`: read every chunk, check header and checksum; find stray temp files."""

from __future__ import annotations

from typing import Annotated

import typer

from lmcache_cli.output import Column
from lmcache_cli.progress import progress_bar
from lmcache_cli.state import FormatOption, get_state
from lmcache_cli.units import human_size, plural


def verify(
    ctx: typer.Context,
    fix: Annotated[
        bool,
        typer.Option("--fix", help="Remove chunks that failed their checksum and stale temp files (nothing else)."),
    ] = False,
    jobs: Annotated[int, typer.Option("--jobs", "-j", metavar="N", min=1, max=64, help="Chunks checked in parallel.")] = 4,
    format_: FormatOption = None,
) -> None:
    """Check every chunk's header and checksum; find stray temp files.

    Exit code 1 when something bad remains (after --fix, when given), or when a
    chunk could not be read (a remote timeout): such chunks are reported as
    unverified and never removed. Files named like chunks outside the store's
    layout (model weights, say) are listed as foreign and left alone.

    \b
    Examples:
      lmcache verify
      lmcache verify --fix
    """
    from lmcache_core import store_ops  # lazily: keeps `lmcache --help` fast

    state = get_state(ctx)
    out = state.output(format_)
    with state.open_store(must_exist=True) as store:
        # A config-described store is verified tier by tier (store_ops opens each);
        # listing it here would open every tier at once just for a progress total.
        entries = store.entries() if store.kind != "tiered" else []
        total = sum(e.size or 0 for e in entries)
        with progress_bar(out, "verify", total or None, len(entries)) as bar:
            last = [0]

            def advance(done: int, nbytes: int) -> None:
                bar.advance(1, nbytes - last[0])
                last[0] = nbytes

            report = store_ops.verify_store(store, fix=fix, jobs=jobs, progress=advance)
        where = store.describe()
    left = report.remaining_problems
    if out.json:
        out.data({"store": where, **report.to_dict()})
    else:
        removed = set(report.removed)
        states = dict.fromkeys(report.left_alone, "changed, left alone") | dict.fromkeys(removed, "removed")
        rows = [[b.where, b.reason, states.get(b.where, "bad")] for b in report.bad]
        rows += [[u.where, u.reason, "unverified"] for u in report.unverified]
        rows += [[f.path, f.reason, "ignored"] for f in report.foreign]
        rows += [
            [t.path, f"temp file, {human_size(t.size)}" + ("" if t.stale else " (writer alive)"),
             "removed" if t.path in removed else ("stray" if t.stale else "in use")]
            for t in report.temps
        ]
        if rows:
            out.table([Column("CHUNK / FILE"), Column("PROBLEM"), Column("STATE")], rows)
        stray = sum(1 for t in report.temps if t.stale)
        out.line(
            f"checked {plural(report.checked, 'chunk')} in {where}: {report.ok} ok, {len(report.bad)} bad, "
            + (f"{len(report.unverified)} unverified, " if report.unverified else "")
            + f"{plural(stray, 'stray temp file')}"
            + (f"; removed {len(report.removed)}" if fix else "")
        )
    if report.foreign:
        out.warn(
            f"{plural(len(report.foreign), 'file')} named like chunks but not at a chunk path "
            f"(e.g. {report.foreign[0].path}): not part of the store, left alone"
        )
    if report.left_alone:
        out.warn(
            f"{plural(len(report.left_alone), 'bad chunk')} replaced by a writer after the check "
            f"(e.g. {report.left_alone[0]}): left alone; rerun verify to check the new copy"
        )
    for failure in report.fix_failures:
        out.warn(f"could not remove {failure}")
    if left:
        if report.unverified:
            hint = "some chunks could not be read (never removed); check the store and rerun"
        else:
            hint = "check permissions and rerun" if fix else "rerun with --fix to remove them"
        out.error(f"{plural(left, 'problem')} left in {where}; {hint}")
        raise typer.Exit(1)
