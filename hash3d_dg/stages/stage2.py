"""Stage 2: refine the mesh texture (and optionally its vertices) toward the guidance's img2img."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from hash3d_dg.accel import adam_options, upload
from hash3d_dg.camera import Camera
from hash3d_dg.config import RunConfig
from hash3d_dg.mesh import Mesh, rasterize_mesh
from hash3d_dg.stages.metrics import mask_iou, psnr
from hash3d_dg.stages.reference import ReferenceView
from hash3d_dg.stages.loop import StageLoop
from hash3d_dg.stages.views import sample_novel_view


@dataclass
class Stage2Result:
    mesh: Mesh
    report: dict


def _logit(x: torch.Tensor) -> torch.Tensor:
    x = x.clamp(1e-4, 1 - 1e-4)
    return torch.log(x / (1 - x))


def render_supersampled(mesh: Mesh, camera: Camera, size: int, ssaa: float, albedo: torch.Tensor,
                        offsets: torch.Tensor | None, backend: str, background: torch.Tensor):
    """Render at ``size * ssaa`` and resample to ``size`` (DreamGaussian's random supersampling).

    As DreamGaussian's mesh renderer: trilinear mip-mapped texture lookups (so a minified
    texture's gradient spreads over the texels a pixel covers instead of aliasing onto a few) and
    antialiased silhouettes (``dr.antialias`` with nvdiffrast, 2x2 supersampling with torch).

    Returns (rgb [size,size,3], alpha [size,size,1], viewcos [size,size,1])."""
    inner = max(8, int(round(size * ssaa)))
    out = rasterize_mesh(mesh, camera.resized(inner), background=background, backend=backend,
                         vertex_offsets=offsets, albedo=albedo, antialias=True,
                         texture_filter="mipmap")
    forward = upload(camera.c2w[:3, 2], out.normal.device, out.normal.dtype)  # pinned, non-blocking
    viewcos = (out.normal * forward).sum(-1, keepdim=True)
    stacked = torch.cat([out.rgb, out.alpha, viewcos], dim=-1)
    if inner != size:
        stacked = F.interpolate(stacked.permute(2, 0, 1)[None], (size, size), mode="bilinear",
                                align_corners=False, antialias=inner > size)[0].permute(1, 2, 0)
    return stacked[..., :3], stacked[..., 3:4], stacked[..., 4:5]


def run_stage2(mesh: Mesh, ref: ReferenceView, cfg: RunConfig, guidance=None,
               progress: bool = True, progress_callback=None) -> Stage2Result:
    """Optimise the albedo (and vertex offsets when ``stage2.geom_lr > 0``) for
    ``cfg.stage2.iters`` steps; returns the refined mesh. ``guidance`` and ``progress_callback``
    as in ``run_stage1`` (events with ``"stage": "stage2"``); the refine runs under the
    guidance's stage-2 reuse policy."""
    s2 = cfg.stage2
    device = ref.device
    rng = np.random.default_rng(cfg.seed + 1)
    mesh = mesh.to(device)
    raw_albedo = torch.nn.Parameter(_logit(mesh.albedo.float()))
    groups = [{"params": [raw_albedo], "lr": s2.texture_lr}]
    offsets = None
    if s2.geom_lr > 0:
        offsets = torch.nn.Parameter(torch.zeros_like(mesh.v))
        groups.append({"params": [offsets], "lr": s2.geom_lr})
    optimizer = torch.optim.Adam(groups, **adam_options(s2.fused_adam, device))
    white = torch.ones(3, device=device)
    use_guidance = guidance is not None and cfg.guidance.lambda_zero123 > 0
    params = [p for group in groups for p in group["params"]]
    loop = StageLoop("stage2", "stage 2", "stage 2 (mesh)  ", s2.iters, optimizer,
                     params=lambda: params, device=device,
                     guidance=guidance if use_guidance else None, progress=progress,
                     progress_callback=progress_callback)
    guard = loop.guard

    def forward(step: int, step_ratio: float) -> torch.Tensor:
        albedo = torch.sigmoid(raw_albedo)

        # Known view: MSE on pixels the mesh covers and faces the camera (none without an image).
        if ref.has_image:
            ssaa = float(np.clip(rng.uniform(0, 2.0), s2.ssaa_min, s2.ssaa_max))
            rgb, alpha, viewcos = render_supersampled(mesh, ref.camera, ref.camera.width, ssaa, albedo,
                                                      offsets, s2.backend, white)
            guard.observe_render(step, rgb)
            valid = ((alpha > 0) & (viewcos > 0.5)).detach().float()
            loss = F.mse_loss(rgb * valid, ref.rgb * valid)
        else:
            loss = torch.zeros((), device=device)

        # Novel view: MSE toward the guidance's partially denoised version of the render.
        if use_guidance:
            view = sample_novel_view(rng, ref.elevation, cfg.stage1.min_ver, cfg.stage1.max_ver)
            camera = Camera.orbit(ref.elevation + view.d_elevation, view.d_azimuth,
                                  cfg.radius + view.d_radius, width=s2.render_res, fovy=cfg.fovy)
            ssaa = float(np.clip(rng.uniform(0, 2.0), s2.ssaa_min, s2.ssaa_max))
            image, _, _ = render_supersampled(mesh, camera, s2.render_res, ssaa, albedo, offsets,
                                              s2.backend, white)
            guard.observe_render(step, image)
            image = image.permute(2, 0, 1)[None]
            strength = s2.strength_start + step_ratio * (s2.strength_end - s2.strength_start)
            refined = guidance.refine(image.detach(), [view.d_elevation], [view.d_azimuth],
                                      [view.d_radius], strength=strength, steps=s2.ddim_steps)
            refined = F.interpolate(refined.float(), image.shape[-2:], mode="bilinear",
                                    align_corners=False)
            loss = loss + cfg.guidance.lambda_zero123 * F.mse_loss(image, refined)
        return loss

    start = time.perf_counter()
    result = loop.run(forward)

    with torch.no_grad():
        refined_mesh = Mesh(
            v=(mesh.v + offsets).detach() if offsets is not None else mesh.v,
            f=mesh.f, vn=mesh.vn, vt=mesh.vt, ft=mesh.ft, albedo=torch.sigmoid(raw_albedo).detach(),
        )
        if offsets is not None:
            refined_mesh = refined_mesh.compute_normals()
        out = rasterize_mesh(refined_mesh, ref.camera, background=white, backend=s2.backend) if ref.has_image else None
    report = {"iters": s2.iters, "seconds": round(time.perf_counter() - start, 3),
              "final_loss": result.final_loss}
    if out is not None:
        report.update(ref_psnr=round(psnr(out.rgb, ref.rgb), 3), ref_mask_iou=round(mask_iou(out.alpha, ref.mask), 4))
    report.update(result.guidance)
    return Stage2Result(mesh=refined_mesh, report=report)
