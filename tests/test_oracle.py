"""The oracle quality benchmark: an exact pixel-space denoiser behind the real Hash3D cache."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

from hash3d_dg.eval.oracle import (SCHEDULER_CONFIG, OracleDenoiser, OracleGuidance, oracle_report,
                                    resolve_settings, run_oracle_once)
from hash3d_dg.eval.oracle_scene import OracleScene, build_scene_mesh

REPO = Path(__file__).resolve().parents[1]
from hash3d_dg.cache import CachedDenoiser, CacheKey, Hash3DCache, Hash3DConfig, SplitDenoiser

SIZE = 24


@pytest.fixture(scope="module")
def scene() -> OracleScene:
    return OracleScene(build_scene_mesh(n_lat=16, n_lon=32, texture_size=64), ssaa=1, backend="torch")


@pytest.fixture(scope="module")
def alphas() -> torch.Tensor:
    return DDIMScheduler.from_config(SCHEDULER_CONFIG).alphas_cumprod


def make_oracle(scene, alphas) -> OracleDenoiser:
    return OracleDenoiser(scene, alphas, SIZE, reference_elevation=0.0, radius=2.0, fovy=49.1)


def test_scene_is_a_closed_asymmetric_object(scene):
    mesh = scene.mesh
    assert mesh.signed_volume() > 0.2  # a blob of radius ~0.5, outward winding
    # closed: every edge is shared by exactly two faces
    f = mesh.f
    edges = torch.cat([f[:, [0, 1]], f[:, [1, 2]], f[:, [2, 0]]]).sort(dim=1).values
    _, counts = torch.unique(edges, dim=0, return_counts=True)
    assert bool((counts == 2).all())
    front, front_a = scene.render(0.0, 0.0, 2.0, SIZE, 49.1)
    back, _ = scene.render(0.0, 180.0, 2.0, SIZE, 49.1)
    coverage = float(front_a.mean())
    assert 0.2 < coverage < 0.8  # the object fills a good part of the frame, not all of it
    assert float(front_a[SIZE // 2, SIZE // 2]) == 1.0 and float(front_a[0, 0]) == 0.0
    assert torch.allclose(front[0, 0], torch.ones(3))  # white background
    assert float((front - back).abs().mean()) > 0.05  # front and back differ
    rgba = scene.rgba(0.0, 0.0, 2.0, SIZE, 49.1)
    assert rgba.shape == (SIZE, SIZE, 4) and np.isfinite(rgba).all()
    # compositing the straight colour over white gives the render back
    comp = rgba[..., :3] * rgba[..., 3:] + (1 - rgba[..., 3:])
    assert np.allclose(comp, front.numpy(), atol=1e-5)


def test_oracle_is_a_split_denoiser_whose_shallow_path_reproduces_full(scene, alphas):
    oracle = make_oracle(scene, alphas)
    assert isinstance(oracle, SplitDenoiser)
    ctx = OracleDenoiser.context_for([10.0, -20.0], [30.0, 170.0], [0.0, 0.1])
    sample = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([37, 941])
    eps, feature = oracle.full(sample, t, ctx)
    assert feature.shape == sample.shape and eps.shape == sample.shape
    assert torch.equal(oracle.shallow(sample, t, ctx, feature), eps)
    # the feature is the clean ground truth in [-1, 1]
    rgb, _ = scene.render(10.0, 30.0, 2.0, SIZE, 49.1)
    assert torch.allclose(feature[0], rgb.permute(2, 0, 1) * 2 - 1)


@pytest.mark.parametrize("t", [1, 20, 500, 980, 999])
def test_oracle_eps_is_exact(scene, alphas, t):
    oracle = make_oracle(scene, alphas)
    ctx = OracleDenoiser.context_for([5.0], [-60.0], [0.0])
    x0 = oracle.clean(ctx).double()
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(t), dtype=torch.float64)
    ab = float(alphas[t].double())
    x_t = math.sqrt(ab) * x0 + math.sqrt(1 - ab) * eps
    pred, _ = oracle.full(x_t, t, ctx)
    assert torch.allclose(pred, eps, atol=1e-9, rtol=0)


def test_stale_feature_from_another_camera_costs_quality(scene, alphas):
    oracle = make_oracle(scene, alphas)
    here = OracleDenoiser.context_for([0.0], [40.0], [0.0])
    there = OracleDenoiser.context_for([0.0], [52.0], [0.0])  # same 20-degree cell
    x0 = oracle.clean(here)
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    t = 400
    ab = float(alphas[t])
    x_t = math.sqrt(ab) * x0 + math.sqrt(1 - ab) * eps
    _, stale = oracle.full(x_t, t, there)
    out = oracle.shallow(x_t, t, here, stale)
    assert float((out - eps).abs().mean()) > 0.02
    # the error is exactly the x0 mismatch scaled by sqrt(ab / (1 - ab))
    expected = math.sqrt(ab / (1 - ab)) * (stale - x0)
    assert torch.allclose(eps - out, expected, atol=1e-4)

    # Through the real cache: a cached neighbour is reused (shallow call) and is wrong by the same.
    cache = Hash3DCache(Hash3DConfig.preset("official", eta=1.0), seed=0)
    den = CachedDenoiser(oracle, cache)
    key = lambda az: CacheKey(azimuth=az, elevation=0.0, radius=0.0, timestep=float(t))  # noqa: E731
    den(x_t, torch.tensor([t]), there, keys=[key(52.0)], query=x_t)  # miss: computed, stored
    got = den(x_t, torch.tensor([t]), here, keys=[key(40.0)], query=x_t)
    assert den.stats.shallow_calls == 1 and cache.stats.hits == 1
    assert torch.allclose(got, out, atol=1e-5)


def test_sds_gradient_is_the_analytic_pull_toward_the_truth(scene, alphas):
    oracle = make_oracle(scene, alphas)
    guidance = OracleGuidance(CachedDenoiser(oracle), sds_scale=0.5, seed=0)
    images = torch.rand(1, 3, SIZE, SIZE, requires_grad=True)
    step_ratio = 0.6
    t = guidance.timestep_for(step_ratio)
    assert t == 400
    loss = guidance.sds(images, [15.0], [-100.0], [0.0], step_ratio=step_ratio)
    loss.backward()
    ab = float(alphas[t])
    x0 = oracle.clean(OracleDenoiser.context_for([15.0], [-100.0], [0.0]))
    x = images.detach() * 2 - 1
    # loss = s/2 |x - sg(x - g)|^2 with g = (1 - ab)(eps_pred - eps) = sqrt(ab (1 - ab)) (x - x0);
    # d/d images = 2 * s * g
    expected = 2 * 0.5 * math.sqrt(ab * (1 - ab)) * (x - x0)
    assert torch.allclose(images.grad, expected, atol=1e-4)
    assert guidance.stats()["unet"] == {"full_calls": 1, "shallow_calls": 0}


def test_refine_pulls_any_render_to_the_truth(scene, alphas):
    oracle = make_oracle(scene, alphas)
    guidance = OracleGuidance(CachedDenoiser(oracle), seed=0)
    grey = torch.full((1, 3, SIZE, SIZE), 0.5)
    refined = guidance.refine(grey, [0.0], [90.0], [0.0], strength=0.8, steps=50)
    truth, _ = scene.render(0.0, 90.0, 2.0, SIZE, 49.1)
    truth = truth.permute(2, 0, 1)[None]
    err_in = float(((grey - truth) ** 2).mean())
    err_out = float(((refined - truth) ** 2).mean())
    assert err_out < err_in / 30
    assert guidance.stats()["unet"]["full_calls"] == 10  # 50 * (1 - 0.8) DDIM steps, one view


def test_short_run_reports_finite_numbers_and_counts_hits(scene):
    settings = resolve_settings("tiny", device="cpu")
    result = run_oracle_once(scene, Hash3DConfig.preset("paper", eta=0.5), settings, iters=30,
                             iters_refine=3, seed=0)
    for key in ("psnr", "ssim", "mask_iou", "stage1_psnr", "mesh_psnr", "seconds"):
        assert math.isfinite(result[key]), key
    assert result["unet_shallow_calls"] > 0
    assert result["unet_shallow_calls"] == result["cache_hits"]
    s2 = resolve_config_strengths(3)
    assert result["unet_full_calls"] + result["unet_shallow_calls"] == 30 + sum(50 - int(50 * s) for s in s2)
    assert result["ground_truth_renders"] == result["unet_full_calls"]


def resolve_config_strengths(iters: int) -> list[float]:
    """Stage 2's img2img strength per iteration (RunConfig defaults 0.8 -> 0.95)."""
    return [0.8 + min(1.0, k / iters) * (0.95 - 0.8) for k in range(1, iters + 1)]


