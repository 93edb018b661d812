"""`lmcache bench`: put/get throughput and latency per store, against the raw medium."""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Annotated, Any, Iterator

import typer

from lmcache_cli.errors import CliError, end_interrupted, usage_error
from lmcache_cli.output import Column, Output, safe_url
from lmcache_cli.state import FormatOption, get_state

QUICK = {"chunk_mb": 4.0, "count": 8, "batch": 4}
#: After Ctrl-C, seconds bench has to remove what it wrote before the process ends.
#: The CLI's own grace (``main.INTERRUPT_GRACE_S``, 2 s) cut the cleanup of a store
#: 30 ms away half-way: 67 chunks and raw objects were left in the user's bucket.
CLEANUP_GRACE_S = 30.0


def _parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(p) for p in text.replace("x", ",").split(","))
    except ValueError:
        raise usage_error(f"--kv-shape {text!r}: expected integers like 32,2,256,8,128") from None
    if len(shape) != 5 or shape[1] != 2 or min(shape) < 1:
        raise usage_error(f"--kv-shape {text!r}: expected L,2,T,H,D (5 positive sizes, the second 2)")
    return shape


def bench(
    ctx: typer.Context,
    stores: Annotated[list[str] | None, typer.Option("--store", "-s", metavar="URL", help="Store to measure (repeatable) [default: the global store].")] = None,
    chunk_mb: Annotated[float | None, typer.Option("--chunk-mb", metavar="MIB", min=0.001, help="Chunk size in MiB [default: 32, Llama-3.1-8B's 256-token chunk].")] = None,
    kv_shape: Annotated[str | None, typer.Option("--kv-shape", metavar="L,2,T,H,D", help="Chunk shape instead of --chunk-mb.")] = None,
    dtype: Annotated[str, typer.Option("--dtype", metavar="DTYPE", help="Chunk dtype: bfloat16, float16, float32, float8_e4m3fn, ... (any a chunk can hold).")] = "bfloat16",
    count: Annotated[int | None, typer.Option("--count", "-n", metavar="N", min=2, help="Chunks per measurement [default: 8].")] = None,
    batch: Annotated[int | None, typer.Option("--batch", metavar="N", min=1, help="Chunks per batched get [default: 16].")] = None,
    quick: Annotated[bool, typer.Option("--quick", help="Small run (4 MiB chunks, 8 of them) for a first look.")] = False,
    drop_caches: Annotated[bool, typer.Option("--drop-caches", help="Cold disk reads after dropping the whole machine's page cache (root; evicts other processes' cached files too) [default: only the run's own files].")] = False,
    format_: FormatOption = None,
) -> None:
    """Measure put/get GB/s and latency per store against the raw medium.

    Put, get and batched get through each store and the raw medium in the same
    run: GB/s, p50/p99 latency and the ratio to raw. Removes what it wrote.

    \b
    Examples:
      lmcache bench --quick
      lmcache bench -s /mnt/nvme/lmcache -s redis://localhost:6379 --chunk-mb 32 --format json
    """
    state = get_state(ctx)
    out = state.output(format_)
    if chunk_mb is not None and kv_shape is not None:
        raise usage_error("give --chunk-mb or --kv-shape, not both")
    shape = _parse_shape(kv_shape) if kv_shape is not None else None
    if quick:
        chunk_mb = chunk_mb if chunk_mb is not None or shape is not None else QUICK["chunk_mb"]
        count = count or int(QUICK["count"])
        batch = batch or int(QUICK["batch"])
    urls = list(stores or [])
    if not urls:
        url, source = state.store_url()
        if url is None:  # tiers from --config, LMCACHE_CONFIG_FILE or LMCACHE_<FIELD> variables
            raise usage_error(f"bench measures stores named by URL; give --store URL (the store from {source} has none)")
        urls = [url]
    try:
        from lmcache_core.bench import check_params, run_bench
    except ModuleNotFoundError as exc:
        if exc.name != "lmcache_core.bench":
            raise
        raise CliError("the benchmark engine (lmcache_core.bench) is not installed in this build") from None
    kwargs: dict[str, object] = {"dtype": dtype}
    if count is not None:
        kwargs["count"] = count
    if batch is not None:
        kwargs["batch"] = batch
    # Whole elements of the dtype: --chunk-mb 0.01 is 10485.76 bytes, and the error
    # named a byte count ("got 10485") nobody had typed.
    chunk_bytes = None if chunk_mb is None else int(chunk_mb * (1 << 20)) // _itemsize(dtype) * _itemsize(dtype)
    try:  # before anything is generated or written
        check_params(chunk_bytes, shape, dtype, count if count is not None else 2, batch if batch is not None else 1)
    except ValueError as exc:
        raise usage_error(str(exc)) from None
    with _interrupt_leaves_time_to_clean_up(out):
        report = run_bench(
            urls,
            chunk_bytes=chunk_bytes,
            kv_shape=shape,
            progress=out.message,
            drop_caches=drop_caches,
            **kwargs,  # type: ignore[arg-type]
        )
    errors = list(getattr(report, "errors", []) or [])
    if out.json:
        out.data(report.to_dict())
    elif report.rows:
        _table(out, report.rows)
    for err in errors:
        out.error(f"bench of {err.get('store')} failed: {err.get('error')}; check the store URL and server")
    if errors:
        raise typer.Exit(1)


@contextlib.contextmanager
def _interrupt_leaves_time_to_clean_up(out: Output) -> Iterator[None]:
    """While the run lasts, Ctrl-C stops it and leaves ``CLEANUP_GRACE_S`` for its
    cleanup (every run removes what it wrote, in ``finally`` blocks); a second Ctrl-C
    ends the process at once. Where SIGINT is ignored, or off the main thread, nothing
    changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)
    if previous in (signal.SIG_IGN, None):
        yield
        return
    timers: list[threading.Timer] = []

    def on_sigint(signum: int, frame: Any) -> None:
        if timers:
            end_interrupted("error: interrupted again: what bench wrote may be left in the store\n")
        # Ends the process even if the KeyboardInterrupt is lost (see main.INTERRUPT_GRACE_S)
        # or the cleanup hangs; once the run has unwound, the CLI ends it as usual.
        timer = threading.Timer(CLEANUP_GRACE_S, end_interrupted)
        timer.daemon = True
        timers.append(timer)
        timer.start()
        out.message("interrupted: removing what bench wrote (Ctrl-C again to stop at once)")
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, on_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        for timer in timers:
            timer.cancel()


def _table(out: Output, rows: list[dict[str, object]]) -> None:
    out.table(
        [Column("STORE"), Column("OP")]
        + [Column(c, right=True) for c in ("GB/s", "p50 ms", "p99 ms", "RAW OP", "RAW GB/s", "RATIO")],
        [
            [
                safe_url(str(r["store"])), r["op"], _f(r["gbps"]), _f(r["p50_ms"]), _f(r["p99_ms"]),
                r.get("raw_op") or "-", _f(r.get("raw_gbps")), _f(r.get("ratio")),
            ]
            for r in rows
        ],
    )


def _f(x: object) -> str:
    if x is None:
        return "-"
    if isinstance(x, (int, float)):
        return f"{x:.2f}" if abs(x) >= 0.01 or x == 0 else f"{x:.2g}"
    return str(x)


def _itemsize(dtype: str) -> int:
    """Bytes per element of the dtype named ``dtype`` (1 for an unknown name: the
    parameter check says what is wrong with it)."""
    import torch

    tdtype = getattr(torch, dtype, None)
    return tdtype.itemsize if isinstance(tdtype, torch.dtype) else 1
