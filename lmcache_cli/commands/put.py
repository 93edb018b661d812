"""`lmcache put`: store one tensor under a key, or a prompt's KV split into chunks."""

from __future__ import annotations

import math
from typing import Annotated

import typer

from lmcache_cli.errors import usage_error
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
from lmcache_cli.store_tiers import holding_tiers
from lmcache_cli.units import human_size, plural


def put(
    ctx: typer.Context,
    key: Annotated[str | None, typer.Argument(metavar="KEY", help="Chunk key: fmt@model@world_size@worker_id@hash.", show_default=False)] = None,
    file: Annotated[str | None, typer.Argument(metavar="FILE", help="Tensor file: .safetensors, .npy or .pt (weights only).", show_default=False)] = None,
    tensor: Annotated[str | None, typer.Option("--tensor", metavar="NAME", help="Which tensor of a multi-tensor file.")] = None,
    tokens: TokensOption = None,
    kv: Annotated[str | None, typer.Option("--kv", metavar="FILE", help="With --tokens: the prompt's KV tensor file.")] = None,
    model: Annotated[str | None, typer.Option("--model", "-m", metavar="NAME", help="With --tokens: model name of the keys.")] = None,
    fmt: KvFmtOption = KvFmt.vllm,
    chunk_size: ChunkSizeOption = None,
    world_size: WorldSizeOption = 1,
    worker_id: WorkerIdOption = 0,
    format_: FormatOption = None,
) -> None:
    """Store a tensor under KEY, or a prompt's KV by prefix-hash chunks.

    \b
    Examples:
      lmcache put vllm@llama@1@0@0a1b2c chunk.safetensors
      lmcache put --tokens prompt.json --kv kv.safetensors --model llama
    """
    state = get_state(ctx)
    out = state.output(format_)
    if tokens is not None or kv is not None or model is not None:
        if key is not None or file is not None:
            raise usage_error("give either KEY FILE or --tokens/--kv/--model, not both")
        if tokens is None or kv is None or model is None:
            raise usage_error("--tokens, --kv and --model go together")
        key_fields(model, fmt.value, world_size, worker_id)
        _put_tokens(state, out, tokens, kv, tensor, model, fmt.value, chunk_size, world_size, worker_id)
        return
    if key is None or file is None:
        raise usage_error("give KEY FILE, or --tokens FILE --kv FILE --model NAME")
    chunk_key = parse_key(key)
    from lmcache_cli.tensor_files import load_tensor

    chunk = load_tensor(file, tensor)
    with state.open_store() as store:
        store.backend.put(chunk_key, chunk.contiguous(), blocking=True)
        where = store.describe()
        # A tiered store's put logs a remote tier's refusal and returns: ask each tier,
        # as `put --tokens` and `warm` do, rather than report a write that did not happen.
        held, missing = holding_tiers(store, chunk_key)
    nbytes = chunk.numel() * chunk.element_size()
    result = {
        "key": chunk_key.to_string(),
        "store": where,
        "dtype": str(chunk.dtype).removeprefix("torch."),
        "shape": list(chunk.shape),
        "bytes": nbytes,
        "stored_in": held,
        "not_stored_in": missing,
    }
    out.data(result)
    if out.human and held:
        out.message(
            f"stored {chunk_key} ({result['dtype']} {tuple(chunk.shape)}, {human_size(nbytes)}) in {' + '.join(held)}"
        )
    if missing:
        out.error(f"{chunk_key} not stored in {' and '.join(missing)} ({_why_not(missing)}); rerun once it is back")
        raise typer.Exit(1)


def _why_not(tiers: list[str]) -> str:
    """Why ``tiers`` did not take a write: the store's own words where it logged them
    (this error line replaces that warning, see ``log_lines``), else the likely causes."""
    from lmcache_cli.log_lines import store_failure_cause

    return store_failure_cause(" ".join(tiers)) or "the tier refused the write or is down"


