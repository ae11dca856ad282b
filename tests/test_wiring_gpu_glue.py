"""The CUDA rasteriser wrappers (gsplat, 3DGS ``diff_gaussian_rasterization``, nvdiffrast) run
on the CPU against fake backend modules, so their glue is tested without a GPU: argument order,
the ``means2d`` gradient's scale (it feeds the densification threshold), row flips,
triangle-id offsets, barycentric order.

Each fake is a module injected through ``sys.modules`` that implements its package's documented
contract independently of the project:

* ``gsplat``: the projection and tile intersection are gsplat's own pure-PyTorch reference
  (``gsplat.cuda._torch_impl``); ``rasterize_to_pixels`` composites tile by tile in the
  ``flatten_ids`` order with gsplat's kernel rules (pixel centres at +0.5, alpha capped at
  0.999, skipped below 1/255, stop before transmittance 1e-4).
* ``diff_gaussian_rasterization``: 3DGS's ``forward.cu`` written in PyTorch: row-vector
  matrices, ``ndc2Pix`` (centres at integers), the EWA covariance with the 1.3 tan-fov clamp and
  the 0.3 dilation, the 3-sigma radius with its 0.1 floor and the empty-tile rule, alpha capped
  at 0.99; its ``means2D`` gradient is in NDC units (d pixel / d means2D = W / 2, as
  ``backward.cu``).
* ``nvdiffrast.torch``: a brute-force rasteriser of clip-space triangles with nvdiffrast's
  outputs (row 0 at the bottom; ``(u, v)`` = weights of the first and second vertex,
  perspective-correct; ``z / w``; triangle id + 1), ``interpolate``, a bilinear ``texture`` (texel
  row y at v = (y + 0.5) / H) and an identity ``antialias``.

The wrappers' outputs are then compared with a reference that does not go through them: a
brute-force per-pixel composite (gsplat), the torch backend (3DGS, whose rules it follows),
and the torch mesh rasteriser (nvdiffrast).
"""

from __future__ import annotations

import math
import sys
import types
from collections import namedtuple

import pytest
import torch
import trimesh

from hash3d_dg.camera import Camera
from hash3d_dg.gaussians.rasterize_torch import rasterize_torch

# ================================================================== gsplat


def _gsplat_composite_tiles(means2d, conics, colors, opacities, width, height, tile_size,
                            isect_offsets, flatten_ids, backgrounds=None):
    """gsplat's ``rasterize_to_pixels`` (one image) written per tile, differentiable."""
    means2d, conics, colors, opacities = means2d[0], conics[0], colors[0], opacities[0]
    tiles_y, tiles_x = isect_offsets.shape[-2:]
    offsets = isect_offsets.reshape(-1).tolist() + [int(flatten_ids.shape[0])]
    channels = colors.shape[-1]
    rows = []
    for ty in range(tiles_y):
        cols = []
        for tx in range(tiles_x):
            tile = ty * tiles_x + tx
            ids = flatten_ids[offsets[tile]:offsets[tile + 1]].long()
            y0, x0 = ty * tile_size, tx * tile_size
            h, w = min(tile_size, height - y0), min(tile_size, width - x0)
            if h <= 0 or w <= 0:
                continue
            py, px = torch.meshgrid(torch.arange(y0, y0 + h, dtype=colors.dtype) + 0.5,
                                    torch.arange(x0, x0 + w, dtype=colors.dtype) + 0.5, indexing="ij")
            if ids.numel() == 0:
                color = torch.zeros(h, w, channels, dtype=colors.dtype)
                t_final = torch.ones(h, w, dtype=colors.dtype)
            else:
                m, c = means2d[ids], conics[ids]
                dx = px[..., None] - m[:, 0]
                dy = py[..., None] - m[:, 1]
                sigma = 0.5 * (c[:, 0] * dx * dx + c[:, 2] * dy * dy) + c[:, 1] * dx * dy
                alpha = torch.clamp(opacities[ids] * torch.exp(-sigma), max=0.999)
                alpha = torch.where((sigma >= 0) & (alpha >= 1.0 / 255.0), alpha, torch.zeros_like(alpha))
                one_minus = 1.0 - alpha
                t_before = torch.cumprod(torch.cat([torch.ones_like(alpha[..., :1]), one_minus[..., :-1]], -1), -1)
                keep = (t_before * one_minus).detach() > 1e-4  # a prefix: once stopped, stopped
                keep = torch.cumprod(keep.to(torch.int8), -1).bool()
                alpha = alpha * keep
                one_minus = 1.0 - alpha
                t_before = torch.cumprod(torch.cat([torch.ones_like(alpha[..., :1]), one_minus[..., :-1]], -1), -1)
                weight = alpha * t_before
                color = (weight[..., None] * colors[ids]).sum(-2)
                t_final = torch.prod(one_minus, -1)
            if backgrounds is not None:
                color = color + t_final[..., None] * backgrounds[0]
            cols.append((color, 1.0 - t_final[..., None]))
        rows.append(cols)
    image = torch.cat([torch.cat([c for c, _ in cols], 1) for cols in rows], 0)
    alpha_img = torch.cat([torch.cat([a for _, a in cols], 1) for cols in rows], 0)
    return image[None], alpha_img[None]