def test_report_structure():
    report = oracle_report(iters=20, iters_refine=2, modes=("off", "paper"), sweeps=True, seed=0,
                           size="tiny", etas=(0.1, 0.6), grid_sizes=(30,), eval_views=4)
    assert set(report) == {"modes", "sweeps", "settings"}
    assert set(report["modes"]) == {"off", "paper"}
    off, paper = report["modes"]["off"], report["modes"]["paper"]
    assert off["unet_shallow_calls"] == 0 and off["cache_hits"] == 0
    assert paper["unet_shallow_calls"] == paper["cache_hits"]
    for entry in report["sweeps"]["eta"] + report["sweeps"]["grid"]:
        assert entry["unet_shallow_calls"] == entry["cache_hits"]
        assert all(math.isfinite(entry[k]) for k in ("psnr", "ssim", "mask_iou"))
    assert [e["eta"] for e in report["sweeps"]["eta"]] == [0.1, 0.6]
    assert report["sweeps"]["eta"][0]["psnr"] == paper["psnr"]  # eta 0.1 is the paper preset
    assert report["sweeps"]["grid"][0]["grid"] == [30.0, 30.0, 0.2, 30.0]
    assert report["settings"]["runs"] == 4  # off, paper (= eta 0.1), eta 0.6, grid 30
    assert report["settings"]["ref_size"] == 32 and report["settings"]["eval_views"] == 4
    # a higher retrieval probability serves more calls from the cache
    assert report["sweeps"]["eta"][1]["unet_shallow_calls"] > paper["unet_shallow_calls"]


