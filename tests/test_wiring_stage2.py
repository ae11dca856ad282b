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

import trimesh

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

    def __init__(self, image_size=24, cache=False):
        self.image_size = image_size
        self.entries = 5 if cache else 0  # a table holding entries from earlier work
        self.cached = cache
        self.calls = []

    def stats(self):
        return {"unet": {"full_calls": 0, "shallow_calls": 0},
                "cache": {"attempts": 0, "hits": 0, "misses": 0, "inserts": 0, "evictions": 0,
                          "entries": self.entries, "bytes": 200 * self.entries,
                          "hits_by_grid": [0] if self.cached else []}}

    def refine(self, images, d_elevation, d_azimuth, d_radius, strength=0.8, steps=50):
        assert not images.requires_grad and images.dtype == torch.float32
        self.calls.append({"shape": tuple(images.shape), "d_el": list(d_elevation),
                           "d_az": list(d_azimuth), "d_r": list(d_radius), "strength": strength,
                           "steps": steps})
        x = F.interpolate(images, (self.image_size, self.image_size), mode="bilinear",
                          align_corners=False)
        return (0.3 + 0.5 * x.flip(1)).clamp(0, 1)  # channels reversed, dimmed


def config(**stage2):
    # off the library defaults (radius, fovy, supersampling range), so a dropped setting shows
    values = {"seed": SEED, "device": "cpu", "radius": 2.2, "fovy": 45.0,
              "guidance": {"lambda_zero123": 0.7},
              "stage1": {"ref_size": 24},
              "stage2": {"iters": 6, "render_res": 16, "texture_lr": 0.2, "strength_start": 0.6,
                         "strength_end": 0.9, "ddim_steps": 20, "backend": "torch",
                         "ssaa_min": 1.1, "ssaa_max": 1.5},
              "hash3d": {"mode": "fast"}}
    values["stage2"].update(stage2)
    return build_config(values)


def reference_view(cfg):
    size = cfg.stage1.ref_size
    return ReferenceView.from_rgba(render_sample("ball", size), cfg.elevation, cfg.radius,
                                   cfg.fovy, size)


def supersampled(mesh, camera, size, ssaa, albedo, offsets=None):
    """DreamGaussian's random supersampling: render at size * ssaa, resample to size."""
    inner = max(8, int(round(size * ssaa)))
    out = rasterize_mesh(mesh, camera.resized(inner), background=torch.ones(3), backend="torch",
                         albedo=albedo, antialias=True, texture_filter="mipmap",
                         vertex_offsets=offsets)
    forward = torch.as_tensor(camera.c2w[:3, 2], dtype=out.normal.dtype)  # towards the camera
    stack = torch.cat([out.rgb, out.alpha, (out.normal * forward).sum(-1, keepdim=True)], -1)
    if inner != size:
        stack = F.interpolate(stack.permute(2, 0, 1)[None], (size, size), mode="bilinear",
                              align_corners=False, antialias=inner > size)[0].permute(1, 2, 0)
    return stack[..., :3], stack[..., 3:4], stack[..., 4:5]


def reference_stage2(mesh: Mesh, ref: ReferenceView, cfg, guidance=None):
    """Returns the refined mesh and the per-step losses."""
    s2, s1 = cfg.stage2, cfg.stage1
    rng = np.random.default_rng(cfg.seed + 1)
    a = mesh.albedo.float().clamp(1e-4, 1 - 1e-4)
    raw = torch.nn.Parameter(torch.log(a / (1 - a)))
    groups = [{"params": [raw], "lr": s2.texture_lr}]
    offsets = None
    if s2.geom_lr > 0:  # DreamGaussian's optional vertex offsets
        offsets = torch.nn.Parameter(torch.zeros_like(mesh.v))
        groups.append({"params": [offsets], "lr": s2.geom_lr})
    opt = torch.optim.Adam(groups)
    losses = []
    for step in range(1, s2.iters + 1):
        ratio = step / s2.iters
        albedo = torch.sigmoid(raw)
        ssaa = float(np.clip(rng.uniform(0, 2.0), s2.ssaa_min, s2.ssaa_max))
        rgb, alpha, viewcos = supersampled(mesh, ref.camera, ref.camera.width, ssaa, albedo, offsets)
        valid = ((alpha > 0) & (viewcos > 0.5)).float()
        loss = F.mse_loss(rgb * valid, ref.rgb * valid)
        if guidance is not None:
            low = max(min(s1.min_ver, s1.min_ver - ref.elevation), -80.0 - ref.elevation)
            high = min(max(s1.max_ver, s1.max_ver - ref.elevation), 80.0 - ref.elevation)
            ver, hor = float(rng.uniform(low, high)), float(rng.uniform(-180.0, 180.0))
            cam = Camera.orbit(ref.elevation + ver, hor, cfg.radius, width=s2.render_res, fovy=cfg.fovy)
            ssaa = float(np.clip(rng.uniform(0, 2.0), s2.ssaa_min, s2.ssaa_max))
            image, _, _ = supersampled(mesh, cam, s2.render_res, ssaa, albedo, offsets)
            image = image.permute(2, 0, 1)[None]
            strength = s2.strength_start + ratio * (s2.strength_end - s2.strength_start)
            refined = guidance.refine(image.detach(), [ver], [hor], [0.0], strength=strength,
                                      steps=s2.ddim_steps)
            refined = F.interpolate(refined, image.shape[-2:], mode="bilinear", align_corners=False)
            loss = loss + cfg.guidance.lambda_zero123 * F.mse_loss(image, refined)
        losses.append(float(loss.detach()))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    with torch.no_grad():
        out = Mesh(mesh.v + offsets if offsets is not None else mesh.v, mesh.f, mesh.vn, mesh.vt,
                   mesh.ft, torch.sigmoid(raw))
        if offsets is not None:
            out = out.compute_normals()
    return out, losses