def fake_gsplat(calls: list):
    from gsplat.cuda import _torch_impl as ref

    mod = types.ModuleType("gsplat")

    # the keywords the wrapper must pass have no defaults here (gsplat's are not ours)
    def fully_fused_projection(means, covars, quats, scales, viewmats, Ks, width, height, *,
                               eps2d, near_plane, far_plane, packed, opacities, **kw):
        calls.append(("fully_fused_projection", dict(width=width, height=height, eps2d=eps2d,
                                                     near=near_plane, far=far_plane,
                                                     packed=packed, covars=covars)))
        assert covars is None and packed is False and not kw
        assert torch.is_tensor(opacities) and opacities.shape == means.shape[:1]
        assert viewmats.shape == (1, 4, 4) and Ks.shape == (1, 3, 3)
        cov, _ = ref._quat_scale_to_covar_preci(quats, scales, compute_preci=False, triu=False)
        radii, m2d, depths, conics, comp = ref._fully_fused_projection(
            means, cov, viewmats, Ks, width, height, eps2d=eps2d, near_plane=near_plane,
            far_plane=far_plane)
        # gsplat leaves the means2d of the Gaussians it culls uninitialised
        culled = ~(radii > 0).all(dim=-1)
        m2d = torch.where(culled[..., None], torch.full_like(m2d, 1e30), m2d)
        return radii, m2d, depths, conics, comp

    def isect_tiles(means2d, radii, depths, tile_size, tile_width, tile_height, *, packed, **kw):
        calls.append(("isect_tiles", dict(tile_size=tile_size, tile_width=tile_width,
                                          tile_height=tile_height)))
        assert packed is False and not kw
        assert means2d.shape[0] == radii.shape[0] == depths.shape[0] == 1
        return ref._isect_tiles(means2d, radii, depths, tile_size, tile_width, tile_height)

    def isect_offset_encode(isect_ids, n_images, tile_width, tile_height):
        calls.append(("isect_offset_encode", dict(n=n_images, tile_width=tile_width,
                                                  tile_height=tile_height)))
        return ref._isect_offset_encode(isect_ids, n_images, tile_width, tile_height)

    def rasterize_to_pixels(means2d, conics, colors, opacities, width, height, tile_size,
                            isect_offsets, flatten_ids, backgrounds=None, **kw):
        calls.append(("rasterize_to_pixels", dict(width=width, height=height,
                                                  tile_size=tile_size)))
        assert not kw and isect_offsets.ndim == 3 and isect_offsets.shape[0] == 1
        assert backgrounds is not None and backgrounds.dtype == colors.dtype
        assert backgrounds.shape == (1, colors.shape[-1])
        return _gsplat_composite_tiles(means2d, conics, colors, opacities, width, height,
                                       tile_size, isect_offsets, flatten_ids, backgrounds)

    mod.fully_fused_projection = fully_fused_projection
    mod.isect_tiles = isect_tiles
    mod.isect_offset_encode = isect_offset_encode
    mod.rasterize_to_pixels = rasterize_to_pixels
    return mod


