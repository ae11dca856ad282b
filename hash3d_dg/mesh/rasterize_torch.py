"""Pure-PyTorch triangle rasteriser (CPU or any device), memory bounded.

Screen convention: pixel ``(col, row)`` has its centre at ``(col + 0.5, row + 0.5)``; ``x`` grows
to the right and ``y`` DOWN, so row 0 is the top of the image. From OpenGL clip coordinates
``(cx, cy, cz, cw)``: ``x = (cx / cw * 0.5 + 0.5) * W`` and ``y = (0.5 - cy / cw * 0.5) * H``;
``cw`` is the camera-space distance along the view axis (the "depth" output).

Two passes:

1. Visibility (no gradient): every triangle is expanded into (triangle, pixel) pairs over its
   clamped screen bounding box. Large boxes are split into row bands and the pairs are processed
   in chunks of at most ``pair_budget`` (or one image row, whichever is larger), so memory stays
   bounded whatever the mesh or resolution. Each pair evaluates the triangle's affine edge
   functions at the pixel centre; covered pairs write ``(1/depth, triangle id)`` packed into one
   int64 key into a z-buffer with ``scatter_reduce(amax)`` (nearest wins, ties to the larger id).
   Triangles with any vertex closer than the near plane (``w < near``) or with zero screen area
   are culled (no clipping).
2. Attributes (differentiable): for the covered pixels only, the visible triangle's clip-space
   vertices are re-projected and the screen-space barycentrics ``l_i`` are recomputed, then made
   perspective-correct: ``b_i = (l_i / w_i) / sum_j (l_j / w_j)``, ``depth = 1 / sum_j (l_j / w_j)``.
   Gradients reach vertex positions through these barycentrics (not through visibility).
"""

from __future__ import annotations

import torch
from torch import Tensor

DEFAULT_PAIR_BUDGET = 1 << 19


def clip_to_screen(clip: Tensor, width: int, height: int) -> Tensor:
    """OpenGL clip coordinates ``[..., 4]`` -> screen ``(x right, y down)`` pixels ``[..., 2]``."""
    w = clip[..., 3]
    x = (clip[..., 0] / w * 0.5 + 0.5) * width
    y = (0.5 - clip[..., 1] / w * 0.5) * height
    return torch.stack([x, y], dim=-1)


def _edge_coefficients(xy: Tensor, inv_w: Tensor, faces: Tensor) -> tuple[Tensor, Tensor]:
    """Per-triangle affine coefficients of (l0, l1, 1/depth) as functions of the pixel centre.

    Returns ``coeffs [F, 3, 3]`` (rows l0, l1, inv_depth; columns A, B, C with value
    ``A * px + B * py + C``) and the signed doubled screen area ``[F]``.
    """
    a, b, c = xy[faces[:, 0]], xy[faces[:, 1]], xy[faces[:, 2]]
    area = (b[:, 0] - a[:, 0]) * (c[:, 1] - a[:, 1]) - (b[:, 1] - a[:, 1]) * (c[:, 0] - a[:, 0])
    safe = torch.where(area.abs() > 0, area, torch.ones_like(area))
    # l0 = cross(b - p, c - p) / area; l1 = cross(c - p, a - p) / area
    l0 = torch.stack([b[:, 1] - c[:, 1], c[:, 0] - b[:, 0], b[:, 0] * c[:, 1] - b[:, 1] * c[:, 0]], -1)
    l1 = torch.stack([c[:, 1] - a[:, 1], a[:, 0] - c[:, 0], c[:, 0] * a[:, 1] - c[:, 1] * a[:, 0]], -1)
    l0 = l0 / safe[:, None]
    l1 = l1 / safe[:, None]
    iw = inv_w[faces]  # [F, 3]
    # 1/depth = l0 iw0 + l1 iw1 + (1 - l0 - l1) iw2
    d = l0 * (iw[:, 0] - iw[:, 2])[:, None] + l1 * (iw[:, 1] - iw[:, 2])[:, None]
    d[:, 2] += iw[:, 2]
    return torch.stack([l0, l1, d], dim=1), area


