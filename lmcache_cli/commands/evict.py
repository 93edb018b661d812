"""`lmcache evict`: remove chunks by pattern, model, age, or LRU down to a size."""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING, Annotated

import typer

from lmcache_cli.errors import CliError, usage_error
from lmcache_cli.options import (
    ModelOption,
    OlderThanOption,
    PatternArgument,
    age_option,
    model_option,
    pattern_argument,
    size_option,
    warn_unknown_ages,
)
from lmcache_cli.output import Column, Output
from lmcache_cli.progress import progress_bar
from lmcache_cli.state import FormatOption, get_state
from lmcache_cli.units import human_age, human_size, plural

if TYPE_CHECKING:
    from lmcache_core.store_ops import EvictPlan, EvictResult, Store

PLAN_ROWS_SHOWN = 20


def stdin_is_terminal() -> bool:
    """Whether someone can answer a prompt (tests replace this)."""
    try:
        return sys.stdin.isatty()
    except (AttributeError, ValueError):
        return False


def evict(
    ctx: typer.Context,
    pattern: PatternArgument = None,
    model: ModelOption = None,
    older_than: OlderThanOption = None,
    to_size: Annotated[str | None, typer.Option("--to-size", metavar="SIZE", help="Remove least recently used chunks (among those selected) until the store holds at most SIZE.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only show the plan.")] = False,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    format_: FormatOption = None,
) -> None:
    """Remove chunks by pattern, model, age, or LRU down to a size.

    Shows the plan, then asks before removing (unless --yes); without a terminal
    to ask on it refuses unless --yes is given. An empty PATTERN is a usage error
    ('*' selects everything). On a disk store a chunk written again after the
    plan was made (a server used it meanwhile) is left alone, not removed.

    \b
    Examples:
      lmcache evict --older-than 7d --dry-run
      lmcache evict --to-size 50GiB --yes
      lmcache evict 'vllm@old-model@*' --yes
    """
    from lmcache_core import store_ops  # lazily: keeps `lmcache --help` fast

    state = get_state(ctx)
    out = state.output(format_)
    pattern = pattern_argument(pattern)
    model = model_option(model)
    max_age = age_option(older_than, "--older-than")
    target = size_option(to_size, "--to-size")
    if pattern is None and model is None and max_age is None and target is None:
        raise usage_error("say what to evict: PATTERN, --model, --older-than or --to-size ('*' for everything)")
    now = time.time()
    with state.open_store(must_exist=True) as store:
        listed = store.entries()
        if max_age is not None:
            warn_unknown_ages(out, listed, store.describe())
        elif target is not None:
            warn_unknown_ages(out, listed, store.describe(), "--to-size")
        plan = store_ops.plan_evict(
            listed, pattern=pattern, model=model, older_than=max_age, to_size=target, now=now
        )
        where = store.describe()
        if not out.json:
            _show_plan(out, plan, now, where)
        if not plan.victims or dry_run:
            out.data(
                {
                    "store": where,
                    "dry_run": dry_run,
                    "plan": plan.to_dict(now),
                    "removed": 0,
                    "bytes_freed": 0,
                    "left_alone": [],
                    "failures": [],  # the same fields as a run that removed chunks
                }
            )
            if not plan.victims and out.human:
                out.message("nothing to evict")
            return
        if not yes:
            if not stdin_is_terminal():
                raise CliError(
                    f"refusing to remove {plural(len(plan.victims), 'chunk')} without confirmation (no terminal); "
                    "rerun with --yes, or --dry-run to see the plan"
                )
            if not typer.confirm(
                f"Remove {plural(len(plan.victims), 'chunk')} ({human_size(plan.freed)}) from {where}?", err=True
            ):
                out.message("cancelled; nothing removed")
                return
        result = _run_evict(out, store, plan)
    failures = result.failures
    out.data(
        {
            "store": where,
            "dry_run": False,
            "plan": plan.to_dict(now),
            "removed": result.removed,
            "bytes_freed": result.freed,
            "left_alone": result.left_alone,
            "failures": failures,
        }
    )
    if out.human:
        kept = f"; left {len(result.left_alone)} alone (changed since the plan)" if result.left_alone else ""
        out.line(f"removed {plural(result.removed, 'chunk')}, freed {human_size(result.freed)}{kept}")
    if result.left_alone:
        out.warn(
            f"{plural(len(result.left_alone), 'chunk')} changed since the plan (e.g. {result.left_alone[0]}): "
            "written or read again since it was listed, so in use; left alone"
        )
    if failures:
        for f in failures[:10]:
            out.warn(f)
        out.error(f"{plural(len(failures), 'chunk')} could not be removed; check permissions and rerun")
        raise typer.Exit(1)


def _run_evict(out: Output, store: Store, plan: EvictPlan) -> EvictResult:
    """``store_ops.run_evict`` under a progress bar: thousands of removals from an object
    store (one request each) ran for minutes with nothing shown."""
    from lmcache_core.store_ops import run_evict

    with progress_bar(out, "evict", None, len(plan.victims), by_chunks=True, bytes_label="freed") as bar:
        return run_evict(store, plan, progress=lambda freed: bar.advance(1, freed))


def _show_plan(out: Output, plan: EvictPlan, now: float, where: str) -> None:
    if plan.victims:
        rows = [
            [v.key.to_string(), human_size(v.size), human_age(None if v.last_used is None else now - v.last_used)]
            for v in plan.victims[:PLAN_ROWS_SHOWN]
        ]
        out.table([Column("EVICT"), Column("SIZE", right=True), Column("LAST USED", right=True)], rows)
        if len(plan.victims) > PLAN_ROWS_SHOWN:
            out.line(f"... and {len(plan.victims) - PLAN_ROWS_SHOWN} more")
    out.line(
        f"plan: remove {plural(len(plan.victims), 'chunk')}, freeing {human_size(plan.freed)} "
        f"({human_size(plan.before)} -> {human_size(plan.after)}) in {where}"
    )