def scene(n=40, seed=0, opacity=(0.3, 0.95), dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    means = (torch.rand(n, 3, generator=g, dtype=dtype) * 2 - 1) * 0.45
    quats = torch.randn(n, 4, generator=g, dtype=dtype)
    quats = quats / quats.norm(dim=-1, keepdim=True)
    scales = 0.03 + 0.07 * torch.rand(n, 3, generator=g, dtype=dtype)
    lo, hi = opacity
    opacities = lo + (hi - lo) * torch.rand(n, generator=g, dtype=dtype)
    colors = torch.rand(n, 3, generator=g, dtype=dtype)
    return means, quats, scales, opacities, colors


def brute_force_gsplat(means, quats, scales, opacities, colors, cam, bg, max_alpha=0.999):
    """Every Gaussian in front of the near plane at every pixel, in depth order (no tiles)."""
    from gsplat.cuda import _torch_impl as ref

    cov, _ = ref._quat_scale_to_covar_preci(quats, scales, compute_preci=False, triu=False)
    radii, m2d, depths, conics, _ = ref._fully_fused_projection(
        means, cov, cam.viewmat(dtype=means.dtype)[None], cam.K(dtype=means.dtype)[None],
        cam.width, cam.height, near_plane=cam.near, far_plane=cam.far)
    m2d, depths, conics = m2d[0], depths[0], conics[0]
    m2d_leaf = m2d  # the gradient is read at the projected means (pixel units)
    if m2d_leaf.requires_grad:
        m2d_leaf.retain_grad()
    order = [int(i) for i in torch.argsort(depths) if bool((radii[0, i] > 0).all())]
    py, px = torch.meshgrid(torch.arange(cam.height, dtype=means.dtype) + 0.5,
                            torch.arange(cam.width, dtype=means.dtype) + 0.5, indexing="ij")
    idx = torch.tensor(order)
    m, c = m2d_leaf[idx], conics[idx]
    dx, dy = px[..., None] - m[:, 0], py[..., None] - m[:, 1]
    sigma = 0.5 * (c[:, 0] * dx * dx + c[:, 2] * dy * dy) + c[:, 1] * dx * dy
    alpha = torch.clamp(opacities[idx] * torch.exp(-sigma), max=max_alpha)
    alpha = torch.where((sigma >= 0) & (alpha >= 1 / 255), alpha, torch.zeros_like(alpha))
    trans = torch.ones(cam.height, cam.width, dtype=means.dtype)
    rgbd = torch.zeros(cam.height, cam.width, 4, dtype=means.dtype)
    feats = torch.cat([colors, depths[:, None]], -1)[idx]
    done = torch.zeros(cam.height, cam.width, dtype=torch.bool)
    for k in range(len(order)):
        a = alpha[..., k]
        nxt = trans * (1 - a)
        done = done | (nxt.detach() <= 1e-4)
        a = torch.where(done, torch.zeros_like(a), a)
        rgbd = rgbd + (a * trans)[..., None] * feats[k]
        trans = trans * (1 - a)
    image = rgbd[..., :3] + trans[..., None] * bg
    return image, (1 - trans)[..., None], rgbd[..., 3:], m2d_leaf


@pytest.mark.parametrize("size", [(24, 20), (40, 17)])
def test_gsplat_wrapper_against_gsplat_reference_and_brute_force(monkeypatch, size):
    from hash3d_dg.gaussians.rasterize_cuda import rasterize_gsplat

    calls = []
    monkeypatch.setitem(sys.modules, "gsplat", fake_gsplat(calls))
    W, H = size
    cam = Camera.orbit(-15, 40, 2.0, W, H)
    means, quats, scales, opacities, colors = scene()
    bg = torch.tensor([0.2, 0.9, 0.4])
    leaf = means.clone().requires_grad_()
    out = rasterize_gsplat(leaf, quats, scales, opacities, colors, cam.viewmat(), cam.K(), W, H,
                           bg, near=cam.near, far=cam.far, tile_size=16)
    weights = torch.linspace(0.2, 1.0, 3)
    (out.image * weights).sum().backward()

    assert out.backend == "gsplat"
    names = [c[0] for c in calls]
    assert names == ["fully_fused_projection", "isect_tiles", "isect_offset_encode",
                     "rasterize_to_pixels"]
    tiles_x, tiles_y = math.ceil(W / 16), math.ceil(H / 16)
    assert calls[0][1] == dict(width=W, height=H, eps2d=0.3, near=cam.near, far=cam.far,
                               packed=False, covars=None)
    assert calls[1][1] == dict(tile_size=16, tile_width=tiles_x, tile_height=tiles_y)
    assert calls[2][1] == dict(n=1, tile_width=tiles_x, tile_height=tiles_y)
    assert calls[3][1] == dict(width=W, height=H, tile_size=16)

    ref_leaf = means.clone().requires_grad_()
    image, alpha, depth, m2d = brute_force_gsplat(ref_leaf, quats, scales, opacities, colors, cam, bg)
    (image * weights).sum().backward()
    assert out.image.shape == (H, W, 3) and out.alpha.shape == (H, W, 1) and out.depth.shape == (H, W, 1)
    assert float(alpha.detach().max()) > 0.5
    torch.testing.assert_close(out.image, image, rtol=0, atol=2e-5)
    torch.testing.assert_close(out.alpha, alpha, rtol=0, atol=2e-5)
    torch.testing.assert_close(out.depth, depth, rtol=0, atol=5e-5)
    # means2d: gsplat's projection, and its gradient in pixel units, at full scale
    vis = out.radii > 0
    torch.testing.assert_close(out.means2d[vis], m2d[vis].detach(), rtol=0, atol=1e-4)
    g, g_ref = out.means2d.grad[vis], m2d.grad[vis]
    assert float(g_ref.abs().max()) > 1e-3
    torch.testing.assert_close(g, g_ref, rtol=1e-3, atol=1e-5 * float(g_ref.abs().max()))
    torch.testing.assert_close(leaf.grad, ref_leaf.grad, rtol=1e-3,
                               atol=1e-4 * float(ref_leaf.grad.abs().max()))


def test_gsplat_wrapper_matches_the_torch_backend_with_gsplats_cap(monkeypatch):
    """The same scene through the torch backend with ``max_alpha=0.999``: the pixels, and the
    ``means2d`` gradient that densification thresholds, agree at full scale."""
    from hash3d_dg.gaussians.rasterize_cuda import rasterize_gsplat

    monkeypatch.setitem(sys.modules, "gsplat", fake_gsplat([]))
    cam = Camera.orbit(20, -70, 2.0, 32, 24)
    sc = scene(50, seed=4, dtype=torch.float64)
    bg = torch.ones(3, dtype=torch.float64)
    vm, K = cam.viewmat(dtype=torch.float64), cam.K(dtype=torch.float64)
    out = rasterize_gsplat(sc[0].clone().requires_grad_(), *sc[1:], vm, K, cam.width,
                           cam.height, bg, near=cam.near, far=cam.far)
    ref = rasterize_torch(sc[0].clone().requires_grad_(), *sc[1:], vm, K, cam.width, cam.height,
                          bg, near=cam.near, far=cam.far, max_alpha=0.999)
    out.image.sum().backward()
    ref.image.sum().backward()
    torch.testing.assert_close(out.image, ref.image, rtol=0, atol=5e-3)
    assert float((out.image - ref.image).detach().abs().mean()) < 2e-4
    assert torch.equal(out.radii, ref.radii)
    vis = ref.radii > 0
    g, g_ref = out.means2d.grad[vis], ref.means2d.grad[vis]
    ratio = float(g.norm() / g_ref.norm())
    assert abs(ratio - 1) < 0.02, ratio
    assert float(torch.nn.functional.cosine_similarity(g.flatten(), g_ref.flatten(), 0)) > 0.99


# ================================================================== 3DGS (inria)

FORK_FIELDS = ("image_height", "image_width", "tanfovx", "tanfovy", "bg", "scale_modifier",
               "viewmatrix", "projmatrix", "sh_degree", "campos", "prefiltered", "debug")


def _quat_rotmat(q):
    """3DGS ``computeCov3D``'s rotation of an (r, x, y, z) quaternion, used as given."""
    r, x, y, z = q.unbind(-1)
    return torch.stack([
        torch.stack([1 - 2 * (y * y + z * z), 2 * (x * y - r * z), 2 * (x * z + r * y)], -1),
        torch.stack([2 * (x * y + r * z), 1 - 2 * (x * x + z * z), 2 * (y * z - r * x)], -1),
        torch.stack([2 * (x * z - r * y), 2 * (y * z + r * x), 1 - 2 * (x * x + y * y)], -1)], -2)


def fake_inria(outputs: int, antialiasing_field: bool, record: list):
    fields = FORK_FIELDS + (("antialiasing",) if antialiasing_field else ())
    Settings = namedtuple("GaussianRasterizationSettings", fields)

    class GaussianRasterizer(torch.nn.Module):
        def __init__(self, raster_settings):
            super().__init__()
            self.s = raster_settings

        def forward(self, means3D, means2D, opacities, shs=None, colors_precomp=None,
                    scales=None, rotations=None, cov3D_precomp=None):
            s = self.s
            record.append({"settings": s, "means2D": means2D, "opacities": opacities,
                           "rotations": rotations, "scales": scales, "shs": shs,
                           "cov3D_precomp": cov3D_precomp})
            assert shs is None and cov3D_precomp is None and colors_precomp is not None
            assert means2D.shape == means3D.shape  # 3DGS: screen-space points [N, 3]
            W, H = s.image_width, s.image_height
            n = means3D.shape[0]
            hom = torch.cat([means3D, torch.ones(n, 1)], -1)
            p_hom = hom @ s.projmatrix
            p_proj = p_hom[:, :3] / (p_hom[:, 3:4] + 1e-7)
            t = hom @ s.viewmatrix
            in_frustum = t[:, 2] > 0.2
            # computeCov3D (scale_modifier) and computeCov2D
            rot = _quat_rotmat(rotations)
            m = rot * (scales * s.scale_modifier)[:, None, :]
            cov3 = m @ m.transpose(1, 2)
            fx, fy = W / (2 * s.tanfovx), H / (2 * s.tanfovy)
            limx, limy = 1.3 * s.tanfovx, 1.3 * s.tanfovy
            tz = t[:, 2]
            tx = torch.clamp(t[:, 0] / tz, -limx, limx) * tz
            ty = torch.clamp(t[:, 1] / tz, -limy, limy) * tz
            zero = torch.zeros_like(tz)
            J = torch.stack([torch.stack([fx / tz, zero, -fx * tx / tz**2], -1),
                             torch.stack([zero, fy / tz, -fy * ty / tz**2], -1)], -2)
            Wr = s.viewmatrix[:3, :3].T  # row-vector matrix -> rotation
            T = J @ Wr
            cov2 = T @ cov3 @ T.transpose(1, 2)
            a = cov2[:, 0, 0] + 0.3
            b = cov2[:, 0, 1]
            c = cov2[:, 1, 1] + 0.3
            det = a * c - b * b
            conic = torch.stack([c / det, -b / det, a / det], -1)
            mid = 0.5 * (a + c)
            lam1 = mid + torch.sqrt(torch.clamp(mid * mid - det, min=0.1))
            lam2 = mid - torch.sqrt(torch.clamp(mid * mid - det, min=0.1))
            radius = torch.ceil(3 * torch.sqrt(torch.maximum(lam1, lam2))).detach()
            # ndc2Pix, then the means2D hook: its gradient is d loss / d pixel * (W/2, H/2)
            pix = ((p_proj[:, :2] + 1) * torch.tensor([W, H]) - 1) * 0.5
            pix = pix + means2D[:, :2] * torch.tensor([0.5 * W, 0.5 * H])
            # getRect with 16-pixel blocks: an empty rectangle zeroes the radius
            gx, gy = (W + 15) // 16, (H + 15) // 16
            pd = pix.detach()
            x0 = torch.clamp(((pd[:, 0] - radius) / 16).long(), 0, gx)
            x1 = torch.clamp(((pd[:, 0] + radius + 15) / 16).long(), 0, gx)
            y0 = torch.clamp(((pd[:, 1] - radius) / 16).long(), 0, gy)
            y1 = torch.clamp(((pd[:, 1] + radius + 15) / 16).long(), 0, gy)
            visible = in_frustum & (det > 0) & ((x1 - x0) * (y1 - y0) > 0)
            radii = torch.where(visible, radius, torch.zeros_like(radius)).int()
            # render: depth order, pixel centres at integers
            order = [int(i) for i in torch.argsort(tz.detach()) if bool(visible[i])]
            py, px = torch.meshgrid(torch.arange(H, dtype=pix.dtype), torch.arange(W, dtype=pix.dtype),
                                    indexing="ij")
            trans = torch.ones(H, W)
            color = torch.zeros(H, W, 3)
            depth = torch.zeros(H, W)
            done = torch.zeros(H, W, dtype=torch.bool)
            op = opacities[:, 0]
            for i in order:
                dx, dy = pix[i, 0] - px, pix[i, 1] - py
                power = -0.5 * (conic[i, 0] * dx * dx + conic[i, 2] * dy * dy) - conic[i, 1] * dx * dy
                alpha = torch.clamp(op[i] * torch.exp(power), max=0.99)
                alpha = torch.where((power <= 0) & (alpha >= 1 / 255), alpha, torch.zeros_like(alpha))
                done = done | ((trans * (1 - alpha)).detach() < 1e-4)
                alpha = torch.where(done, torch.zeros_like(alpha), alpha)
                color = color + (alpha * trans)[..., None] * colors_precomp[i]
                depth = depth + alpha * trans * tz[i]
                trans = trans * (1 - alpha)
            image = (color + trans[..., None] * s.bg).permute(2, 0, 1)
            if outputs == 4:  # DreamGaussian's fork: image, radii, depth, alpha
                return image, radii, depth[None], (1 - trans)[None]
            return image, radii

    mod = types.ModuleType("diff_gaussian_rasterization")
    mod.GaussianRasterizationSettings = Settings
    mod.GaussianRasterizer = GaussianRasterizer
    return mod


@pytest.mark.parametrize("outputs,antialiasing", [(4, False), (2, False), (2, True)],
                         ids=["dreamgaussian_fork", "graphdeco", "graphdeco_antialiasing_field"])
def test_inria_wrapper_against_the_torch_backend(monkeypatch, outputs, antialiasing):
    from hash3d_dg.gaussians.rasterize_cuda import rasterize_inria

    record = []
    monkeypatch.setitem(sys.modules, "diff_gaussian_rasterization",
                        fake_inria(outputs, antialiasing, record))
    cam = Camera.orbit(-20, 45, 2.0, 28, 22)
    means, quats, scales, opacities, colors = scene(30, seed=2)
    raw_quats = quats * torch.linspace(0.5, 2.0, 30)[:, None]  # unnormalised on purpose
    bg = torch.tensor([1.0, 0.5, 0.0])
    leaf = means.clone().requires_grad_()
    out = rasterize_inria(leaf, raw_quats, scales, opacities, colors, cam.viewmat(), cam.K(),
                          cam.width, cam.height, bg, near=cam.near, far=cam.far)
    weights = torch.linspace(0.2, 1.0, 3)
    (out.image * weights).sum().backward()

    s = record[0]["settings"]
    assert (s.image_height, s.image_width) == (22, 28)
    assert s.sh_degree == 0 and s.scale_modifier == 1.0 and not s.prefiltered
    if antialiasing:
        assert s.antialiasing is False
    torch.testing.assert_close(record[0]["rotations"].norm(dim=-1), torch.ones(30))
    assert record[0]["opacities"].shape == (30, 1)
    assert len(record) == (1 if outputs == 4 else 2)  # graphdeco: a second pass for depth/alpha
    if outputs == 2:
        torch.testing.assert_close(record[1]["settings"].bg, torch.zeros(3))

    ref_leaf = means.clone().requires_grad_()
    ref = rasterize_torch(ref_leaf, quats, scales, opacities, colors, cam.viewmat(), cam.K(),
                          cam.width, cam.height, bg, near=cam.near, far=cam.far)
    (ref.image * weights).sum().backward()
    assert float(ref.alpha.max()) > 0.5
    for name in ("image", "alpha", "depth"):
        assert getattr(out, name).shape == getattr(ref, name).shape, name
        torch.testing.assert_close(getattr(out, name), getattr(ref, name), rtol=0, atol=1e-4,
                                   msg=name)
    assert out.radii.dtype == torch.int32
    assert torch.equal(out.radii > 0, ref.radii > 0)
    torch.testing.assert_close(out.means2d, ref.means2d, rtol=0, atol=1e-4)
    vis = ref.radii > 0
    g, g_ref = out.means2d.grad[vis], ref.means2d.grad[vis]
    assert float(g_ref.abs().max()) > 1e-3
    torch.testing.assert_close(g, g_ref, rtol=1e-3, atol=1e-4 * float(g_ref.abs().max()))
    torch.testing.assert_close(leaf.grad, ref_leaf.grad, rtol=1e-3,
                               atol=1e-3 * float(ref_leaf.grad.abs().max()))


def test_inria_wrapper_without_autograd(monkeypatch):
    from hash3d_dg.gaussians.rasterize_cuda import rasterize_inria

    monkeypatch.setitem(sys.modules, "diff_gaussian_rasterization", fake_inria(4, False, []))
    cam = Camera.orbit(0, 0, 2.0, 16, 16)
    sc = scene(10, seed=3)
    with torch.no_grad():
        out = rasterize_inria(*sc, cam.viewmat(), cam.K(), 16, 16, torch.ones(3))
    assert out.means2d.grad is None and not out.means2d.requires_grad
    assert out.image.shape == (16, 16, 3)


# ================================================================== nvdiffrast


class _CudaNamedCpu(str):
    """A device string that reads "cpu" to torch but says ``type == "cuda"`` to the wrapper's
    guard, so the wrapper's own code runs on the CPU."""

    type = "cuda"
    index = 0


class CudaLooking(torch.Tensor):
    @property
    def device(self):
        return _CudaNamedCpu("cpu")


def _plain(t):
    return t.as_subclass(torch.Tensor) if isinstance(t, torch.Tensor) else t


def fake_nvdiffrast(record: list):
    """``nvdiffrast.torch`` by brute force (see the module docstring)."""
    dr = types.ModuleType("nvdiffrast.torch")

    class RasterizeCudaContext:
        def __init__(self, device=None):
            record.append(("context", device))

    def rasterize(ctx, pos, tri, resolution, grad_db=False):
        assert isinstance(ctx, RasterizeCudaContext)
        pos, tri = _plain(pos), _plain(tri)
        assert pos.ndim == 3 and pos.shape[0] == 1 and pos.shape[-1] == 4
        assert tri.dtype == torch.int32 and pos.dtype == torch.float32
        record.append(("rasterize", tuple(resolution), grad_db))
        h, w = resolution
        clip = pos[0]
        ys, xs = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
        px, py = xs / w * 2 - 1, ys / h * 2 - 1  # row 0 = bottom (OpenGL window coordinates)
        out = torch.zeros(1, h, w, 4)
        best = torch.full((h, w), float("inf"))
        for k, (a, b, c) in enumerate(tri.long().tolist()):
            ca, cb, cc = clip[a], clip[b], clip[c]
            if min(float(ca[3]), float(cb[3]), float(cc[3])) <= 0:
                continue
            na, nb, nc = ca[:2] / ca[3], cb[:2] / cb[3], cc[:2] / cc[3]
            den = (nb[1] - nc[1]) * (na[0] - nc[0]) + (nc[0] - nb[0]) * (na[1] - nc[1])
            if abs(float(den)) < 1e-12:
                continue
            l0 = ((nb[1] - nc[1]) * (px - nc[0]) + (nc[0] - nb[0]) * (py - nc[1])) / den
            l1 = ((nc[1] - na[1]) * (px - nc[0]) + (na[0] - nc[0]) * (py - nc[1])) / den
            l2 = 1 - l0 - l1
            inside = (l0 >= 0) & (l1 >= 0) & (l2 >= 0)
            # perspective-correct weights and z/w
            q0, q1, q2 = l0 / ca[3], l1 / cb[3], l2 / cc[3]
            s = q0 + q1 + q2
            u, v = q0 / s, q1 / s
            zw = l0 * ca[2] / ca[3] + l1 * cb[2] / cb[3] + l2 * cc[2] / cc[3]
            take = inside & (zw < best) & (zw >= -1) & (zw <= 1)
            best = torch.where(take, zw, best)
            out[0, ..., 0] = torch.where(take, u, out[0, ..., 0])
            out[0, ..., 1] = torch.where(take, v, out[0, ..., 1])
            out[0, ..., 2] = torch.where(take, zw, out[0, ..., 2])
            out[0, ..., 3] = torch.where(take, torch.tensor(float(k + 1)), out[0, ..., 3])
        return out, torch.zeros(1, h, w, 4)

    def interpolate(attr, rast, tri, rast_db=None, diff_attrs=None):
        attr, rast, tri = _plain(attr), _plain(rast), _plain(tri)
        record.append(("interpolate", attr.shape[-1], diff_attrs))
        assert tri.dtype == torch.int32 and rast.shape[-1] == 4 and attr.ndim == 3
        if diff_attrs is not None or rast_db is not None:  # uv derivatives: both or neither
            assert diff_attrs == "all" and rast_db is not None and rast_db.shape == rast.shape
        tid = rast[0, ..., 3].long() - 1
        covered = tid >= 0
        corners = attr[0][tri.long()[tid.clamp(min=0)]]  # [H, W, 3, C]
        u, v = rast[0, ..., 0], rast[0, ..., 1]
        wts = torch.stack([u, v, 1 - u - v], -1) * covered[..., None]
        out = (corners * wts[..., None]).sum(-2)[None]
        return out, torch.zeros(out.shape[:-1] + (2 * attr.shape[-1],))

    def texture(tex, uv, uv_da=None, filter_mode="auto", boundary_mode="wrap"):
        record.append(("texture", filter_mode, boundary_mode))
        tex, uv = _plain(tex), _plain(uv)
        if "mipmap" in filter_mode:  # a mip level needs the uv derivatives
            assert uv_da is not None and uv_da.shape[-1] == 4 and uv_da.shape[:-1] == uv.shape[:-1]
        assert tex.dtype == torch.float32
        th, tw = tex.shape[1:3]
        # texel (x, y) centred at ((x + 0.5) / W, (y + 0.5) / H), row y = 0 at v = 0; clamp
        fx = (uv[..., 0] * tw - 0.5).clamp(0, tw - 1)
        fy = (uv[..., 1] * th - 0.5).clamp(0, th - 1)
        x0, y0 = fx.floor().long(), fy.floor().long()
        x1, y1 = (x0 + 1).clamp(max=tw - 1), (y0 + 1).clamp(max=th - 1)
        ax, ay = (fx - x0)[..., None], (fy - y0)[..., None]
        t = tex[0]
        return ((t[y0, x0] * (1 - ax) + t[y0, x1] * ax) * (1 - ay)
                + (t[y1, x0] * (1 - ax) + t[y1, x1] * ax) * ay)

    def antialias(color, rast, pos, tri):
        record.append(("antialias", tuple(color.shape)))
        color, rast, pos, tri = _plain(color), _plain(rast), _plain(pos), _plain(tri)
        assert color.dtype == torch.float32 and color.ndim == 4
        assert rast.shape[:3] == color.shape[:3] and rast.shape[-1] == 4
        assert pos.ndim == 3 and pos.shape[-1] == 4 and tri.dtype == torch.int32
        return color

    dr.RasterizeCudaContext = RasterizeCudaContext
    dr.rasterize = rasterize
    dr.interpolate = interpolate
    dr.texture = texture
    dr.antialias = antialias
    parent = types.ModuleType("nvdiffrast")
    parent.torch = dr
    return parent, dr


@pytest.fixture
def nvdiffrast_fake(monkeypatch):
    from hash3d_dg.mesh import backends, rasterize_nvdiffrast

    record = []
    parent, dr = fake_nvdiffrast(record)
    monkeypatch.setitem(sys.modules, "nvdiffrast", parent)
    monkeypatch.setitem(sys.modules, "nvdiffrast.torch", dr)
    monkeypatch.setattr(backends, "available_mesh_backends",
                        lambda device: {"torch": True, "nvdiffrast": True})
    rasterize_nvdiffrast.cuda_context.cache_clear()
    yield record
    rasterize_nvdiffrast.cuda_context.cache_clear()


def _textured_sphere():
    from hash3d_dg.mesh.mesh import Mesh

    tm = trimesh.creation.icosphere(subdivisions=1, radius=0.6)
    v = torch.tensor(tm.vertices, dtype=torch.float32) * torch.tensor([1.0, 0.8, 0.7])
    f = torch.tensor(tm.faces, dtype=torch.int64)
    g = torch.Generator().manual_seed(0)
    # uv from the position (smooth, no seam on the visible side), and a random texture
    vt = torch.stack([0.5 + 0.6 * v[:, 0], 0.5 + 0.6 * v[:, 1]], -1).clamp(0, 1)
    albedo = torch.rand(8, 10, 3, generator=g)
    return Mesh(v, f, None, vt, f.clone(), albedo).compute_normals()


def test_nvdiffrast_wrapper_matches_the_torch_rasteriser(nvdiffrast_fake):
    """The full nvdiffrast path of ``rasterize_mesh`` (bottom-row layout, tri id - 1,
    barycentric order, row flips after shading) against the torch backend, pixel for pixel."""
    from hash3d_dg.mesh.backends import rasterize_mesh

    mesh = _textured_sphere()
    mesh = type(mesh)(mesh.v.as_subclass(CudaLooking), mesh.f, mesh.vn, mesh.vt, mesh.ft, mesh.albedo)
    cam = Camera.orbit(-25, 35, 1.4, width=20, height=14)
    bg = torch.tensor([0.1, 0.2, 0.9])
    out = rasterize_mesh(mesh, cam, background=bg, backend="nvdiffrast")
    plain = type(mesh)(_plain(mesh.v), mesh.f, mesh.vn, mesh.vt, mesh.ft, mesh.albedo)
    ref = rasterize_mesh(plain, cam, background=bg, backend="torch")
    assert out.backend == "nvdiffrast"
    assert ("rasterize", (14, 20), True) in nvdiffrast_fake
    tid, rtid = _plain(out.tri_id), ref.tri_id
    assert (rtid >= 0).float().mean() > 0.3
    same = tid == rtid
    assert float(same.float().mean()) > 0.97, float(same.float().mean())
    hit = same & (rtid >= 0)
    torch.testing.assert_close(_plain(out.bary)[hit], ref.bary[hit], rtol=0, atol=1e-4)
    torch.testing.assert_close(_plain(out.depth)[same], ref.depth[same], rtol=0, atol=1e-4)
    torch.testing.assert_close(_plain(out.rgb)[same], ref.rgb[same], rtol=0, atol=1e-4)
    torch.testing.assert_close(_plain(out.uv)[same], ref.uv[same], rtol=0, atol=1e-4)
    torch.testing.assert_close(_plain(out.normal)[same], ref.normal[same], rtol=0, atol=1e-4)
    torch.testing.assert_close(_plain(out.alpha)[same], ref.alpha[same], rtol=0, atol=0)


def test_nvdiffrast_texture_lookup_flips_rows_and_antialias_is_applied(nvdiffrast_fake):
    """The mip-mapped lookup hands nvdiffrast the texture bottom row first (its v = 0 row):
    with the fake's bilinear ``texture`` the result is the torch path's bilinear lookup."""
    from hash3d_dg.mesh.backends import rasterize_mesh

    mesh = _textured_sphere()
    looking = type(mesh)(mesh.v.as_subclass(CudaLooking), mesh.f, mesh.vn, mesh.vt, mesh.ft,
                         mesh.albedo)
    cam = Camera.orbit(10, -20, 1.4, width=18, height=16)
    out = rasterize_mesh(looking, cam, background=torch.ones(3), backend="nvdiffrast",
                         texture_filter="mipmap", antialias=True)
    ref = rasterize_mesh(mesh, cam, background=torch.ones(3), backend="torch",
                         texture_filter="bilinear")
    kinds = [r[0] for r in nvdiffrast_fake]
    assert "texture" in kinds and "antialias" in kinds
    assert ("texture", "linear-mipmap-linear", "clamp") in nvdiffrast_fake
    assert ("antialias", (1, 16, 18, 4)) in nvdiffrast_fake  # rgb + alpha, batch of one
    same = _plain(out.tri_id) == ref.tri_id
    assert float(same.float().mean()) > 0.97
    torch.testing.assert_close(_plain(out.rgb)[same], ref.rgb[same], rtol=0, atol=1e-4)


# ================================================================== on a GPU: the real kernels

def _cuda_grads(backend):
    from hash3d_dg.gaussians import rasterize_gaussians

    means, quats, scales, opacities, colors = scene(400, seed=11, opacity=(0.05, 0.95))
    sc = [t.cuda() for t in (means, quats, scales, opacities, colors)]
    cam = Camera.orbit(-20, 45, 2.0, 96, 80)
    bg = torch.ones(3, device="cuda")
    out = {}
    for be in (backend, "torch"):
        leaf = sc[0].clone().requires_grad_()
        o = rasterize_gaussians(leaf, *sc[1:], camera=cam, background=bg, backend=be)
        (o.image * torch.linspace(0.2, 1.0, 3, device="cuda")).sum().backward()
        out[be] = o
    return out[backend], out["torch"]


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["gsplat", "inria"])
def test_cuda_means2d_gradient_has_the_torch_backends_scale(backend):
    """Cosine similarity cannot see a scale error; the norm ratio and a per-Gaussian regression
    of one gradient on the other can (densification thresholds these gradients)."""
    import importlib.util

    module = "gsplat" if backend == "gsplat" else "diff_gaussian_rasterization"
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} not installed")
    out, ref = _cuda_grads(backend)
    vis = (out.radii > 0) & (ref.radii > 0)
    g, g_ref = out.means2d.grad[vis].flatten(), ref.means2d.grad[vis].flatten()
    ratio = float(g.norm() / g_ref.norm())
    slope = float((g * g_ref).sum() / (g_ref * g_ref).sum())  # least squares g ~ slope * g_ref
    assert abs(ratio - 1) < 0.05, ratio
    assert abs(slope - 1) < 0.05, slope


