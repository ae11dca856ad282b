"""The guidance's UNet calls replayed from CUDA graphs (``guidance.cuda_graphs``).

Stage 1 is bound by the CPU launching kernels (~4000 per iteration on the H200, GPU busy 25-39 %):
one classifier-free-guided UNet call costs 31.5 ms eager and 7.75 ms replayed from one CUDA graph
(``shared/gpu/README.md``). Everything the UNet sees has a static shape once the render is resized
to the guidance's image size (latents ``[2B, 8, 32, 32]``, context ``[2B, 1, 768]``, the timestep
``[2B]``, the cached feature's shape at the cache point), so each path is captured once per run and
replayed:

* ``GraphedSplit`` wraps a ``UNetSplit`` (it is what the ``CachedDenoiser`` calls). Its ``full``
  and ``shallow`` copy their inputs into static device buffers, replay the graph captured for
  that path and input shapes (one graph per path and batch shape: full, shallow at the split's
  cache point), and return copies of the static outputs. The Hash3D decisions (retrieve or not,
  which cell, the blend) stay outside, on the host and in a few device ops, so a cache hit
  replays the shallow graph with the blended feature copied into its buffer and a miss the full
  graph, whose feature output is copied into the table.
* Nothing inside a graph reads a device value on the host: the timestep reaches the UNet as a
  device tensor (the time embedding is computed from it on the device), shapes are host facts.
* ``GraphedAutograd`` replays stage 1's differentiable encode of the render (forward and
  backward, ``torch.cuda.make_graphed_callables``); the SD VAE's posterior sample is taken
  outside the graph (``mean + std * eps``), so the gradient flows through the graph's mean and
  std exactly as through the eager sample.
* ``GraphedCalls`` does the same for stage 2's no-grad autoencoder calls (the refine's encode
  and its decode); the SD VAE's posterior sample is drawn outside the graph from the guidance's
  generator, on the graph's mean and std.
* On the CPU (and with ``cuda_graphs=off``) the same object runs the same ops on the same static
  buffers eagerly (``capture=False``): the tests check on the CPU that this is bitwise the
  eager path, and on CUDA (``@pytest.mark.cuda``) that replaying equals the eager call within
  fp16 tolerance.

The noise, the timestep and the camera embedding are drawn/computed outside the graphs exactly as
in the eager path (the guidance's generator is never used inside a capture), so a graphed run
draws the same random numbers in the same order.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
from torch import Tensor

log = logging.getLogger(__name__)


def _as_timestep(timestep: Any, rows: int, device: torch.device) -> Tensor:
    if isinstance(timestep, Tensor):
        if timestep.ndim == 0:
            return timestep.to(device).expand(rows)
        return timestep.to(device)
    return torch.full((rows,), int(timestep), dtype=torch.long, device=device)


class CapturedCall:
    """One path's static buffers and (on CUDA) its graph."""

    def __init__(self, fn, inputs: list[Tensor], capture: bool, pool=None) -> None:
        self.fn = fn
        self.static_in = [t.detach().clone() for t in inputs]
        self.graph = None
        self.capture_seconds = 0.0
        if capture:
            start = time.perf_counter()
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream), torch.no_grad():
                for _ in range(2):  # warm-up: cuDNN / cuBLAS pick their kernels outside capture
                    fn(*self.static_in)
            torch.cuda.current_stream().wait_stream(stream)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph, pool=pool), torch.no_grad():
                self.static_out = fn(*self.static_in)
            torch.cuda.synchronize()
            self.capture_seconds = time.perf_counter() - start
        else:
            self.static_out = None

    def run_eager(self):
        """What the graph replays, run eagerly on the static buffers (the CPU path; ``bench
        launches`` counts it as one graph launch)."""
        with torch.no_grad():
            return self.fn(*self.static_in)

    def __call__(self, inputs: list[Tensor]):
        for static, value in zip(self.static_in, inputs):
            static.copy_(value)
        if self.graph is not None:
            self.graph.replay()
            out = self.static_out
        else:
            out = self.run_eager()
        # copies: the next replay overwrites the static outputs
        if isinstance(out, tuple):
            return tuple(o.clone() for o in out)
        return out.clone()


