"""The real stage loops on small problems: fitting, the cache in both stages, reproducibility,
and mesh extraction from fitted Gaussians."""

import math

import pytest
import torch
import trimesh

from hash3d_dg.config import TINY_MODEL, build_config
from hash3d_dg.gaussians import GaussianModel
from hash3d_dg.mesh import extract_mesh
from hash3d_dg.pipeline import build_guidance
from hash3d_dg.eval.samples import render_sample
from hash3d_dg.stages import ReferenceView, run_stage1, run_stage2
from hash3d_dg.bench.harness import standin_mesh


def small_config(**sections):
    values = {"device": "cpu", "guidance": {"model": TINY_MODEL, "image_size": 32},
              "stage1": {"ref_size": 32, "num_pts": 200, "render_res": [16, 16, 16]},
              "stage2": {"render_res": 16}}
    for key, value in sections.items():
        if isinstance(value, dict):
            values.setdefault(key, {}).update(value)
        else:
            values[key] = value
    return build_config(values)


def reference(cfg, size=None):
    size = size or cfg.stage1.ref_size
    return ReferenceView.from_rgba(render_sample("ball", size), cfg.elevation, cfg.radius, cfg.fovy, size)


@pytest.fixture
def tiny_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HASH3D_DG_CACHE", str(tmp_path / "cache"))


def guided(cfg):
    return build_guidance(cfg, torch.device("cpu"), torch.float32)


def test_fit_without_guidance_reaches_psnr_and_iou():
    cfg = small_config(guidance={"lambda_zero123": 0.0},
                       stage1={"iters": 120, "ref_size": 64, "num_pts": 2000, "density_start_iter": 30,
                               "densification_interval": 30})
    result = run_stage1(reference(cfg), cfg, guidance=None, progress=False)
    assert result.report["ref_psnr"] > 20.0, result.report
    assert result.report["ref_mask_iou"] > 0.85, result.report
    assert result.report["unet"] == {"full_calls": 0, "shallow_calls": 0}


def test_stage1_paper_mode_hits_and_shallow_calls_equal_hits(tiny_cache):
    cfg = small_config(stage1={"iters": 200}, hash3d={"mode": "paper", "eta": 0.5})
    guidance = guided(cfg)
    ref = reference(cfg)
    guidance.set_reference(ref.image_nchw(), cfg.elevation)
    report = run_stage1(ref, cfg, guidance, progress=False).report
    assert report["cache"]["hits"] > 0
    assert report["unet"]["shallow_calls"] == report["cache"]["hits"]
    assert report["unet"]["full_calls"] + report["unet"]["shallow_calls"] == 200
    assert report["cache"]["attempts"] == report["cache"]["hits"] + report["cache"]["misses"]
    assert report["cache"]["inserts"] == report["unet"]["full_calls"]


def test_stage1_off_mode_never_touches_a_cache(tiny_cache):
    cfg = small_config(stage1={"iters": 5}, hash3d={"mode": "off"})
    guidance = guided(cfg)
    ref = reference(cfg)
    guidance.set_reference(ref.image_nchw(), cfg.elevation)
    report = run_stage1(ref, cfg, guidance, progress=False).report
    assert guidance.denoiser.cache is None
    assert report["unet"] == {"full_calls": 5, "shallow_calls": 0}


def test_seeded_stage1_is_reproducible(tiny_cache):
    def run():
        cfg = small_config(stage1={"iters": 6}, hash3d={"mode": "paper", "eta": 0.5})
        guidance = guided(cfg)
        ref = reference(cfg)
        guidance.set_reference(ref.image_nchw(), cfg.elevation)
        result = run_stage1(ref, cfg, guidance, progress=False)
        return {k: v.detach().clone() for k, v in result.gaussians.params.items()}, result.report

    (a, ra), (b, rb) = run(), run()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert ra["unet"] == rb["unet"] and ra["cache"]["hits"] == rb["cache"]["hits"]