# ================================================================== edges: culling, defaults, dtypes

def edge_scene(dtype=torch.float32):
    """Orbit camera at (0, 0, 2) looking at the origin: Gaussians at camera depths 0.05
    (inside a 0.1 near plane), 0.5, 2, 60 (beyond a 50 far plane), 100.5 (beyond 100) and 3
    behind the camera."""
    means = torch.tensor([[0.0, 0.0, 1.95], [0.05, 0.0, 1.5], [0.1, -0.1, 0.0], [0.0, 0.0, -58.0],
                          [0.0, 0.0, 5.0], [-0.2, 0.1, 0.2], [0.0, 0.0, -98.5]], dtype=dtype)
    n = means.shape[0]
    quats = torch.tensor([[1.0, 0, 0, 0]], dtype=dtype).repeat(n, 1)
    scales = torch.full((n, 3), 0.05, dtype=dtype)
    return means, quats, scales, torch.full((n,), 0.8, dtype=dtype), torch.rand(n, 3, dtype=dtype)


def test_gsplat_wrapper_culling_defaults_and_dtypes(monkeypatch):
    from hash3d_dg.gaussians.projection import project_gaussians
    from hash3d_dg.gaussians.rasterize_cuda import rasterize_gsplat

    calls = []
    monkeypatch.setitem(sys.modules, "gsplat", fake_gsplat(calls))
    cam = Camera.orbit(0, 0, 2.0, 20, 18)
    sc = edge_scene()
    vm, K = cam.viewmat(), cam.K()
    # explicit near / far: the radii are our projection's, the culled rows' means2d are ours
    out = rasterize_gsplat(*sc, vm, K, 20, 18, torch.ones(3, dtype=torch.float64), near=0.1, far=50.0)
    ours = project_gaussians(*sc[:3], vm, K, 20, 18, near=0.1, far=50.0)
    assert torch.equal(out.radii, ours.radii)
    assert ours.radii.tolist()[0] == 0 and ours.radii.tolist()[3] == 0 and ours.radii[1] > 0
    assert torch.isfinite(out.means2d).all()
    culled = ~(ours.radii > 0)
    torch.testing.assert_close(out.means2d[culled], ours.means2d[culled])
    assert out.image.dtype == torch.float32  # a float64 background follows the features
    # defaults: near 0.01, far 1e10, 16-pixel tiles
    calls.clear()
    out = rasterize_gsplat(*sc, vm, K, 20, 18, torch.ones(3))
    assert calls[0][1]["near"] == 0.01 and calls[0][1]["far"] == 1e10
    assert calls[1][1]["tile_size"] == 16 and calls[3][1]["tile_size"] == 16
    assert torch.equal(out.radii, project_gaussians(*sc[:3], vm, K, 20, 18).radii)


