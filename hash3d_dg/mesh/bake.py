"""Bake an albedo texture for a uv-mapped mesh from renders of another representation.

For every bake view the source (the Gaussians) is rendered with ``render_fn(camera)`` and the
mesh is rasterised from the same camera. Each mesh pixel knows its uv; pixels that the source
covers (source alpha > ``alpha_threshold``) and that face the camera (cosine between the
interpolated normal and the direction to the camera > ``min_cos``) are splatted into the atlas
with bilinear weights. Two ways to combine the views (``mode``):

* ``average``: every texel gets the average over all views, each sample weighted by its cosine.
* ``first`` (DreamGaussian): views are visited front first (sorted by the angle between their
  direction and the input view's, ``front``, which is added to the views when missing); a texel takes the colour of the FIRST view that
  sees it at a cosine above ``first_cos`` and is then locked, so the input view's detail is not
  blurred by oblique views. Per view, the texels it locks are its splats with small holes
  filled from coarser levels (push-pull, below), limited to the uv triangles of the faces that
  view saw at that cosine (so a coarse level never leaks into a neighbouring chart). Texels that
  no view saw at ``first_cos`` take the cosine-weighted ``average`` of the rest.
* ``front``: as ``first``, but only the input (front-most) view locks texels; every other texel
  takes the cosine-weighted ``average`` of all views. The input view keeps its detail and the
  other views are not locked to whichever oblique view came first (measured better than both
  on held-out views at equal input-view fidelity, see the README).

Hole filling, limited to the atlas (texels covered by a uv triangle, dilated by ``dilate``
texels so bilinear lookups at chart borders stay on the chart colour):

1. small holes (texels between splatted samples when the texture is finer than the renders) are
   filled from up to ``pull_levels`` coarser 2x2-summed levels of the same accumulation
   (push-pull);
2. remaining unseen texels take the colour of the nearest valid texel (scipy Euclidean distance
   transform over texel coordinates).

Texels outside the dilated atlas are padded the same way (nearest valid texel), so mip-mapped
lookups never bleed a background colour into the charts.
"""

from __future__ import annotations

import logging
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from hash3d_dg import accel
from hash3d_dg.camera import DEFAULT_FOVY, Camera
from hash3d_dg.config import MESH_BAKE_MODES, MESH_BAKE_VIEWS
from hash3d_dg.mesh.backends import rasterize_mesh
from hash3d_dg.mesh.mesh import Mesh
from hash3d_dg.mesh.rasterize_torch import rasterize_uv

logger = logging.getLogger(__name__)

#: (elevation, azimuth) degrees, orbit convention (negative elevation looks down from above):
#: 8 views around the equator, 4 from 45 deg above, 4 from 45 deg below, straight top and bottom.
DEFAULT_BAKE_VIEWS: tuple[tuple[float, float], ...] = (
    tuple((0.0, az) for az in (0.0, 45.0, 90.0, 135.0, 180.0, -135.0, -90.0, -45.0))
    + tuple((-45.0, az) for az in (0.0, 90.0, 180.0, -90.0))
    + tuple((45.0, az) for az in (0.0, 90.0, 180.0, -90.0))
    + ((-89.0, 0.0), (89.0, 0.0))
)


#: The 18 views without the row from 45 degrees below: 8 around the equator, 4 from 45 degrees
#: above, straight top and bottom.
UPPER_BAKE_VIEWS: tuple[tuple[float, float], ...] = tuple(
    v for v in DEFAULT_BAKE_VIEWS if v[0] != 45.0)

#: Named view sets (``mesh.bake_views``; the names are the run config's, in that order).
BAKE_VIEW_SETS: dict[str, tuple[tuple[float, float], ...]] = dict(
    zip(MESH_BAKE_VIEWS, (DEFAULT_BAKE_VIEWS, UPPER_BAKE_VIEWS), strict=True))

BAKE_MODES = MESH_BAKE_MODES


def _direction(elevation: float, azimuth: float) -> Tensor:
    el, az = torch.deg2rad(torch.tensor(float(elevation))), torch.deg2rad(torch.tensor(float(azimuth)))
    return torch.stack([torch.cos(el) * torch.sin(az), -torch.sin(el), torch.cos(el) * torch.cos(az)])


