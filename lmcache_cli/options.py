"""Argument parsers and option types shared by several commands."""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING, Annotated, Sequence

import typer

from lmcache_cli.errors import usage_error
from lmcache_cli.units import parse_age, parse_size
from lmcache_core.key import CacheEngineKey

if TYPE_CHECKING:
    from lmcache_cli.output import Output
    from lmcache_core.store_ops import ChunkEntry


class KvFmt(str, enum.Enum):
    """KV layout names (``--fmt``)."""

    vllm = "vllm"
    huggingface = "huggingface"


class SortBy(str, enum.Enum):
    """``ls --sort`` orders."""

    name = "name"
    size = "size"
    age = "age"


def parse_key(text: str) -> CacheEngineKey:
    """A key from its ``fmt@model@world_size@worker_id@hash`` string (usage error if bad)."""
    try:
        return CacheEngineKey.from_string(text)
    except ValueError as exc:
        raise usage_error(f"invalid key {text!r:.120}: {exc}") from None


def pattern_argument(pattern: str | None) -> str | None:
    """PATTERN as given; an empty or blank one is a usage error, never "every chunk":
    it is an unset variable (``lmcache evict "$PATTERN" --yes`` in a cron job) far
    more often than a wish for everything, which ``'*'`` says."""
    if pattern is not None and not pattern.strip():
        raise usage_error(f"PATTERN is empty ({pattern!r}); pass '*' to mean every chunk")
    return pattern


#: Which option sets each field that ``CacheEngineKey`` checks, for usage errors.
_KEY_FIELD_OPTIONS = {"model_name": "--model", "world_size": "--world-size", "worker_id": "--worker-id", "fmt": "--fmt"}


def model_option(model: str | None) -> str | None:
    """``--model`` as given, when a key can hold it (usage error otherwise).

    An empty one is an unset variable (``lmcache warm --model "$MODEL"``), never a
    filter: it matched no chunk, so warm "copied 0" and exited 0.
    """
    if model is not None:
        key_fields(model)
    return model


def key_fields(model: str, fmt: str = "vllm", world_size: int = 1, worker_id: int = 0) -> None:
    """Check the fields the keys of a command are built from (usage error, exit 2, if bad):
    a model name with ``@`` or control characters, or ``--worker-id`` >= ``--world-size``,
    is a bad argument, not a failure of the store."""
    if not model.strip():
        raise usage_error(f"--model is empty ({model!r}); give the model name of the keys")
    try:
        CacheEngineKey(fmt, model, world_size, worker_id, "0")
    except ValueError as exc:
        field = str(exc).split(":", 1)[0]
        option = _KEY_FIELD_OPTIONS.get(field, "key")
        raise usage_error(f"{option}: {exc}") from None


def size_option(text: str | None, option: str) -> int | None:
    if text is None:
        return None
    try:
        return parse_size(text)
    except ValueError as exc:
        raise usage_error(f"{option}: {exc}") from None


def age_option(text: str | None, option: str) -> float | None:
    if text is None:
        return None
    try:
        return parse_age(text)
    except ValueError as exc:
        raise usage_error(f"{option}: {exc}") from None


ModelOption = Annotated[str | None, typer.Option("--model", "-m", metavar="NAME", help="Only chunks of this model name.")]
KvFmtFilter = Annotated[KvFmt | None, typer.Option("--fmt", metavar="vllm|huggingface", help="Only chunks of this KV layout.")]
OlderThanOption = Annotated[
    str | None,
    typer.Option("--older-than", metavar="AGE", help="Only chunks not written or read for AGE (90s, 30m, 12h, 7d, 2w)."),
]
PatternArgument = Annotated[
    str | None,
    typer.Argument(
        metavar="PATTERN",
        help="Glob on the key string (fmt@model@ws@worker@hash), e.g. 'vllm@llama*'; text without * ? [ matches as a substring; '*' matches every chunk (an empty PATTERN is an error).",
        show_default=False,
    ),
]
TokensOption = Annotated[
    str | None, typer.Option("--tokens", "-t", metavar="FILE", help="Token ids: a .json list or a 1-D .npy array.")
]
ChunkSizeOption = Annotated[
    int | None, typer.Option("--chunk-size", metavar="N", min=1, help="Tokens per chunk [default: the config's chunk_size, 256].")
]
WorldSizeOption = Annotated[int, typer.Option("--world-size", metavar="N", min=1, help="Tensor-parallel world size of the keys.")]
WorkerIdOption = Annotated[int, typer.Option("--worker-id", metavar="N", min=0, help="Worker rank of the keys.")]
KvFmtOption = Annotated[KvFmt, typer.Option("--fmt", metavar="vllm|huggingface", help="KV layout: vllm [L,2,T,H,D] or huggingface [L,2,H,T,D].")]


def warn_unknown_ages(out: Output, entries: Sequence[ChunkEntry], where: str, option: str = "--older-than") -> None:
    """Warn that ``--older-than`` cannot match chunks whose medium records no age (Redis),
    rather than let it match nothing in silence; for ``--to-size``, that it takes them
    first, in key order, which is no least-recently-used order."""
    unknown = sum(1 for e in entries if e.last_used is None)
    if unknown:
        what = "chunk has" if unknown == 1 else "chunks have"
        if option == "--to-size":
            out.warn(
                f"{unknown} {what} no recorded age in {where}; --to-size removes them first, "
                "in key order, not least recently used first"
            )
        else:
            out.warn(f"{unknown} {what} no recorded age in {where}; {option} never selects them")
