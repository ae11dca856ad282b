"""Stage 1's wiring, checked through ``run_stage1`` against independent references.

* the position learning rate of every step against 3DGS's ``get_expon_lr_func`` written out by
  hand (log-linear from ``lr_init * spatial_lr_scale`` to ``lr_final * spatial_lr_scale``);
* the densification schedule: the number of Gaussians changes only right after a
  densification step, and does change;
* the whole loop against a reference loop written here from DreamGaussian's ``main.py``
  (``train_step``: reference-view loss, SDS on random novel views, Adam step, densify with the
  last render's statistics, final prune), run with the same seed: same Gaussians, same counts,
  same PSNR -- a loop with its learning rates swapped or its densification removed cannot meet it;
* the guidance's inputs (batch, render size per milestone, annealed step ratio, camera ranges).

The learning rates are observed with torch's global optimizer step hook, so the tests do not
depend on how the loop builds or stores its optimizer.
"""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.optim.optimizer import register_optimizer_step_pre_hook

from hash3d_dg.camera import Camera
from hash3d_dg.config import build_config
from hash3d_dg.gaussians import Densifier, GaussianModel
from hash3d_dg.eval.samples import render_sample
from hash3d_dg.stages import ReferenceView, run_stage1

SEED = 3


def config(**stage1):
    values = {"seed": SEED, "device": "cpu", "guidance": {"lambda_zero123": 0.0},
              "stage1": {"iters": 40, "ref_size": 32, "num_pts": 300, "render_res": [16, 16, 16],
                         "density_start_iter": 10, "densification_interval": 10,
                         "density_end_iter": 30, "opacity_reset_interval": 20,
                         "position_lr_max_steps": 40, "backend": "torch",
                         # off the library defaults, so that a dropped setting shows
                         "init_radius": 0.45, "feature_lr": 0.02, "opacity_lr": 0.04,
                         "scaling_lr": 0.006, "rotation_lr": 0.004, "percent_dense": 0.02,
                         "densify_grad_threshold": 0.008}}
    values["stage1"].update(stage1)
    return build_config(values)


def reference_view(cfg):
    size = cfg.stage1.ref_size
    return ReferenceView.from_rgba(render_sample("ball", size), cfg.elevation, cfg.radius,
                                   cfg.fovy, size)


class StepSpy:
    """Records, at every optimizer step, each named group's lr and the number of Gaussians."""

    def __init__(self):
        self.steps: list[dict] = []

    def __enter__(self):
        def hook(optimizer, args, kwargs):
            groups = {g.get("name"): g for g in optimizer.param_groups}
            if "means" in groups:
                self.steps.append({"lr": {k: float(g["lr"]) for k, g in groups.items()},
                                   "n": int(groups["means"]["params"][0].shape[0])})
        self.handle = register_optimizer_step_pre_hook(hook)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def expon_lr(step, lr_init, lr_final, max_steps, scale):
    """3DGS ``get_expon_lr_func`` (delay_steps = 0, DreamGaussian), by hand."""
    t = min(max(step / max_steps, 0.0), 1.0)
    a, b = lr_init * scale, lr_final * scale
    return math.exp(math.log(a) * (1 - t) + math.log(b) * t)


# ------------------------------------------------------------------ learning rates

def test_position_lr_follows_the_3dgs_exponential_schedule_every_step():
    cfg = config(iters=12, position_lr_max_steps=10, position_lr_init=2e-3,
                 position_lr_final=4e-5, spatial_lr_scale=5.0, density_start_iter=1000)
    with StepSpy() as spy:
        run_stage1(reference_view(cfg), cfg, None, progress=False)
    assert len(spy.steps) == 12
    s1 = cfg.stage1
    for step, seen in enumerate(spy.steps, start=1):
        want = expon_lr(step, 2e-3, 4e-5, 10, 5.0)
        assert seen["lr"]["means"] == pytest.approx(want, rel=1e-9), step
        # the other groups keep DreamGaussian's constant rates
        assert seen["lr"]["sh0"] == pytest.approx(s1.feature_lr)
        assert seen["lr"]["opacities"] == pytest.approx(s1.opacity_lr)
        assert seen["lr"]["scales"] == pytest.approx(s1.scaling_lr)
        assert seen["lr"]["quats"] == pytest.approx(s1.rotation_lr)
    # decreasing from 1e-2 toward 2e-4, clamped after max_steps
    assert spy.steps[0]["lr"]["means"] > spy.steps[8]["lr"]["means"]
    assert spy.steps[10]["lr"]["means"] == pytest.approx(4e-5 * 5.0, rel=1e-9)
    assert spy.steps[11]["lr"]["means"] == pytest.approx(4e-5 * 5.0, rel=1e-9)


