"""`lmcache lookup`: how much of a prompt's prefix is cached, per tier."""

from __future__ import annotations

import math
from typing import Annotated

import typer

from lmcache_cli.options import (
    ChunkSizeOption,
    KvFmt,
    KvFmtOption,
    WorkerIdOption,
    WorldSizeOption,
    key_fields,
)
from lmcache_cli.output import Column
from lmcache_cli.progress import progress_bar
from lmcache_cli.state import FormatOption, get_state
from lmcache_cli.store_tiers import answered


def lookup(
    ctx: typer.Context,
    tokens: Annotated[str, typer.Option("--tokens", "-t", metavar="FILE", help="Token ids: a .json list or a 1-D .npy array.")],
    model: Annotated[str, typer.Option("--model", "-m", metavar="NAME", help="Model name of the keys.")],
    fmt: KvFmtOption = KvFmt.vllm,
    chunk_size: ChunkSizeOption = None,
    world_size: WorldSizeOption = 1,
    worker_id: WorkerIdOption = 0,
    format_: FormatOption = None,
) -> None:
    """Show how much of a prompt's prefix is cached, per tier.

    \b
    Example:
      lmcache lookup --tokens prompt.json --model llama
    """
    from lmcache_cli.tensor_files import load_tokens
    from lmcache_core import store_ops  # lazily: keeps `lmcache --help` fast

    state = get_state(ctx)
    out = state.output(format_)
    key_fields(model, fmt.value, world_size, worker_id)
    token_ids = load_tokens(tokens)
    size = chunk_size or state.config().chunk_size
    n_chunks = math.ceil(len(token_ids) / size)
    with state.open_store(must_exist=True) as store:
        # "0 cached" must mean the store said so, not that a tier was down: an
        # unanswered contains() is an error here (see store_tiers.answered). A header
        # read per chunk (a request each on a remote): a long prompt shows a bar.
        with answered(store, "whether chunks are cached"), progress_bar(
            out, "lookup", None, n_chunks, by_chunks=True, show_bytes=False
        ) as bar:
            last = [0]  # chunks reported so far: the library counts up, the bar adds

            def advance(done: int, total: int) -> None:
                bar.advance(done - last[0])
                last[0] = done

            result = store_ops.prefix_lookup(
                store, token_ids, model=model, fmt=fmt.value, chunk_size=size, world_size=world_size,
                worker_id=worker_id, progress=advance,
            )
        result["store"] = store.describe()
    if out.json:
        out.data(result)
        return
    out.line(
        f"cached prefix: {result['tokens']} of {result['total_tokens']} tokens "
        f"({result['chunks']} of {result['total_chunks']} chunks of {size})"
    )
    out.table(
        [Column("TIER"), Column("TOKENS", right=True), Column("CHUNKS", right=True)],
        [[t["tier"], t["tokens"], t["chunks"]] for t in result["per_tier"]],
    )