def test_stage2_paper_mode_reuses_features_across_denoising_steps(tiny_cache):
    cfg = small_config(stage2={"iters": 4}, hash3d={"mode": "paper", "eta": 1.0})
    guidance = guided(cfg)
    ref = reference(cfg)
    guidance.set_reference(ref.image_nchw(), cfg.elevation)
    result = run_stage2(standin_mesh(texture_size=16, subdivisions=2), ref, cfg, guidance, progress=False)
    report = result.report
    assert report["cache"]["hits"] > 0
    assert report["unet"]["shallow_calls"] == report["cache"]["hits"]
    # 4 refine calls; strength 0.8 -> 0.95 over 50 DDIM steps: 10 + 8 + 6 + 3 denoising steps
    steps = sum(50 - int(50 * (0.8 + (i / 4) * 0.15)) for i in range(1, 5))
    assert report["unet"]["full_calls"] + report["unet"]["shallow_calls"] == steps
    assert result.mesh.albedo.shape == (16, 16, 3)


def test_stage2_trajectory_setting_reuses_along_each_trajectory(tiny_cache):
    cfg = small_config(stage2={"iters": 3}, hash3d={"mode": "official", "stage2": "trajectory",
                                                    "trajectory_interval": 4})
    guidance = guided(cfg)
    ref = reference(cfg)
    guidance.set_reference(ref.image_nchw(), cfg.elevation)
    report = run_stage2(standin_mesh(texture_size=16, subdivisions=2), ref, cfg, guidance,
                        progress=False).report
    steps = [50 - int(50 * (0.8 + (i / 3) * 0.15)) for i in range(1, 4)]
    assert report["unet"]["full_calls"] == sum(math.ceil(n / 4) for n in steps)
    assert report["unet"]["shallow_calls"] == sum(n - math.ceil(n / 4) for n in steps)
    assert report["cache"]["hits"] == 0  # the grid table is not used in trajectory mode


def test_stage2_fits_the_reference_texture_without_guidance():
    cfg = small_config(guidance={"lambda_zero123": 0.0}, stage2={"iters": 25},
                       stage1={"ref_size": 48})
    ref = reference(cfg)
    mesh = standin_mesh(texture_size=32, subdivisions=3)
    before = run_stage2(mesh, ref, small_config(guidance={"lambda_zero123": 0.0}, stage2={"iters": 0},
                                                stage1={"ref_size": 48}), None, progress=False).report
    after = run_stage2(mesh, ref, cfg, None, progress=False).report
    assert after["ref_psnr"] > before["ref_psnr"] + 1.0


