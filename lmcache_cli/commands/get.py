"""`lmcache get`: a chunk to a .safetensors file, or the longest cached prefix of a prompt."""

from __future__ import annotations

import math
import os
from typing import Annotated

import typer

from lmcache_cli.errors import CliError, unusable_chunk, usage_error
from lmcache_cli.options import (
    ChunkSizeOption,
    KvFmt,
    KvFmtOption,
    TokensOption,
    WorkerIdOption,
    WorldSizeOption,
    key_fields,
    parse_key,
)
from lmcache_cli.output import Output
from lmcache_cli.progress import progress_bar
from lmcache_cli.state import CliState, FormatOption, get_state
from lmcache_cli.store_tiers import answered
from lmcache_cli.units import human_size, plural


def get(
    ctx: typer.Context,
    key: Annotated[str | None, typer.Argument(metavar="KEY", help="Chunk key: fmt@model@world_size@worker_id@hash.", show_default=False)] = None,
    output: Annotated[str | None, typer.Option("--output", "-o", metavar="OUT.safetensors", help="File to write.")] = None,
    tokens: TokensOption = None,
    model: Annotated[str | None, typer.Option("--model", "-m", metavar="NAME", help="With --tokens: model name of the keys.")] = None,
    fmt: KvFmtOption = KvFmt.vllm,
    chunk_size: ChunkSizeOption = None,
    world_size: WorldSizeOption = 1,
    worker_id: WorkerIdOption = 0,
    format_: FormatOption = None,
) -> None:
    """Write a chunk, or a prompt's longest cached prefix, to a file.

    The chunk is checked against its checksum first; a prefix is written as one
    tensor "kv" with the number of tokens it covers in its metadata.

    \b
    Examples:
      lmcache get vllm@llama@1@0@0a1b2c -o chunk.safetensors
      lmcache get --tokens prompt.json --model llama -o prefix.safetensors
    """
    state = get_state(ctx)
    out = state.output(format_)
    if output is None:
        raise usage_error("give the file to write with -o OUT.safetensors")
    from lmcache_cli.tensor_files import TENSOR_SUFFIXES

    suffix = os.path.splitext(output)[1].lower()
    if suffix in TENSOR_SUFFIXES and suffix != ".safetensors":
        # get writes safetensors: under a .npy or .pt name, `lmcache put` (which reads
        # by suffix) and numpy/torch refused the file it wrote.
        raise usage_error(f"-o {output}: get writes a .safetensors file, not {suffix}; name it OUT.safetensors")
    if tokens is not None or model is not None:
        if key is not None:
            raise usage_error("give either KEY or --tokens/--model, not both")
        if tokens is None or model is None:
            raise usage_error("--tokens and --model go together")
        key_fields(model, fmt.value, world_size, worker_id)
        _get_prefix(state, out, tokens, model, fmt.value, chunk_size, world_size, worker_id, output)
        return
    if key is None:
        raise usage_error("give a KEY, or --tokens FILE --model NAME")
    chunk_key = parse_key(key)
    from lmcache_cli.tensor_files import write_atomic
    from lmcache_core import chunk_format, store_ops

    with state.open_store(must_exist=True) as store:
        # Verified as it is read; on a tiered store a bad copy falls through to a good one.
        chunk, check = store.read_verified(chunk_key)
        if chunk is None or not check.ok:
            if check.status == store_ops.CORRUPT:
                raise CliError(f"{chunk_key}: {check.reason}; not written (run `lmcache verify --fix`)")
            raise unusable_chunk(chunk_key, check, store.describe())
        header, payload = chunk_format.encode(chunk, chunk_key.to_string())
        size = write_atomic(output, [header, payload])
    result = {
        "key": chunk_key.to_string(),
        "output": output,
        "bytes": size,
        "dtype": str(chunk.dtype).removeprefix("torch."),
        "shape": list(chunk.shape),
    }
    out.data(result)
    if out.human:
        out.message(f"wrote {output} ({result['dtype']} {tuple(chunk.shape)}, {human_size(size)})")


def _get_prefix(
    state: CliState, out: Output, tokens_path: str, model: str, fmt: str, chunk_size: int | None,
    world_size: int, worker_id: int, output: str,
) -> None:
    from lmcache_cli.tensor_files import load_tokens, write_safetensors
    from lmcache_core import store_ops

    token_ids = load_tokens(tokens_path)
    size = chunk_size or state.config().chunk_size
    n_chunks = math.ceil(len(token_ids) / size)
    with state.open_store(must_exist=True) as store:
        # The inspection read `get KEY` uses: a bad chunk ends the prefix and is
        # reported, never deleted, and no chunk's age changes. A tier that could not
        # be asked is an error, not "no cached prefix" (store_tiers.answered).
        # By chunks, as `put --tokens`: a prefix that ends early reads no more bytes,
        # and its bar jumps to the end rather than stopping short of it.
        with answered(store, "whether chunks are cached"), progress_bar(
            out, "get", None, n_chunks, by_chunks=True, bytes_label="read"
        ) as bar:
            last = [0, 0]  # chunks and bytes reported so far: the library counts up, the bar adds

            def advance(done: int, total: int, nbytes: int) -> None:
                bar.advance(done - last[0], nbytes - last[1])
                last[:] = [done, nbytes]

            found = store_ops.read_prefix(
                store, token_ids, model=model, fmt=fmt, chunk_size=size, world_size=world_size, worker_id=worker_id,
                progress=advance,
            )  # fmt: skip
        where = store.describe()
    total = len(token_ids)
    covered = found.tokens
    stopped = found.stopped
    problem = None
    if stopped is not None:
        index = len(found.chunks)
        problem = f"chunk {index} ({stopped.where}): {stopped.reason}"
        if stopped.status == store_ops.CORRUPT:
            problem += "; left in place (`lmcache verify` reports it, `verify --fix` removes it)"
    kv = found.joined()
    if kv is None:
        detail = f": {problem}" if problem else ""
        raise CliError(f"no cached prefix of these {total} tokens for model {model!r} in {where}{detail}; nothing written")
    nbytes = write_safetensors(
        output,
        {"kv": kv},
        {"lmcache.model": model, "lmcache.fmt": fmt, "lmcache.tokens": str(covered), "lmcache.total_tokens": str(total)},
    )
    chunks = len(found.chunks)
    result = {
        "model": model,
        "output": output,
        "tokens": covered,
        "total_tokens": total,
        "chunks": chunks,
        "bytes": nbytes,
        "shape": list(kv.shape),
        "failed": 0 if stopped is None else 1,
        "failures": [] if stopped is None else [{"key": stopped.where, "status": stopped.status, "reason": stopped.reason}],
    }
    out.data(result)
    if out.human:
        out.message(f"wrote {output}: {covered} of {total} tokens cached ({plural(chunks, 'chunk')}, {human_size(nbytes)})")
    if problem is not None:
        out.warn(f"the cached prefix stops at {problem}")