def _put_tokens(
    state: CliState, out: Output, tokens_path: str, kv_path: str, tensor: str | None, model: str, fmt: str,
    chunk_size: int | None, world_size: int, worker_id: int,
) -> None:
    """Store a prompt's chunks. A write that fails part-way (a full disk, a remote
    gone) still reports, in JSON too, which chunks this run stored before it; exit 1."""
    from lmcache_cli.tensor_files import load_tensor, load_tokens
    from lmcache_core.tokens import ChunkedKVStore, StoreResult

    token_ids = load_tokens(tokens_path)
    kv = load_tensor(kv_path, tensor)
    size = chunk_size or state.config().chunk_size
    n_chunks = math.ceil(len(token_ids) / size)
    error: OSError | None = None
    with state.open_store() as store:
        kvstore = ChunkedKVStore(
            store.backend, model, fmt=fmt, chunk_size=size, world_size=world_size, worker_id=worker_id
        )
        keys = kvstore.keys_for(token_ids)
        # The chunks this run stored (their bytes were counted; the others finished
        # were already cached or refused by a tier), and how many finished.
        stored_at: list[int] = []
        finished = [0]
        last = [0]
        # By chunks: one already cached stores no bytes, and a bar in bytes stayed
        # empty through a rerun that found every chunk cached.
        with progress_bar(out, "put", None, n_chunks, by_chunks=True, bytes_label="stored") as bar:

            def advance(done: int, total: int, nbytes: int) -> None:
                bar.advance(1, nbytes - last[0])
                if nbytes > last[0]:
                    stored_at.append(done - 1)
                last[0] = nbytes
                finished[0] = done

            try:
                result = kvstore.store(token_ids, kv, progress=advance)
            except OSError as exc:  # a full disk, a remote gone: say what was stored before it
                error = exc
                others = [keys[i] for i in range(finished[0]) if i not in stored_at]
                held = sum(not store.backend.missing_tiers(k) for k in others)
                stored = len(stored_at)
                result = StoreResult(len(token_ids), len(keys), stored, held, last[0], len(keys) - stored - held)
        where = store.describe()
        lacking: list[str] = []  # the tiers that lack a chunk: named in the error
        if result.failed and error is None:
            for key in keys:
                lacking += [t for t in holding_tiers(store, key)[1] if t not in lacking]
    stored_keys = [keys[i].to_string() for i in stored_at]
    payload = {
        "model": model,
        "store": where,
        "tokens": result.tokens,
        "chunks": result.chunks,
        "stored": result.stored,
        "skipped": result.skipped,
        "bytes": result.nbytes,
        "chunk_size": size,
    }
    payload["failed"] = result.failed
    payload["not_stored_in"] = lacking
    payload["stored_keys"] = stored_keys  # what this run wrote (before a failure, if any)
    payload["error"] = None
    failure = ""
    if error is not None:
        from lmcache_cli.errors import describe_error

        at = min(finished[0], len(keys) - 1)  # the chunk whose write raised
        message = describe_error(error)[0]
        payload["error"] = {"chunk": at, "key": keys[at].to_string(), "message": message}
        unwritten = len(keys) - at - 1
        rest = f"; {plural(unwritten, 'chunk')} after it not written" if unwritten else ""
        failure = f"chunk {at} ({keys[at]}) not stored: {message}{rest}; rerun once fixed (stored chunks are skipped)"
    out.data(payload)
    if out.human:
        before = " before the failure" if error is not None else ""
        out.message(
            f"stored {result.stored} of {result.chunks} chunks ({result.tokens} tokens, "
            f"{human_size(result.nbytes)}; {result.skipped} already cached) in {where}{before}"
        )
        if error is not None and stored_keys:
            shown = [f"{i} ({keys[i]})" for i in stored_at]
            more = f" and {len(shown) - 10} more" if len(shown) > 10 else ""
            out.message(f"stored chunks: {', '.join(shown[:10])}{more}")
    if failure:
        out.error(failure)
        raise typer.Exit(1)
    if result.failed:
        tiers = " and ".join(lacking) if lacking else f"every tier of {where}"
        out.error(
            f"{plural(result.failed, 'chunk')} not stored in {tiers} ({_why_not(lacking)}); rerun once it is back"
        )
        raise typer.Exit(1)
