"""Kernels launched and host syncs per steady-state iteration of each stage, counted on the CPU.

``python -m hash3d_dg.bench launches [--json]`` runs both stages on the built-in tiny random
Zero-1-to-3 (tiny renders: the counts do not depend on sizes) once per Hash3D mode, under
``accel.virtual()`` (the CPU takes the accelerator's code path: the loss is read every 10 steps,
values stay on the device, fused Adam where a run on CUDA would use it) and counts what every
iteration would ask of a GPU. ``--json`` gives ``modes.<mode>.stage1`` and ``.stage2``, each with
``kernels_per_iter``, ``syncs_per_iter`` and ``uploads_per_iter`` (blocking host-to-device copies),
``async_uploads_per_iter`` (pinned, non-blocking ones), the sites of the syncs and uploads, and
what the rasteriser (excluded, see below) did. The mesh phase (``mesh``, once: it does not depend
on the Hash3D mode) is counted whole, not per iteration: ``mesh.kernels``, ``mesh.syncs``,
``mesh.uploads`` (blocking) and ``mesh.sync_sites`` (``file:line`` -> count) of one
``extract_textured_mesh`` (box fit, density grid, marching cubes, clean-up, uv atlas, bake) on a
tiny blob of Gaussians (:func:`count_mesh`).

How it counts: the virtual device
---------------------------------
On the CPU every tensor lives in host memory, so "would this op wait for the GPU?" needs a notion of
which tensors *would* be on the device. ``LaunchCounter`` keeps one: a tensor is a **device**
tensor unless it is known to be a **host** tensor, which is

* made from host data without a device (``torch.tensor(data)``, ``torch.as_tensor(array)``,
  ``torch.from_numpy``), or by a factory called without ``device=`` (``torch.zeros(3)``);
* read back to the host (``.cpu()``, ``.to("cpu")``, ``.numpy()``);
* computed only from host tensors.

Convention the code base follows for this to work (and which a run on CUDA needs anyway): a
``torch.device`` object names the run's device, the string ``"cpu"`` (or ``.cpu()``) names the host.

Then (a ``TorchFunctionMode`` sees the Python-level calls, a ``TorchDispatchMode`` every aten op):

* **kernel**: an aten op on device tensors that is not a view or metadata op (``detach``,
  ``view``, ``empty``...). One aten op is about one kernel launch (cuDNN's layout conversions and
  a few multi-kernel ops launch more on a GPU; the CPU dispatches composite ops to the same aten
  ops as CUDA).
* **sync**: a device value read by the host: ``.item()`` / ``float()`` / ``int()`` / ``bool()``
  (``_local_scalar_dense``), ``.tolist()``, ``.numpy()``, ``.cpu()`` / ``.to("cpu")``; ops whose
  output shape depends on device values: ``nonzero``, boolean-mask indexing (``index`` /
  ``index_put_`` with a bool index), ``masked_select``, ``repeat_interleave`` without
  ``output_size``, ``unique``.
* **blocking upload**: host data copied to the device from pageable memory: ``torch.tensor(data,
  device=...)``, ``torch.as_tensor(array, device=...)``, ``host.to(device)`` or ``copy_`` of a host
  tensor into a device one without ``non_blocking=True``; with it, an **async upload**
  (``accel.upload`` pins the host buffer first).

CUDA graphs: by default the UNet calls go through ``GraphedSplit`` as a CUDA run with
``guidance.cuda_graphs=auto`` does; on the CPU it runs what the graph would replay eagerly on its
static buffers, and the counter counts that as **one** launch (``graph_launches``; the ops inside
are ``graphed_kernels``); stage 1's differentiable encode (``make_graphed_callables``) counts one
launch forward and one backward. ``--no-graphs`` counts the eager calls.

Iterations are the windows between successive optimiser steps (a global step pre-hook); a
*steady-state* iteration is one with no check (the loss and divergence flags are read every 10
steps), no densify/prune and no optimiser-state initialisation. The rasteriser is excluded: the
torch rasterisers stand in for gsplat and nvdiffrast, which a CUDA run uses, so their forward and
backward ops are counted apart (``rasterizer``); everything around them (camera matrices,
backgrounds, the guidance, the loss, the optimiser, the densification statistics) is counted.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import sys
import time
from collections import Counter
from dataclasses import dataclass, field, fields, is_dataclass

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.weak import WeakTensorKeyDictionary

_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SELF = {os.path.abspath(__file__), os.path.join(_PACKAGE, "accel.py")}
_TORCH = os.path.dirname(torch.__file__)

aten = torch.ops.aten

#: aten ops that launch nothing on a GPU (views, metadata, allocation without a fill).
_NO_KERNEL = {
    aten.detach.default, aten.lift_fresh.default, aten.alias.default, aten.empty.memory_format,
    aten.empty_strided.default, aten.empty_like.default, aten.set_.source_Storage_storage_offset,
    aten._local_scalar_dense.default, aten.resize_.default, aten.new_empty.default,
    aten.new_empty_strided.default, aten.sym_size.int, aten.sym_stride.int, aten.sym_numel.default,
    aten.is_same_size.default, aten._has_compatible_shallow_copy_type.default,
    aten.lift_fresh_copy.default,
}
_SHAPE_SYNC = {aten.nonzero.default, aten.masked_select.default, aten.unique_dim.default,
               aten._unique2.default, aten._unique.default, aten.unique_consecutive.default,
               aten.equal.default}
_FACTORIES = {torch.zeros, torch.ones, torch.full, torch.empty, torch.arange, torch.linspace,
              torch.rand, torch.randn, torch.randint, torch.randperm, torch.eye, torch.logspace,
              torch.scalar_tensor}
_FROM_DATA = {torch.tensor, torch.as_tensor, torch.asarray}
_READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.__float__,
          torch.Tensor.__int__, torch.Tensor.__bool__, torch.Tensor.__index__}


def _site() -> str:
    """``file:line`` of the innermost frame of this package that led here (and of the library
    frame it called, when the read happened inside a library)."""
    frame = sys._getframe(2)
    outer = None
    inner_lib = None
    while frame is not None:
        path = os.path.abspath(frame.f_code.co_filename)
        if path.startswith(_PACKAGE + os.sep) and path not in _SELF:
            outer = f"{os.path.relpath(path, os.path.dirname(_PACKAGE))}:{frame.f_lineno}"
            break
        if inner_lib is None and not path.startswith(_TORCH) and path not in _SELF \
                and "site-packages" in path:
            inner_lib = f"{path.split('site-packages' + os.sep)[-1]}:{frame.f_lineno}"
        frame = frame.f_back
    if outer is None:
        return inner_lib or "?"
    return outer if inner_lib is None else f"{outer} ({inner_lib})"


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            yield from _tensors(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _tensors(item)


@dataclass
class Counts:
    kernels: int = 0
    syncs: int = 0
    uploads: int = 0
    async_uploads: int = 0
    rasterizer_kernels: int = 0
    rasterizer_syncs: int = 0
    graph_launches: int = 0
    graphed_kernels: int = 0
    sites: Counter = field(default_factory=Counter)

    def as_dict(self) -> dict:
        return {"kernels": self.kernels, "syncs": self.syncs, "uploads": self.uploads,
                "async_uploads": self.async_uploads, "graph_launches": self.graph_launches,
                "graphed_kernels": self.graphed_kernels,
                "rasterizer": {"kernels": self.rasterizer_kernels,
                               "syncs": self.rasterizer_syncs},
                "sites": dict(self.sites.most_common())}


class LaunchCounter:
    """Counts kernels, host syncs and uploads of the code run inside it (see the module
    docstring). ``counts`` accumulates; ``take()`` returns and restarts it."""

    def __init__(self) -> None:
        self.host = WeakTensorKeyDictionary()  # tensors known to live on the host
        self.counts = Counts()
        self._host_factory = 0  # > 0 while a host-data call or device-less factory runs
        self._in_read = 0  # > 0 while a read the function mode already counted runs
        self._excluded = 0  # > 0 inside the rasteriser
        self._graphed = 0  # > 0 inside what a CUDA graph replays
        self._modes: list = []

    # -- bookkeeping ---------------------------------------------------------------------------
    def is_host(self, t: torch.Tensor) -> bool:
        return t in self.host

    def mark_host(self, obj) -> None:
        for t in _tensors(obj):
            self.host[t] = True

    def unmark_host(self, obj) -> None:
        for t in _tensors(obj):
            self.host.pop(t, None)

    def _event(self, kind: str, what: str) -> None:
        c = self.counts
        if self._excluded:
            if kind == "sync":
                c.rasterizer_syncs += 1
            return
        if kind == "sync":
            c.syncs += 1
        elif kind == "upload":
            c.uploads += 1
        elif kind == "async_upload":
            c.async_uploads += 1
        c.sites[f"{kind} {what} @ {_site()}"] += 1

    def take(self) -> Counts:
        out, self.counts = self.counts, Counts()
        return out

    @contextlib.contextmanager
    def graph_replay(self):
        """The ops inside are one CUDA graph launch (counted as one kernel; the ops themselves
        as ``graphed_kernels``). A host sync inside would break the capture: still counted."""
        if not self._excluded:
            self.counts.graph_launches += 1
            self.counts.kernels += 1
        self._graphed += 1
        try:
            yield
        finally:
            self._graphed -= 1

    @contextlib.contextmanager
    def excluded(self):
        self._excluded += 1
        try:
            yield
        finally:
            self._excluded -= 1

    # -- the modes -----------------------------------------------------------------------------
    def __enter__(self) -> "LaunchCounter":
        self._modes = [_Dispatch(self), _Function(self)]
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for mode in reversed(self._modes):
            mode.__exit__(*exc)
        self._modes = []


def _target_device(args, kwargs):
    """(device named, or None; whether it is the host) of a ``Tensor.to`` call."""
    device = kwargs.get("device")
    for a in args:
        if isinstance(a, (str, torch.device)):
            device = a
        elif isinstance(a, torch.Tensor):
            device = a.device
    if device is None:
        return None, False
    # The convention (module docstring): the string "cpu" is the host, a device object the run's.
    host = isinstance(device, str) and torch.device(device).type == "cpu"
    return device, host


def _names_device(device) -> bool:
    """Whether a ``device=`` argument names the run's device (a ``torch.device``) rather than
    the host (None or the string ``"cpu"``)."""
    if device is None:
        return False
    return not (isinstance(device, str) and torch.device(device).type == "cpu")


class _Function(TorchFunctionMode):
    def __init__(self, counter: LaunchCounter) -> None:
        super().__init__()
        self.c = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        c = self.c
        if func in _FROM_DATA:
            src = args[0] if args else kwargs.get("data")
            has_device = _names_device(kwargs.get("device"))
            if isinstance(src, torch.Tensor):
                out = func(*args, **kwargs)
                if has_device and c.is_host(src):
                    c._event("upload", func.__name__)
                    c.unmark_host(out)
                return out
            c._host_factory += 1
            try:
                out = func(*args, **kwargs)
            finally:
                c._host_factory -= 1
            if has_device:
                c._event("upload", func.__name__)
                c.unmark_host(out)
            else:
                c.mark_host(out)
            return out
        if func in _FACTORIES and not _names_device(kwargs.get("device")):
            c._host_factory += 1
            try:
                out = func(*args, **kwargs)
            finally:
                c._host_factory -= 1
            c.mark_host(out)
            return out
        if func in _READS:
            self_t = args[0]
            if not c.is_host(self_t):
                c._event("sync", func.__name__)
            c._in_read += 1
            try:
                out = func(*args, **kwargs)
            finally:
                c._in_read -= 1
            return out
        if func is torch.Tensor.cpu or func is torch.Tensor.to:
            self_t = args[0]
            if func is torch.Tensor.cpu:
                device, to_host = "cpu", True
            else:
                device, to_host = _target_device(args[1:], kwargs)
            if device is None:  # a dtype change only: stays where it is
                return func(*args, **kwargs)
            was_host = c.is_host(self_t)
            c._in_read += 1
            try:
                out = func(*args, **kwargs)
                if out is self_t:  # a no-op on the CPU: a separate alias carries the new place
                    out = self_t.view_as(self_t)
            finally:
                c._in_read -= 1
            if to_host:
                if not was_host:
                    c._event("sync", "to_host")
                c.mark_host(out)
            elif was_host:
                nb = kwargs.get("non_blocking", False) or any(
                    a is True for a in args[1:] if isinstance(a, bool))
                c._event("async_upload" if nb else "upload", "to")
                c.unmark_host(out)
            return out
        return func(*args, **kwargs)


class _Dispatch(TorchDispatchMode):
    def __init__(self, counter: LaunchCounter) -> None:
        super().__init__()
        self.c = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        c = self.c
        inputs = list(_tensors(args)) + list(_tensors(kwargs))
        host_inputs = [t for t in inputs if c.is_host(t)]
        all_host = bool(inputs) and len(host_inputs) == len(inputs)
        on_host = all_host or (not inputs and c._host_factory > 0)
        if func is aten.copy_.default and inputs:
            dst, src = args[0], args[1]
            if c.is_host(src) and not c.is_host(dst):
                nb = bool(args[2]) if len(args) > 2 else bool(kwargs.get("non_blocking", False))
                if src.dim() > 0 or src.numel() > 1:
                    c._event("async_upload" if nb else "upload", "copy_")
            elif c.is_host(dst) and not c.is_host(src):
                c._event("sync", "copy_to_host")
        if not on_host:
            if func is aten._local_scalar_dense.default:
                if not c._in_read:
                    c._event("sync", "item")
            elif func in _SHAPE_SYNC:
                c._event("sync", func.__name__)
            elif func in (aten.index.Tensor, aten.index_put_.default, aten.index_put.default,
                          aten._index_put_impl_.default):
                idx = args[1] if len(args) > 1 else kwargs.get("indices")
                if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in idx or ()):
                    c._event("sync", f"{func.__name__}(bool mask)")
            elif func in (aten.repeat_interleave.Tensor, aten.repeat_interleave.self_Tensor):
                if kwargs.get("output_size") is None:
                    c._event("sync", "repeat_interleave")
        out = func(*args, **kwargs)
        if on_host or func is aten.lift_fresh.default:  # lift_fresh: host data (from_numpy too)
            c.mark_host(out)
            return out
        if not (func in _NO_KERNEL or getattr(func, "is_view", False)):
            if c._excluded:
                c.counts.rasterizer_kernels += 1
            elif c._graphed:
                c.counts.graphed_kernels += 1
            else:
                c.counts.kernels += 1
        return out


# ---------------------------------------------------------------------------------------------
# Excluding the rasteriser (forward and backward)


class _Gate(torch.autograd.Function):
    """Identity whose backward switches the counter's exclusion on (``on``) or off."""

    @staticmethod
    def forward(ctx, x, counter, on):
        ctx.counter, ctx.on = counter, on
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        if ctx.on:
            ctx.counter._excluded += 1
        elif ctx.counter._excluded > 0:
            ctx.counter._excluded = 0
        return grad, None, None


