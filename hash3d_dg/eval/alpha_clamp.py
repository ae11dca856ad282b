"""gsplat's alpha cap (0.999) against the reference's (0.99), measured on CPU (no CUDA needed).

The torch backend emulates both ways a gsplat render can be set up, against itself with the
reference cap:

* ``gsplat_native``: ``alpha = min(0.999, o g)`` (gsplat's kernels, opacities as they are);
* ``opacity_clamp``: opacities clamped at 0.99 (straight-through gradient) before gsplat's
  ``min(0.999, .)``, which makes the cap right but scales each pixel of an ``o > 0.99``
  Gaussian by ``0.99 / o``.

Reported: image error (mean, max), and the relative error of the gradients of an image loss with
respect to the means (what densification statistics follow) and the opacities.

    python -m hash3d_dg.bench alpha-clamp --json
"""

from __future__ import annotations

import argparse

import torch

from hash3d_dg.camera import Camera
from hash3d_dg.gaussians.rasterize_torch import rasterize_torch


def scene(n: int, opacity_range, seed: int = 11):
    g = torch.Generator().manual_seed(seed)
    means = (torch.rand(n, 3, generator=g) * 2 - 1) * 0.5
    quats = torch.randn(n, 4, generator=g)
    scales = 0.005 + torch.rand(n, 3, generator=g) * 0.04
    lo, hi = opacity_range
    return means, quats, scales, lo + (hi - lo) * torch.rand(n, generator=g), torch.rand(n, 3, generator=g)


def render(sc, cam: Camera, max_alpha: float, clamp_opacity: bool):
    means = sc[0].clone().requires_grad_()
    opac = sc[3].clone().requires_grad_()
    o = opac - (opac - opac.clamp(max=0.99)).detach() if clamp_opacity else opac
    out = rasterize_torch(means, sc[1], sc[2], o, sc[4], cam.viewmat(), cam.K(), cam.width,
                          cam.height, torch.ones(3), near=cam.near, far=cam.far,
                          max_alpha=max_alpha)
    target = torch.rand(out.image.shape, generator=torch.Generator().manual_seed(0))
    ((out.image - target) ** 2).sum().backward()
    return out.image.detach(), means.grad, opac.grad


def add_arguments(p: argparse.ArgumentParser) -> None:
    """No options: one fixed scene and camera."""


def run_from_args(args: argparse.Namespace) -> dict:
    cam = Camera.orbit(-20, 45, 2.0, 256)
    results = {}
    for label, rng in (("opacity 0.95-1", (0.95, 1.0)), ("opacity 0.5-1", (0.5, 1.0)),
                       ("opacity 0.05-0.95", (0.05, 0.95))):
        sc = scene(3000, rng)
        ref_img, ref_gm, ref_go = render(sc, cam, 0.99, False)
        row = {}
        for name, clamp in (("gsplat_native", False), ("opacity_clamp", True)):
            img, gm, go = render(sc, cam, 0.999, clamp)
            d = (img - ref_img).abs()
            row[name] = {"image_mean": float(d.mean()), "image_max": float(d.max()),
                         "means_grad_rel": float((gm - ref_gm).norm() / ref_gm.norm()),
                         "opacity_grad_rel": float((go - ref_go).norm() / ref_go.norm())}
        results[label] = row
    return {"scene": "3000 Gaussians, 256x256, camera (-20, 45, 2.0)",
            "reference": "torch backend, max_alpha 0.99", "results": results}