# ------------------------------------------------------------------ densification schedule

def test_gaussian_count_changes_only_after_densification_steps():
    cfg = config()
    with StepSpy() as spy:
        result = run_stage1(reference_view(cfg), cfg, None, progress=False)
    counts = [s["n"] for s in spy.steps]
    assert counts[0] == cfg.stage1.num_pts
    # the count seen at step k+1 differs from step k only when step k densified (k = 10, 20, 30)
    changed = [k for k in range(1, len(counts)) if counts[k] != counts[k - 1]]
    assert changed, "densification never changed the number of Gaussians"
    assert set(changed) <= {10, 20, 30}, changed
    d = result.report["densify"]
    assert d["cloned"] + d["split"] > 0
    # the report's counts add up: start + cloned + split (a split replaces 1 by 2) - pruned
    assert cfg.stage1.num_pts + d["cloned"] + d["split"] - d["pruned"] == result.report["num_gaussians"]
    assert result.gaussians.num_points == result.report["num_gaussians"]


# ------------------------------------------------------------------ reference loop

class FakeGuidance:
    """A differentiable stand-in for Zero-1-to-3: ``sds`` pulls renders toward a fixed colour
    and records what it was given. Enough of the guidance interface for the stage's meters."""

    def __init__(self, colour=(0.2, 0.5, 0.8), cache=False):
        self.colour = torch.tensor(colour)[None, :, None, None]
        self.entries = 5 if cache else 0  # a table that already holds entries (an earlier stage)
        self.cached = cache
        self.calls = []

    def stats(self):
        return {"unet": {"full_calls": 0, "shallow_calls": 0},
                "cache": {"attempts": 0, "hits": 0, "misses": 0, "inserts": 0, "evictions": 0,
                          "entries": self.entries, "bytes": 200 * self.entries,
                          "hits_by_grid": [0] if self.cached else []}}

    def sds(self, images, d_elevation, d_azimuth, d_radius, step_ratio=None):
        self.calls.append({"shape": tuple(images.shape), "d_el": list(d_elevation),
                           "d_az": list(d_azimuth), "d_r": list(d_radius),
                           "step_ratio": step_ratio})
        return 100.0 * ((images - self.colour) ** 2).sum()


def reference_stage1(ref: ReferenceView, cfg, guidance=None):
    """DreamGaussian's stage-1 ``train_step`` written out (the same seeds as the product)."""
    s1 = cfg.stage1
    rng = np.random.default_rng(cfg.seed)
    torch.manual_seed(cfg.seed)
    model = GaussianModel.random_init(s1.num_pts, s1.init_radius, seed=cfg.seed)
    opt = model.make_optimizer({"means": s1.position_lr_init, "sh0": s1.feature_lr,
                                "opacities": s1.opacity_lr, "scales": s1.scaling_lr,
                                "quats": s1.rotation_lr})
    dens = Densifier(grad_threshold=s1.densify_grad_threshold, percent_dense=s1.percent_dense,
                     start_iter=s1.density_start_iter, end_iter=s1.density_end_iter,
                     interval=s1.densification_interval,
                     opacity_reset_interval=s1.opacity_reset_interval)
    white, black = torch.ones(3), torch.zeros(3)
    counts = {"cloned": 0, "split": 0, "pruned": 0}
    losses = []
    for step in range(1, s1.iters + 1):
        ratio = min(1.0, step / s1.iters)
        for g in opt.param_groups:
            if g["name"] == "means":
                g["lr"] = expon_lr(step, s1.position_lr_init, s1.position_lr_final,
                                   s1.position_lr_max_steps, s1.spatial_lr_scale)
        out = model.render(ref.camera, white, backend="torch")
        loss = s1.lambda_rgb * F.mse_loss(out.image, ref.rgb) \
            + s1.lambda_mask * F.mse_loss(out.alpha, ref.mask)
        if guidance is not None:
            res = s1.render_res[sum(1 for m in s1.render_res_milestones if ratio >= m)]
            images, vers, hors = [], [], []
            for _ in range(s1.batch_size):
                # DreamGaussian: ver in [max(min_ver, -80 - el), min(max_ver, 80 - el)] widened
                # so the reference elevation can be reached; hor in [-180, 180)
                low = max(min(s1.min_ver, s1.min_ver - ref.elevation), -80.0 - ref.elevation)
                high = min(max(s1.max_ver, s1.max_ver - ref.elevation), 80.0 - ref.elevation)
                ver, hor = float(rng.uniform(low, high)), float(rng.uniform(-180.0, 180.0))
                cam = Camera.orbit(ref.elevation + ver, hor, cfg.radius, width=res, fovy=cfg.fovy)
                bg = black if rng.random() < s1.invert_bg_prob else white
                out = model.render(cam, bg, backend="torch")
                images.append(out.image.permute(2, 0, 1))
                vers.append(ver)
                hors.append(hor)
            loss = loss + cfg.guidance.lambda_zero123 * guidance.sds(
                torch.stack(images), vers, hors, [0.0] * len(vers),
                step_ratio=ratio if s1.anneal_timestep else None)
        losses.append(float(loss.detach()))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        c = dens.step_post_backward(model, opt, out, step)
        for k in counts:
            counts[k] += c[k]
    counts["pruned"] += dens.prune(model, opt, min_opacity=0.01, max_world_scale=0.1)
    with torch.no_grad():
        out = model.render(ref.camera, white, backend="torch")
    mse = float(((out.image - ref.rgb) ** 2).mean())
    reference_stage1.losses = losses
    a, b = out.alpha > 0.5, ref.mask > 0.5
    reference_stage1.iou = float((a & b).sum()) / float((a | b).sum())
    return model, counts, -10 * math.log10(mse)