def _gate(obj, counter, on, skip=(), deep=True):
    if isinstance(obj, torch.Tensor):
        if obj.requires_grad and obj.is_floating_point():
            return _Gate.apply(obj, counter, on)
        return obj
    if isinstance(obj, (list, tuple)):
        return type(obj)(_gate(o, counter, on, skip, deep) for o in obj)
    if isinstance(obj, dict):
        return {k: _gate(v, counter, on, skip, deep) for k, v in obj.items()}
    if deep and is_dataclass(obj) and not isinstance(obj, type) \
            and not type(obj).__dataclass_params__.frozen:
        for f in fields(obj):
            if f.name not in skip:
                setattr(obj, f.name, _gate(getattr(obj, f.name), counter, on, skip))
        return obj
    return obj


class _GraphGate(_Gate):
    """Identity whose backward opens (``on``: one graph launch) or closes the counting of a
    graphed backward (``make_graphed_callables`` replays the whole backward as one graph)."""

    @staticmethod
    def backward(ctx, grad):
        c = ctx.counter
        if ctx.on:
            if c._graphed == 0 and not c._excluded:
                c.counts.graph_launches += 1
                c.counts.kernels += 1
            c._graphed += 1
        else:
            c._graphed = 0
        return grad, None, None


def _graph_gate(obj, counter, on):
    if isinstance(obj, torch.Tensor) and obj.requires_grad and obj.is_floating_point():
        return _GraphGate.apply(obj, counter, on)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_graph_gate(o, counter, on) for o in obj)
    return obj


