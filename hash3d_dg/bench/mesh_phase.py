"""Mesh phase side by side: today's settings against faster ones, on the same Gaussians.

``python -m hash3d_dg.bench mesh-phase --json`` takes one set of Gaussians (a saved PLY, or a
short stage-1 fit of the oracle object or of an RGBA photo, cached as a PLY), runs the real mesh
phase (:func:`hash3d_dg.stages.meshing.extract_textured_mesh`) once per named preset, and
reports for each: seconds per step (density grid, marching cubes, clean-up, decimation, uv
atlas, bake), faces, and the texture fidelity of the baked mesh against the Gaussians it came
from: re-render PSNR from the input view and from held-out views (views that no bake camera
uses), and the silhouette IoU (mesh coverage vs Gaussian alpha > 0.5), all renders over white.

Presets (``PRESETS``) are ``MeshConfig`` overrides; ``baseline`` is the code's state before
this benchmark existed (resolution 128, no bounding-box fit, 100k-face target, cosine-weighted
average of 18 views at 512 px).
"""

from __future__ import annotations

import argparse
import copy
import logging
import time
from pathlib import Path

import numpy as np
import torch

from hash3d_dg.camera import Camera

log = logging.getLogger(__name__)

#: MeshConfig overrides per preset. ``baseline`` reproduces the settings of the code before the
#: mesh-phase work (``fit_box`` off, average bake, no pymeshlab clean-up).
PRESETS: dict[str, dict] = {
    "baseline": dict(resolution=128, decimate_target=100_000, bake_render_size=512,
                     bake_mode="average", bake_views="default18", fit_box=False, clean="basic"),
    "default": {},
}

#: Held-out views (elevation, azimuth): between the bake cameras' azimuths and elevations.
HELD_OUT_VIEWS = tuple((-30.0, az) for az in (22.5, 112.5, 202.5, 292.5)) + tuple(
    (20.0, az) for az in (67.5, 157.5, 247.5, 337.5))


def fit_gaussians(source: str, iters: int, size: int, seed: int = 0):
    """A short stage-1 fit: ``source`` is ``oracle`` (the oracle object, with the oracle
    guidance, as in ``bench oracle``) or the path of an RGBA image (reference view only).
    Returns the Gaussians and the input elevation."""
    from hash3d_dg.bench.oracle import (SCHEDULER_CONFIG, OracleDenoiser, OracleGuidance,
                                        OracleScene)
    from hash3d_dg.cache import CachedDenoiser
    from hash3d_dg.config import build_config
    from hash3d_dg.stages import ReferenceView, run_stage1

    cfg = build_config({"seed": seed, "device": "cpu",
                        "stage1": {"iters": iters, "ref_size": size, "render_res": [size] * 3,
                                   "invert_bg_prob": 0.0},
                        "guidance": {"image_size": size}})
    cfg.stage1.backend = "torch"
    guidance = None
    if source == "oracle":
        from diffusers import DDIMScheduler

        scene = OracleScene.default(texture_size=512, ssaa=2, backend="torch")
        rgba = scene.rgba(cfg.elevation, 0.0, cfg.radius, size, cfg.fovy)
        scheduler = DDIMScheduler.from_config(SCHEDULER_CONFIG)
        oracle = OracleDenoiser(scene, scheduler.alphas_cumprod, size, cfg.elevation, cfg.radius,
                                cfg.fovy)
        guidance = OracleGuidance(CachedDenoiser(oracle, None), seed=seed)
    else:
        from hash3d_dg.preprocess import load_image

        rgba = load_image(source)
        if rgba.shape[-1] != 4:
            raise ValueError(f"{source}: needs an alpha channel")
    ref = ReferenceView.from_rgba(rgba, cfg.elevation, cfg.radius, cfg.fovy, size, "cpu")
    if guidance is not None:
        guidance.set_reference(ref.image_nchw(), cfg.elevation)
    result = run_stage1(ref, cfg, guidance, progress=False)
    return result.gaussians, cfg.elevation


def load_or_fit(source: str, ply: str | None, iters: int, size: int, seed: int = 0):
    """Gaussians from ``ply`` when it exists, else fitted (and saved to ``ply`` when given)."""
    from hash3d_dg.gaussians.ply import load_ply, save_ply

    if ply and Path(ply).exists():
        return load_ply(ply), 0.0
    start = time.perf_counter()
    gaussians, elevation = fit_gaussians(source, iters, size, seed)
    log.info("fitted %d Gaussians to %s in %.1f s", gaussians.num_points, source,
             time.perf_counter() - start)
    if ply:
        Path(ply).parent.mkdir(parents=True, exist_ok=True)
        save_ply(gaussians, ply)
    return gaussians, elevation


def _fit_main(argv=None) -> int:  # python -m hash3d_dg.bench.mesh_phase SOURCE PLY ITERS SIZE
    import sys

    source, ply, iters, size = sys.argv[1:5] if argv is None else argv
    torch.set_num_threads(1)
    g, _ = load_or_fit(source, ply, int(iters), int(size))
    print(ply, g.num_points)
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    raise SystemExit(_fit_main())
