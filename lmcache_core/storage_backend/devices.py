"""Device names checked and pinned down once, when a store is configured.

A bare ``"cuda"`` means "the current device" to torch, and the current device is
per host thread: a thread the library starts sits on GPU 0, whatever the caller
chose with ``torch.cuda.set_device``. So ``"cuda"`` is resolved to ``cuda:N`` of
the configuring thread, and every later copy (on any thread) goes to that GPU.
The stream helpers below hand GPU tensors between a caller's CUDA stream and the
library's threads.
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


# -- CUDA streams ------------------------------------------------------------------------
#
# The library's threads (writers, readers, decoders) work on each GPU's default stream;
# a caller may work on another (LMCache loads and stores on side streams), and torch
# orders neither against the other. These helpers hand GPU tensors across that line.
# Each is a no-op for CPU tensors, and none touches CUDA unless a tensor is on a GPU.


def for_library_threads(tensor: torch.Tensor) -> None:
    """Make the library's threads' later GPU work on ``tensor`` wait for the calling
    thread's work queued so far (which may still be writing it). Thread-safe.

    The host does not wait: the default stream waits, on the GPU, for the caller's
    stream (``Stream.wait_stream``). Called before queueing a GPU tensor for a writer.
    """
    if not tensor.is_cuda:
        return
    current = torch.cuda.current_stream(tensor.device)
    default = torch.cuda.default_stream(tensor.device)
    if current != default:
        default.wait_stream(current)


def finished(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor``, once the GPU work this thread queued (the copy that filled it) is done.

    For a tensor about to be seen by other threads, which may read it on any stream:
    a GPU-to-GPU ``copy_`` returns before it has run. Thread-safe.
    """
    if tensor.is_cuda:
        torch.cuda.current_stream(tensor.device).synchronize()
    return tensor


def caller_stream(device: torch.device) -> torch.cuda.Stream | None:
    """The calling thread's current stream on ``device`` (None for the CPU), captured on the
    caller's thread for tensors that library threads will make for it. Thread-safe."""
    return torch.cuda.current_stream(device) if device.type == "cuda" else None


def used_on(tensor: torch.Tensor, stream: torch.cuda.Stream | None) -> torch.Tensor:
    """``tensor``, marked as used on ``stream`` when a library thread allocated it for a
    caller working there (``Tensor.record_stream``): else, once the caller drops it, the
    caching allocator may give its memory to the library thread's stream again while
    kernels the caller queued still read it. Thread-safe."""
    if stream is not None and tensor.is_cuda:
        tensor.record_stream(stream)
    return tensor