def _same_run(result, model, counts, psnr):
    assert result.report["densify"] == counts
    assert result.report["num_gaussians"] == model.num_points
    assert result.report["ref_psnr"] == pytest.approx(psnr, abs=2e-3)
    for key, value in model.params.items():
        torch.testing.assert_close(result.gaussians.params[key].detach(), value.detach(),
                                   rtol=1e-4, atol=1e-5, msg=key)


def test_stage1_matches_the_reference_loop_without_guidance():
    cfg = config()
    ref = reference_view(cfg)
    seen = []
    result = run_stage1(ref, cfg, None, progress=False, progress_callback=seen.append)
    model, counts, psnr = reference_stage1(ref, cfg)
    assert counts["cloned"] + counts["split"] > 0 and counts["pruned"] > 0  # the test can see both
    _same_run(result, model, counts, psnr)
    # the progress reports: every step on the CPU, with the step's loss
    assert [e["step"] for e in seen] == list(range(1, 41))
    assert all(e["stage"] == "stage1" and e["total"] == 40 and e["hit_rate"] == 0.0 for e in seen)
    assert [e["loss"] for e in seen] == pytest.approx(reference_stage1.losses, rel=1e-4)
    assert result.report["final_loss"] == pytest.approx(reference_stage1.losses[-1], rel=1e-4)
    assert result.report["iters"] == 40 and result.report["seconds"] > 0
    # the report's rounding: PSNR to 3 decimals, IoU to 4
    assert round(result.report["ref_psnr"], 3) == result.report["ref_psnr"]
    assert round(result.report["ref_mask_iou"], 4) == result.report["ref_mask_iou"]
    assert result.report["ref_mask_iou"] == pytest.approx(reference_stage1.iou, abs=1e-3)


def test_stage1_matches_the_reference_loop_with_guidance():
    cfg = build_config({"seed": SEED, "device": "cpu", "radius": 2.3, "fovy": 40.0,
                        "guidance": {"lambda_zero123": 0.5},
                        "stage1": {"iters": 20, "ref_size": 24, "num_pts": 200, "batch_size": 2,
                                   "render_res": [8, 12, 16], "render_res_milestones": [0.3, 0.6],
                                   "density_start_iter": 5, "densification_interval": 5,
                                   "density_end_iter": 15, "position_lr_max_steps": 20,
                                   "backend": "torch"}})
    ref = reference_view(cfg)
    fake = FakeGuidance()
    result = run_stage1(ref, cfg, fake, progress=False)
    twin = FakeGuidance()
    model, counts, psnr = reference_stage1(ref, cfg, twin)
    _same_run(result, model, counts, psnr)
    assert round(result.report["ref_psnr"], 3) == result.report["ref_psnr"]
    assert len(fake.calls) == 20
    for a, b in zip(fake.calls, twin.calls):
        assert a["shape"] == b["shape"] and a["step_ratio"] == pytest.approx(b["step_ratio"])
        assert a["d_el"] == pytest.approx(b["d_el"]) and a["d_az"] == pytest.approx(b["d_az"])
        assert a["d_r"] == [0.0, 0.0]
    # the progressive render size and the annealed timestep, step by step
    for step, call in enumerate(fake.calls, start=1):
        ratio = step / 20
        size = 8 if ratio < 0.3 else (12 if ratio < 0.6 else 16)
        assert call["shape"] == (2, 3, size, size), step
        assert call["step_ratio"] == pytest.approx(ratio), step
        assert all(-180.0 <= az < 180.0 for az in call["d_az"])
        assert all(-30.0 <= el <= 30.0 for el in call["d_el"])


