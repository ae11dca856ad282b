"""Stage 2's wiring, checked through ``run_stage2`` against a reference loop written here from
DreamGaussian's stage-2 ``train_step`` (``main2.py``): the albedo optimised through a sigmoid,
the reference view's MSE on covered, camera-facing pixels (view cosine > 0.5) of a render at a
random supersampling factor, and on a random novel view the MSE toward the guidance's
img2img refinement with the strength annealed from ``strength_start`` to ``strength_end``.

The guidance is a deterministic stand-in that records what it is given, so the reference run can
reproduce the product's exactly (same seed): any change to the loss, the schedule, the
supersampling or the refine's inputs moves the texture.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hash3d_dg.bench.harness import standin_mesh
from hash3d_dg.camera import Camera
from hash3d_dg.config import build_config
from hash3d_dg.mesh import Mesh, rasterize_mesh
from hash3d_dg.eval.samples import render_sample
from hash3d_dg.stages import ReferenceView, run_stage2

SEED = 5


class FakeRefineGuidance:
    """``refine`` returns a fixed colour transform of its input at ``image_size``; records calls.
    (The stage-2 reuse policy lives inside a real guidance's ``refine``: tests/test_oracle.py and
    tests/test_wiring_refine.py count its full and shallow calls.)"""

    cached = False

    def __init__(self, image_size=24):
        self.image_size = image_size
        self.calls = []

    def stats(self):
        return {"unet": {"full_calls": 0, "shallow_calls": 0},
                "cache": {"attempts": 0, "hits": 0, "misses": 0, "inserts": 0, "evictions": 0,
                          "entries": 0, "bytes": 0, "hits_by_grid": []}}

    def refine(self, images, d_elevation, d_azimuth, d_radius, strength=0.8, steps=50):
        assert not images.requires_grad
        self.calls.append({"shape": tuple(images.shape), "d_el": list(d_elevation),
                           "d_az": list(d_azimuth), "d_r": list(d_radius), "strength": strength,
                           "steps": steps})
        x = F.interpolate(images, (self.image_size, self.image_size), mode="bilinear",
                          align_corners=False)
        return (0.3 + 0.5 * x.flip(1)).clamp(0, 1)  # channels reversed, dimmed


def config(**stage2):
    values = {"seed": SEED, "device": "cpu", "guidance": {"lambda_zero123": 0.7},
              "stage1": {"ref_size": 24},
              "stage2": {"iters": 6, "render_res": 16, "texture_lr": 0.2, "strength_start": 0.6,
                         "strength_end": 0.9, "ddim_steps": 20, "backend": "torch"},
              "hash3d": {"mode": "fast"}}
    values["stage2"].update(stage2)
    return build_config(values)


def reference_view(cfg):
    size = cfg.stage1.ref_size
    return ReferenceView.from_rgba(render_sample("ball", size), cfg.elevation, cfg.radius,
                                   cfg.fovy, size)


def supersampled(mesh, camera, size, ssaa, albedo):
    """DreamGaussian's random supersampling: render at size * ssaa, resample to size."""
    inner = max(8, int(round(size * ssaa)))
    out = rasterize_mesh(mesh, camera.resized(inner), background=torch.ones(3), backend="torch",
                         albedo=albedo, antialias=True, texture_filter="mipmap")
    forward = torch.as_tensor(camera.c2w[:3, 2], dtype=out.normal.dtype)  # towards the camera
    stack = torch.cat([out.rgb, out.alpha, (out.normal * forward).sum(-1, keepdim=True)], -1)
    if inner != size:
        stack = F.interpolate(stack.permute(2, 0, 1)[None], (size, size), mode="bilinear",
                              align_corners=False, antialias=inner > size)[0].permute(1, 2, 0)
    return stack[..., :3], stack[..., 3:4], stack[..., 4:5]


