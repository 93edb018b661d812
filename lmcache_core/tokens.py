"""Token-level access: store a prompt's KV by prefix-hash chunks, find and fetch
the longest cached prefix. Thread-safe when the backend is.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from lmcache_core.key import TOKEN_AXIS, CacheEngineKey, chunk_hashes
from lmcache_core.storage_backend.abstract_backend import LMCBackendInterface

Progress = Callable[[int, int, int], None]  # (chunks done, chunks total, bytes done)


@dataclass(frozen=True)
class StoreResult:
    """What ``ChunkedKVStore.store`` did."""

    tokens: int
    chunks: int
    stored: int
    skipped: int
    nbytes: int
    #: chunks a tier did not take (a hybrid's remote that is down); not stored everywhere
    failed: int = 0


@dataclass(frozen=True)
class PrefixLookup:
    """How much of a prompt is cached: leading tokens and chunks, overall and per tier."""

    tokens: int
    chunks: int
    total_tokens: int
    total_chunks: int
    per_tier: dict[str, int] = field(default_factory=dict)  # tier name -> cached leading tokens


def chunk_tokens(index: int, n: int, chunk_size: int) -> int:
    """Tokens chunk ``index`` of an ``n``-token prompt covers: ``chunk_size``, fewer for the last."""
    return min(chunk_size, n - index * chunk_size)


def continues_prefix(found: list[torch.Tensor], chunk: torch.Tensor, axis: int, tokens: int) -> bool:
    """Whether ``chunk`` can extend the prefix ``found``: the same dtype, device and
    non-token dimensions, and exactly ``tokens`` on ``axis`` (``chunk_tokens``; the
    prompt's last chunk too: one of another length gave KV longer or shorter than the
    tokens it was said to cover). Chunks of one prefix may come from different puts
    (another model config, a hand-made put); joined, they would be wrong KV, silently
    upcast or mis-sized."""
    if chunk.dim() != 5 or chunk.shape[axis] != tokens:
        return False
    if not found:
        return True
    first = found[0]
    return (
        chunk.dtype == first.dtype
        and chunk.device == first.device
        and all(chunk.shape[d] == first.shape[d] for d in range(5) if d != axis)
    )


class ChunkedKVStore:
    """A backend addressed by token ids instead of keys.

    The caller's tensors are never shared with the store: ``store`` leaves ``kv``
    free to be reused once it returns (``blocking=False`` too), and ``retrieve``
    returns KV of its own, not a view of a memory tier's cache.

    Args:
        backend: any ``LMCBackendInterface``.
        model_name, fmt, world_size, worker_id: the key fields of every chunk.
        chunk_size: tokens per chunk (LMCache's default is 256).

    Raises:
        ValueError: an invalid key field or ``chunk_size``.
    """

    def __init__(
        self,
        backend: LMCBackendInterface,
        model_name: str,
        *,
        fmt: str = "vllm",
        chunk_size: int = 256,
        world_size: int = 1,
        worker_id: int = 0,
    ) -> None:
        if fmt not in TOKEN_AXIS:
            raise ValueError(f"fmt: {fmt!r} is not one of {', '.join(TOKEN_AXIS)}")
        self.backend = backend
        self.model_name = model_name
        self.fmt = fmt
        self.chunk_size = chunk_size
        self.world_size = world_size
        self.worker_id = worker_id
        # Validate the key fields once, with a clear message, before any work.
        CacheEngineKey(fmt, model_name, world_size, worker_id, "0")
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size: must be an int >= 1, got {chunk_size!r}")

    @property
    def token_axis(self) -> int:
        return TOKEN_AXIS[self.fmt]

    def keys_for(self, token_ids: Sequence[int] | Any) -> list[CacheEngineKey]:
        """The chunk keys of a token sequence, in order."""
        return [
            CacheEngineKey(self.fmt, self.model_name, self.world_size, self.worker_id, h)
            for h in chunk_hashes(token_ids, self.chunk_size)
        ]

    def split(self, kv: torch.Tensor, n_tokens: int) -> list[torch.Tensor]:
        """``kv`` cut along its token axis into ``chunk_size`` pieces (last may be partial)."""
        if not isinstance(kv, torch.Tensor):
            raise TypeError(f"kv must be a torch.Tensor, got {type(kv).__name__}")
        axis = self.token_axis
        if kv.dim() != 5:
            raise ValueError(
                f"kv must have 5 dimensions ({_layout(self.fmt)}), got shape {tuple(kv.shape)}"
            )
        if kv.shape[1] != 2:
            raise ValueError(
                f"kv must hold keys and values on axis 1 ({_layout(self.fmt)}), got shape {tuple(kv.shape)}"
            )
        if not kv.is_floating_point():
            # An int or bool tensor is no KV cache (a token-id array passed as --kv, say):
            # stored, it would be served to an engine as if it were one.
            raise ValueError(f"kv must be a floating-point tensor (fp16, bf16, fp32, fp8), got {kv.dtype}")
        if kv.shape[axis] != n_tokens:
            raise ValueError(
                f"kv has {kv.shape[axis]} tokens on axis {axis} ({_layout(self.fmt)}) "
                f"but {n_tokens} token ids were given"
            )
        if n_tokens == 0:
            return []  # torch.split of an empty axis gives one empty piece, for no key
        return list(torch.split(kv, self.chunk_size, dim=axis))

    def store(
        self,
        token_ids: Sequence[int] | Any,
        kv: torch.Tensor,
        *,
        skip_existing: bool = True,
        blocking: bool = True,
        progress: Progress | None = None,
    ) -> StoreResult:
        """Split ``kv`` by chunk, key each by prefix hash and put them.

        Args:
            skip_existing: do not rewrite chunks the backend already has.
            blocking: wait for the writes (else they go to the backend's workers;
                ``kv`` may still be changed or reused as soon as this returns).
            progress: called after each chunk with (done, total, bytes).
        """
        keys = self.keys_for(token_ids)
        pieces = self.split(kv, _length(token_ids))
        stored = skipped = nbytes = failed = 0
        # Held means held by every tier (a hybrid's contains() answers from any): a
        # chunk its remote did not take is not skipped next time, and counts as failed.
        missing = self.backend.missing_tiers
        for i, (key, piece) in enumerate(zip(keys, pieces, strict=True)):
            size = piece.numel() * piece.element_size()
            if skip_existing and not missing(key):
                skipped += 1
            else:
                chunk = piece.contiguous()
                if not blocking and _same_memory(chunk, kv):
                    # A queued put holds the tensor it was given until a worker writes it
                    # (put_nonblocking: "must not modify"). The pieces of a longer prompt
                    # are copies already, but a one-chunk prompt's piece is ``kv`` itself:
                    # a caller that reused its buffer after store() returned had the new
                    # contents cached under this prompt's key.
                    chunk = chunk.clone()
                self.backend.put(key, chunk, blocking=blocking)
                if blocking and missing(key):
                    failed += 1
                else:
                    stored += 1
                    nbytes += size
            if progress is not None:
                progress(i + 1, len(keys), nbytes)
        return StoreResult(_length(token_ids), len(keys), stored, skipped, nbytes, failed)

    def lookup(self, token_ids: Sequence[int] | Any) -> PrefixLookup:
        """Leading tokens cached, overall and per tier, without reading payloads.

        Counts the chunks each tier says it holds (``contains``), so it is an upper
        bound: ``retrieve`` may cover fewer tokens when a chunk vanished meanwhile,
        fails its checksum, or does not continue the prefix (another dtype, shape or
        length). ``store_ops.prefix_lookup`` (``lmcache lookup``) reads each header.
        """
        n = _length(token_ids)
        keys = self.keys_for(token_ids)
        chunks = _prefix_hits(self.backend, keys)
        per_tier: dict[str, int] = {}
        tiers = getattr(self.backend, "tiers", None)
        if callable(tiers):
            for name, tier in tiers():
                per_tier[name] = self._tokens(_prefix_hits(tier, keys), n)
        else:
            per_tier[self.backend.describe()] = self._tokens(chunks, n)
        return PrefixLookup(self._tokens(chunks, n), chunks, n, len(keys), per_tier)

    def retrieve(self, token_ids: Sequence[int] | Any) -> tuple[torch.Tensor | None, int]:
        """The KV of the longest cached prefix and how many tokens it covers.

        Chunks are fetched in one ``batched_get``; the prefix ends at the first
        miss (a chunk that vanished or failed its checksum counts as a miss) or at
        the first chunk that does not continue it (``continues_prefix``). The KV is
        the caller's own (new memory, on the backend's ``dst_device``), never a view
        of the cache: writing into it changes no stored chunk.
        """
        n = _length(token_ids)
        keys = self.keys_for(token_ids)
        hits = _prefix_hits(self.backend, keys)
        if hits == 0:
            return None, 0
        found: list[torch.Tensor] = []
        for i, chunk in enumerate(self.backend.batched_get(keys[:hits])):
            if chunk is None or not self._continues(found, chunk, chunk_tokens(i, n, self.chunk_size)):
                break
            found.append(chunk)
        if not found:
            return None, 0
        # cat copies one chunk too: a memory tier's get is zero-copy, and a one-chunk
        # prefix returned as it came let a caller's in-place change (a rotary fix-up,
        # a reused buffer) rewrite the cached chunk for every later prompt.
        kv = torch.cat(found, dim=self.token_axis)
        return kv, sum(int(c.shape[self.token_axis]) for c in found)

    def _continues(self, found: list[torch.Tensor], chunk: torch.Tensor, tokens: int) -> bool:
        return continues_prefix(found, chunk, self.token_axis, tokens)

    def _tokens(self, chunks: int, n: int) -> int:
        return min(n, chunks * self.chunk_size)


def _prefix_hits(backend: LMCBackendInterface, keys: list[CacheEngineKey]) -> int:
    for i, key in enumerate(keys):
        if not backend.contains(key):
            return i
    return len(keys)


def _same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` and ``b`` are views of one storage."""
    return a.device == b.device and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def _length(token_ids: Sequence[int] | Any) -> int:
    if hasattr(token_ids, "shape"):
        return int(token_ids.shape[0]) if len(token_ids.shape) else 0
    return len(token_ids)


def _layout(fmt: str) -> str:
    return "[layers, 2, tokens, heads, head_size]" if fmt == "vllm" else "[layers, 2, heads, tokens, head_size]"
