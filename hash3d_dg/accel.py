"""What a run does differently on an accelerator, in one place: where host reads are allowed,
how host values reach the device, and the "virtual accelerator" that lets the CPU take the
accelerator's code path (to count its kernels and host syncs without one, ``bench launches``).

* ``is_accelerator(device)``: True for a CUDA device, and for the CPU inside ``virtual()``. Code
  whose host syncs depend on the device (how often a stage reads its loss back, whether a value is
  kept on the device or read to the host) asks this instead of ``device.type == "cuda"``.
* ``upload(values, device, dtype)``: host data (numbers, numpy arrays, CPU tensors) to the device
  in one copy: pinned and non-blocking on CUDA, a plain tensor on the CPU (bitwise what
  ``torch.as_tensor(values, dtype=dtype)`` gives, so the CPU path is unchanged).
* ``virtual()``: a context in which the CPU counts as an accelerator. Nothing else changes: the
  tensors stay on the CPU and nothing CUDA-only is called.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence

import numpy as np
import torch

_state = threading.local()


def virtual_active() -> bool:
    """Whether ``virtual()`` is active in this thread."""
    return bool(getattr(_state, "virtual", False))


@contextlib.contextmanager
def virtual() -> Iterator[None]:
    """Inside, ``is_accelerator("cpu")`` is True: the CPU takes the accelerator's code path."""
    previous = virtual_active()
    _state.virtual = True
    try:
        yield
    finally:
        _state.virtual = previous


def is_accelerator(device: torch.device | str | None) -> bool:
    """True on CUDA (and on the CPU inside ``virtual()``): host syncs cost a stall there."""
    if device is None:
        return False
    kind = torch.device(device).type
    return kind == "cuda" or (kind == "cpu" and virtual_active())


def upload(values, device: torch.device | str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``values`` (a number, a sequence, a numpy array or a host tensor) as a tensor on ``device``.

    On CUDA one pinned, non-blocking copy (the host buffer is pinned first, so the copy does not
    wait for the queue of kernels); on the CPU a plain tensor, bitwise equal to
    ``torch.as_tensor(values, dtype=dtype)``.
    """
    device = torch.device(device)
    if isinstance(values, torch.Tensor):
        host = values.detach().to(dtype=dtype)
    else:
        host = torch.as_tensor(np.asarray(values), dtype=dtype)
    if device.type != "cuda":
        if device.type == "cpu":
            return host.to(device, non_blocking=True)  # a no-op on the CPU (counted as an upload)
        return host.to(device)
    if not host.is_pinned():
        host = host.pin_memory()
    return host.to(device, non_blocking=True)


def upload_many(arrays: Sequence, device: torch.device | str,
                dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    """Several host arrays to ``device`` in one copy (concatenated flat, split on the device);
    each keeps its shape. On the CPU each is bitwise ``torch.as_tensor(a, dtype=dtype)``."""
    device = torch.device(device)
    flats = [np.asarray(a, dtype=np.float64 if dtype == torch.float64 else None) for a in arrays]
    if device.type == "cpu" and not virtual_active():
        return [torch.as_tensor(a, dtype=dtype) for a in flats]
    shapes = [a.shape for a in flats]
    packed = np.concatenate([a.reshape(-1) for a in flats]) if flats else np.zeros(0)
    whole = upload(packed, device, dtype)
    out, start = [], 0
    for shape in shapes:
        n = int(np.prod(shape)) if len(shape) else 1
        out.append(whole[start:start + n].reshape(shape))
        start += n
    return out


def resolve_switch(value: str, device: torch.device | str | None, name: str = "setting") -> bool:
    """An ``auto | on | off`` speed setting: ``auto`` is on for an accelerator (CUDA, or the CPU
    inside ``virtual()``), off elsewhere."""
    if value == "auto":
        return is_accelerator(device)
    if value in ("on", "off"):
        return value == "on"
    raise ValueError(f"{name}={value!r} must be auto, on or off")


def adam_options(fused: str, device: torch.device | str | None) -> dict:
    """Keyword arguments for ``torch.optim.Adam`` under a ``fused_adam`` setting: ``fused=True``
    when it resolves on (one kernel per step for all parameters, no host reads); nothing
    otherwise (torch's default: foreach kernels on CUDA, the per-tensor loop on the CPU)."""
    return {"fused": True} if resolve_switch(fused, device, "fused_adam") else {}
