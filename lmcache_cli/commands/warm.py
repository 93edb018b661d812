"""`lmcache warm`: copy chunks between any two stores, skipping what is there, verifying each."""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, Annotated

import typer

from lmcache_cli.errors import CliError, usage_error
from lmcache_cli.options import ModelOption, PatternArgument, model_option, pattern_argument
from lmcache_cli.output import Column
from lmcache_cli.progress import progress_bar
from lmcache_cli.state import FormatOption, get_state
from lmcache_cli.units import human_rate, human_size, plural
from lmcache_core.config import mask_url

if TYPE_CHECKING:
    from lmcache_core.key import CacheEngineKey


def warm(
    ctx: typer.Context,
    pattern: PatternArgument = None,
    src: Annotated[str | None, typer.Option("--from", metavar="URL", help="Source store [default: the global store].")] = None,
    dst: Annotated[str | None, typer.Option("--to", metavar="URL", help="Destination store [default: the global store].")] = None,
    model: ModelOption = None,
    keys_file: Annotated[str | None, typer.Option("--keys", metavar="FILE", help="Copy the keys listed in FILE (one a line; - for stdin) instead of listing the source.")] = None,
    jobs: Annotated[int, typer.Option("--jobs", "-j", metavar="N", min=1, max=256, help="Chunks copied in parallel.")] = 8,
    verify_existing: Annotated[bool, typer.Option("--verify-existing", help="Read chunks the destination already has in full and recopy any that fail their checksum (without it, only their header, and on disk their size, are checked: cheap, but a flipped payload byte goes unnoticed).")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only show what would be copied and skipped.")] = False,
    format_: FormatOption = None,
) -> None:
    """Copy chunks between stores (skips existing, verifies each).

    Typical: S3 -> local disk before a node starts serving, or local -> S3 in CI.

    Chunks the destination already has are skipped when their header (and, on
    disk, their size) checks out; a truncated, empty or mangled copy is rewritten (counted as copied
    and repaired). --verify-existing also checks their checksums (reading them in
    full). Each copy is read back and checked against the source checksum. The
    source is only read: a bad source chunk fails its copy and stays in place
    (see `lmcache verify`), and no source chunk's age changes. A chunk listed in
    the source but removed there before its copy (a live store evicts) is counted
    as gone, not failed; with --keys a chunk missing in the source is a failure.
    Exit code 1 if any chunk failed.

    \b
    Examples:
      lmcache warm --from s3://bucket/kv --to /mnt/nvme/lmcache --model llama -j 16
      lmcache ls -q llama | lmcache warm --keys - --from /data/a --to redis://cache:6379
    """
    from lmcache_core import store_ops  # lazily: keeps `lmcache --help` fast

    state = get_state(ctx)
    out = state.output(format_)
    pattern = pattern_argument(pattern)
    model = model_option(model)
    if src is None and dst is None:
        raise usage_error("give --from URL and/or --to URL (the other defaults to the global store)")
    src_store = state.open_store(src)
    dst_store = state.open_store(dst)
    with src_store, dst_store:
        if src_store.same_place(dst_store):
            raise usage_error(f"--from and --to are the same store ({src_store.describe()})")
        if src_store.root is not None and not os.path.isdir(src_store.root):
            # Opening it would create an empty store and "copy 0" successfully.
            raise CliError(f"--from {src_store.root}: no such store directory; check the path")
        if keys_file is not None:
            if pattern is not None or model is not None:
                raise usage_error("--keys lists the chunks itself; drop PATTERN/--model")
            lines = sys.stdin if keys_file == "-" else _read_lines(keys_file)
            try:
                keys = store_ops.read_keys(lines)
            except ValueError as exc:
                raise usage_error(f"--keys {keys_file}: {exc}") from None
            # Once each: a key listed twice (overlapping `ls -q` outputs) was copied
            # twice, concurrently, and counted as two chunks.
            keys = list(dict.fromkeys(keys))
            sizes: dict[str, int | None] = {}
        else:
            entries = store_ops.select(src_store.entries(), pattern=pattern, model=model)
            keys = [e.key for e in entries]
            sizes = {e.key.to_string(): e.size for e in entries}
        header = {"from": src_store.describe(), "to": dst_store.describe()}
        if dry_run:
            # What warm would do: copy what is absent, and replace copies that fail the check.
            # A question (or, with --verify-existing, a full read) per chunk: show it.
            absent: set[CacheEngineKey] = set()
            repair: list[CacheEngineKey] = []
            with progress_bar(out, "warm --dry-run", None, len(keys), by_chunks=True, bytes_label="checked") as bar:
                for k in keys:
                    if not dst_store.contains(k):
                        absent.add(k)
                    elif store_ops.held_copy_problem(dst_store, k, full=verify_existing) is not None:
                        repair.append(k)
                    bar.advance(1, sizes.get(k.to_string()) or 0)
            to_repair = set(repair)
            copy = [k for k in keys if k in absent or k in to_repair]
            copy_bytes = sum(sizes.get(k.to_string()) or 0 for k in copy)
            report = {
                **header,
                "dry_run": True,
                "to_copy": len(copy),
                "to_repair": len(repair),
                "to_skip": len(keys) - len(copy),
                "bytes": copy_bytes,
                "keys": [k.to_string() for k in copy],
            }
            if out.json:
                out.data(report)
                return
            if copy:
                out.table([Column("WOULD COPY")], [[k.to_string()] for k in copy])
            repairs = f", {len(repair)} of them to replace bad copies" if repair else ""
            out.line(
                f"dry run: would copy {plural(len(copy), 'chunk')} ({human_size(copy_bytes)}){repairs}, "
                f"skip {report['to_skip']} already in {header['to']}"
            )
            return
        # By chunks: a skipped chunk moves no bytes, and a bar in bytes stayed empty
        # through a rerun that found every chunk in place.
        with progress_bar(out, "warm", None, len(keys), by_chunks=True, bytes_label="copied") as bar:
            result = store_ops.warm(
                src_store, dst_store, keys, jobs=jobs, verify_existing=verify_existing,
                listed=keys_file is None, progress=lambda outcome, n: bar.advance(1, n),
            )  # fmt: skip
    report = {**header, "dry_run": False, **result.to_dict()}
    if out.json:
        out.data(report)
    else:
        if result.failed:
            out.table([Column("FAILED"), Column("REASON")], [[k, r] for k, r in result.failed])
        repaired = f" ({result.repaired} repaired)" if result.repaired else ""
        gone = f", gone {len(result.gone)} (removed from the source after the listing)" if result.gone else ""
        out.line(
            f"copied {result.copied}{repaired}, skipped {result.skipped}, failed {len(result.failed)}{gone}: "
            f"{human_size(result.bytes_copied)} in {result.seconds:.2f}s ({human_rate(result.gbps * 1e9)}) "
            f"{header['from']} -> {header['to']}"
        )
    if result.failed:
        # The first reason in the error line: with --format json it is the only line on
        # stderr, and it names the store, whose own warnings it then replaces (log_lines).
        first_key, first_reason = result.failed[0]
        first = "" if len(result.failed) == 1 else "first: "
        out.error(
            f"{plural(len(result.failed), 'chunk')} failed to copy ({first}{first_key}: {first_reason}); "
            "rerun warm to retry them (copied ones are skipped)"
        )
        raise typer.Exit(1)


def _read_lines(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8") as f:
            return f.readlines()
    except OSError as exc:
        raise CliError(f"--keys {mask_url(path)}: {exc.strerror or exc}; give a readable file or - for stdin") from None
