"""Mip-mapped (trilinear) texture lookups and antialiased renders of the torch mesh rasteriser."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hash3d_dg.camera import Camera
from hash3d_dg.mesh.backends import rasterize_mesh
from hash3d_dg.mesh.mesh import Mesh, mip_level, mip_pyramid, sample_texture, sample_texture_mip


def _checker(size: int, square: int) -> torch.Tensor:
    idx = torch.arange(size) // square
    board = ((idx[:, None] + idx[None, :]) % 2).float()
    return board[..., None].repeat(1, 1, 3)


def _quad(texture: torch.Tensor, half: float = 0.6, tilt: float = 0.0) -> Mesh:
    """A square facing +z (uv over its whole area), optionally tilted about the x axis."""
    c, s = np.cos(tilt), np.sin(tilt)
    v = np.array([[-half, -half, 0], [half, -half, 0], [half, half, 0], [-half, half, 0]], float)
    v = v @ np.array([[1, 0, 0], [0, c, -s], [0, s, c]]).T
    f = torch.tensor([[0, 1, 2], [0, 2, 3]])
    vt = torch.tensor([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    return Mesh(torch.tensor(v, dtype=torch.float32), f, vt=vt, ft=f.clone(),
                albedo=texture).compute_normals()


def test_pyramid_levels_are_box_filtered():
    tex = torch.rand(16, 8, 3, dtype=torch.float64)
    levels = mip_pyramid(tex)
    assert [tuple(t.shape[:2]) for t in levels] == [(16, 8), (8, 4), (4, 2), (2, 1), (1, 1)]
    expect = tex.reshape(8, 2, 4, 2, 3).mean(dim=(1, 3))
    assert torch.allclose(levels[1], expect)
    assert torch.allclose(levels[-1][0, 0], tex.mean(dim=(0, 1)))


def test_level_zero_lookup_equals_bilinear():
    g = torch.Generator().manual_seed(0)
    tex = torch.rand(32, 32, 3, generator=g, dtype=torch.float64)
    uv = torch.rand(500, 2, generator=g, dtype=torch.float64)
    mip = sample_texture_mip(tex, uv, torch.zeros(500, dtype=torch.float64))
    assert torch.equal(mip, sample_texture(tex, uv))
    # a fractional level blends the two nearest levels linearly
    half = sample_texture_mip(tex, uv, torch.full((500,), 1.25, dtype=torch.float64))
    levels = mip_pyramid(tex)
    expect = 0.75 * sample_texture(levels[1], uv) + 0.25 * sample_texture(levels[2], uv)
    assert torch.allclose(half, expect)


def test_magnified_render_is_unchanged_by_mipmapping():
    mesh = _quad(torch.rand(16, 16, 3, generator=torch.Generator().manual_seed(1)))
    cam = Camera.orbit(0.0, 0.0, 2.0, width=96)
    bil = rasterize_mesh(mesh, cam, backend="torch")
    mip = rasterize_mesh(mesh, cam, backend="torch", texture_filter="mipmap")
    assert torch.equal(bil.rgb, mip.rgb)


def test_mip_level_follows_the_pixel_footprint():
    # a 256-texel texture over a quad ~1.2 / 2 of the view: at 32 px one pixel spans ~13 texels
    mesh = _quad(torch.rand(256, 256, 3))
    from hash3d_dg.mesh.rasterize_torch import attribute_derivatives, rasterize_torch

    cam = Camera.orbit(0.0, 0.0, 2.0, width=32)
    tri, _, _ = rasterize_torch(mesh.v, mesh.f, cam.mvp(), 32, 32)
    dx, dy = attribute_derivatives(mesh.v, mesh.f, cam.mvp(), tri, mesh.vt, mesh.ft)
    level = mip_level(dx, dy, (256, 256))
    # analytic: the quad (side 1.2) at distance 2 with fovy 49.1 deg covers 1.2 / (2 * 2 *
    # tan(24.55 deg)) of the image height -> texels per pixel = 256 / (32 * that)
    frac = 1.2 / (4.0 * np.tan(np.radians(49.1 / 2)))
    expect = np.log2(256 / (32 * frac))
    assert abs(float(level.median()) - expect) < 0.05
    assert float(dx[:, 1].abs().max()) < 1e-9 and float(dy[:, 0].abs().max()) < 1e-9


@pytest.mark.parametrize("tilt", [0.0, 1.1])
def test_minified_checkerboard_matches_supersampled_reference_better(tilt):
    tex = _checker(256, 2)  # 2-texel squares: far finer than the 40 px render can show
    mesh = _quad(tex, tilt=tilt)
    cam = Camera.orbit(0.0, 0.0, 2.0, width=40)
    grey = torch.full((3,), 0.5)
    ref = rasterize_mesh(mesh, cam.resized(640), background=grey, backend="torch")
    ref_rgb = F.avg_pool2d(ref.rgb.permute(2, 0, 1)[None], 16)[0].permute(1, 2, 0)
    bil = rasterize_mesh(mesh, cam, background=grey, backend="torch")
    mip = rasterize_mesh(mesh, cam, background=grey, backend="torch", texture_filter="mipmap")
    inside = (bil.alpha[..., 0] > 0) & (F.avg_pool2d(ref.alpha.permute(2, 0, 1)[None], 16)[0, 0] > 0.999)
    err_bil = float(((bil.rgb - ref_rgb)[inside] ** 2).mean())
    err_mip = float(((mip.rgb - ref_rgb)[inside] ** 2).mean())
    assert err_mip < 0.25 * err_bil  # bilinear aliases (errors ~0.25), mipmapping averages
    assert err_mip < 0.01


def test_gradients_reach_the_texture_and_spread_when_minified():
    tex = torch.rand(128, 128, 3, generator=torch.Generator().manual_seed(2))
    cam = Camera.orbit(0.0, 0.0, 2.0, width=24)
    counts = {}
    for mode in ("bilinear", "mipmap"):
        albedo = tex.clone().requires_grad_(True)
        mesh = _quad(tex)
        out = rasterize_mesh(mesh, cam, backend="torch", albedo=albedo, texture_filter=mode)
        (out.rgb * torch.linspace(0.5, 1.5, 3)).sum().backward()
        grad = albedo.grad
        assert torch.isfinite(grad).all()
        counts[mode] = int((grad.abs().sum(-1) > 0).sum())
        # every covered pixel contributes its full weight: the gradient sums to the pixel count
        assert abs(float(grad[..., 0].sum()) * 2 - float(out.alpha.sum())) < 1e-3 * float(out.alpha.sum())
    assert counts["bilinear"] <= 4 * 24 * 24
    assert counts["mipmap"] > 5 * counts["bilinear"]


def test_antialiased_edges_are_fractional_and_close_to_supersampled():
    mesh = _quad(torch.full((8, 8, 3), 0.2), tilt=0.0)
    mesh.v = mesh.v @ torch.tensor([[0.94, -0.34, 0], [0.34, 0.94, 0], [0, 0, 1.0]])  # rotate in-plane
    mesh = mesh.compute_normals()
    cam = Camera.orbit(0.0, 0.0, 2.0, width=48)
    white = torch.ones(3)
    hard = rasterize_mesh(mesh, cam, background=white, backend="torch")
    soft = rasterize_mesh(mesh, cam, background=white, backend="torch", antialias=True,
                          texture_filter="mipmap")
    ref = rasterize_mesh(mesh, cam.resized(48 * 8), background=white, backend="torch")
    ref_alpha = F.avg_pool2d(ref.alpha.permute(2, 0, 1)[None], 8)[0].permute(1, 2, 0)
    frac = (soft.alpha > 0.01) & (soft.alpha < 0.99)
    assert int(frac.sum()) > 20 and not bool(((hard.alpha > 0) & (hard.alpha < 1)).any())
    assert float((soft.alpha - ref_alpha).abs().mean()) < 0.5 * float((hard.alpha - ref_alpha).abs().mean())