def test_inria_wrapper_culling_defaults(monkeypatch):
    from hash3d_dg.gaussians.projection import project_gaussians
    from hash3d_dg.gaussians.rasterize_cuda import rasterize_inria

    monkeypatch.setitem(sys.modules, "diff_gaussian_rasterization", fake_inria(4, False, []))
    cam = Camera.orbit(0, 0, 2.0, 20, 18)
    sc = edge_scene()
    vm, K = cam.viewmat(), cam.K()
    for kwargs, near, far in (({}, 0.01, 100.0), ({"near": 0.1, "far": 50.0}, 0.1, 50.0)):
        out = rasterize_inria(*sc, vm, K, 20, 18, torch.ones(3), **kwargs)
        ours = project_gaussians(*sc[:3], vm, K, 20, 18, near=near, far=far)
        torch.testing.assert_close(out.means2d, ours.means2d)
        assert out.backend == "inria"


def test_inria_matrices_clip_depth_is_3dgs_zero_to_one():
    """3DGS's getProjectionMatrix: camera depth near -> clip z/w 0, far -> 1; 4x4 matrices."""
    from hash3d_dg.gaussians.rasterize_cuda import inria_matrices

    cam = Camera.orbit(15, 30, 2.0, 32, 24)
    vm, K = cam.viewmat(dtype=torch.float64), cam.K(dtype=torch.float64)
    view_t, full_proj, campos, tanx, tany = inria_matrices(vm, K, 32, 24, 0.2, 40.0)
    assert view_t.shape == full_proj.shape == (4, 4) and campos.shape == (3,)
    c2w = torch.linalg.inv(vm)
    for depth, want in ((0.2, 0.0), (40.0, 1.0), (5.0, (40.0 / 39.8) * (1 - 0.2 / 5.0))):
        p = c2w @ torch.tensor([0.01, -0.02, depth, 1.0], dtype=torch.float64)  # OpenCV: +z ahead
        clip = p @ full_proj
        assert float(clip[2] / clip[3]) == pytest.approx(want, abs=1e-9)
        assert float(clip[3]) == pytest.approx(depth, abs=1e-9)
    assert tanx == pytest.approx(16 / float(K[0, 0])) and tany == pytest.approx(12 / float(K[1, 1]))