def _mesh():
    """A sphere with per-vertex uvs (front and back share the texture, which does not matter
    here) and a random albedo holding exact 0 and 1 texels (the logit must clamp them)."""
    tm = trimesh.creation.icosphere(subdivisions=2, radius=0.5)
    v = torch.tensor(tm.vertices, dtype=torch.float32)
    f = torch.tensor(tm.faces, dtype=torch.int64)
    vt = torch.stack([0.5 + 0.9 * v[:, 0], 0.5 + 0.9 * v[:, 1]], -1)
    albedo = torch.rand(16, 16, 3, generator=torch.Generator().manual_seed(2))
    albedo[0, :4] = 0.0
    albedo[-1, -4:] = 1.0
    mesh = Mesh(v, f, None, vt, f.clone(), albedo).compute_normals()
    # stored normals that are not the recomputed ones (as a loaded mesh may have): the texture
    # pass must keep them, and only a geometry pass may recompute them
    tilt = torch.nn.functional.normalize(mesh.vn + 0.2 * torch.tensor([0.3, -0.2, 0.1]), dim=-1)
    return Mesh(v, f, tilt, vt, f.clone(), albedo)


def test_stage2_matches_the_reference_loop_with_guidance(monkeypatch):
    from hash3d_dg.mesh import backends

    names = []
    real = backends.resolve_mesh_backend
    monkeypatch.setattr(backends, "resolve_mesh_backend",
                        lambda name, device: names.append(name) or real(name, device))
    cfg = config()
    ref = reference_view(cfg)
    fake, twin = FakeRefineGuidance(cache=True), FakeRefineGuidance()
    seen = []
    result = run_stage2(_mesh(), ref, cfg, fake, progress=False, progress_callback=seen.append)
    assert set(names) == {"torch"} and len(names) == 2 * 6 + 1  # every render: the configured one
    want_mesh, losses = reference_stage2(_mesh(), ref, cfg, twin)
    want = want_mesh.albedo
    assert float((want - _mesh().albedo).abs().max()) > 0.05  # the texture did move
    torch.testing.assert_close(result.mesh.albedo, want, rtol=0, atol=2e-5)
    torch.testing.assert_close(result.mesh.vn, _mesh().vn)  # geometry untouched without geom_lr
    assert torch.equal(result.mesh.v, _mesh().v)
    assert [e["step"] for e in seen] == list(range(1, 7))
    assert all(e["stage"] == "stage2" and e["total"] == 6 and e["hit_rate"] == 0.0 for e in seen)
    assert [e["loss"] for e in seen] == pytest.approx(losses, rel=1e-4)
    report = result.report
    assert report["final_loss"] == pytest.approx(losses[-1], rel=1e-4)
    assert report["cache"]["entries"] == 5  # the guidance's cache is reported
    assert 0 < report["seconds"] and round(report["seconds"], 3) == report["seconds"]
    a, b = out_alpha_iou(result.mesh, ref)
    assert report["ref_mask_iou"] == pytest.approx(b, abs=1e-4)
    assert round(report["ref_mask_iou"], 4) == report["ref_mask_iou"]
    assert round(report["ref_psnr"], 3) == report["ref_psnr"]
    assert len(fake.calls) == 6
    for step, (a, b) in enumerate(zip(fake.calls, twin.calls), start=1):
        assert a["shape"] == (1, 3, 16, 16)
        assert a["d_el"] == pytest.approx(b["d_el"]) and a["d_az"] == pytest.approx(b["d_az"])
        assert a["d_r"] == [0.0]
        # strength: 0.6 -> 0.9 linearly in step / iters; DreamGaussian's 50-step DDIM count
        assert a["strength"] == pytest.approx(0.6 + step / 6 * 0.3)
        assert a["steps"] == 20
    # the report measures the refined mesh from the reference view
    psnr, _ = out_alpha_iou(want_mesh, ref)
    assert result.report["ref_psnr"] == pytest.approx(psnr, abs=2e-3)