def reference_stage2(mesh: Mesh, ref: ReferenceView, cfg, guidance=None):
    s2, s1 = cfg.stage2, cfg.stage1
    rng = np.random.default_rng(cfg.seed + 1)
    a = mesh.albedo.float().clamp(1e-4, 1 - 1e-4)
    raw = torch.nn.Parameter(torch.log(a / (1 - a)))
    opt = torch.optim.Adam([raw], lr=s2.texture_lr)
    for step in range(1, s2.iters + 1):
        ratio = step / s2.iters
        albedo = torch.sigmoid(raw)
        ssaa = float(np.clip(rng.uniform(0, 2.0), s2.ssaa_min, s2.ssaa_max))
        rgb, alpha, viewcos = supersampled(mesh, ref.camera, ref.camera.width, ssaa, albedo)
        valid = ((alpha > 0) & (viewcos > 0.5)).float()
        loss = F.mse_loss(rgb * valid, ref.rgb * valid)
        if guidance is not None:
            low = max(min(s1.min_ver, s1.min_ver - ref.elevation), -80.0 - ref.elevation)
            high = min(max(s1.max_ver, s1.max_ver - ref.elevation), 80.0 - ref.elevation)
            ver, hor = float(rng.uniform(low, high)), float(rng.uniform(-180.0, 180.0))
            cam = Camera.orbit(ref.elevation + ver, hor, cfg.radius, width=s2.render_res, fovy=cfg.fovy)
            ssaa = float(np.clip(rng.uniform(0, 2.0), s2.ssaa_min, s2.ssaa_max))
            image, _, _ = supersampled(mesh, cam, s2.render_res, ssaa, albedo)
            image = image.permute(2, 0, 1)[None]
            strength = s2.strength_start + ratio * (s2.strength_end - s2.strength_start)
            refined = guidance.refine(image.detach(), [ver], [hor], [0.0], strength=strength,
                                      steps=s2.ddim_steps)
            refined = F.interpolate(refined, image.shape[-2:], mode="bilinear", align_corners=False)
            loss = loss + cfg.guidance.lambda_zero123 * F.mse_loss(image, refined)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return torch.sigmoid(raw).detach()


def _mesh():
    return standin_mesh(texture_size=16, subdivisions=2)


def test_stage2_matches_the_reference_loop_with_guidance():
    cfg = config()
    ref = reference_view(cfg)
    fake, twin = FakeRefineGuidance(), FakeRefineGuidance()
    result = run_stage2(_mesh(), ref, cfg, fake, progress=False)
    want = reference_stage2(_mesh(), ref, cfg, twin)
    assert float((want - _mesh().albedo).abs().max()) > 0.05  # the texture did move
    torch.testing.assert_close(result.mesh.albedo, want, rtol=0, atol=2e-5)
    assert len(fake.calls) == 6
    for step, (a, b) in enumerate(zip(fake.calls, twin.calls), start=1):
        assert a["shape"] == (1, 3, 16, 16)
        assert a["d_el"] == pytest.approx(b["d_el"]) and a["d_az"] == pytest.approx(b["d_az"])
        assert a["d_r"] == [0.0]
        # strength: 0.6 -> 0.9 linearly in step / iters; DreamGaussian's 50-step DDIM count
        assert a["strength"] == pytest.approx(0.6 + step / 6 * 0.3)
        assert a["steps"] == 20
    # the report measures the refined mesh from the reference view
    out = rasterize_mesh(Mesh(result.mesh.v, result.mesh.f, result.mesh.vn, result.mesh.vt,
                              result.mesh.ft, want), ref.camera, background=torch.ones(3),
                         backend="torch")
    psnr = -10 * math.log10(float(((out.rgb - ref.rgb) ** 2).mean()))
    assert result.report["ref_psnr"] == pytest.approx(psnr, abs=2e-3)


def test_stage2_matches_the_reference_loop_without_guidance():
    cfg = config(iters=5)
    cfg.guidance.lambda_zero123 = 0.0
    ref = reference_view(cfg)
    fake = FakeRefineGuidance()
    result = run_stage2(_mesh(), ref, cfg, fake, progress=False)
    assert fake.calls == []
    want = reference_stage2(_mesh(), ref, cfg, None)
    torch.testing.assert_close(result.mesh.albedo, want, rtol=0, atol=2e-5)
    assert result.report["iters"] == 5
