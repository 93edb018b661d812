"""`lmcache show`: everything about one chunk, checksum verified, with value statistics."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from lmcache_cli.errors import unusable_chunk
from lmcache_cli.options import parse_key
from lmcache_cli.output import Column
from lmcache_cli.state import FormatOption, get_state
from lmcache_cli.units import human_size


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.6g}"


def show(
    ctx: typer.Context,
    key: Annotated[str, typer.Argument(metavar="KEY", help="Chunk key: fmt@model@world_size@worker_id@hash.", show_default=False)],
    layers: Annotated[bool, typer.Option("--layers", help="Value statistics per layer too.")] = False,
    format_: FormatOption = None,
) -> None:
    """Show one chunk: key, header, checksum status and value statistics.

    Statistics (min, max, mean, std) are over finite values; NaN and Inf are counted.

    \b
    Example:
      lmcache show vllm@llama@1@0@0a1b2c --layers
    """
    from lmcache_core import store_ops  # lazily: keeps `lmcache --help` fast

    state = get_state(ctx)
    out = state.output(format_)
    chunk_key = parse_key(key)
    with state.open_store(must_exist=True) as store:
        chunk, check = store.read(chunk_key)
        path = store.path_of(chunk_key)
        if check.header is None:
            raise unusable_chunk(chunk_key, check, store.describe())
        stored_size = None
        if path is not None:
            import os

            stored_size = os.path.getsize(path)
    header = check.header
    values = store_ops.value_stats(chunk, per_layer=layers) if chunk is not None else None
    report: dict[str, Any] = {
        "key": chunk_key.to_string(),
        "fmt": chunk_key.fmt,
        "model": chunk_key.model_name,
        "world_size": chunk_key.world_size,
        "worker_id": chunk_key.worker_id,
        "chunk_hash": chunk_key.chunk_hash,
        "path": path,
        "header": header.to_dict(),
        "dtype": header.dtype,
        "shape": list(header.shape),
        "bytes": header.nbytes,
        "stored_bytes": stored_size if stored_size is not None else header.total_size,
        "checksum": header.checksum,
        "checksum_ok": check.ok,
        "checksum_status": "verified" if check.ok else f"FAILED: {check.reason}",
        "values": values,
    }
    if out.json:
        out.data(report)
        if not check.ok:  # exit 1 says why on stderr, as in human mode
            out.error(f"{chunk_key}: {check.reason}; remove it with `lmcache verify --fix`")
            raise typer.Exit(1)
        return
    pairs = [
        ("key", report["key"]),
        ("fmt", chunk_key.fmt),
        ("model", chunk_key.model_name),
        ("world_size", chunk_key.world_size),
        ("worker_id", chunk_key.worker_id),
        ("chunk_hash", chunk_key.chunk_hash),
    ]
    if path:
        pairs.append(("path", path))
    pairs += [
        ("format", header.version),
        ("dtype", header.dtype),
        ("shape", "x".join(map(str, header.shape))),
        ("bytes", f"{human_size(header.nbytes)} ({header.nbytes} B payload, {report['stored_bytes']} B stored)"),
        ("checksum", f"{header.checksum} ({report['checksum_status']})"),
    ]
    if values is not None:
        v = values["all"]
        pairs += [
            ("min / max", f"{_num(v['min'])} / {_num(v['max'])}"),
            ("mean / std", f"{_num(v['mean'])} / {_num(v['std'])}"),
            ("NaN / Inf", f"{v['nan']} / {v['inf']}"),
        ]
    out.fields(pairs)
    if values is not None and layers and "layers" in values:
        out.line()
        out.table(
            [Column("LAYER", right=True)] + [Column(c, right=True) for c in ("MIN", "MAX", "MEAN", "STD", "NAN", "INF")],
            [
                [i, _num(s["min"]), _num(s["max"]), _num(s["mean"]), _num(s["std"]), s["nan"], s["inf"]]
                for i, s in enumerate(values["layers"])
            ],
        )
    if not check.ok:
        out.error(f"{chunk_key}: {check.reason}; remove it with `lmcache verify --fix`")
        raise typer.Exit(1)
