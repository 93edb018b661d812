#!/usr/bin/env python
"""Local tiers beside the raw medium (issue 2, item 9).

Puts and gets N chunks (default 32 MiB fp16, shape [32, 2, 256, 8, 128])
through the memory tier (``cpu://``) and the disk tier (a fresh directory, page
cache, checksums on) and, in the same run, measures ``copy_`` into warm memory
and raw ``write()``/``readinto`` of the same bytes. Prints a table; writes JSON.

    python scripts/bench_local.py [--count 8] [--dtype float16] [--dir DIR] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile

from lmcache_core.bench import REFERENCE_SHAPE, format_table, run_bench


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--count", type=int, default=8, help="chunks per operation (default 8)")
    ap.add_argument("--batch", type=int, default=8, help="keys per batched_get (default 8)")
    ap.add_argument("--dtype", default="float16", help="torch dtype name (default float16)")
    ap.add_argument(
        "--shape", default=",".join(map(str, REFERENCE_SHAPE)), help="chunk shape, comma separated"
    )
    ap.add_argument(
        "--dir", default=None, help="disk-tier directory (default: a fresh temp dir, removed after)"
    )
    ap.add_argument("--json", default="bench_local.json", help="where to write the JSON report")
    ap.add_argument(
        "--repeat", type=int, default=1, help="run the whole matrix this many times (JSON keeps all)"
    )
    args = ap.parse_args(argv)
    shape = tuple(int(d) for d in args.shape.split(","))
    tmp = None
    directory = args.dir
    if directory is None:
        tmp = directory = tempfile.mkdtemp(prefix="lmcache-bench-local-", dir="/var/tmp")
    try:
        reports = []
        for i in range(args.repeat):
            report = run_bench(
                ["cpu://", directory],
                kv_shape=shape,
                dtype=args.dtype,
                count=args.count,
                batch=args.batch,
                progress=lambda m: print(m, file=sys.stderr),
            )
            reports.append(report.to_dict())
            print(f"\nrun {i + 1}/{args.repeat}: {args.count} chunks of shape {list(shape)} {args.dtype}")
            print(format_table(report.rows))
            for err in report.errors:
                print(f"error: {err['store']}: {err['error']}", file=sys.stderr)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    with open(args.json, "w") as f:
        json.dump(reports[0] if len(reports) == 1 else {"runs": reports}, f, indent=2)
    print(f"\nJSON: {args.json}")
    return 1 if any(r["errors"] for r in reports) else 0


if __name__ == "__main__":
    sys.exit(main())
