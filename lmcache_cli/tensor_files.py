"""Reading tensors and token ids from files people have, and writing results.

Never unpickles: ``.npy`` with ``allow_pickle=False``, ``.pt`` with
``weights_only=True``; ``.safetensors`` holds no code by construction.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmcache_cli.errors import CliError, usage_error

if TYPE_CHECKING:
    import numpy as np
    import torch

TENSOR_SUFFIXES = (".safetensors", ".npy", ".pt", ".pth")


def _pick(tensors: dict[str, Any], name: str | None, path: Path) -> Any:
    if name is not None:
        if name not in tensors:
            raise CliError(f"{path}: no tensor named {name!r}; it holds {', '.join(sorted(tensors)) or 'none'}")
        return tensors[name]
    if len(tensors) != 1:
        raise usage_error(
            f"{path} holds {len(tensors)} tensors ({', '.join(sorted(tensors)[:6])}); choose one with --tensor NAME"
        )
    return next(iter(tensors.values()))


def load_tensor(path: str, tensor_name: str | None = None) -> torch.Tensor:
    """One tensor from ``.safetensors`` (one, or ``tensor_name``), ``.npy`` or ``.pt``/``.pth``."""
    import torch

    p = Path(path)
    suffix = p.suffix.lower()
    if not p.is_file():
        raise CliError(f"tensor file {p} not found; check the path")
    if suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            tensors = load_file(str(p))
        except SafetensorError as exc:
            raise CliError(f"{p} is not a valid safetensors file: {exc}") from None
        return _pick(tensors, tensor_name, p)  # type: ignore[no-any-return]
    if suffix == ".npy":
        import numpy as np

        arr = _load_npy(p, "save a plain numeric array")
        if tensor_name is not None:
            raise usage_error("--tensor applies to .safetensors and .pt files, not .npy")
        # Native byte order (torch refuses '>f4'), C order, and the array's own shape:
        # np.ascontiguousarray alone turns a 0-d array into shape (1,).
        native = arr.astype(arr.dtype.newbyteorder("="), copy=False)
        return torch.from_numpy(np.ascontiguousarray(native).reshape(arr.shape))
    if suffix in (".pt", ".pth"):
        try:
            obj = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as exc:  # weights_only refuses arbitrary objects: say so plainly
            raise CliError(f"{p}: not loadable with weights_only=True ({str(exc).splitlines()[0]})") from None
        if isinstance(obj, torch.Tensor):
            if tensor_name is not None:
                raise usage_error(f"{p} holds a single tensor; drop --tensor")
            return obj
        if isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return _pick({str(k): v for k, v in obj.items()}, tensor_name, p)  # type: ignore[no-any-return]
        raise CliError(f"{p} holds a {type(obj).__name__}, not a tensor or a dict of tensors")
    raise usage_error(f"{p}: unsupported file type {suffix or '(none)'}; use one of {', '.join(TENSOR_SUFFIXES)}")


def load_tokens(path: str) -> np.ndarray:
    """Token ids from a ``.json`` list of ints or a 1-D integer ``.npy``."""
    import numpy as np

    p = Path(path)
    if not p.is_file():
        raise CliError(f"token file {p} not found; check the path")
    if p.suffix.lower() == ".npy":
        arr = _load_npy(p, "save a 1-D integer array")
    elif p.suffix.lower() == ".json":
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as exc:
            raise CliError(f"{p} is not valid JSON: {exc}") from None
        if not isinstance(data, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in data):
            raise CliError(f"{p} must hold a JSON list of integer token ids")
        try:
            arr = np.asarray(data, dtype=np.int64)
        except OverflowError:
            raise CliError(f"{p}: token ids must fit in 64 bits (-2**63 .. 2**63-1)") from None
    else:
        raise usage_error(f"{p}: token ids must be a .json list or a .npy array")
    if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
        raise CliError(f"{p} must hold a 1-D array of integer token ids, got {arr.ndim}-D {arr.dtype}")
    return arr


def _load_npy(p: Path, hint: str) -> np.ndarray:
    """An array from a ``.npy`` file, never unpickled; a clear error for any bad file.

    Raises:
        CliError: the file is empty, not .npy, truncated, or holds Python objects
            (numpy raises EOFError for an empty file and calls any non-.npy file
            "pickled data", since that is what it would have to unpickle).
    """
    import numpy as np

    try:
        arr = np.load(p, allow_pickle=False)
    except (ValueError, EOFError) as exc:  # (an OSError, say permissions, is reported as such)
        text = (str(exc).splitlines() or [type(exc).__name__])[0]
        with open(p, "rb") as f:
            magic = f.read(6)
        if not magic:
            raise CliError(f"{p} is empty; {hint}") from None
        if magic != b"\x93NUMPY":
            raise CliError(f"{p} is not a .npy file (no .npy header); {hint}") from None
        if "object" in text.lower():
            raise CliError(f"{p} holds Python objects, which are never unpickled ({text}); {hint}") from None
        raise CliError(f"{p}: unreadable .npy array, truncated or damaged ({text}); {hint}") from None
    if not isinstance(arr, np.ndarray):  # an .npz archive renamed .npy
        arr.close()
        raise CliError(f"{p} is not a single .npy array; {hint}")
    return arr


def write_atomic(path: str, data_parts: list[Any]) -> int:
    """Write bytes-like parts to ``path`` via a temp file and ``os.replace``; returns bytes.

    Raises:
        CliError: the write failed (``writing PATH: No space left on device; ...``):
            a failed ``write`` names no file, and the temp file is ours, not the user's.
    """
    target = Path(path)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    n = 0
    try:
        with open(tmp, "wb") as f:
            for part in data_parts:
                f.write(part)
                n += memoryview(part).nbytes
        os.replace(tmp, target)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise CliError(f"writing {path}: {exc.strerror or exc}; check the disk and the path") from None
        raise
    return n


def write_safetensors(path: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> int:
    """A plain safetensors file (atomically); returns its size."""
    from safetensors.torch import save

    data = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata=metadata)
    return write_atomic(path, [data])