def front_first(views: Sequence[tuple[float, float]], front: tuple[float, float] = (0.0, 0.0)
                ) -> list[tuple[float, float]]:
    """``views`` sorted by the angle between their camera direction and ``front``'s (stable)."""
    d0 = _direction(*front)
    angle = [float(torch.arccos((_direction(*v) @ d0).clamp(-1, 1))) for v in views]
    order = sorted(range(len(views)), key=lambda i: (round(angle[i], 6), i))
    return [tuple(views[i]) for i in order]


def _splat(acc: Tensor, wacc: Tensor, uv: Tensor, colour: Tensor, weight: Tensor, size: int) -> None:
    """Bilinearly splat ``colour [N, 3]`` x ``weight [N]`` at ``uv [N, 2]`` into flat accumulators.

    Corners off the texture add weight 0 to texel 0 (fixed-size ops, no boolean mask: nothing
    waits on the device; adding +0 changes no sum)."""
    tx = uv[:, 0] * size - 0.5
    ty = (1.0 - uv[:, 1]) * size - 0.5
    x0, y0 = torch.floor(tx), torch.floor(ty)
    fx, fy = tx - x0, ty - y0
    x0, y0 = x0.long(), y0.long()
    for dx, dy, wgt in ((0, 0, (1 - fx) * (1 - fy)), (1, 0, fx * (1 - fy)),
                        (0, 1, (1 - fx) * fy), (1, 1, fx * fy)):
        xi, yi = x0 + dx, y0 + dy
        ok = (xi >= 0) & (xi < size) & (yi >= 0) & (yi < size)
        w = torch.where(ok, wgt * weight, 0.0)
        idx = torch.where(ok, yi * size + xi, 0)
        acc.index_add_(0, idx, colour * w[:, None])
        wacc.index_add_(0, idx, w)


def _rows(mask: Tensor, *rows: Tensor) -> tuple[Tensor, ...]:
    """``rows`` (``[N, ...]`` each) at the ``mask [N]``ed rows on the CPU (a free ``nonzero``
    skips the others), all of them on an accelerator (no host sync; the caller gives the other
    rows weight 0)."""
    if accel.is_accelerator(mask.device):
        return rows
    idx = torch.nonzero(mask).squeeze(1)
    return tuple(r[idx] for r in rows)


def _pull_fill(acc: Tensor, wacc: Tensor, levels: int, eps: float = 1e-8
               ) -> tuple[Tensor, Tensor]:
    """Weighted averages ``[S, S, 3]`` with small holes filled from coarser levels.

    Returns the colour and a bool ``[S, S]`` mask of texels that received a value.
    """
    pyramid = [(acc, wacc)]
    for _ in range(levels):
        a, w = pyramid[-1]
        if min(w.shape) < 2:
            break
        a2 = torch.nn.functional.avg_pool2d(a.permute(2, 0, 1)[None], 2, ceil_mode=True,
                                            divisor_override=1)[0].permute(1, 2, 0)
        w2 = torch.nn.functional.avg_pool2d(w[None, None], 2, ceil_mode=True,
                                            divisor_override=1)[0, 0]
        pyramid.append((a2, w2))
    colour, valid = None, None
    for a, w in reversed(pyramid):
        here = w > eps
        c = a / w.clamp_min(eps)[..., None]
        if colour is not None:
            up = colour.repeat_interleave(2, 0).repeat_interleave(2, 1)[: w.shape[0], : w.shape[1]]
            up_valid = valid.repeat_interleave(2, 0).repeat_interleave(2, 1)[: w.shape[0], : w.shape[1]]
            c = torch.where(here[..., None], c, up)
            here = here | up_valid
        colour, valid = c, here
    return colour, valid