def _excluding(fn, counter: LaunchCounter, skip=("means2d",)):
    def wrapper(*args, **kwargs):
        args = _gate(args, counter, False, deep=False)
        kwargs = _gate(kwargs, counter, False, deep=False)
        with counter.excluded():
            out = fn(*args, **kwargs)
        return _gate(out, counter, True, skip)
    wrapper.__wrapped__ = fn
    return wrapper


@contextlib.contextmanager
def _patched(counter: LaunchCounter):
    """The rasterisers excluded; torch's foreach kernels allowed on the CPU (where a run on CUDA
    takes them: an optimiser without ``fused``)."""
    import hash3d_dg.gaussians.backends as gb
    import hash3d_dg.mesh.backends as mb

    saved = []

    def patch(module, name, value):
        saved.append((module, name, getattr(module, name)))
        setattr(module, name, value)

    from hash3d_dg.guidance import graphed

    original_run = graphed.CapturedCall.run_eager

    def run_eager(self):
        with counter.graph_replay():
            return original_run(self)

    patch(graphed.CapturedCall, "run_eager", run_eager)
    original_autograd = graphed.GraphedAutograd.__call__

    def autograd_call(self, name, fn, x):
        # what make_graphed_callables replays: the forward as one launch, the backward as one
        def replayed(v):
            v = _graph_gate(v, counter, False)
            with counter.graph_replay():
                out = fn(v)
            return _graph_gate(out, counter, True)
        return original_autograd(self, name, replayed, x)

    patch(graphed.GraphedAutograd, "__call__", autograd_call)
    original_mesh = mb.rasterize_mesh
    patch(gb, "rasterize_torch", _excluding(gb.rasterize_torch, counter))
    wrapped_mesh = _excluding(original_mesh, counter)
    for mod in list(sys.modules.values()):
        if getattr(mod, "__name__", "").startswith("hash3d_dg") and \
                getattr(mod, "rasterize_mesh", None) is original_mesh:
            patch(mod, "rasterize_mesh", wrapped_mesh)
    # torch's optimisers take their foreach (multi-tensor) kernels only for CUDA tensors.
    import torch.utils._foreach_utils as fu

    devices = fu._get_foreach_kernels_supported_devices()
    patch(fu, "_get_foreach_kernels_supported_devices", lambda: list(devices) + ["cpu"])
    import torch.optim.optimizer as oo

    if hasattr(oo, "_get_foreach_kernels_supported_devices"):
        patch(oo, "_get_foreach_kernels_supported_devices", lambda: list(devices) + ["cpu"])
    try:
        yield
    finally:
        for module, name, value in reversed(saved):
            setattr(module, name, value)


