"""From Gaussians to a textured mesh: density -> marching cubes -> UV atlas -> baked albedo."""

from __future__ import annotations

import logging
import time

import torch

from hash3d_dg.config import RunConfig
from hash3d_dg.gaussians import GaussianModel
from hash3d_dg.mesh import Mesh, bake_texture, extract_mesh

log = logging.getLogger(__name__)


def extract_textured_mesh(gaussians: GaussianModel, cfg: RunConfig) -> tuple[Mesh, dict]:
    """Mesh of the Gaussians' density level set with an albedo baked from Gaussian renders.

    Renders use the run's backends: ``cfg.stage1.backend`` for the Gaussians and
    ``cfg.stage2.backend`` for the mesh (the resolved names, when the config came from a
    ``RunContext``)."""
    m = cfg.mesh
    start = time.perf_counter()
    with torch.no_grad():
        mesh = extract_mesh(gaussians.density, bound=m.bound, resolution=m.resolution,
                            threshold=m.density_thresh, decimate_target=m.decimate_target,
                            device=gaussians.get_means.device)
        mesh = mesh.unwrap_uv(texture_size=m.texture_size)
        background = torch.ones(3, device=gaussians.get_means.device)

        def render_fn(camera):
            out = gaussians.render(camera, background, backend=cfg.stage1.backend)
            return out.image, out.alpha

        mesh.albedo = bake_texture(mesh, render_fn, radius=cfg.radius,
                                   render_size=m.bake_render_size, texture_size=m.texture_size,
                                   fovy=cfg.fovy, backend=cfg.stage2.backend)
    report = {"seconds": round(time.perf_counter() - start, 3), "vertices": int(mesh.v.shape[0]),
              "faces": int(mesh.f.shape[0]), "texture_size": m.texture_size}
    return mesh, report
