"""Chunk keys and the prefix-hash chain of token ids.

``CacheEngineKey.to_string()`` is LMCache's ``fmt@model@world_size@worker_id@hash``
form; ``from_string`` is its exact inverse. Keys are immutable and thread-safe.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:  # torch is heavy; `lmcache --help` must not import it
    import numpy as np
    import torch

FORMATS = ("vllm", "huggingface")
#: the token axis of a chunk tensor, per fmt (``[layers, 2, tokens, heads, head_size]`` for vllm)
TOKEN_AXIS = {"vllm": 2, "huggingface": 3}
MAX_MODEL_NAME_CHARS = 512
# Also bounded in UTF-8 bytes: a store path percent-encodes each byte as 3 characters,
# and 512 four-byte characters would make a path longer than PATH_MAX (4096).
MAX_MODEL_NAME_BYTES = 1024
# world_size (and so worker_id) is below this: a 300-digit one made a store path component
# longer than NAME_MAX (255 bytes), and the disk tier's put raised ENAMETOOLONG.
MAX_WORLD_SIZE = 2**31
_INT64_MAX = 2**63 - 1
_HASH_RE = re.compile(r"[0-9a-f]{1,128}")
_SEP = "@"


@dataclass(frozen=True, slots=True)
class CacheEngineKey:
    """The name of one chunk: which model, which worker, which token prefix.

    Args:
        fmt: KV layout, ``"vllm"`` or ``"huggingface"``.
        model_name: model identifier; any text without ``@`` or control characters.
        world_size: tensor-parallel world size, in ``[1, 2**31)``.
        worker_id: rank of the worker, in ``[0, world_size)``.
        chunk_hash: lowercase hex prefix hash, 1-128 characters.

    Raises:
        ValueError: naming the first invalid field.
    """

    fmt: str
    model_name: str
    world_size: int
    worker_id: int
    chunk_hash: str

    def __post_init__(self) -> None:
        if not isinstance(self.fmt, str) or self.fmt not in FORMATS:
            raise ValueError(f"fmt: {self.fmt!r} is not one of {', '.join(FORMATS)}")
        _check_model_name(self.model_name)
        if isinstance(self.world_size, bool) or not isinstance(self.world_size, int):
            raise ValueError(f"world_size: expected an int, got {type(self.world_size).__name__}")
        if not 1 <= self.world_size < MAX_WORLD_SIZE:
            raise ValueError(f"world_size: must be in [1, {MAX_WORLD_SIZE}), got {str(self.world_size)[:40]}")
        if isinstance(self.worker_id, bool) or not isinstance(self.worker_id, int):
            raise ValueError(f"worker_id: expected an int, got {type(self.worker_id).__name__}")
        if not 0 <= self.worker_id < self.world_size:
            raise ValueError(
                f"worker_id: must be in [0, {self.world_size}), got {self.worker_id}"
            )
        if not isinstance(self.chunk_hash, str) or not _HASH_RE.fullmatch(self.chunk_hash):
            raise ValueError(
                f"chunk_hash: must be 1-128 lowercase hex characters, got {self.chunk_hash!r:.80}"
            )

    def as_tuple(self) -> tuple[str, str, int, int, str]:
        """The fields in order: a stand-in hashed and compared in C, where the key's own
        ``__hash__``/``__eq__`` are Python code an interrupt can land in (``LRUIndex``)."""
        return (self.fmt, self.model_name, self.world_size, self.worker_id, self.chunk_hash)

    def to_string(self) -> str:
        """LMCache's ``fmt@model@world_size@worker_id@chunk_hash`` form."""
        return _SEP.join(
            (self.fmt, self.model_name, str(self.world_size), str(self.worker_id), self.chunk_hash)
        )

    @classmethod
    def from_string(cls, text: str) -> CacheEngineKey:
        """Parse ``to_string()`` output exactly.

        Raises:
            ValueError: when ``text`` is not a valid key string.
        """
        if not isinstance(text, str):
            raise ValueError(f"key: expected a string, got {type(text).__name__}")
        parts = text.split(_SEP)
        if len(parts) != 5:
            raise ValueError(
                f"key: expected 5 '@'-separated fields "
                f"(fmt@model@world_size@worker_id@hash), got {len(parts)}"
            )
        fmt, model, ws, wid, chunk_hash = parts
        return cls(fmt, model, _parse_int("world_size", ws), _parse_int("worker_id", wid), chunk_hash)

    def __str__(self) -> str:
        return self.to_string()


