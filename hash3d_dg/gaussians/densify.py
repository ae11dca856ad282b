"""Adaptive density control of 3D Gaussians (clone / split / prune / opacity reset).

Follows DreamGaussian's use of the 3DGS rules (``main.py`` + ``gs_renderer.py``):

* statistics are accumulated at every step with ``start_iter <= step <= end_iter``: the norm of
  the view-space gradient of each visible Gaussian's projected mean, in NDC units as 3DGS
  (pixel gradient times (W/2, H/2)), and its largest screen radius;
* every ``interval`` steps (inside that window): the mean gradient ``>= grad_threshold`` selects
  Gaussians; those with ``max scale <= percent_dense * extent`` are cloned, the larger ones are
  split into 2 children sampled from the parent (scales / 1.6); then Gaussians with
  ``opacity < min_opacity`` or ``max scale > world_size_prune * extent`` are pruned; the
  statistics restart from zero;
* every ``opacity_reset_interval`` steps (inside the window) opacities are clamped to
  ``opacity_reset_value`` and their Adam moments zeroed.

Screen-size pruning: DreamGaussian passes ``max_screen_size=1`` (pixels), but in 3DGS's code the
screen radii are zeroed by the densification that runs just before the check, so it never
fires; only the world-size part (``0.1 * extent``, active because ``max_screen_size`` is truthy)
does. ``max_screen_size=None`` (default) reproduces that behaviour; a number enables a real
screen-radius prune (``max radius > max_screen_size`` pixels).

Why not gsplat's ``DefaultStrategy``: it wants one optimizer per parameter (we keep DreamGaussian's
single Adam with named groups), compares with ``>`` where 3DGS uses ``>=``, prunes large Gaussians
only after the first opacity reset, and its opacity reset never fires in gsplat 1.5.3. The pure
ops here are small and follow 3DGS exactly.

Call ``step_post_backward`` after ``loss.backward()`` and ``optimizer.step()`` (as DreamGaussian):
it replaces the model's parameters (and the optimizer's references and moments) when the
number of Gaussians changes.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch import Tensor, nn

from hash3d_dg.gaussians.model import PARAM_KEYS, GaussianModel
from hash3d_dg.gaussians.projection import quat_to_rotmat
from hash3d_dg.gaussians.render_result import GaussianRender

log = logging.getLogger(__name__)

ParamFn = Callable[[str, Tensor], Tensor]


def replace_params(model: GaussianModel, optimizer: torch.optim.Optimizer | None,
                   param_fn: ParamFn, state_fn: ParamFn,
                   keys: Iterable[str] = PARAM_KEYS) -> None:
    """Replace ``model.params[key]`` by ``param_fn(key, old)`` and keep ``optimizer`` consistent.

    The optimizer's param group named ``key`` gets the new Parameter; each per-row state tensor
    (Adam's ``exp_avg``, ``exp_avg_sq``, ...) becomes ``state_fn(key, old_state)``; ``step``
    is kept.
    """
    for key in keys:
        old = model.params[key]
        new = nn.Parameter(param_fn(key, old.detach()).contiguous(),
                           requires_grad=old.requires_grad)
        if optimizer is not None:
            for group in optimizer.param_groups:
                if group.get("name") == key or any(p is old for p in group["params"]):
                    if len(group["params"]) != 1:
                        raise ValueError(f"param group {key!r} must hold exactly one tensor")
                    state = optimizer.state.pop(old, None)
                    group["params"] = [new]
                    if state:
                        for name, value in list(state.items()):
                            if torch.is_tensor(value) and value.shape == old.shape:
                                state[name] = state_fn(key, value)
                        optimizer.state[new] = state
                    break
        model.params[key] = new


def _zero_rows(value: Tensor, n: int) -> Tensor:
    return value.new_zeros((n,) + tuple(value.shape[1:]))


@dataclass
class Densifier:
    """DreamGaussian's densification schedule and thresholds (defaults: configs/image.yaml).

    Attributes:
        grad_threshold: mean NDC view-space gradient that triggers densification.
        percent_dense: clone/split boundary, as a fraction of ``extent``.
        extent: scene extent (DreamGaussian passes 4).
        min_opacity: prune below this opacity.
        world_size_prune: prune when the largest scale exceeds this fraction of ``extent``
            (None disables).
        max_screen_size: prune when the largest screen radius (pixels) since the last
            densification exceeds this (None, the default, matches DreamGaussian in effect).
        start_iter, end_iter, interval: the densification window and period (1-based steps,
            as DreamGaussian increments its step before training).
        opacity_reset_interval, opacity_reset_value: periodic opacity clamp.
        split_children: children per split Gaussian (3DGS: 2, scales divided by 0.8 * 2).
        generator: optional RNG for the split samples.
    """

    grad_threshold: float = 0.01
    percent_dense: float = 0.01
    extent: float = 4.0
    min_opacity: float = 0.01
    world_size_prune: float | None = 0.1
    max_screen_size: float | None = None
    start_iter: int = 100
    end_iter: int = 3000
    interval: int = 100
    opacity_reset_interval: int = 700
    opacity_reset_value: float = 0.01
    split_children: int = 2
    generator: torch.Generator | None = None
    grad_accum: Tensor | None = field(default=None, init=False, repr=False)
    denom: Tensor | None = field(default=None, init=False, repr=False)
    max_radii: Tensor | None = field(default=None, init=False, repr=False)

    @classmethod
    def from_config(cls, s1, generator: torch.Generator | None = None) -> "Densifier":
        """The strategy of a run's ``stage1`` config section (its documented ``densify_*``,
        ``density_*``, ``percent_dense`` and ``opacity_reset_interval`` settings)."""
        return cls(grad_threshold=s1.densify_grad_threshold, percent_dense=s1.percent_dense,
                   start_iter=s1.density_start_iter, end_iter=s1.density_end_iter,
                   interval=s1.densification_interval,
                   opacity_reset_interval=s1.opacity_reset_interval, generator=generator)

    # ------------------------------------------------------------------ statistics
    def reset_stats(self, model: GaussianModel) -> None:
        """Zero the accumulated statistics (sized to the model)."""
        n, device = model.num_points, model.params["means"].device
        self.grad_accum = torch.zeros(n, device=device)
        self.denom = torch.zeros(n, device=device)
        self.max_radii = torch.zeros(n, device=device)

    def _ensure_stats(self, model: GaussianModel) -> None:
        if self.grad_accum is None or self.grad_accum.shape[0] != model.num_points:
            if self.grad_accum is not None:
                log.warning("densification statistics reset: model size changed outside the "
                            "Densifier (%d -> %d)", self.grad_accum.shape[0], model.num_points)
            self.reset_stats(model)

    @torch.no_grad()
    def accumulate(self, model: GaussianModel, render: GaussianRender) -> None:
        """Add one render's view-space gradients and radii (after ``backward``)."""
        self._ensure_stats(model)
        grad = render.means2d.grad
        if grad is None:
            raise RuntimeError("render.means2d has no gradient: call after backward() of a loss "
                               "that used this render")
        if grad.shape[0] != model.num_points:
            raise ValueError(f"render has {grad.shape[0]} Gaussians, model {model.num_points}")
        # Over all Gaussians with torch.where (no boolean indexing: no host sync on a GPU);
        # bitwise what adding at the visible ones gives.
        visible = render.radii > 0
        to_ndc = self._to_ndc(render.width, render.height, grad)
        norms = (grad * to_ndc).norm(dim=-1).to(self.grad_accum.dtype)
        self.grad_accum += torch.where(visible, norms, torch.zeros_like(norms))
        self.denom += visible.to(self.denom.dtype)
        self.max_radii = torch.where(
            visible, torch.maximum(self.max_radii, render.radii.to(self.max_radii.dtype)),
            self.max_radii)

    def _to_ndc(self, width: int, height: int, like: Tensor) -> Tensor:
        """``[W/2, H/2]`` on ``like``'s device, uploaded once per size."""
        key = (float(width), float(height), like.device, like.dtype)
        cache = self.__dict__.setdefault("_ndc_scales", {})
        if key not in cache:
            from hash3d_dg.accel import upload

            cache[key] = upload([width / 2.0, height / 2.0], like.device, like.dtype)
        return cache[key]

    # ------------------------------------------------------------------ schedule
    def step_post_backward(self, model: GaussianModel, optimizer: torch.optim.Optimizer,
                           render: GaussianRender | Iterable[GaussianRender],
                           step: int) -> dict:
        """Accumulate statistics and, on schedule, densify/prune and reset opacities.

        ``render``: the render(s) whose ``means2d.grad`` to accumulate (DreamGaussian uses the
        last novel-view render of the step). Returns counts ``cloned``, ``split``, ``pruned``,
        ``opacity_reset`` (bool) and the resulting ``num_points``.
        """
        result = {"cloned": 0, "split": 0, "pruned": 0, "opacity_reset": False,
                  "num_points": model.num_points}
        if not self.start_iter <= step <= self.end_iter:
            return result
        renders = [render] if isinstance(render, GaussianRender) else list(render)
        for r in renders:
            self.accumulate(model, r)
        if step % self.interval == 0:
            cloned, split, pruned = self.densify_and_prune(model, optimizer)
            result.update(cloned=cloned, split=split, pruned=pruned)
        if step % self.opacity_reset_interval == 0:
            self.reset_opacity(model, optimizer)
            result["opacity_reset"] = True
        result["num_points"] = model.num_points
        return result

    # ------------------------------------------------------------------ operations
    @torch.no_grad()
    def densify_and_prune(self, model: GaussianModel,
                          optimizer: torch.optim.Optimizer | None) -> tuple[int, int, int]:
        """Clone small / split large high-gradient Gaussians, then prune. Returns the counts."""
        self._ensure_stats(model)
        grads = self.grad_accum / self.denom
        grads[~torch.isfinite(grads)] = 0.0
        max_scale = model.get_scales.max(dim=1).values
        selected = grads >= self.grad_threshold
        small = max_scale <= self.percent_dense * self.extent
        clone_mask, split_mask = selected & small, selected & ~small
        n_clone, n_split = int(clone_mask.sum()), int(split_mask.sum())
        if n_clone:
            self._clone(model, optimizer, clone_mask)
            split_mask = torch.cat([split_mask, split_mask.new_zeros(n_clone)])
        if n_split:
            self._split(model, optimizer, split_mask)

        prune_mask = model.get_opacities < self.min_opacity
        if self.world_size_prune is not None:
            prune_mask |= model.get_scales.max(dim=1).values > self.world_size_prune * self.extent
        if self.max_screen_size is not None:
            prune_mask |= self.max_radii > self.max_screen_size
        n_prune = int(prune_mask.sum())
        if n_prune:
            self._remove(model, optimizer, prune_mask)
        self.reset_stats(model)
        log.debug("densify: %d cloned, %d split, %d pruned -> %d Gaussians", n_clone, n_split,
                  n_prune, model.num_points)
        return n_clone, n_split, n_prune

    @torch.no_grad()
    def prune(self, model: GaussianModel, optimizer: torch.optim.Optimizer | None = None,
              min_opacity: float | None = None, max_world_scale: float | None = None) -> int:
        """Remove Gaussians with opacity below ``min_opacity`` (default ``self.min_opacity``) or,
        when given, a largest scale above ``max_world_scale`` (DreamGaussian's final prune uses
        0.01 and 0.1). Returns the number removed."""
        min_opacity = self.min_opacity if min_opacity is None else min_opacity
        mask = model.get_opacities < min_opacity
        if max_world_scale is not None:
            mask |= model.get_scales.max(dim=1).values > max_world_scale
        n = int(mask.sum())
        if n:
            self._remove(model, optimizer, mask)
        return n

    @torch.no_grad()
    def reset_opacity(self, model: GaussianModel,
                      optimizer: torch.optim.Optimizer | None) -> None:
        """Clamp opacities to at most ``opacity_reset_value``; zero their Adam moments."""
        limit = math.log(self.opacity_reset_value / (1.0 - self.opacity_reset_value))
        replace_params(model, optimizer, lambda k, p: p.clamp(max=limit),
                       lambda k, v: torch.zeros_like(v), keys=("opacities",))

    def _follow_stats(self, fn: Callable[[Tensor], Tensor]) -> None:
        for name in ("grad_accum", "denom", "max_radii"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, fn(value))

    def _clone(self, model, optimizer, mask: Tensor) -> None:
        replace_params(model, optimizer, lambda k, p: torch.cat([p, p[mask]]),
                       lambda k, v: torch.cat([v, _zero_rows(v, int(mask.sum()))]))
        self._follow_stats(lambda v: torch.cat([v, v[mask]]))

    def _split(self, model, optimizer, mask: Tensor) -> None:
        k = self.split_children
        scales = model.get_scales[mask]
        stds = scales.repeat(k, 1)
        samples = torch.randn(stds.shape, generator=self.generator, device=stds.device,
                              dtype=stds.dtype) * stds
        rots = quat_to_rotmat(model.params["quats"][mask]).repeat(k, 1, 1)
        new_means = (rots @ samples[..., None])[..., 0] + model.params["means"][mask].repeat(k, 1)
        new_log_scales = torch.log(stds / (0.8 * k))
        keep = ~mask

        def param_fn(key: str, p: Tensor) -> Tensor:
            if key == "means":
                child = new_means
            elif key == "scales":
                child = new_log_scales
            else:
                child = p[mask].repeat((k,) + (1,) * (p.dim() - 1))
            return torch.cat([p[keep], child.to(p.dtype)])

        n_new = k * int(mask.sum())
        replace_params(model, optimizer, param_fn,
                       lambda key, v: torch.cat([v[keep], _zero_rows(v, n_new)]))
        self._follow_stats(lambda v: torch.cat([v[keep], v[mask].repeat(k)]))

    def _remove(self, model, optimizer, mask: Tensor) -> None:
        keep = ~mask
        replace_params(model, optimizer, lambda k, p: p[keep], lambda k, v: v[keep])
        self._follow_stats(lambda v: v[keep])