class _PlainSettings:
    """A settings class without namedtuple's ``_fields`` (an older build of the extension)."""

    FIELDS = FORK_FIELDS

    def __init__(self, **kw):
        assert set(kw) == set(self.FIELDS), sorted(set(kw) ^ set(self.FIELDS))
        self.__dict__.update(kw)


def test_inria_settings_are_exactly_the_forks(monkeypatch):
    from hash3d_dg.gaussians.rasterize_cuda import rasterize_inria

    record = []
    mod = fake_inria(4, False, record)
    mod.GaussianRasterizationSettings = _PlainSettings
    monkeypatch.setitem(sys.modules, "diff_gaussian_rasterization", mod)
    cam = Camera.orbit(0, 0, 2.0, 16, 16)
    rasterize_inria(*scene(10, seed=3), cam.viewmat(), cam.K(), 16, 16, torch.ones(3))
    s = record[0]["settings"]
    assert s.prefiltered is False and s.debug is False and s.sh_degree == 0
    assert s.campos.shape == (3,) and s.campos.dtype == torch.float32
    torch.testing.assert_close(s.campos.double(), torch.as_tensor(cam.campos, dtype=torch.float64),
                               atol=1e-6, rtol=0)
    assert s.viewmatrix.shape == s.projmatrix.shape == (4, 4)
    assert s.viewmatrix.dtype == s.projmatrix.dtype == s.bg.dtype == torch.float32


