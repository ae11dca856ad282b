"""GaussianModel, PLY I/O, the learning-rate schedule and densification."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

from hash3d_dg.camera import Camera
from hash3d_dg.gaussians import (
    DEFAULT_LRS,
    SH_C0,
    Densifier,
    GaussianModel,
    load_ply,
    position_lr,
    save_ply,
    set_group_lr,
)
from hash3d_dg.gaussians.ply import PLY_FIELDS


def small_model(n: int = 8, seed: int = 0) -> GaussianModel:
    g = torch.Generator().manual_seed(seed)
    return GaussianModel(
        means=(torch.rand(n, 3, generator=g) - 0.5) * 0.6,
        sh0=torch.randn(n, 3, generator=g),
        opacities=torch.randn(n, generator=g),
        scales=torch.log(0.02 + 0.1 * torch.rand(n, 3, generator=g)),
        quats=torch.randn(n, 4, generator=g))


# ---------------------------------------------------------------- model
def test_random_init_follows_dreamgaussian():
    m = GaussianModel.random_init(num_points=500, radius=0.5, seed=3)
    assert m.num_points == 500
    means = m.get_means.detach()
    assert means.norm(dim=-1).max() <= 0.5 + 1e-6
    assert means.norm(dim=-1).median() > 0.5 * 0.5 ** (1 / 3) * 0.9  # uniform in volume
    torch.testing.assert_close(m.get_opacities, torch.full((500,), 0.1))
    assert ((m.params["sh0"] >= 0) & (m.params["sh0"] < 1 / 255)).all()
    torch.testing.assert_close(m.get_colors, 0.5 + SH_C0 * m.params["sh0"])
    torch.testing.assert_close(m.get_quats, torch.tensor([[1.0, 0, 0, 0]]).expand(500, 4))
    # isotropic scale = sqrt(mean squared distance to the 3 nearest neighbours)
    d2 = torch.cdist(means.double(), means.double()) ** 2
    d2.fill_diagonal_(float("inf"))
    expected = torch.sqrt(d2.topk(3, largest=False).values.mean(1)).float()
    torch.testing.assert_close(m.get_scales, expected[:, None].expand(500, 3), rtol=1e-5,
                               atol=1e-7)
    same = GaussianModel.random_init(num_points=500, radius=0.5, seed=3)
    assert torch.equal(same.get_means, m.get_means)


def test_density_matches_brute_force_and_is_chunk_independent():
    m = small_model(30, seed=1)
    pts = (torch.rand(700, 3, generator=torch.Generator().manual_seed(2)) - 0.5) * 0.8
    with torch.no_grad():
        d = m.density(pts, chunk=64, max_pairs=500)
        d_big = m.density(pts, chunk=100000)
        cov = m.covariances().double()
        diff = pts.double()[:, None, :] - m.get_means.double()[None]
        m2 = torch.einsum("pgi,gij,pgj->pg", diff, torch.linalg.inv(cov), diff)
        terms = m.get_opacities.double() * torch.exp(-0.5 * m2)
        ref = torch.where(m2 <= 9, terms, torch.zeros_like(terms)).sum(1)
        ref_uncut = terms.sum(1)
    assert ref.max() > 0.5
    torch.testing.assert_close(d.double(), ref, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(d, d_big, rtol=1e-5, atol=1e-7)
    assert (ref_uncut - ref).max() < 0.05 * ref.max()  # the 3-sigma cut drops little


def test_make_optimizer_and_position_schedule():
    m = small_model()
    opt = m.make_optimizer(DEFAULT_LRS)
    names = [g["name"] for g in opt.param_groups]
    assert names == ["means", "sh0", "opacities", "scales", "quats"]
    for g in opt.param_groups:
        assert g["params"][0] is m.params[g["name"]] and g["lr"] == DEFAULT_LRS[g["name"]]
        assert g["eps"] == 1e-15
    with pytest.raises(ValueError, match="missing"):
        m.make_optimizer({"means": 1e-3})
    set_group_lr(opt, "means", position_lr(250))
    assert opt.param_groups[0]["lr"] == pytest.approx(math.sqrt(1e-3 * 2e-5))
    assert position_lr(0) == pytest.approx(1e-3)
    assert position_lr(500) == pytest.approx(2e-5)
    assert position_lr(5000) == pytest.approx(2e-5)
    assert position_lr(100, spatial_lr_scale=10) == pytest.approx(10 * position_lr(100))
    assert position_lr(0, delay_steps=100) == pytest.approx(0.02 * 1e-3)  # 3DGS warm-up


def test_render_is_differentiable_to_all_parameters():
    m = small_model(20)
    out = m.render(Camera.orbit(0, 0, 2.0, 24), torch.ones(3))
    (out.image.mean() + out.alpha.mean()).backward()
    for key, p in m.params.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, key


def test_render_clamps_the_image_to_unit_range_as_dreamgaussian():
    from hash3d_dg.gaussians import rasterize_gaussians

    m = small_model(20)
    with torch.no_grad():
        m.params["sh0"][:] = 6.0  # rgb = 0.5 + SH_C0 * 6 ~ 2.2: overexposed
        m.params["opacities"][:] = 3.0
    cam, bg = Camera.orbit(0, 0, 2.0, 24), torch.zeros(3)
    raw = rasterize_gaussians(m.get_means, m.get_quats, m.get_scales, m.get_opacities,
                              m.get_colors, cam, bg, backend="torch")
    out = m.render(cam, bg, backend="torch")
    assert raw.image.max() > 1.5  # the rasterizer itself composites values above 1
    torch.testing.assert_close(out.image, raw.image.clamp(0, 1))
    torch.testing.assert_close(out.alpha, raw.alpha)
    torch.testing.assert_close(out.depth, raw.depth)
    # saturated pixels pass no gradient to the colours (the clamp's point)
    saturated = (raw.image.detach() > 1.0).all(-1)
    assert saturated.sum() > 10
    (out.image[saturated].sum()).backward()
    assert m.params["sh0"].grad.abs().max() == 0


# ---------------------------------------------------------------- PLY
def test_ply_round_trip_is_exact_and_uses_the_3dgs_layout(tmp_path):
    m = small_model(37, seed=4)
    path = tmp_path / "sub" / "point_cloud.ply"
    save_ply(m, path)
    assert os.listdir(path.parent) == ["point_cloud.ply"]  # no temp file left behind
    raw = path.read_bytes()
    header, body = raw.split(b"end_header\n", 1)
    lines = header.decode().splitlines()
    assert lines[:3] == ["ply", "format binary_little_endian 1.0", "element vertex 37"]
    props = [ln.split() for ln in lines[3:]]
    assert all(p[:2] == ["property", "float"] for p in props)
    assert tuple(p[2] for p in props) == PLY_FIELDS == (
        "x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2", "opacity",
        "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3")
    assert len(body) == 37 * 17 * 4
    rows = np.frombuffer(body, dtype="<f4").reshape(37, 17)
    np.testing.assert_array_equal(rows[:, 9], m.params["opacities"].detach().numpy())  # raw logit
    np.testing.assert_array_equal(rows[:, 13:17], m.params["quats"].detach().numpy())  # w first

    loaded = load_ply(path)
    for key in m.params:
        assert torch.equal(loaded.params[key], m.params[key].detach()), key


def test_load_ply_accepts_other_orders_and_extra_properties(tmp_path):
    m = small_model(5, seed=6)
    p = {k: v.detach().numpy() for k, v in m.params.items()}
    fields = ["rot_0", "rot_1", "rot_2", "rot_3", "x", "y", "z", "f_dc_0", "f_dc_1", "f_dc_2",
              "f_rest_0", "opacity", "scale_0", "scale_1", "scale_2"]
    cols = {"x": p["means"][:, 0], "y": p["means"][:, 1], "z": p["means"][:, 2],
            "opacity": p["opacities"], "f_rest_0": np.zeros(5, np.float32)}
    cols.update({f"f_dc_{i}": p["sh0"][:, i] for i in range(3)})
    cols.update({f"scale_{i}": p["scales"][:, i] for i in range(3)})
    cols.update({f"rot_{i}": p["quats"][:, i] for i in range(4)})
    data = np.stack([cols[f] for f in fields], 1).astype("<f4")
    header = ("ply\nformat binary_little_endian 1.0\ncomment made by a test\nelement vertex 5\n"
              + "".join(f"property float {f}\n" for f in fields) + "end_header\n")
    path = tmp_path / "other.ply"
    path.write_bytes(header.encode() + data.tobytes())
    loaded = load_ply(path)
    for key in m.params:
        assert torch.equal(loaded.params[key], m.params[key].detach()), key
    bad = tmp_path / "bad.ply"
    bad.write_bytes(b"ply\nformat binary_little_endian 1.0\nelement vertex 1\n"
                    b"property float x\nend_header\n" + b"\0" * 4)
    with pytest.raises(ValueError, match="missing properties"):
        load_ply(bad)


# ---------------------------------------------------------------- densification
def _render_with_grads(model: GaussianModel, grads_px: torch.Tensor):
    """A real render whose means2d.grad is then set to chosen pixel-space gradients."""
    out = model.render(Camera.orbit(0, 0, 2.0, 32, 32), torch.ones(3))
    out.image.sum().backward()
    out.means2d.grad = grads_px.clone()
    return out


def test_densifier_clones_small_splits_large_prunes_transparent_and_keeps_optimizer_state():
    n = 6
    scales = torch.tensor([0.01, 0.02, 0.1, 0.2, 0.03, 0.015])  # percent_dense * extent = 0.04
    model = GaussianModel(
        means=torch.tensor([[0.1 * i - 0.25, 0.0, 0.0] for i in range(n)]),
        sh0=torch.arange(n * 3, dtype=torch.float32).reshape(n, 3),
        opacities=torch.logit(torch.tensor([0.5, 0.5, 0.5, 0.5, 0.5, 0.001])),
        scales=torch.log(scales)[:, None].repeat(1, 3),
        quats=torch.tensor([[1.0, 0, 0, 0]]).repeat(n, 1))
    opt = model.make_optimizer()
    # one real Adam step so that every parameter has moments
    out = model.render(Camera.orbit(0, 0, 2.0, 32, 32), torch.ones(3))
    (out.image.mean() + out.alpha.mean()).backward()
    opt.step()
    opt.zero_grad()
    old = {k: v.detach().clone() for k, v in model.params.items()}
    old_avg = {k: opt.state[model.params[k]]["exp_avg"].clone() for k in model.params}
    assert (out.radii > 0).all()

    dens = Densifier(start_iter=1, end_iter=10, interval=2, opacity_reset_interval=100,
                     generator=torch.Generator().manual_seed(0))
    # NDC grad = |pixel grad * (W/2, H/2)| = 16 * |g|: above 0.01 for 0, 2, 3 (and 5)
    grads = torch.zeros(n, 2)
    grads[[0, 2, 3, 5], 0] = 0.002
    grads[1, 1] = 0.0001
    res1 = dens.step_post_backward(model, opt, _render_with_grads(model, grads), step=1)
    assert res1["cloned"] == res1["split"] == 0 and model.num_points == n
    torch.testing.assert_close(dens.grad_accum, grads.norm(dim=-1) * 16)
    res = dens.step_post_backward(model, opt, _render_with_grads(model, grads), step=2)

    # 0 and 5 are small -> cloned, 2 and 3 large -> split in 2; 5 (and its clone) transparent
    assert (res["cloned"], res["split"], res["pruned"]) == (2, 2, 2)
    assert model.num_points == n + 2 + 2 - 2 == res["num_points"]
    sh0 = model.params["sh0"].detach()
    # order (3DGS): kept originals, clones, then split children
    expected_rows = [0, 1, 4, 0, 2, 3, 2, 3]
    torch.testing.assert_close(sh0, old["sh0"][expected_rows])
    torch.testing.assert_close(model.params["means"][:4].detach(), old["means"][[0, 1, 4, 0]])
    children = model.params["scales"][4:].detach()
    torch.testing.assert_close(children, old["scales"][[2, 3, 2, 3]] - math.log(1.6))
    offsets = (model.params["means"][4:].detach() - old["means"][[2, 3, 2, 3]]).abs()
    assert (offsets < 5 * scales[[2, 3, 2, 3], None]).all() and offsets.sum() > 0

    for group in opt.param_groups:
        key = group["name"]
        param = group["params"][0]
        assert param is model.params[key]
        state = opt.state[param]
        assert state["exp_avg"].shape == param.shape == state["exp_avg_sq"].shape
        torch.testing.assert_close(state["exp_avg"][:3], old_avg[key][[0, 1, 4]])
        assert state["exp_avg"][3:].abs().sum() == 0  # clones and children start fresh
    assert dens.grad_accum.shape == (model.num_points,) and dens.grad_accum.sum() == 0
    # the optimizer still trains the new parameters
    out = model.render(Camera.orbit(0, 0, 2.0, 32, 32), torch.ones(3))
    out.image.mean().backward()
    before = model.params["means"].detach().clone()
    opt.step()
    assert not torch.equal(before, model.params["means"].detach())


def test_densifier_prunes_huge_gaussians_and_resets_opacity_on_schedule():
    model = GaussianModel(
        means=torch.zeros(3, 3), sh0=torch.zeros(3, 3),
        opacities=torch.logit(torch.tensor([0.9, 0.005, 0.5])),
        scales=torch.log(torch.tensor([0.01, 0.01, 0.5]))[:, None].repeat(1, 3),
        quats=torch.tensor([[1.0, 0, 0, 0]]).repeat(3, 1))
    opt = model.make_optimizer()
    out = model.render(Camera.orbit(0, 0, 2.0, 16), torch.ones(3))
    out.image.mean().backward()
    opt.step()
    dens = Densifier(start_iter=1, interval=1000, opacity_reset_interval=3)
    render = _render_with_grads(model, torch.zeros(3, 2))
    res = dens.step_post_backward(model, opt, render, step=3)
    assert res["opacity_reset"] and model.num_points == 3
    torch.testing.assert_close(model.get_opacities, torch.tensor([0.01, 0.005, 0.01]))
    assert opt.state[model.params["opacities"]]["exp_avg"].abs().sum() == 0
    assert opt.param_groups[2]["params"][0] is model.params["opacities"]
    # outside the window nothing happens
    assert dens.step_post_backward(model, opt, render, step=5000)["num_points"] == 3

    # world-size prune: 0.5 > 0.1 * extent (0.4); opacity 0.005 < 0.01
    model = GaussianModel(
        means=torch.zeros(4, 3), sh0=torch.zeros(4, 3),
        opacities=torch.logit(torch.tensor([0.9, 0.005, 0.5, 0.5])),
        scales=torch.log(torch.tensor([0.01, 0.01, 0.5, 0.2]))[:, None].repeat(1, 3),
        quats=torch.tensor([[1.0, 0, 0, 0]]).repeat(4, 1))
    opt = model.make_optimizer()
    assert Densifier().densify_and_prune(model, opt) == (0, 0, 2)
    assert model.num_points == 2 and opt.param_groups[0]["params"][0].shape == (2, 3)
    # DreamGaussian's final prune: opacity < 0.01 or largest scale > 0.1
    assert Densifier().prune(model, None, min_opacity=0.01, max_world_scale=0.1) == 1
    torch.testing.assert_close(model.get_opacities, torch.tensor([0.9]))