def test_unannealed_stage1_passes_no_step_ratio_and_zero_lambda_skips_guidance():
    cfg = config(iters=3, anneal_timestep=False)
    cfg.guidance.lambda_zero123 = 1.0
    fake = FakeGuidance(cache=True)
    report = run_stage1(reference_view(cfg), cfg, fake, progress=False).report
    assert [c["step_ratio"] for c in fake.calls] == [None, None, None]
    assert report["cache"]["entries"] == 5  # the guidance's cache is reported
    cfg.guidance.lambda_zero123 = 0.0
    fake = FakeGuidance(cache=True)
    report = run_stage1(reference_view(cfg), cfg, fake, progress=False).report
    assert fake.calls == []
    assert report["cache"]["entries"] == 0 and report["cache"]["bytes"] == 0  # unused: not reported


def test_a_single_iteration_reaches_the_end_of_the_schedule():
    cfg = config(iters=1)
    cfg.guidance.lambda_zero123 = 1.0
    fake = FakeGuidance()
    run_stage1(reference_view(cfg), cfg, fake, progress=False)
    assert [c["step_ratio"] for c in fake.calls] == [1.0]


def test_no_iterations_report_a_nan_loss_and_a_real_duration(monkeypatch):
    import time

    cfg = config(iters=0)
    start = time.perf_counter()
    report = run_stage1(reference_view(cfg), cfg, None, progress=False).report
    took = time.perf_counter() - start
    assert math.isnan(report["final_loss"])
    assert 0 <= report["seconds"] <= took + 1e-3
    # a clock that advances 12.3456 ms per reading: the duration is a multiple, in ms to 3 places
    ticks = iter(range(10**6))
    monkeypatch.setattr(time, "perf_counter", lambda: 100.0 + 0.0123456 * next(ticks))
    seconds = run_stage1(reference_view(cfg), cfg, None, progress=False).report["seconds"]
    assert isinstance(seconds, float) and seconds > 0
    assert seconds == round(seconds, 3)
    assert any(abs(seconds - round(0.0123456 * n, 3)) < 1e-12 for n in range(1, 50))


def test_every_render_uses_the_configured_backend(monkeypatch):
    backends = []
    real = GaussianModel.render

    def render(self, camera, background, backend="auto", **kw):
        backends.append(backend)
        return real(self, camera, background, backend=backend, **kw)

    monkeypatch.setattr(GaussianModel, "render", render)
    cfg = config(iters=2)
    cfg.guidance.lambda_zero123 = 1.0
    run_stage1(reference_view(cfg), cfg, FakeGuidance(), progress=False)
    assert len(backends) == 2 * 2 + 1 and set(backends) == {"torch"}  # ref + novel, then the report


def test_final_clean_up_prunes_transparent_and_oversized_gaussians():
    """DreamGaussian's last prune: opacity < 0.01 or largest scale > 0.1 world units."""
    cfg = config(iters=2, density_start_iter=1000)
    model = GaussianModel.random_init(200, 0.45, seed=1)
    with torch.no_grad():
        model.params["scales"][:] = math.log(0.03)
        model.params["scales"][:7] = math.log(0.25)           # far above 0.1, below 0.4
        model.params["opacities"][7:18] = math.log(0.004 / 0.996)  # far below 0.01
    result = run_stage1(reference_view(cfg), cfg, None, progress=False, gaussians=model)
    assert result.report["densify"] == {"cloned": 0, "split": 0, "pruned": 18}
    assert result.gaussians.num_points == 182


def test_progress_reports_follow_the_check_interval(monkeypatch):
    """On an accelerator the loss is read every ``check_interval`` steps and at the last one."""
    import hash3d_dg.stages as stages_pkg

    for name, module in list(sys.modules.items()):
        if name.startswith(stages_pkg.__name__) and hasattr(module, "check_interval"):
            monkeypatch.setattr(module, "check_interval", lambda device: 4)
    cfg = config(iters=10)
    seen = []
    run_stage1(reference_view(cfg), cfg, None, progress=False, progress_callback=seen.append)
    assert [e["step"] for e in seen] == [4, 8, 10]


def test_stage1_shows_a_progress_bar_by_default(capsys):
    cfg = config(iters=2)
    run_stage1(reference_view(cfg), cfg, None)
    err = capsys.readouterr().err
    assert err.lstrip("\r").startswith("stage 1 (gaussians): ")
    assert "loss=" in err and "pts=300" in err
    run_stage1(reference_view(cfg), cfg, None, progress=False)
    assert "stage 1 (gaussians)" not in capsys.readouterr().err