class IterationWindows:
    """Counts per optimiser step: the window closed by each ``optimizer.step()`` (a global
    pre-hook) holds one iteration's work."""

    def __init__(self, counter: LaunchCounter) -> None:
        self.counter = counter
        self.windows: list[Counts] = []
        self._handle = None

    def __enter__(self):
        from torch.optim.optimizer import register_optimizer_step_pre_hook

        self.counter.take()

        def hook(optimizer, args, kwargs):
            self.windows.append(self.counter.take())

        self._handle = register_optimizer_step_pre_hook(hook)
        return self

    def __exit__(self, *exc):
        self._handle.remove()
        self.windows.append(self.counter.take())  # after the last step


def _summary(windows: list[Counts], steady: list[int], check: list[int]) -> dict:
    def per_iter(key):
        values = [getattr(windows[i], key) for i in steady]
        return statistics.median(values) if values else None

    sites: Counter = Counter()
    for i in steady:
        sites.update(windows[i].sites)
    n = max(len(steady), 1)
    out = {"kernels_per_iter": per_iter("kernels"), "syncs_per_iter": per_iter("syncs"),
           "uploads_per_iter": per_iter("uploads"),
           "async_uploads_per_iter": per_iter("async_uploads"),
           "graph_launches_per_iter": per_iter("graph_launches"),
           "graphed_kernels_per_iter": per_iter("graphed_kernels"),
           "rasterizer_per_iter": {"kernels": per_iter("rasterizer_kernels"),
                                   "syncs": per_iter("rasterizer_syncs")},
           "max_syncs_per_steady_iter": max((windows[i].syncs for i in steady), default=None),
           "max_uploads_per_steady_iter": max((windows[i].uploads for i in steady), default=None),
           "steady_iterations": len(steady),
           "sites_per_iter": {k: round(v / n, 3) for k, v in sites.most_common()}}
    if check:
        w = windows[check[0]]
        out["check_iteration"] = {"kernels": w.kernels, "syncs": w.syncs, "uploads": w.uploads,
                                  "sites": dict(w.sites.most_common())}
    return out