@torch.no_grad()
def zbuffer(xy: Tensor, w: Tensor, faces: Tensor, valid: Tensor, width: int, height: int,
            pair_budget: int = DEFAULT_PAIR_BUDGET) -> Tensor:
    """Nearest covering triangle per pixel.

    Args:
        xy: ``[V, 2]`` screen positions (pixels, y down). Entries of culled vertices may be
            non-finite as long as every face using them is marked invalid.
        w: ``[V]`` positive depths of the vertices (1 for an orthographic/uv raster).
        faces: ``[F, 3]`` int64 vertex indices.
        valid: ``[F]`` bool, triangles allowed to draw.
        pair_budget: at most this many (triangle, pixel) pairs (or one row of a triangle's box)
            are held in memory at once.

    Returns:
        ``[H, W]`` int64 triangle index, -1 where no triangle covers the pixel centre.
    """
    device = xy.device
    xy = xy.double()
    inv_w = 1.0 / w.double()
    zbuf = torch.full((height * width,), -1, dtype=torch.int64, device=device)
    if faces.shape[0] == 0:
        return zbuf.view(height, width)
    coeffs, area = _edge_coefficients(torch.nan_to_num(xy), torch.nan_to_num(inv_w), faces)
    tri_xy = xy[faces]  # [F, 3, 2]
    valid = valid & (area.abs() > 1e-12) & torch.isfinite(tri_xy).all(dim=(1, 2))
    lo = torch.nan_to_num(tri_xy.amin(dim=1))
    hi = torch.nan_to_num(tri_xy.amax(dim=1))
    x0 = torch.ceil(lo[:, 0] - 0.5).clamp(0, width - 1).long()
    x1 = torch.floor(hi[:, 0] - 0.5).clamp(-1, width - 1).long()
    y0 = torch.ceil(lo[:, 1] - 0.5).clamp(0, height - 1).long()
    y1 = torch.floor(hi[:, 1] - 0.5).clamp(-1, height - 1).long()
    # boxes entirely off one side collapse to empty through the clamps
    off = (hi[:, 0] < 0.5) | (hi[:, 1] < 0.5) | (lo[:, 0] > width - 0.5) | (lo[:, 1] > height - 0.5)
    valid = valid & ~off & (x1 >= x0) & (y1 >= y0)
    tri = torch.nonzero(valid).squeeze(1)
    if tri.numel() == 0:
        return zbuf.view(height, width)
    bw = (x1 - x0 + 1)[tri]
    bh = (y1 - y0 + 1)[tri]
    # split tall/wide boxes into row bands of at most max(pair_budget, bw) pairs
    rows_per = torch.clamp(pair_budget // bw, min=1)
    n_items = (bh + rows_per - 1) // rows_per
    item_tri_local = torch.repeat_interleave(torch.arange(tri.numel(), device=device), n_items)
    first_item = torch.cumsum(n_items, 0) - n_items
    band = torch.arange(item_tri_local.numel(), device=device) - first_item[item_tri_local]
    item_y0 = y0[tri][item_tri_local] + band * rows_per[item_tri_local]
    item_rows = torch.minimum(rows_per[item_tri_local], y1[tri][item_tri_local] - item_y0 + 1)
    item_bw = bw[item_tri_local]
    item_count = item_bw * item_rows
    item_tri = tri[item_tri_local]
    item_x0 = x0[item_tri]
    cum = torch.cumsum(item_count, 0)
    n = int(item_count.numel())
    start = 0
    while start < n:
        base = int(cum[start - 1]) if start > 0 else 0
        end = int(torch.searchsorted(cum, base + pair_budget, right=True))
        end = max(end, start + 1)
        counts = item_count[start:end]
        total = int(counts.sum())
        pair_item = torch.repeat_interleave(torch.arange(start, end, device=device), counts)
        offsets = torch.cumsum(counts, 0) - counts
        local = torch.arange(total, device=device) - offsets[pair_item - start]
        pbw = item_bw[pair_item]
        px = item_x0[pair_item] + local % pbw
        py = item_y0[pair_item] + torch.div(local, pbw, rounding_mode="floor")
        ptri = item_tri[pair_item]
        co = coeffs[ptri]  # [N, 3, 3]
        fx = px.double() + 0.5
        fy = py.double() + 0.5
        vals = co[:, :, 0] * fx[:, None] + co[:, :, 1] * fy[:, None] + co[:, :, 2]  # [N, 3]
        l0, l1, inv_depth = vals[:, 0], vals[:, 1], vals[:, 2]
        eps = -1e-9
        inside = (l0 >= eps) & (l1 >= eps) & (1.0 - l0 - l1 >= eps) & (inv_depth > 0)
        if bool(inside.any()):
            depth_bits = inv_depth[inside].float().view(torch.int32).long()
            key = (depth_bits << 32) | ptri[inside]
            zbuf.scatter_reduce_(0, (py * width + px)[inside], key, reduce="amax")
        start = end
    tri_id = torch.where(zbuf >= 0, zbuf & 0xFFFFFFFF, zbuf)
    return tri_id.view(height, width)


def perspective_barycentrics(clip_tri: Tensor, pix: Tensor, width: int, height: int
                             ) -> tuple[Tensor, Tensor]:
    """Differentiable perspective-correct barycentrics of pixel centres.

    Args:
        clip_tri: ``[N, 3, 4]`` clip coordinates of each pixel's triangle (all ``w > 0``).
        pix: ``[N, 2]`` pixel centres ``(x, y)`` in screen pixels (y down).

    Returns:
        ``bary [N, 3]`` (sum to 1) and ``depth [N]`` (camera distance along the view axis).
    """
    xy = clip_to_screen(clip_tri, width, height)  # [N, 3, 2]
    w = clip_tri[..., 3]
    a, b, c = xy[:, 0], xy[:, 1], xy[:, 2]

    def cross(p: Tensor, q: Tensor) -> Tensor:
        return p[:, 0] * q[:, 1] - p[:, 1] * q[:, 0]

    area = cross(b - a, c - a)
    l0 = cross(b - pix, c - pix) / area
    l1 = cross(c - pix, a - pix) / area
    l2 = 1.0 - l0 - l1
    q = torch.stack([l0, l1, l2], dim=-1) / w
    s = q.sum(dim=-1)
    return q / s[:, None], 1.0 / s


def rasterize_torch(v: Tensor, faces: Tensor, mvp: Tensor, width: int, height: int,
                    near: float = 0.0, pair_budget: int = DEFAULT_PAIR_BUDGET
                    ) -> tuple[Tensor, Tensor, Tensor]:
    """Rasterise world-space triangles.

    Args:
        v: ``[V, 3]`` world positions (gradients flow through the barycentrics and depth).
        faces: ``[F, 3]`` int64.
        mvp: ``[4, 4]`` world -> OpenGL clip transform.
        near: triangles with any vertex at clip ``w < near`` are culled.

    Returns:
        ``tri_id [H, W]`` int64 (-1 empty), ``bary [H, W, 3]`` perspective-correct barycentrics
        (0 where empty), ``depth [H, W]`` view-axis distance (0 where empty). Row 0 is the top.
    """
    mvp = mvp.to(device=v.device, dtype=v.dtype)
    clip = torch.cat([v, torch.ones_like(v[:, :1])], dim=-1) @ mvp.T  # [V, 4]
    with torch.no_grad():
        cw = clip[:, 3].detach()
        ok_vertex = cw >= max(near, 1e-12)
        xy = clip_to_screen(clip.detach(), width, height)
        valid = ok_vertex[faces].all(dim=1)
        tri_id = zbuffer(xy, torch.where(ok_vertex, cw, torch.ones_like(cw)), faces, valid,
                         width, height, pair_budget)
    flat = tri_id.view(-1)
    pix_idx = torch.nonzero(flat >= 0).squeeze(1)
    tid = flat[pix_idx]
    pix = torch.stack([(pix_idx % width).to(v.dtype) + 0.5,
                       torch.div(pix_idx, width, rounding_mode="floor").to(v.dtype) + 0.5], -1)
    bary_c, depth_c = perspective_barycentrics(clip[faces[tid]], pix, width, height)
    bary = v.new_zeros((height * width, 3)).index_put((pix_idx,), bary_c)
    depth = v.new_zeros((height * width,)).index_put((pix_idx,), depth_c)
    return tri_id, bary.view(height, width, 3), depth.view(height, width)


@torch.no_grad()
def rasterize_uv(vt: Tensor, ft: Tensor, size: int, pair_budget: int = DEFAULT_PAIR_BUDGET
                 ) -> tuple[Tensor, Tensor]:
    """Rasterise the uv atlas into a ``size x size`` texture (texel centres, row 0 = image top).

    Returns ``tri_id [S, S]`` (-1 outside the charts) and linear barycentrics ``bary [S, S, 3]``.
    """
    uv = vt.double()
    xy = torch.stack([uv[:, 0] * size, (1.0 - uv[:, 1]) * size], dim=-1)
    ones = torch.ones(vt.shape[0], dtype=torch.float64, device=vt.device)
    valid = torch.ones(ft.shape[0], dtype=torch.bool, device=vt.device)
    tri_id = zbuffer(xy, ones, ft, valid, size, size, pair_budget)
    flat = tri_id.view(-1)
    pix_idx = torch.nonzero(flat >= 0).squeeze(1)
    tid = flat[pix_idx]
    pix = torch.stack([(pix_idx % size).double() + 0.5,
                       torch.div(pix_idx, size, rounding_mode="floor").double() + 0.5], -1)
    # orthographic: clip coordinates with w = 1 reproduce xy exactly
    tri_xy = xy[ft[tid]]
    clip = torch.cat([tri_xy[..., :1] / size * 2.0 - 1.0, 1.0 - tri_xy[..., 1:] / size * 2.0,
                      torch.zeros_like(tri_xy[..., :1]), torch.ones_like(tri_xy[..., :1])], -1)
    bary_c, _ = perspective_barycentrics(clip, pix, size, size)
    bary = torch.zeros((size * size, 3), dtype=torch.float64, device=vt.device)
    bary[pix_idx] = bary_c
    return tri_id, bary.view(size, size, 3).float()


@torch.no_grad()
def attribute_derivatives(v: Tensor, faces: Tensor, mvp: Tensor, tri_id: Tensor, attr: Tensor,
                          attr_faces: Tensor) -> tuple[Tensor, Tensor]:
    """Screen-space derivatives of a perspective-correct vertex attribute at covered pixels.

    For each covered pixel (in the order of ``nonzero(tri_id.view(-1) >= 0)``) the visible
    triangle's barycentrics are evaluated half a pixel to either side of the centre on its own
    plane (the triangle extended, as a GPU's pixel quad does), and the attribute ``attr [A, C]``
    (indexed by ``attr_faces [F, 3]``, e.g. ``vt``/``ft``) is interpolated there; the central
    differences are ``d/dx`` (one pixel to the right) and ``d/dy`` (one pixel down), ``[N, C]``.
    Used for the mip level of texture lookups.
    """
    height, width = tri_id.shape
    flat = tri_id.reshape(-1)
    pix_idx = torch.nonzero(flat >= 0).squeeze(1)
    tid = flat[pix_idx]
    dtype = torch.float64
    clip = torch.cat([v.to(dtype), torch.ones_like(v[:, :1], dtype=dtype)], dim=-1) @ mvp.to(
        device=v.device, dtype=dtype).T
    clip_tri = clip[faces[tid]]
    pix = torch.stack([(pix_idx % width).to(dtype) + 0.5,
                       torch.div(pix_idx, width, rounding_mode="floor").to(dtype) + 0.5], -1)
    corner = attr.to(dtype)[attr_faces[tid]]  # [N, 3, C]

    def at(offset):
        b, _ = perspective_barycentrics(clip_tri, pix + pix.new_tensor(offset), width, height)
        return (corner * b[..., None]).sum(dim=1)

    d_dx = at((0.5, 0.0)) - at((-0.5, 0.0))
    d_dy = at((0.0, 0.5)) - at((0.0, -0.5))
    bad = ~(torch.isfinite(d_dx).all(-1) & torch.isfinite(d_dy).all(-1))
    d_dx[bad] = 0.0
    d_dy[bad] = 0.0
    return d_dx.to(attr.dtype), d_dy.to(attr.dtype)