def test_parallel_jobs_give_the_same_report():
    kwargs = dict(iters=12, iters_refine=1, modes=("off", "official"), sweeps=False, seed=1,
                  size="tiny", eval_views=2)
    serial = oracle_report(**kwargs)
    parallel = oracle_report(jobs=2, **kwargs)
    for mode in ("off", "official"):
        for key in ("psnr", "ssim", "mask_iou", "unet_full_calls", "unet_shallow_calls"):
            assert serial["modes"][mode][key] == parallel["modes"][mode][key], (mode, key)


def test_fast_mode_falls_back_across_timesteps_and_reuses_trajectories(scene):
    settings = resolve_settings("tiny", device="cpu")
    result = run_oracle_once(scene, Hash3DConfig.preset("fast"), settings, iters=40, iters_refine=2, seed=0)
    s1, s2 = result["stage1"], result["stage2"]
    assert math.isfinite(result["psnr"])
    assert s1["unet"]["shallow_calls"] == s1["cache_hits"] > 0
    # stage 2: the grid table is not used; each refine call runs one full step, the rest shallow
    assert s2["cache_attempts"] == 0 and s2["unet"]["full_calls"] == 2
    steps = sum(50 - int(50 * s) for s in resolve_config_strengths(2))
    assert s2["unet"]["shallow_calls"] == steps - 2


def test_guidance_type_oracle_runs_the_product_pipeline(tmp_path):
    """``guidance.type=oracle`` plugs the oracle guidance into the product's own run (the same
    ``build_guidance`` seam a second guidance uses): a complete result, UNet calls counted, the
    cache consulted in paper mode."""
    from hash3d_dg.config import load_config
    from hash3d_dg.pipeline import RunContext, run_image

    cfg = load_config("smoke.yaml", ["guidance.type=oracle", "guidance.image_size=32", "hash3d.mode=paper",
                                     "hash3d.eta=1.0", "stage1.iters=6", "stage2.iters=2"])
    ctx = RunContext.create(cfg, progress=False)
    assert "oracle" in ctx.describe()
    report = run_image(REPO / "data" / "ball.png", ctx, tmp_path, name="ball")
    assert (tmp_path / "ball" / "ball.glb").stat().st_size > 0
    assert report["stage1"]["unet"]["full_calls"] + report["stage1"]["unet"]["shallow_calls"] == 6
    assert report["stage1"]["cache"]["attempts"] == 6 and report["model_family"] is None
