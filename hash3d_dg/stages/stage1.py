"""Stage 1: fit 3D Gaussians to the reference view plus score distillation on random novel views."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from hash3d_dg.accel import adam_options, upload
from hash3d_dg.camera import Camera
from hash3d_dg.config import RunConfig
from hash3d_dg.gaussians import Densifier, GaussianModel, position_lr
from hash3d_dg.stages.metrics import mask_iou, psnr
from hash3d_dg.stages.reference import ReferenceView
from hash3d_dg.stages.loop import StageLoop
from hash3d_dg.stages.views import sample_novel_view

log = logging.getLogger(__name__)

WHITE = (1.0, 1.0, 1.0)
BLACK = (0.0, 0.0, 0.0)


@dataclass
class Stage1Result:
    gaussians: GaussianModel
    report: dict


def render_resolution(step_ratio: float, resolutions: list, milestones: list) -> int:
    """Progressive render size: resolutions[k] once step_ratio passes milestones[k-1]."""
    index = sum(1 for m in milestones if step_ratio >= m)
    return int(resolutions[index])


def evaluate_reference(gaussians: GaussianModel, ref: ReferenceView, backend: str) -> dict:
    with torch.no_grad():
        out = gaussians.render(ref.camera, torch.tensor(WHITE, device=ref.device), backend=backend)
    return {"ref_psnr": round(psnr(out.image, ref.rgb), 3),
            "ref_mask_iou": round(mask_iou(out.alpha, ref.mask), 4)}


def make_optimizer(gaussians: GaussianModel, s1) -> torch.optim.Optimizer:
    """DreamGaussian's single Adam with one named group per Gaussian parameter."""
    fused = "fused" in adam_options(s1.fused_adam, gaussians.params["means"].device)
    return gaussians.make_optimizer({
        "means": s1.position_lr_init, "sh0": s1.feature_lr, "opacities": s1.opacity_lr,
        "scales": s1.scaling_lr, "quats": s1.rotation_lr,
    }, fused=fused)


def schedule_position_lr(optimizer: torch.optim.Optimizer, step: int, s1) -> None:
    """The means' learning rate at ``step`` (3DGS's exponential schedule, ``position_lr``)."""
    for group in optimizer.param_groups:
        if group.get("name") == "means":
            group["lr"] = position_lr(step, s1.position_lr_init, s1.position_lr_final,
                                      s1.position_lr_delay_mult, s1.position_lr_max_steps,
                                      spatial_lr_scale=s1.spatial_lr_scale)


def run_stage1(ref: ReferenceView, cfg: RunConfig, guidance=None, progress: bool = True,
               gaussians: GaussianModel | None = None, progress_callback=None) -> Stage1Result:
    """Optimise Gaussians for ``cfg.stage1.iters`` steps.

    ``guidance`` implements the guidance interface (``guidance/base.py``) with its reference
    already set, or is None (then only the reference view is fitted, as with
    ``guidance.lambda_zero123=0``). ``progress_callback``, if given, is called at every check of
    the loop with ``{"stage": "stage1", "step", "total", "loss", "hit_rate"}`` (what the
    progress bar shows, for a web page).

    Randomness: the novel views and backgrounds come from a NumPy generator seeded with
    ``cfg.seed``, the densifier's split samples from a torch generator of the same seed; no
    global random state is read or set.
    """
    s1 = cfg.stage1
    device = ref.device
    rng = np.random.default_rng(cfg.seed)
    if gaussians is None:
        gaussians = GaussianModel.random_init(s1.num_pts, s1.init_radius, seed=cfg.seed, device=device)
    optimizer = make_optimizer(gaussians, s1)
    densifier = Densifier.from_config(s1, generator=torch.Generator(device=device).manual_seed(cfg.seed))
    use_guidance = guidance is not None and cfg.guidance.lambda_zero123 > 0
    # both backgrounds uploaded once; each view picks one on the host
    backgrounds = {WHITE: upload(WHITE, device), BLACK: upload(BLACK, device)}
    white = backgrounds[WHITE]
    densify_counts = {"cloned": 0, "split": 0, "pruned": 0}
    loop = StageLoop("stage1", "stage 1", "stage 1 (gaussians)", s1.iters, optimizer,
                     params=lambda: gaussians.params.values(), device=device,
                     guidance=guidance if use_guidance else None, progress=progress,
                     progress_callback=progress_callback,
                     postfix=lambda: {"pts": gaussians.num_points})
    guard = loop.guard
    last = {}  # the step's last render: densification reads its view-space gradients

    def forward(step: int, step_ratio: float) -> torch.Tensor:
        schedule_position_lr(optimizer, step, s1)
        # Known view: match the input image and its mask (a run without one: text to 3D).
        if ref.has_image:
            out = gaussians.render(ref.camera, white, backend=s1.backend)
            guard.observe_render(step, out.image)
            loss = s1.lambda_rgb * F.mse_loss(out.image, ref.rgb)
            loss = loss + s1.lambda_mask * F.mse_loss(out.alpha, ref.mask)
        else:
            loss = torch.zeros((), device=device)

        # Novel views: score distillation through the (cached) guidance.
        if use_guidance:
            res = render_resolution(step_ratio, s1.render_res, s1.render_res_milestones)
            images, views = [], []
            for _ in range(s1.batch_size):
                view = sample_novel_view(rng, ref.elevation, s1.min_ver, s1.max_ver)
                camera = Camera.orbit(ref.elevation + view.d_elevation, view.d_azimuth,
                                      cfg.radius + view.d_radius, width=res, fovy=cfg.fovy)
                bg = BLACK if rng.random() < s1.invert_bg_prob else WHITE
                out = gaussians.render(camera, backgrounds[bg], backend=s1.backend)
                guard.observe_render(step, out.image)
                images.append(out.image.permute(2, 0, 1))
                views.append(view)
            sds = guidance.sds(
                torch.stack(images),
                [v.d_elevation for v in views], [v.d_azimuth for v in views],
                [v.d_radius for v in views],
                step_ratio=step_ratio if s1.anneal_timestep else None,
            )
            loss = loss + cfg.guidance.lambda_zero123 * sds
        last["render"] = out
        return loss

    def densify(step: int) -> None:
        # Densification statistics come from the last render, as in DreamGaussian; it replaces
        # parameters, so it runs after the optimizer step.
        counts = densifier.step_post_backward(gaussians, optimizer, last.pop("render"), step)
        for key in densify_counts:
            densify_counts[key] += int(counts.get(key, 0))

    start = time.perf_counter()
    result = loop.run(forward, after_step=densify)

    # DreamGaussian's final clean-up: transparent or oversized (> 0.1 world units) Gaussians.
    pruned = densifier.prune(gaussians, optimizer, min_opacity=0.01, max_world_scale=0.1)
    densify_counts["pruned"] += int(pruned)
    seconds = time.perf_counter() - start
    report = {"iters": s1.iters, "seconds": round(seconds, 3), "final_loss": result.final_loss,
              "num_gaussians": gaussians.num_points, "densify": densify_counts}
    if ref.has_image:
        report.update(evaluate_reference(gaussians, ref, s1.backend))
    report.update(result.guidance)
    return Stage1Result(gaussians=gaussians, report=report)