# ------------------------------------------------------------------ nvdiffrast, directly

def test_nvdiffrast_rasterize_outputs_directly(nvdiffrast_fake, monkeypatch):
    """One triangle (id 0) filling the image centre, in float64: tri id, barycentrics (first,
    second, third vertex), zeros where empty, the caller's dtype, one context per device."""
    from hash3d_dg.mesh.rasterize_nvdiffrast import (antialias_nvdiffrast, rasterize_nvdiffrast,
                                                     texture_nvdiffrast)

    cam = Camera.orbit(0, 0, 2.0, width=12, height=10)
    v = torch.tensor([[-0.6, -0.5, 0.0], [0.6, -0.5, 0.0], [0.0, 0.6, 0.0]],
                     dtype=torch.float64).as_subclass(CudaLooking)
    f = torch.tensor([[0, 1, 2]])
    tri_id, bary, depth, state = rasterize_nvdiffrast(v, f, cam.mvp(dtype=torch.float64), 12, 10)
    tri_id, bary, depth = _plain(tri_id), _plain(bary), _plain(depth)
    assert ("context", torch.device("cuda", 0)) in nvdiffrast_fake
    assert bary.dtype == depth.dtype == torch.float64
    hit = tri_id == 0
    assert hit.sum() > 20 and (tri_id[~hit] == -1).all()
    assert (bary[~hit] == 0).all() and (depth[~hit] == 0).all()
    torch.testing.assert_close(bary[hit].sum(-1), torch.ones(int(hit.sum()), dtype=torch.float64))
    torch.testing.assert_close(depth[hit], torch.full((int(hit.sum()),), 2.0, dtype=torch.float64),
                               atol=1e-5, rtol=0)
    # nvdiffrast's rows run bottom-up: the apex (third vertex, top of the image) weighs most in
    # the last rows, the first vertex (bottom left) in the first rows' left pixels
    rows = torch.nonzero(hit)[:, 0]
    top, bottom = int(rows.max()), int(rows.min())
    assert float(bary[top][hit[top]][:, 2].mean()) > float(bary[bottom][hit[bottom]][:, 2].mean())
    left = torch.nonzero(hit[bottom])[0, 0]
    assert float(bary[bottom, left, 0]) > float(bary[bottom, left, 1])
    # antialias and texture keep the caller's dtype and zero empty pixels
    colour = torch.rand(10, 12, 4, dtype=torch.float64)
    aa = _plain(antialias_nvdiffrast(colour, state))
    assert aa.dtype == torch.float64 and aa.shape == (10, 12, 4)
    tex = torch.rand(4, 4, 3, dtype=torch.float64)
    vt = torch.tensor([[0.1, 0.1], [0.9, 0.1], [0.5, 0.9]], dtype=torch.float64)
    looked = _plain(texture_nvdiffrast(tex, vt, f, state))
    assert looked.dtype == torch.float64 and (looked[~hit] == 0).all()
    assert torch.isfinite(looked).all() and (looked[hit] > 0).any()