def atlas_mask(mesh: Mesh, size: int, dilate: int = 2, tri_id: Tensor | None = None) -> Tensor:
    """Bool ``[S, S]`` texels covered by a uv triangle, dilated by ``dilate`` texels (row 0 = top).

    ``tri_id``: the atlas raster ``rasterize_uv(mesh.vt, mesh.ft, size)[0]`` when already made.
    Each dilation step adds the 4-neighbours (scipy's ``binary_dilation`` with its default
    cross), on the device."""
    if tri_id is None:
        tri_id, _ = rasterize_uv(mesh.vt, mesh.ft, size)
    mask = (tri_id >= 0).to(mesh.v.device)
    for _ in range(max(0, dilate)):
        grown = mask.clone()
        grown[1:] |= mask[:-1]
        grown[:-1] |= mask[1:]
        grown[:, 1:] |= mask[:, :-1]
        grown[:, :-1] |= mask[:, 1:]
        mask = grown
    return mask


def bake_texture(mesh: Mesh, render_fn: Callable[[Camera], tuple[Tensor, Tensor]],
                 views: Sequence[tuple[float, float]] = DEFAULT_BAKE_VIEWS, radius: float = 2.0,
                 render_size: int = 512, texture_size: int = 1024, fovy: float = DEFAULT_FOVY,
                 backend: str = "auto", min_cos: float = 0.1, alpha_threshold: float = 0.5,
                 pull_levels: int = 3, dilate: int = 2, mode: str = "average",
                 first_cos: float = 0.5, front: tuple[float, float] = (0.0, 0.0)) -> Tensor:
    """Bake an albedo texture ``[T, T, 3]`` in [0, 1] for ``mesh`` (which needs ``vt``/``ft``).

    Args:
        mesh: uv-mapped mesh (``mesh.unwrap_uv()``); its albedo, if any, is ignored.
        render_fn: ``camera -> (rgb [H, W, 3], alpha [H, W, 1])`` of the source, rendered at
            ``camera.width x camera.height`` with row 0 at the top (same as the mesh renders).
        views: ``(elevation, azimuth)`` degrees of the orbit cameras (see
            :data:`DEFAULT_BAKE_VIEWS`).
        radius, render_size, fovy: orbit radius, square render size, vertical field of view.
        texture_size: output texture side ``T`` (best equal to the ``unwrap_uv`` resolution).
        backend: mesh rasteriser backend.
        min_cos, alpha_threshold, pull_levels, dilate: see the module docstring.
        mode: ``front``, ``first`` or ``average`` (see the module docstring); ``first_cos`` and
            ``front`` (the input view's ``(elevation, azimuth)``) do not matter for ``average``.
    """
    if not mesh.has_uv:
        raise ValueError("bake_texture needs a uv atlas: call mesh.unwrap_uv() first")
    if mode not in BAKE_MODES:
        raise ValueError(f"unknown bake mode {mode!r}: expected one of {', '.join(BAKE_MODES)}")
    device = mesh.v.device
    size = int(texture_size)
    acc = torch.zeros(size * size, 3, device=device)
    wacc = torch.zeros(size * size, device=device)
    untextured = Mesh(mesh.v, mesh.f, mesh.vn, mesh.vt, mesh.ft, None)
    if untextured.vn is None:
        untextured = untextured.compute_normals()
    v, f = untextured.v.float(), untextured.f
    atlas_tri, _ = rasterize_uv(untextured.vt, untextured.ft, size)
    atlas_tri = atlas_tri.to(device)
    first = mode in ("first", "front")
    if first:
        views = list(views)
        if not any(abs(el - front[0]) < 1e-6 and abs(az - front[1]) < 1e-6 for el, az in views):
            views.insert(0, (float(front[0]), float(front[1])))  # the input view itself
        views = front_first(views, front)
        lock_views = len(views) if mode == "first" else 1
        locked = torch.zeros(size, size, dtype=torch.bool, device=device)
        first_colour = torch.zeros(size, size, 3, device=device)
        view_acc = torch.zeros(size * size, 3, device=device)
        view_w = torch.zeros(size * size, device=device)
    cams = [Camera.orbit(el, az, radius, render_size, fovy=fovy) for el, az in views]
    campos_all = accel.upload(np.stack([cam.campos for cam in cams]), device)  # one copy
    for view_index, cam in enumerate(cams):
        with torch.no_grad():
            src_rgb, src_alpha = render_fn(cam)
            r = rasterize_mesh(untextured, cam, backend=backend)
        src_rgb = src_rgb.detach().to(device=device, dtype=torch.float32)
        src_alpha = src_alpha.detach().to(device=device, dtype=torch.float32)
        if src_rgb.shape[:2] != (cam.height, cam.width):
            raise ValueError(f"render_fn returned {tuple(src_rgb.shape)} for a "
                             f"{cam.height}x{cam.width} camera")
        src_alpha = src_alpha.reshape(cam.height, cam.width)
        # every pixel in fixed-size ops (the ones not kept get weight 0): no host sync per view
        covered = (r.tri_id >= 0).reshape(-1)
        tid = r.tri_id.reshape(-1).clamp_min(0)
        bary = r.bary.reshape(-1, 3).float()
        points = (v[f[tid]] * bary[..., None]).sum(dim=1)
        to_cam = torch.nn.functional.normalize(campos_all[view_index] - points, dim=-1)
        cos = (r.normal.reshape(-1, 3).float() * to_cam).sum(dim=-1)
        keep = covered & (cos > min_cos) & (src_alpha.reshape(-1) > alpha_threshold)
        uv = torch.where(keep[:, None], r.uv.reshape(-1, 2).float(), 0.0)
        colour = torch.where(keep[:, None], src_rgb.reshape(-1, 3), 0.0)
        _splat(acc, wacc, *_rows(keep, uv, colour, torch.where(keep, cos, 0.0)), size)
        if first and view_index < lock_views:
            sel = keep & (cos > first_cos)
            view_acc.zero_()
            view_w.zero_()
            _splat(view_acc, view_w, *_rows(sel, uv, colour, sel.float()), size)
            c_view, ok_view = _pull_fill(view_acc.view(size, size, 3), view_w.view(size, size),
                                         pull_levels)
            # faces this view saw: index 0 stands for "no triangle" (atlas_tri -1), the last
            # slot takes the pixels not selected
            seen = torch.zeros(f.shape[0] + 2, dtype=torch.bool, device=device)
            seen[_rows(sel, torch.where(sel, tid + 1, f.shape[0] + 1))[0]] = True
            new = ok_view & ~locked & seen[atlas_tri + 1]
            first_colour = torch.where(new[..., None], c_view, first_colour)
            locked |= new
    hit = wacc.view(size, size) > 0
    colour, valid = _pull_fill(acc.view(size, size, 3), wacc.view(size, size), pull_levels)
    if first:
        colour = torch.where(locked[..., None], first_colour, colour)
        valid = valid | locked
    mask = atlas_mask(untextured, size, dilate, atlas_tri)
    valid = valid & mask
    # the one host read of the bake: valid, hit, locked and mask as bits of one byte per texel
    bits = (valid.to(torch.uint8) | hit.to(torch.uint8) << 1 | mask.to(torch.uint8) << 3
            | (locked.to(torch.uint8) << 2 if first else 0)).cpu().numpy()
    valid_np, hit_np, mask_np = bits & 1 > 0, bits & 2 > 0, bits & 8 > 0
    if not hit_np.any():
        raise ValueError("bake_texture: no view saw the mesh inside the source's alpha")
    if not valid_np.all() and valid_np.any():
        from scipy import ndimage

        _, (iy, ix) = ndimage.distance_transform_edt(~valid_np, return_indices=True)
        nearest = accel.upload(iy * size + ix, device, torch.int64)
        colour = colour.reshape(-1, 3)[nearest.reshape(-1)].view(size, size, 3)
    # Every texel outside the atlas also takes its nearest chart colour, so mip-mapped lookups in
    # viewers (Blender, three.js) and bilinear lookups at chart borders never bleed black.
    texture = colour
    seen_frac = float(hit_np[mask_np].mean())
    extra = (f", {100.0 * float((bits & 4 > 0)[mask_np].mean()):.1f}% locked by a first view"
             if first else "")
    logger.info("bake (%s): %d views, %.1f%% of atlas texels hit directly%s", mode, len(views),
                100.0 * seen_frac, extra)
    return texture.clamp(0.0, 1.0)
