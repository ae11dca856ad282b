"""Measure how gsplat's radii rule would change densification statistics (CPU, no CUDA).

gsplat 1.5.3's CUDA projection returns per-axis radii ``ceil(e * sqrt(cov_xx))``,
``ceil(e * sqrt(cov_yy))`` with ``e = min(3.33, sqrt(2 ln(255 o)))`` and 0 below opacity 1/255
(read from ``ProjectionEWA3DGSFused.cu``); 3DGS / DreamGaussian / the torch backend use
``ceil(3 sqrt(max eigenvalue))``. The densifier counts a Gaussian as seen when its radius is
> 0 and averages its view-space gradient over those views, so the rule changes the statistic.

Per view: the projection of gsplat's pure-PyTorch reference (``_torch_impl``) gives the 2D
covariances the per-axis rule is applied to; the gradients come from the torch backend.

    python -m hash3d_dg.bench radii-visibility --json
"""

from __future__ import annotations

import argparse
import math

import torch

from hash3d_dg.camera import Camera
from hash3d_dg.gaussians import GaussianModel
from hash3d_dg.gaussians.rasterize_torch import rasterize_torch


def gsplat_rule_radii(means, quats, scales, opacities, cam: Camera) -> torch.Tensor:
    from gsplat.cuda import _torch_impl

    covars, _ = _torch_impl._quat_scale_to_covar_preci(quats, scales, compute_preci=False,
                                                       triu=False)
    _, m2d, depths, conics, _ = _torch_impl._fully_fused_projection(
        means, covars, cam.viewmat()[None], cam.K()[None], cam.width, cam.height,
        near_plane=cam.near, far_plane=cam.far)
    a, b, c = conics[0].unbind(-1)
    det = a * c - b * b
    cov_xx, cov_yy = c / det, a / det
    ext = torch.sqrt(2 * torch.log((opacities * 255).clamp_min(1e-30))).clamp(max=3.33)
    rx, ry = torch.ceil(ext * cov_xx.sqrt()), torch.ceil(ext * cov_yy.sqrt())
    u, v = m2d[0].unbind(-1)
    vis = ((depths[0] > cam.near) & (opacities >= 1 / 255) & ((rx > 0) | (ry > 0))
           & (u + rx > 0) & (u - rx < cam.width) & (v + ry > 0) & (v - ry < cam.height))
    return torch.where(vis, torch.maximum(rx, ry), torch.zeros_like(rx))


def measure(model: GaussianModel, views: int, size: int, seed: int, radius: float = 2.0) -> dict:
    g = torch.Generator().manual_seed(seed)
    n = model.num_points
    acc = {"ours": torch.zeros(n), "gsplat": torch.zeros(n)}
    den = {"ours": torch.zeros(n), "gsplat": torch.zeros(n)}
    differ, radius_ratio = [], []
    means, quats = model.get_means.detach(), model.get_quats.detach()
    scales, opac = model.get_scales.detach(), model.get_opacities.detach()
    colors = model.get_colors.detach()
    for _ in range(views):
        el = float(torch.empty(1).uniform_(-30, 30, generator=g))
        az = float(torch.empty(1).uniform_(-180, 180, generator=g))
        cam = Camera.orbit(el, az, radius, size)
        m = means.clone().requires_grad_()
        out = rasterize_torch(m, quats, scales, opac, colors, cam.viewmat(), cam.K(), size, size,
                              torch.ones(3), near=cam.near, far=cam.far)
        target = torch.rand(size, size, 3, generator=g)
        ((out.image - target) ** 2).mean().backward()
        grad = out.means2d.grad * torch.tensor([size / 2, size / 2])
        norm = grad.norm(dim=-1)
        g_radii = gsplat_rule_radii(means, quats, scales, opac, cam)
        vis = {"ours": out.radii > 0, "gsplat": g_radii > 0}
        both = vis["ours"] & vis["gsplat"]
        radius_ratio.append(g_radii[both] / out.radii[both].float())
        for k in vis:
            acc[k][vis[k]] += norm[vis[k]]
            den[k][vis[k]] += 1
        differ.append(int((vis["ours"] ^ vis["gsplat"]).sum()))
    stat = {k: torch.nan_to_num(acc[k] / den[k]) for k in acc}
    seen = (den["ours"] > 0) & (den["gsplat"] > 0)
    ratio = stat["gsplat"][seen] / stat["ours"][seen].clamp_min(1e-30)
    thr = float(torch.quantile(stat["ours"], 0.9))  # a threshold selecting the top 10 %
    sel = {k: stat[k] >= thr for k in stat}
    rr = torch.cat(radius_ratio)
    return {"gaussians": n, "views": views, "size": size, "camera_radius": radius,
            "radius_ratio_gsplat_over_ours": {"median": round(float(rr.median()), 3),
                                              "min": round(float(rr.min()), 3),
                                              "max": round(float(rr.max()), 3)},
            "visible_per_view_ours": round(float(den["ours"].sum()) / views, 1),
            "visible_per_view_gsplat_rule": round(float(den["gsplat"].sum()) / views, 1),
            "visibility_differs_per_view": round(sum(differ) / views, 1),
            "mean_grad_ratio_gsplat_over_ours": {
                "median": round(float(ratio.median()), 4), "min": round(float(ratio.min()), 4),
                "max": round(float(ratio.max()), 4)},
            "selected_at_top10pct_threshold": {
                "ours": int(sel["ours"].sum()), "gsplat_rule": int(sel["gsplat"].sum()),
                "only_one_rule": int((sel["ours"] ^ sel["gsplat"]).sum())}}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """No options: two fixed models, 8 views of 128 px."""


def run_from_args(args: argparse.Namespace) -> dict:
    blob = GaussianModel.random_init(num_points=5000, seed=0)  # DreamGaussian's start: o = 0.1
    mixed = GaussianModel.random_init(num_points=5000, seed=0)
    with torch.no_grad():  # a later state: opacities spread over (0.005, 0.999)
        o = torch.rand(5000, generator=torch.Generator().manual_seed(1)) * 0.994 + 0.005
        mixed.params["opacities"][:] = torch.log(o / (1 - o))
    return {"initial_blob_o0.1": measure(blob, 8, 128, 0),
            "mixed_opacities": measure(mixed, 8, 128, 0),
            "mixed_opacities_close_camera": measure(mixed, 8, 128, 0, radius=0.9)}