def test_nvdiffrast_wrapper_guards(nvdiffrast_fake, monkeypatch):
    from hash3d_dg.mesh import rasterize_nvdiffrast as mod

    with pytest.raises(ValueError, match="^the nvdiffrast backend needs CUDA tensors$"):
        mod.rasterize_nvdiffrast(torch.zeros(3, 3), torch.tensor([[0, 1, 2]]), torch.eye(4), 4, 4)
    assert mod.nvdiffrast_available() is True
    monkeypatch.setitem(sys.modules, "nvdiffrast.torch", None)  # import fails
    assert mod.nvdiffrast_available() is False


def test_nvdiffrast_context_on_the_current_device_when_unindexed(nvdiffrast_fake, monkeypatch):
    from hash3d_dg.mesh.rasterize_nvdiffrast import rasterize_nvdiffrast

    class _Unindexed(str):
        type = "cuda"
        index = None

    class Looking(torch.Tensor):
        @property
        def device(self):
            return _Unindexed("cpu")

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    v = torch.tensor([[-0.5, -0.5, 0.0], [0.5, -0.5, 0.0], [0.0, 0.5, 0.0]]).as_subclass(Looking)
    rasterize_nvdiffrast(v, torch.tensor([[0, 1, 2]]), Camera.orbit(0, 0, 2.0, 8).mvp(), 8, 8)
    assert ("context", torch.device("cuda", 3)) in nvdiffrast_fake