def fit_gaussians_to_sphere(radius: float, steps: int = 150, seed: int = 0) -> GaussianModel:
    """Fit Gaussians' density to a solid sphere: density 2 inside, 0 outside (threshold 1 between)."""
    model = GaussianModel.random_init(400, radius=radius, seed=seed)
    with torch.no_grad():
        model.params["opacities"].fill_(0.0)  # opacity 0.5
    optimizer = torch.optim.Adam([
        {"params": [model.params["means"]], "lr": 2e-3},
        {"params": [model.params["scales"]], "lr": 1e-2},
        {"params": [model.params["opacities"]], "lr": 5e-2},
    ])
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        points = (torch.rand(4096, 3, generator=generator) * 2 - 1) * radius * 1.6
        inside = (points.norm(dim=1) < radius).float()
        density = model.density(points)
        loss = ((density.clamp(max=2.0) - 2.0 * inside) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model


def test_mesh_from_gaussians_fitted_to_a_sphere_is_watertight_with_the_right_volume():
    radius = 0.5
    model = fit_gaussians_to_sphere(radius)
    with torch.no_grad():
        mesh = extract_mesh(model.density, bound=1.0, resolution=64, threshold=1.0)
    tm = trimesh.Trimesh(mesh.v.numpy(), mesh.f.numpy(), process=False)
    assert tm.is_watertight
    expected = 4.0 / 3.0 * math.pi * radius**3
    assert abs(tm.volume - expected) / expected < 0.10, (tm.volume, expected)


# ------------------------------------------------------------------ the divergence guard

def test_stage1_stops_at_a_non_finite_loss():
    from hash3d_dg.errors import DivergenceError

    cfg = small_config(guidance={"lambda_zero123": 0.0}, stage1={"iters": 5, "lambda_rgb": 1e39})
    with pytest.raises(DivergenceError) as info:
        run_stage1(reference(cfg), cfg, None, progress=False)
    assert (info.value.stage, info.value.iteration, info.value.quantity) == ("stage 1", 1, "loss")
    assert "stage 1 diverged at iteration 1: the loss is not finite" in str(info.value)


def test_stage1_stops_at_a_non_finite_render_before_touching_the_gaussians():
    from hash3d_dg.errors import DivergenceError

    cfg = small_config(guidance={"lambda_zero123": 0.0}, stage1={"iters": 5})
    gaussians = GaussianModel.random_init(200, 0.5, seed=0)
    with torch.no_grad():
        gaussians.params["sh0"][:50] = float("nan")
    with pytest.raises(DivergenceError) as info:
        run_stage1(reference(cfg), cfg, None, progress=False, gaussians=gaussians)
    assert (info.value.iteration, info.value.quantity) == (1, "render")
    # On CPU the check runs before the optimiser step: the finite parameters were never updated.
    assert torch.isfinite(gaussians.params["means"]).all()


def test_stage2_stops_at_a_non_finite_render():
    from hash3d_dg.errors import DivergenceError

    cfg = small_config(guidance={"lambda_zero123": 0.0}, stage2={"iters": 3})
    mesh = standin_mesh(texture_size=16, subdivisions=2)
    mesh.albedo[:8] = float("nan")
    with pytest.raises(DivergenceError) as info:
        run_stage2(mesh, reference(cfg), cfg, None, progress=False)
    assert (info.value.stage, info.value.iteration, info.value.quantity) == ("stage 2", 1, "render")


def test_guard_names_the_earliest_quantity_and_reads_back_only_on_check():
    from hash3d_dg.errors import DivergenceError
    from hash3d_dg.stages.views import DivergenceGuard

    guard = DivergenceGuard("stage 1", "cpu")
    p = torch.nn.Parameter(torch.ones(3))
    for step in range(1, 8):
        guard.observe_render(step, torch.ones(2, 2))
        guard.observe_loss(step, torch.tensor(1.0) if step < 6 else torch.tensor(float("inf")))
        p.grad = torch.ones(3) if step < 4 else torch.tensor([0.0, float("nan"), 0.0])
        guard.observe_gradients(step, [p])
        if step < 4:
            guard.check()  # nothing wrong yet
    with pytest.raises(DivergenceError) as info:
        guard.check()
    assert (info.value.iteration, info.value.quantity) == (4, "gradient")


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_guard_sees_any_non_finite_gradient_and_not_a_large_finite_one(bad):
    from hash3d_dg.errors import DivergenceError
    from hash3d_dg.stages.views import DivergenceGuard

    guard = DivergenceGuard("stage 2", "cpu")
    params = [torch.nn.Parameter(torch.ones(n)) for n in (3, 5, 0, 2)]
    for p in params:
        p.grad = torch.full_like(p, 3.0e38)  # the largest magnitudes are finite: not divergence
    guard.observe_render(1, torch.full((2, 2), -3.0e38))
    guard.observe_gradients(1, params)
    guard.check()
    params[1].grad[4] = bad
    guard.observe_gradients(2, params)
    guard.observe_gradients(3, params)
    guard.observe_render(3, torch.full((2, 2), bad))
    with pytest.raises(DivergenceError) as info:
        guard.check()
    assert (info.value.stage, info.value.iteration, info.value.quantity) == ("stage 2", 2, "gradient")
