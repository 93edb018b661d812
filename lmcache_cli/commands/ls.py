"""`lmcache ls`: list chunks with filters, sorting and header details."""

from __future__ import annotations

import time
from typing import Annotated, Any

import typer

from lmcache_cli.errors import usage_error
from lmcache_cli.options import (
    KvFmtFilter,
    ModelOption,
    OlderThanOption,
    PatternArgument,
    SortBy,
    age_option,
    model_option,
    pattern_argument,
    size_option,
    warn_unknown_ages,
)
from lmcache_cli.output import Column
from lmcache_cli.progress import progress_bar
from lmcache_cli.state import FormatOption, get_state
from lmcache_cli.units import human_age, human_size, plural


def ls(
    ctx: typer.Context,
    pattern: PatternArgument = None,
    model: ModelOption = None,
    fmt: KvFmtFilter = None,
    larger_than: Annotated[str | None, typer.Option("--larger-than", metavar="SIZE", help="Only chunks larger than SIZE (512K, 10MB, 1.5GiB).")] = None,
    older_than: OlderThanOption = None,
    sort: Annotated[SortBy, typer.Option("--sort", metavar="name|size|age", help="name (A-Z), size (largest first) or age (least recently used first).")] = SortBy.name,
    limit: Annotated[int | None, typer.Option("--limit", "-n", metavar="N", min=0, help="Show at most N chunks (the summary still counts all).")] = None,
    long: Annotated[bool, typer.Option("--long", "-l", help="Add dtype and shape, read from chunk headers only.")] = False,
    keys_only: Annotated[bool, typer.Option("--quiet", "-q", help="Keys only, one per line, no summary (for pipes).")] = False,
    format_: FormatOption = None,
) -> None:
    """List chunks in the store.

    \b
    Examples:
      lmcache ls
      lmcache ls --model llama --older-than 7d --sort size -l
      lmcache ls -q 'vllm@llama*' | lmcache warm --keys - --from /a --to s3://b/p
    """
    from lmcache_core import store_ops  # lazily: keeps `lmcache --help` fast

    state = get_state(ctx)
    out = state.output(format_)
    pattern = pattern_argument(pattern)  # "" is no "everything": '*' is
    model = model_option(model)
    if keys_only and out.json:  # -q prints bare keys, which are no JSON document
        raise usage_error("give -q (bare keys) or --format json, not both")
    min_size = size_option(larger_than, "--larger-than")
    min_age = age_option(older_than, "--older-than")
    now = time.time()
    with state.open_store(must_exist=True) as store:
        listed = store.entries()
        if min_age is not None:
            warn_unknown_ages(out, listed, store.describe())
        entries = store_ops.select(
            listed,
            pattern=pattern,
            model=model,
            fmt=fmt.value if fmt else None,
            larger_than=min_size,
            older_than=min_age,
            now=now,
        )
        matched = len(entries)
        total = sum(e.size or 0 for e in entries)
        shown = store_ops.sort_entries(entries, sort.value)
        if limit is not None:
            shown = shown[:limit]
        headers: list[Any] = []
        if long:  # a read per chunk: minutes for thousands of objects in a remote store
            with progress_bar(out, "ls -l", None, len(shown), by_chunks=True, bytes_label="listed") as bar:
                for e in shown:
                    headers.append(store.header(e.key))
                    bar.advance(1, e.size or 0)
        where = store.describe()
    if keys_only:
        out.stdout.write("".join(f"{e.key}\n" for e in shown))
        return
    if out.json:
        rows = []
        for i, e in enumerate(shown):
            row = e.to_dict(now)
            if long:
                h = headers[i]
                row["dtype"] = h.dtype if h else None
                row["shape"] = list(h.shape) if h else None
                row["header_ok"] = h is not None
            rows.append(row)
        out.data({"store": where, "count": matched, "shown": len(shown), "total_bytes": total, "chunks": rows})
        return
    columns = [Column("KEY"), Column("SIZE", right=True), Column("AGE", right=True)]
    if long:
        columns += [Column("DTYPE"), Column("SHAPE")]
    rows_h: list[list[str]] = []
    for i, e in enumerate(shown):
        cells = [e.key.to_string(), human_size(e.size), human_age(None if e.last_used is None else now - e.last_used)]
        if long:
            h = headers[i]
            cells += [h.dtype, "x".join(map(str, h.shape))] if h else ["?", "(unreadable header)"]
        rows_h.append(cells)
    if rows_h:
        out.table(columns, rows_h)
    more = f" (showing {len(shown)})" if len(shown) < matched else ""
    out.line(f"{plural(matched, 'chunk')}, {human_size(total)} total{more} in {where}")