# ---------------------------------------------------------------------------------------------
# The stages under the counter

STAGE1_ITERS = 24
STAGE2_ITERS = 14
INTERVAL = 10


def launch_config(mode: str, **overrides):
    """The config the counts use: tiny model and renders, densification statistics from the
    first step (so steady iterations accumulate them) but no densify/prune inside the window."""
    from hash3d_dg.config import TINY_MODEL, build_config

    values = {"device": "cpu", "seed": 0,
              "guidance": {"model": TINY_MODEL, "image_size": 32},
              "stage1": {"iters": STAGE1_ITERS, "ref_size": 32, "num_pts": 300,
                         "render_res": [16, 16, 16], "density_start_iter": 1,
                         "densification_interval": 1000, "opacity_reset_interval": 1000,
                         "backend": "torch"},
              "stage2": {"iters": STAGE2_ITERS, "render_res": 16, "backend": "torch"},
              "hash3d": {"mode": mode}}
    for key, value in overrides.items():
        values.setdefault(key, {}).update(value) if isinstance(value, dict) else values.update({key: value})
    return build_config(values)


def _steady(n_windows: int, iters: int, skip_first: int = 2) -> tuple[list[int], list[int]]:
    """Window ``k`` (1-based step k's forward/backward, step k-1's optimiser step and after-step
    work) is steady unless a check happens in it (k % 10 == 0: guard check; (k-1) % 10 == 0: the
    loss read) or the optimiser's state is initialised (k <= skip_first)."""
    steady, check = [], []
    for k in range(1, min(n_windows, iters + 1)):
        if k <= skip_first:
            continue
        if k % INTERVAL == 0 or (k - 1) % INTERVAL == 0 or k == iters:
            check.append(k - 1)
            continue
        steady.append(k - 1)
    return steady, check


