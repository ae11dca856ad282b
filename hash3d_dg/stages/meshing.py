"""From Gaussians to a textured mesh: density -> marching cubes -> UV atlas -> baked albedo."""

from __future__ import annotations

import logging
import time

import torch

from hash3d_dg.config import RunConfig, validate
from hash3d_dg.gaussians import GaussianModel
from hash3d_dg.mesh import Mesh, bake_texture, extract_mesh
from hash3d_dg.mesh.bake import BAKE_VIEW_SETS
from hash3d_dg.mesh.extract import fitted_box
from hash3d_dg.mesh.timing import StepClock

log = logging.getLogger(__name__)


def extract_textured_mesh(gaussians: GaussianModel, cfg: RunConfig) -> tuple[Mesh, dict]:
    """Mesh of the Gaussians' density level set with an albedo baked from Gaussian renders.

    Renders use the run's backends: ``cfg.stage1.backend`` for the Gaussians and
    ``cfg.stage2.backend`` for the mesh (the resolved names, when the config came from a
    ``RunContext``). The report holds the seconds of each step (``step_seconds``, ``step_cpu_seconds``)."""
    validate(cfg)  # the same checks a loaded config passed (callers may build one by hand)
    m = cfg.mesh
    start = time.perf_counter()
    clock = StepClock()
    device = gaussians.get_means.device
    with torch.no_grad():
        if m.fit_box:
            centre, bound = fitted_box(gaussians.get_means, gaussians.get_opacities, m.box_fill,
                                       scales=gaussians.get_scales, pad_sigma=m.box_pad_sigma)
        else:
            centre, bound = (0.0, 0.0, 0.0), m.bound
        mesh = extract_mesh(gaussians.density, bound=bound, resolution=m.resolution,
                            threshold=m.density_thresh, decimate_target=m.decimate_target,
                            device=device, centre=centre, clean=m.clean,
                            merge_close_pct=m.merge_close_pct,
                            min_component_pct=m.min_component_pct,
                            min_component_faces=m.min_component_faces,
                            keep_largest=m.keep_largest or m.clean == "basic", clock=clock)
        with clock.step("uv"):
            mesh = mesh.unwrap_uv(texture_size=m.texture_size)
        background = torch.ones(3, device=device)

        def render_fn(camera):
            out = gaussians.render(camera, background, backend=cfg.stage1.backend)
            return out.image, out.alpha

        with clock.step("bake"):
            mesh.albedo = bake_texture(mesh, render_fn, views=BAKE_VIEW_SETS[m.bake_views],
                                       radius=cfg.radius, render_size=m.bake_render_size,
                                       texture_size=m.texture_size, fovy=cfg.fovy,
                                       backend=cfg.stage2.backend, mode=m.bake_mode,
                                       first_cos=m.bake_first_cos, front=(cfg.elevation, 0.0))
    report = {"seconds": round(time.perf_counter() - start, 3), "vertices": int(mesh.v.shape[0]),
              "faces": int(mesh.f.shape[0]), "texture_size": m.texture_size,
              **clock.report()}
    return mesh, report