def _parse_int(field: str, text: str) -> int:
    # int() accepts " 1", "+1", "1_0" and non-ASCII digits; a key string must be canonical.
    if not text.isascii() or not text.isdigit() or (len(text) > 1 and text[0] == "0"):
        raise ValueError(f"{field}: {text!r:.40} is not a canonical non-negative integer")
    if len(text) > len(str(MAX_WORLD_SIZE)):  # never a valid one; int() of 5000 digits raised its own error
        raise ValueError(f"{field}: {text!r:.40} must be below {MAX_WORLD_SIZE}")
    return int(text)


def _check_model_name(name: Any) -> None:
    if not isinstance(name, str):
        raise ValueError(f"model_name: expected a string, got {type(name).__name__}")
    if not name:
        raise ValueError("model_name: must not be empty")
    if _SEP in name:
        raise ValueError("model_name: must not contain '@' (it separates key fields)")
    if len(name) > MAX_MODEL_NAME_CHARS:
        raise ValueError(f"model_name: longer than {MAX_MODEL_NAME_CHARS} characters")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in name):
        raise ValueError("model_name: must not contain control characters")
    try:
        encoded = name.encode("utf-8")
    except UnicodeEncodeError as exc:  # lone surrogates cannot be stored anywhere
        raise ValueError("model_name: not encodable as UTF-8") from exc
    if len(encoded) > MAX_MODEL_NAME_BYTES:
        raise ValueError(f"model_name: longer than {MAX_MODEL_NAME_BYTES} bytes in UTF-8")


def chunk_hashes(
    token_ids: Sequence[int] | np.ndarray | torch.Tensor, chunk_size: int = 256
) -> list[str]:
    """Prefix-hash chain: one sha256 hex digest per ``chunk_size`` tokens.

    Chunk *i*'s hash is ``sha256(hash_{i-1}.encode("ascii") + tokens_i as int64
    little-endian)``, with ``hash_{-1} = ""``. The last chunk may be partial.
    Equal prefixes give equal hashes in every process (never Python's ``hash()``).

    Args:
        token_ids: a list of ints, a 1-D numpy array or a 1-D torch tensor of any
            integer dtype (int32 and int64 give the same hashes); each id must fit in int64.
        chunk_size: tokens per chunk, >= 1.

    Returns:
        ``ceil(len(token_ids) / chunk_size)`` lowercase hex digests.

    Raises:
        ValueError: ``chunk_size`` < 1, ``token_ids`` not 1-D, not integers, or an
            id outside int64.
    """
    import numpy as np

    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size: must be an int >= 1, got {chunk_size!r}")
    if hasattr(token_ids, "detach"):  # a torch tensor, without importing torch
        dtype: Any = token_ids.dtype  # type: ignore[union-attr]
        if dtype.is_floating_point or dtype.is_complex:
            # Checked before .numpy(): a bf16 or fp8 tensor raised a bare TypeError there.
            raise ValueError(f"token_ids: expected integers, got dtype {dtype}")
        token_ids = token_ids.detach().cpu().numpy()  # type: ignore[union-attr]
    arr = np.asarray(token_ids)
    if arr.ndim != 1:
        raise ValueError(f"token_ids: expected a 1-D sequence, got {arr.ndim} dimensions")
    if arr.size and arr.dtype.kind not in "iub":
        raise ValueError(f"token_ids: expected integers, got dtype {arr.dtype}")
    if arr.size and arr.dtype.kind == "u" and arr.dtype.itemsize == 8 and int(arr.max()) > _INT64_MAX:
        # The int64 cast wrapped them: token 2**63 hashed as -2**63 (and 2**64-1 as -1),
        # so two different prompts shared keys. No key of an in-range id changes.
        raise ValueError(f"token_ids: must fit in int64 (-2**63 .. 2**63-1), got {int(arr.max())}")
    tokens = arr.astype("<i8", copy=False)
    hashes: list[str] = []
    prev = ""
    for start in range(0, len(tokens), chunk_size):
        digest = hashlib.sha256(prev.encode("ascii"))
        digest.update(tokens[start : start + chunk_size].tobytes())
        prev = digest.hexdigest()
        hashes.append(prev)
    return hashes