def count_stage(stage: str, mode: str, guidance=None, cfg=None, graphs: bool = True) -> dict:
    """Counts of one stage (``stage1`` or ``stage2``) in one Hash3D mode (see the module
    docstring); ``guidance`` and ``cfg`` default to the tiny model and ``launch_config(mode)``.
    ``graphs``: the UNet calls go through ``GraphedSplit`` as with ``guidance.cuda_graphs=auto``
    on CUDA (each replay one launch), else eager."""
    from hash3d_dg.guidance.acceleration import attach_graphs, detach_graphs

    from hash3d_dg import accel
    from hash3d_dg.bench.harness import standin_mesh
    from hash3d_dg.pipeline import build_guidance
    from hash3d_dg.eval.samples import render_sample
    from hash3d_dg.stages import ReferenceView, run_stage1, run_stage2

    cfg = cfg or launch_config(mode)
    torch.manual_seed(cfg.seed)
    if guidance is None:
        guidance = build_guidance(cfg, torch.device("cpu"), torch.float32)
    ref = ReferenceView.from_rgba(render_sample("ball", cfg.stage1.ref_size), cfg.elevation,
                                  cfg.radius, cfg.fovy, cfg.stage1.ref_size)
    guidance.set_reference(ref.image_nchw(), cfg.elevation)
    if graphs:  # the UNet paths, the autoencoder calls, the fused SDS step
        attach_graphs(guidance, capture=False)
    else:
        detach_graphs(guidance)
    mesh = standin_mesh(texture_size=32, subdivisions=2) if stage == "stage2" else None
    counter = LaunchCounter()
    start = time.perf_counter()
    with accel.virtual(), _patched(counter), counter, IterationWindows(counter) as windows:
        if stage == "stage1":
            run_stage1(ref, cfg, guidance, progress=False)
            iters = cfg.stage1.iters
        else:
            run_stage2(mesh, ref, cfg, guidance, progress=False)
            iters = cfg.stage2.iters
    steady, check = _steady(len(windows.windows), iters)
    out = _summary(windows.windows, steady, check)
    out["seconds"] = round(time.perf_counter() - start, 2)
    return out


MODES = ("off", "paper", "official", "fast")


def launches_report(modes=MODES, stages=("stage1", "stage2", "mesh"), graphs: bool = True) -> dict:
    from hash3d_dg.pipeline import build_guidance

    torch.set_num_threads(1)
    result = {"what": "aten ops on device tensors (kernels), host syncs and uploads per "
                      "steady-state iteration, counted on the CPU on the accelerator's code path "
                      "(hash3d_dg/bench/launches.py); rasteriser excluded",
              "cuda_graphs": graphs, "modes": {}}
    if "mesh" in stages:
        result["mesh"] = count_mesh()
        result["mesh"]["what"] = ("the whole mesh phase (not per iteration) on a tiny blob of "
                                  "Gaussians; the Gaussian and mesh rasterisers (torch standing "
                                  "in for gsplat / nvdiffrast) counted apart, the uv-atlas raster "
                                  "counted")
    stages = tuple(s for s in stages if s != "mesh")
    for mode in (modes if stages else ()):
        cfg = launch_config(mode)
        guidance = build_guidance(cfg, torch.device("cpu"), torch.float32)
        per = {}
        for stage in stages:
            guidance.reset()
            per[stage] = count_stage(stage, mode, guidance=guidance, cfg=cfg, graphs=graphs)
        result["modes"][mode] = per
    return result


