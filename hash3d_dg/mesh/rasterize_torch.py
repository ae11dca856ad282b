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
   int64 key into a z-buffer with ``scatter_reduce(amax)`` (nearest wins, ties to the larger id);
   uncovered pairs write -1, the empty value, so no pair is ever selected by a boolean mask.
   Triangles with any vertex closer than the near plane (``w < near``) or with zero screen area
   are culled (no clipping).
2. Attributes (differentiable): at the covered pixels (on the CPU) or at every pixel, empty ones
   evaluating a fixed, well-posed stand-in triangle masked to 0 (off the CPU: no ``nonzero``,
   see :class:`Pixels`), the visible triangle's clip-space
   vertices are re-projected and the screen-space barycentrics ``l_i`` are recomputed, then made
   perspective-correct: ``b_i = (l_i / w_i) / sum_j (l_j / w_j)``, ``depth = 1 / sum_j (l_j / w_j)``.
   Gradients reach vertex positions through these barycentrics (not through visibility).

Host synchronisation: on CUDA a ``rasterize_torch`` / ``rasterize_uv`` call copies the per-face
box sizes to the host once (the chunk plan, :class:`_ChunkPlan`, sizes every later op:
``repeat_interleave(output_size=...)``, aranges of known length); with the default
``all_pixels`` off the CPU nothing else waits on the device (no ``nonzero``, no boolean indexing,
no ``.item()``). On the CPU the attribute pass keeps ``nonzero`` (free there, and it skips the
empty pixels). ``attribute_derivatives`` (mip-mapped lookups only) still uses ``nonzero``.
"""

from __future__ import annotations

import bisect

import torch
from torch import Tensor

from hash3d_dg import accel

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


class _ChunkPlan:
    """Host-side plan of the visibility pass from the per-face box sizes ``[2, F]`` (width,
    height; height 0 for culled faces): the number of row-band items, and chunks
    ``(first item, end item, first pair, pair count)`` of at most ``pair_budget`` pairs (or one
    item). Mirrors the device's item arithmetic in :func:`zbuffer` exactly (int64)."""

    def __init__(self, box: Tensor, pair_budget: int):
        bw, bh = box[0], box[1]
        rows_per = torch.clamp(pair_budget // bw, min=1)
        n_items = (bh + rows_per - 1) // rows_per
        self.n_items = int(n_items.sum())
        self.chunks: list[tuple[int, int, int, int]] = []
        if self.n_items == 0:
            return
        item_tri = torch.repeat_interleave(n_items)
        band = torch.arange(self.n_items) - (torch.cumsum(n_items, 0) - n_items)[item_tri]
        item_rows = torch.minimum(rows_per[item_tri], bh[item_tri] - band * rows_per[item_tri])
        cum = torch.cumsum(bw[item_tri] * item_rows, 0).tolist()
        start = 0
        while start < self.n_items:
            base = cum[start - 1] if start > 0 else 0
            end = max(bisect.bisect_right(cum, base + pair_budget), start + 1)
            self.chunks.append((start, end, base, cum[end - 1] - base))
            start = end


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
    # every face stays in the arrays (no nonzero): a culled face gets an empty box and no items
    bw = torch.where(valid, x1 - x0 + 1, torch.ones_like(x0))
    bh = torch.where(valid, y1 - y0 + 1, torch.zeros_like(y0))
    # split tall/wide boxes into row bands of at most max(pair_budget, bw) pairs
    rows_per = torch.clamp(pair_budget // bw, min=1)
    n_items = (bh + rows_per - 1) // rows_per
    # the one host copy of the call: the per-face box sizes, from which the host plans the items
    # and chunks (the same integer arithmetic as on the device) to size every later op
    plan = _ChunkPlan(torch.stack([bw, bh]).cpu(), pair_budget)
    if plan.n_items == 0:
        return zbuf.view(height, width)
    item_tri = torch.repeat_interleave(n_items, output_size=plan.n_items)
    first_item = torch.cumsum(n_items, 0) - n_items
    band = torch.arange(plan.n_items, device=device) - first_item[item_tri]
    item_y0 = y0[item_tri] + band * rows_per[item_tri]
    item_rows = torch.minimum(rows_per[item_tri], y1[item_tri] - item_y0 + 1)
    item_bw = bw[item_tri]
    item_count = item_bw * item_rows
    item_x0 = x0[item_tri]
    first_pair = torch.cumsum(item_count, 0) - item_count
    for start, end, base, total in plan.chunks:
        counts = item_count[start:end]
        pair_item = start + torch.repeat_interleave(counts, output_size=total)
        local = torch.arange(base, base + total, device=device) - first_pair[pair_item]
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
        # uncovered pairs write -1, the z-buffer's empty value, so amax ignores them
        depth_bits = inv_depth.float().view(torch.int32).long()
        key = torch.where(inside, (depth_bits << 32) | ptri, -1)
        zbuf.scatter_reduce_(0, py * width + px, key, reduce="amax")
    tri_id = torch.where(zbuf >= 0, zbuf & 0xFFFFFFFF, zbuf)
    return tri_id.view(height, width)


def _safe_clip_tri(like: Tensor) -> Tensor:
    """``[3, 4]`` clip coordinates of a triangle covering the whole screen with ``w = 1`` (built
    on ``like``'s device without a host copy): what empty pixels evaluate."""
    tri = like.new_full((3, 4), -1.0)
    tri[:, 2].fill_(0.0)
    tri[:, 3].fill_(1.0)
    tri[1, 0].fill_(3.0)
    tri[2, 1].fill_(3.0)
    return tri


def gather_corners(attr: Tensor, faces: Tensor, stand_in: Tensor, tri_id: Tensor) -> Tensor:
    """``attr[faces[tri_id]]`` per pixel ``[N, 3, C]``, where pixels with ``tri_id < 0`` read the
    three rows of ``stand_in [3, C]`` instead (a face appended after the last one, on vertices
    appended after the last one). Per pixel-vertex gather, so the backward accumulates into
    ``attr`` in pixel order exactly as ``attr[faces[tri_id]]`` over the covered pixels would."""
    n_v = attr.shape[0]
    extra = torch.arange(n_v, n_v + 3, device=faces.device, dtype=faces.dtype)[None]
    faces_ext = torch.cat([faces, extra])
    attr_ext = torch.cat([attr, stand_in.to(attr.dtype)])
    return attr_ext[faces_ext[torch.where(tri_id >= 0, tri_id, faces.shape[0])]]


class Pixels:
    """The pixels an attribute pass evaluates, and how results return to the full image.

    ``all_pixels=True`` (the default on an accelerator: CUDA, or the CPU inside
    ``accel.virtual()``): every pixel, in row-major order; empty ones carry ``tid = -1`` (:func:`gather_corners` gives them a stand-in face) and :meth:`expand`
    masks them to 0 with ``torch.where``: no ``nonzero``, so no host sync. ``False`` (the default
    on the CPU, where a host sync costs nothing and the empty pixels would be wasted work): the
    covered pixels only, in ``nonzero`` order, scattered back with ``index_put``. Both give the
    same values (the per-pixel arithmetic is the same)."""

    def __init__(self, tri_id: Tensor, all_pixels: bool | None = None):
        flat = tri_id.reshape(-1)
        self.all_pixels = accel.is_accelerator(flat.device) if all_pixels is None else all_pixels
        self.n = flat.numel()
        self.covered = flat >= 0
        if self.all_pixels:
            self.index = torch.arange(self.n, device=flat.device)
            self.tid = flat
        else:
            self.index = torch.nonzero(self.covered).squeeze(1)
            self.tid = flat[self.index]

    def select(self, full: Tensor) -> Tensor:
        """Rows of a per-pixel ``[H * W, ...]`` tensor for the evaluated pixels."""
        return full if self.all_pixels else full[self.index]

    def expand(self, values: Tensor) -> Tensor:
        """Evaluated rows ``[N, ...]`` -> ``[H * W, ...]``, 0 at empty pixels."""
        if self.all_pixels:
            mask = self.covered.view((-1,) + (1,) * (values.dim() - 1))
            return torch.where(mask, values, 0.0)
        out = values.new_zeros((self.n,) + tuple(values.shape[1:]))
        return out.index_put((self.index,), values)

    def centres(self, width: int, dtype: torch.dtype) -> Tensor:
        """``[N, 2]`` pixel centres ``(x, y)`` of the evaluated pixels."""
        idx = self.index
        return torch.stack([(idx % width).to(dtype) + 0.5,
                            torch.div(idx, width, rounding_mode="floor").to(dtype) + 0.5], -1)


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
                    near: float = 0.0, pair_budget: int = DEFAULT_PAIR_BUDGET,
                    all_pixels: bool | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Rasterise world-space triangles.

    Args:
        v: ``[V, 3]`` world positions (gradients flow through the barycentrics and depth).
        faces: ``[F, 3]`` int64.
        mvp: ``[4, 4]`` world -> OpenGL clip transform.
        near: triangles with any vertex at clip ``w < near`` are culled.
        all_pixels: attribute pass over every pixel (sync-free) or the covered ones only; None:
            every pixel off the CPU (see :class:`Pixels`). The results are the same.

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
    # with all_pixels, empty pixels read a fixed well-posed stand-in triangle (detached, appended
    # after the faces): neither their values nor the vertex gradients are NaN, even with no faces
    px = Pixels(tri_id, all_pixels)
    clip_tri = gather_corners(clip, faces, _safe_clip_tri(clip.detach()), px.tid)
    bary_c, depth_c = perspective_barycentrics(clip_tri, px.centres(width, v.dtype), width, height)
    bary = px.expand(bary_c)
    depth = px.expand(depth_c)
    return tri_id, bary.view(height, width, 3), depth.view(height, width)


@torch.no_grad()
def rasterize_uv(vt: Tensor, ft: Tensor, size: int, pair_budget: int = DEFAULT_PAIR_BUDGET,
                 all_pixels: bool | None = None) -> tuple[Tensor, Tensor]:
    """Rasterise the uv atlas into a ``size x size`` texture (texel centres, row 0 = image top).

    Returns ``tri_id [S, S]`` (-1 outside the charts) and linear barycentrics ``bary [S, S, 3]``.
    ``all_pixels``: as in :func:`rasterize_torch`.
    """
    uv = vt.double()
    xy = torch.stack([uv[:, 0] * size, (1.0 - uv[:, 1]) * size], dim=-1)
    ones = torch.ones(vt.shape[0], dtype=torch.float64, device=vt.device)
    valid = torch.ones(ft.shape[0], dtype=torch.bool, device=vt.device)
    tri_id = zbuffer(xy, ones, ft, valid, size, size, pair_budget)
    px = Pixels(tri_id, all_pixels)
    # orthographic: clip coordinates with w = 1 reproduce xy exactly
    stand_in = xy.new_zeros((3, 2))  # a well-posed triangle, built without a host copy
    stand_in[1, 0].fill_(2.0 * size)
    stand_in[2, 1].fill_(2.0 * size)
    tri_xy = gather_corners(xy, ft, stand_in, px.tid)
    clip = torch.cat([tri_xy[..., :1] / size * 2.0 - 1.0, 1.0 - tri_xy[..., 1:] / size * 2.0,
                      torch.zeros_like(tri_xy[..., :1]), torch.ones_like(tri_xy[..., :1])], -1)
    bary_c, _ = perspective_barycentrics(clip, px.centres(size, torch.float64), size, size)
    bary = px.expand(bary_c)
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