class GraphedSplit:
    """A ``UNetSplit`` whose ``full`` / ``shallow`` calls replay CUDA graphs (see the module
    docstring). ``capture`` False runs the same buffers and ops eagerly (the CPU check).

    Calls with autograd enabled (a caller that wants the gradient w.r.t. the sample) go to the
    eager split unchanged.
    """

    def __init__(self, split, capture: bool | None = None) -> None:
        self.split = split
        device = next(split.unet.parameters()).device
        self.capture = device.type == "cuda" if capture is None else bool(capture)
        if self.capture and device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device")
        self.device = device
        self.graphs = GraphedCalls(self.capture, label="UNet")  # one graph per path and shapes
        self.calls: GraphedCalls | None = None  # the guidance's autoencoder graphs (for stats)
        self.grad_calls: GraphedAutograd | None = None  # its differentiable encode (for stats)
        self.step_graph = None  # its fused SDS step (``step_graph.SDSStepGraph``, for stats)
        self.refine_graph = None  # its fused refine step (``step_graph.RefineStepGraph``, for stats)

    def __getattr__(self, name):  # unet, cache_point, n_skips, ...
        return getattr(self.split, name)

    def full(self, sample: Tensor, timestep, encoder_hidden_states: Tensor):
        if torch.is_grad_enabled() and sample.requires_grad:
            return self.split.full(sample, timestep, encoder_hidden_states)
        t = _as_timestep(timestep, sample.shape[0], sample.device)
        return self.graphs("full", self.split.full, sample, t, encoder_hidden_states)

    def shallow(self, sample: Tensor, timestep, encoder_hidden_states: Tensor, feature: Tensor):
        if torch.is_grad_enabled() and sample.requires_grad:
            return self.split.shallow(sample, timestep, encoder_hidden_states, feature)
        t = _as_timestep(timestep, sample.shape[0], sample.device)
        return self.graphs("shallow", self.split.shallow, sample, t, encoder_hidden_states, feature)

    def __call__(self, sample: Tensor, timestep, encoder_hidden_states: Tensor) -> Tensor:
        return self.full(sample, timestep, encoder_hidden_states)[0]

    def stats(self) -> dict:
        out = {**self.graphs.stats(), "captured": self.capture}
        for name, calls in (("autoencoder", self.calls), ("encoder_autograd", self.grad_calls),
                            ("sds_step", self.step_graph), ("refine_step", self.refine_graph)):
            if calls is not None:  # the autoencoder's graphs of the same guidance
                extra = calls.stats()
                out.update(graphs=out["graphs"] + extra["graphs"],
                           capture_seconds=round(out["capture_seconds"] + extra["capture_seconds"], 3))
                out[f"{name}_replays"] = extra["replays"]
        return out


class GraphedCalls:
    """No-grad calls of fixed functions replayed from CUDA graphs: ``calls(name, fn, *inputs)``
    captures ``fn`` once per name and input shapes (and ``tag``, for a constant ``fn`` reads) and
    replays it (``capture=False``: the same buffers and ops, eagerly). ``fn`` must return a tensor
    or a tuple of tensors and be the same computation for a name at every call: it is only used
    at the first. Used for stage 2's autoencoder encode and decode, the UNet's paths
    (``GraphedSplit``) and the fused steps (``step_graph``); ``label`` names them in the log line
    of a capture."""

    def __init__(self, capture: bool, label: str | None = None) -> None:
        self.capture = bool(capture)
        self.label = label
        self._paths: dict[tuple, CapturedCall] = {}
        self._pool = torch.cuda.graph_pool_handle() if self.capture else None
        self.capture_seconds = 0.0
        self.replays = 0

    def __call__(self, name: str, fn, *inputs: Tensor, tag=None):
        key = (name, tag) + tuple((tuple(t.shape), t.dtype, t.stride()) for t in inputs)
        path = self._paths.get(key)
        if path is None:
            path = CapturedCall(fn, list(inputs), self.capture, self._pool)
            self._paths[key] = path
            self.capture_seconds += path.capture_seconds
            if self.capture and self.label:
                log.info("captured the %s's %s path as a CUDA graph in %.2f s", self.label, name,
                         path.capture_seconds)
        self.replays += 1
        return path(list(inputs))

    def stats(self) -> dict:
        return {"graphs": len(self._paths), "replays": self.replays,
                "capture_seconds": round(self.capture_seconds, 3)}


class GraphedAutograd:
    """Differentiable calls (stage 1's encode of the render, forward and backward) replayed from
    CUDA graphs with ``torch.cuda.make_graphed_callables``, one per name and input shape; the
    input's gradient flows back as from the eager call. ``capture=False`` (the CPU) calls ``fn``
    itself. A capture that fails falls back to the eager call for that shape, with one line."""

    def __init__(self, capture: bool) -> None:
        self.capture = bool(capture)
        self._fns: dict[tuple, Any] = {}
        self.capture_seconds = 0.0
        self.replays = 0

    def __call__(self, name: str, fn, x: Tensor):
        key = (name, tuple(x.shape), x.dtype, x.stride())
        graphed = self._fns.get(key)
        if graphed is None:
            graphed = fn
            if self.capture:
                start = time.perf_counter()
                try:
                    sample = x.detach().clone().requires_grad_(x.requires_grad)
                    graphed = torch.cuda.make_graphed_callables(fn, (sample,))
                except Exception as exc:  # noqa: BLE001 - the eager call still works
                    log.warning("CUDA graph capture of %s failed (%s: %s); running it eagerly",
                                name, type(exc).__name__, str(exc).splitlines()[0][:200])
                    graphed = fn
                self.capture_seconds += time.perf_counter() - start
            self._fns[key] = graphed
        self.replays += 1
        return graphed(x)

    def stats(self) -> dict:
        return {"graphs": sum(1 for f in self._fns.values() if self.capture), "replays": self.replays,
                "capture_seconds": round(self.capture_seconds, 3)}


def use_cuda_graphs(setting: str, device: torch.device | str) -> bool:
    """``guidance.cuda_graphs`` resolved: ``auto`` is on for CUDA only (graphs need one); ``on``
    on a device without CUDA is refused with one line."""
    kind = torch.device(device).type
    if setting == "auto":
        return kind == "cuda"
    if setting == "on":
        if kind != "cuda":
            raise ValueError(f"guidance.cuda_graphs=on needs a CUDA device (the run is on {device})")
        return True
    if setting == "off":
        return False
    raise ValueError(f"guidance.cuda_graphs={setting!r} must be auto, on or off")

