"""Device names checked and pinned down once, when a store is configured.

A bare ``"cuda"`` means "the current device" to torch, and the current device is
per host thread: a thread the library starts sits on GPU 0, whatever the caller
chose with ``torch.cuda.set_device``. So ``"cuda"`` is resolved to ``cuda:N`` of
the configuring thread, and every later copy (on any thread) goes to that GPU.
"""

from __future__ import annotations

import torch


def resolve_device(name: str | torch.device, what: str = "dst_device") -> torch.device:
    """``name`` as a ``torch.device`` of type cpu or cuda, a CUDA index made explicit.

    Thread-safe. Initialises CUDA when ``name`` is a bare ``"cuda"`` (to learn the
    current device).

    Raises:
        ValueError: not cpu/cuda, no CUDA device available, or no such GPU.
    """
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"{what} must be cpu or cuda[:N], got {name!r}") from exc
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"{what} must be cpu or cuda[:N], got {name!r}")
    if dev.type == "cpu":
        return torch.device("cpu")  # "cpu:0" and "cpu" compare unequal in torch
    if not torch.cuda.is_available():
        raise ValueError(f"{what}={str(name)!r} but no CUDA device is available; pass {what}='cpu'")
    count = torch.cuda.device_count()
    if dev.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    if dev.index >= count:
        raise ValueError(f"{what}={str(name)!r} but this machine has {count} CUDA device(s)")
    return dev