def add_arguments(p) -> None:
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    p.add_argument("--stages", nargs="+", default=["stage1", "stage2", "mesh"],
                   choices=["stage1", "stage2", "mesh"],
                   help="mesh: the whole mesh phase, once (not per mode)")
    p.add_argument("--sites", action="store_true", help="keep the sync/upload sites in the output")
    p.add_argument("--no-graphs", action="store_true",
                   help="count the eager UNet calls (guidance.cuda_graphs=off) instead of graph replays")


def run_from_args(args) -> dict:
    result = launches_report(tuple(args.modes), tuple(args.stages), graphs=not args.no_graphs)
    if not args.sites:
        result.get("mesh", {}).pop("upload_sites", None)
        for per in result["modes"].values():
            for stage in per.values():
                stage.pop("sites_per_iter", None)
                if "check_iteration" in stage:
                    stage["check_iteration"].pop("sites", None)
    return result


# ---------------------------------------------------------------------------------------------
# The mesh phase under the counter

def mesh_scene(num_points: int = 400, seed: int = 0):
    """A tiny, dense blob of Gaussians (opaque, overlapping, coloured by position) whose density
    crosses the mesh threshold: the mesh phase's syncs do not depend on what it meshes."""
    from hash3d_dg.gaussians import GaussianModel
    from hash3d_dg.gaussians.model import rgb_to_sh0

    g = GaussianModel.random_init(num_points, radius=0.45, seed=seed)
    with torch.no_grad():
        g.params["opacities"].fill_(3.0)  # sigmoid ~ 0.95
        g.params["scales"].fill_(float(torch.log(torch.tensor(0.08))))
        g.params["sh0"].copy_(rgb_to_sh0(g.params["means"] + 0.5))
    return g


def mesh_config(**overrides):
    """The mesh phase's config for the counts: small grid, texture and bake renders (the torch
    backends, as ``launch_config``); ``overrides`` are ``MeshConfig`` fields."""
    from hash3d_dg.config import build_config

    mesh = {"resolution": 40, "density_thresh": 0.5, "texture_size": 64, "bake_render_size": 32,
            "decimate_target": 2000}
    mesh.update(overrides)
    cfg = build_config({"device": "cpu", "seed": 0, "mesh": mesh})
    cfg.stage1.backend = cfg.stage2.backend = "torch"
    return cfg


def count_mesh(cfg=None, gaussians=None) -> dict:
    """Kernels, host syncs and blocking uploads of the whole mesh phase
    (:func:`~hash3d_dg.stages.meshing.extract_textured_mesh`: box fit, density grid, marching
    cubes, clean-up, uv atlas, bake) on the accelerator's code path. As for the stages, the
    Gaussian and mesh rasterisers (the torch stand-ins for gsplat / nvdiffrast) are counted apart
    (``rasterizer``); the uv-atlas raster (``rasterize_uv``, torch on CUDA too) is counted."""
    from hash3d_dg import accel
    from hash3d_dg.stages.meshing import extract_textured_mesh

    cfg = cfg or mesh_config()
    gaussians = gaussians if gaussians is not None else mesh_scene()
    counter = LaunchCounter()
    start = time.perf_counter()
    with accel.virtual(), _patched(counter), counter:
        mesh, report = extract_textured_mesh(gaussians, cfg)
    c = counter.take()
    syncs = Counter({k.split(" @ ", 1)[1]: v for k, v in c.sites.items() if k.startswith("sync ")})
    return {"kernels": c.kernels, "syncs": c.syncs, "uploads": c.uploads,
            "async_uploads": c.async_uploads,
            "rasterizer": {"kernels": c.rasterizer_kernels, "syncs": c.rasterizer_syncs},
            "sync_sites": dict(syncs.most_common()),
            "upload_sites": {k: v for k, v in c.sites.most_common() if "upload" in k.split(" ")[0]},
            "faces": report["faces"], "resolution": cfg.mesh.resolution,
            "texture_size": cfg.mesh.texture_size, "seconds": round(time.perf_counter() - start, 2)}
