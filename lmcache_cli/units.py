"""Sizes and ages as people type and read them: ``1.5 GiB``, ``512M``, ``7d``, ``3h ago``."""

from __future__ import annotations

import re
import time

_SIZE_RE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgtp]?)(i?)(b?)\s*", re.I)
_SIZE_POWERS = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4, "p": 5}
_AGE_RE = re.compile(r"(\d+(?:\.\d*)?)\s*(s|m|h|d|w)", re.I)
_AGE_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_size(text: str) -> int:
    """Bytes from ``1024``, ``512K``, ``1.5GiB``, ``10MB``, ``2G``.

    Binary units throughout: an operator sizing a cache means GiB whether they
    type ``G``, ``GB`` or ``GiB`` (and LMCache's budgets are 1024**3 too).

    Raises:
        ValueError: naming the accepted forms.
    """
    m = _SIZE_RE.fullmatch(text)
    if not m:
        raise ValueError(f"{text!r} is not a size such as 1024, 512K, 10MB, 1.5GiB")
    number, unit = float(m.group(1)), m.group(2).lower()
    return int(number * 1024 ** _SIZE_POWERS[unit])


def parse_age(text: str) -> float:
    """Seconds from ``90s``, ``30m``, ``12h``, ``7d``, ``2w`` or combinations (``1d12h``).

    Raises:
        ValueError: naming the accepted forms.
    """
    s = text.strip()
    pos = 0
    total = 0.0
    for m in _AGE_RE.finditer(s):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _AGE_SECONDS[m.group(2).lower()]
        pos = m.end()
    if not s or pos != len(s):
        raise ValueError(f"{text!r} is not an age such as 90s, 30m, 12h, 7d, 2w or 1d12h")
    return total


def human_size(n: int | None) -> str:
    """``1.5 GiB``, ``312 B``; ``-`` when unknown."""
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            return f"{int(size)} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def human_age(seconds: float | None) -> str:
    """``42s``, ``5m``, ``3h``, ``2d``, ``6w``; ``-`` when unknown."""
    if seconds is None:
        return "-"
    s = max(0.0, seconds)
    if s < 60:
        return f"{int(s)}s"
    if s < 3600:
        return f"{int(s // 60)}m"
    if s < 86400:
        return f"{int(s // 3600)}h"
    if s < 14 * 86400:
        return f"{int(s // 86400)}d"
    return f"{int(s // (7 * 86400))}w"


def human_time(ts: float | None) -> str:
    """Local ISO-like time with its age, e.g. ``2026-11-28 04:12 (3h ago)``."""
    if ts is None:
        return "-"
    stamp = time.strftime("%Y-%m-%d %H:%M", time.localtime(ts))
    return f"{stamp} ({human_age(time.time() - ts)} ago)"


def human_rate(bytes_per_s: float) -> str:
    """``2.41 GB/s`` (decimal, as throughput is quoted)."""
    return f"{bytes_per_s / 1e9:.2f} GB/s"


def plural(n: int, noun: str) -> str:
    """``1 chunk``, ``3 chunks``."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"