def out_alpha_iou(mesh, ref):
    """(PSNR, mask IoU) of ``mesh`` rendered from the reference camera, by hand."""
    out = rasterize_mesh(mesh, ref.camera, background=torch.ones(3), backend="torch")
    psnr = -10 * math.log10(float(((out.rgb - ref.rgb) ** 2).mean()))
    a, b = out.alpha > 0.5, ref.mask > 0.5
    return psnr, float((a & b).sum()) / float((a | b).sum())


def test_stage2_matches_the_reference_loop_without_guidance():
    cfg = config(iters=5)
    cfg.guidance.lambda_zero123 = 0.0
    ref = reference_view(cfg)
    fake = FakeRefineGuidance(cache=True)
    result = run_stage2(_mesh(), ref, cfg, fake, progress=False)
    assert fake.calls == []
    want, _ = reference_stage2(_mesh(), ref, cfg, None)
    torch.testing.assert_close(result.mesh.albedo, want.albedo, rtol=0, atol=2e-5)
    assert result.report["iters"] == 5
    assert result.report["cache"]["entries"] == 0  # the unused guidance is not reported


def test_stage2_with_vertex_offsets_matches_the_reference_loop():
    cfg = config(iters=4, geom_lr=2e-3)
    ref = reference_view(cfg)
    result = run_stage2(_mesh(), ref, cfg, FakeRefineGuidance(), progress=False)
    want, _ = reference_stage2(_mesh(), ref, cfg, FakeRefineGuidance())
    assert float((want.v - _mesh().v).abs().max()) > 1e-3  # the vertices did move
    torch.testing.assert_close(result.mesh.v, want.v, rtol=0, atol=1e-5)
    torch.testing.assert_close(result.mesh.vn, want.vn, rtol=0, atol=1e-5)
    torch.testing.assert_close(result.mesh.albedo, want.albedo, rtol=0, atol=2e-5)
    assert round(result.report["ref_psnr"], 3) == result.report["ref_psnr"]


def test_stage2_progress_bar_and_check_interval(capsys, monkeypatch):
    import sys

    cfg = config(iters=2)
    cfg.guidance.lambda_zero123 = 0.0
    run_stage2(_mesh(), reference_view(cfg), cfg, None)
    err = capsys.readouterr().err
    assert err.lstrip("\r").startswith("stage 2 (mesh)  : ") and "loss=" in err
    run_stage2(_mesh(), reference_view(cfg), cfg, None, progress=False)
    assert capsys.readouterr().err == ""
    for name, module in list(sys.modules.items()):
        if name.startswith("hash3d_dg.stages") and hasattr(module, "check_interval"):
            monkeypatch.setattr(module, "check_interval", lambda device: 3)
    cfg = config(iters=7)
    cfg.guidance.lambda_zero123 = 0.0
    seen = []
    run_stage2(_mesh(), reference_view(cfg), cfg, None, progress=False, progress_callback=seen.append)
    assert [e["step"] for e in seen] == [3, 6, 7]


def test_stage2_schedule_ends_and_empty_runs():
    cfg = config(iters=1)
    fake = FakeRefineGuidance()
    run_stage2(_mesh(), reference_view(cfg), cfg, fake, progress=False)
    assert [c["strength"] for c in fake.calls] == [pytest.approx(0.9)]  # strength_end at the end
    cfg = config(iters=0)
    report = run_stage2(_mesh(), reference_view(cfg), cfg, None, progress=False).report
    assert math.isnan(report["final_loss"]) and report["iters"] == 0


def test_stage2_reports_its_duration_in_ms(monkeypatch):
    import time

    ticks = iter(range(10**6))
    monkeypatch.setattr(time, "perf_counter", lambda: 100.0 + 0.0123456 * next(ticks))
    cfg = config(iters=1)
    cfg.guidance.lambda_zero123 = 0.0
    seconds = run_stage2(_mesh(), reference_view(cfg), cfg, None, progress=False).report["seconds"]
    assert isinstance(seconds, float) and 0 < seconds < 1
    assert any(abs(seconds - round(0.0123456 * n, 3)) < 1e-12 for n in range(1, 50))
