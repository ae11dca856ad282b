"""A differentiable pure-PyTorch tile rasterizer for 3D Gaussians (runs on CPU).

Per pixel it computes exactly what the 3DGS / gsplat CUDA kernels compute:

* Gaussians are sorted front to back by camera-space depth of their means;
* ``alpha_i = min(0.99, o_i * exp(-0.5 d^T conic_i d))`` with ``d`` = pixel centre - mean, where
  pixel (u, v) has its centre at (u + 0.5, v + 0.5) (the convention of ``Camera.K()`` and gsplat);
  a Gaussian is skipped at a pixel where ``alpha_i < 1/255``;
* ``w_i = alpha_i T_i`` with ``T_i = prod_{j<i} (1 - alpha_j)``; compositing stops (the Gaussian
  that would bring the transmittance below 1e-4 is not added, as 3DGS);
* colour = ``sum_i w_i c_i + T_final * background``, alpha = ``1 - T_final``,
  depth = ``sum_i w_i z_i``.

A Gaussian's footprint is the exact ellipse where its alpha can reach 1/255
(``d^T conic d <= 2 ln(255 o)``, at most 3.33 sigma, the same bound gsplat uses), so the result
does not depend on the tile size. The ``radii`` output is the 3DGS screen radius,
``ceil(3 * sqrt(max eigenvalue))``, used for visibility and densification statistics.

Memory stays bounded: the image is cut into ``tile_size`` square tiles, each Gaussian is paired
only with the tiles its footprint overlaps, and the (pair x tile-pixel) work is done in chunks of
at most ``max_chunk_elements`` values. A custom autograd function computes the analytic
gradient (3DGS's back-to-front suffix sums, done as a segmented scan) and keeps only the
per-pair inputs plus one transmittance value per pair-pixel between forward and backward,
recomputing the rest.

On CUDA a call syncs with the host twice (the pair count and the chunk bounds); everything else
has shapes known in advance.

Measured here (2 shared CPU cores, torch 2.13 CPU): 256x256, 5000 Gaussians of DreamGaussian's
initial blob, forward + backward ~0.5 s with one thread.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from hash3d_dg.gaussians.projection import ALPHA_THRESHOLD, Projection, project_gaussians
from hash3d_dg.gaussians.render_result import GaussianRender

MAX_ALPHA = 0.99
T_STOP = 1e-4
_LOG_T_STOP = math.log(T_STOP)


def _pair_alpha(means: Tensor, conics: Tensor, opacities: Tensor, origins: Tensor,
                offsets: Tensor, max_alpha: float = MAX_ALPHA) -> tuple[Tensor, ...]:
    """Alpha of each (Gaussian-tile pair, tile pixel).

    means [P, 2], conics [P, 3], opacities [P], origins [P, 2] (tile corner in pixels),
    offsets [A, 2] (pixel centres inside a tile, +0.5 included).
    Returns dx, dy, gauss, raw (= o * gauss), alpha (masked, clamped), live (bool), all [P, A].
    """
    dx = (origins[:, 0:1] - means[:, 0:1]) + offsets[None, :, 0]
    dy = (origins[:, 1:2] - means[:, 1:2]) + offsets[None, :, 1]
    ca, cb, cc = conics[:, 0:1], conics[:, 1:2], conics[:, 2:3]
    power = -0.5 * (ca * dx * dx + cc * dy * dy) - cb * dx * dy
    gauss = torch.exp(power)
    raw = opacities[:, None] * gauss
    live = (power <= 0) & (raw >= ALPHA_THRESHOLD)
    alpha = torch.where(live, raw.clamp(max=max_alpha), torch.zeros_like(raw))
    return dx, dy, gauss, raw, alpha, live


def _transmittance(alpha: Tensor, seg_first: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Front-to-back transmittance in each tile segment of a chunk (pairs sorted by tile, depth).

    Returns T (exclusive, float64) [P, A], keep mask [P, A] and log(1 - alpha) (float64).
    """
    log1m = torch.log1p(-alpha.double())
    excl = torch.cumsum(log1m, dim=0) - log1m
    excl = excl - excl[seg_first]
    keep = (excl + log1m) >= _LOG_T_STOP
    return torch.exp(excl), keep, log1m


class _CompositeChunk(torch.autograd.Function):
    """Composite one chunk of Gaussian-tile pairs (sorted by tile, then depth).

    forward(means [P,2], conics [P,3], opacities [P], feats [P,F], origins [P,2], offsets [A,2],
            seg_first [P], seg_last [P], tiles [P] (chunk-local tile index), n_tiles, max_alpha)
    -> feat_sum [n_tiles, A, F] (sum_i w_i f_i), log_t [n_tiles, A] (log final transmittance).
    """

    @staticmethod
    def forward(ctx, means, conics, opacities, feats, origins, offsets, seg_first, seg_last,
                tiles, n_tiles, max_alpha):
        _, _, _, _, alpha, _ = _pair_alpha(means, conics, opacities, origins, offsets, max_alpha)
        trans, keep, log1m = _transmittance(alpha, seg_first)
        trans_k = (trans * keep).to(alpha.dtype)  # T_i, 0 after the early stop
        w = alpha * trans_k
        area, nfeat = offsets.shape[0], feats.shape[1]
        feat_sum = torch.zeros(n_tiles, area, nfeat, dtype=feats.dtype, device=feats.device)
        feat_sum.index_add_(0, tiles, w[:, :, None] * feats[:, None, :])
        log_t = torch.zeros(n_tiles, area, dtype=torch.float64, device=feats.device)
        log_t.index_add_(0, tiles, log1m * keep)
        # T is kept (one value per pair-pixel) so backward skips the scan; the rest is recomputed
        ctx.save_for_backward(means, conics, opacities, feats, origins, offsets, seg_last, tiles,
                              trans_k)
        ctx.max_alpha = max_alpha
        return feat_sum, log_t.to(feats.dtype)

    @staticmethod
    def backward(ctx, g_feat_sum, g_log_t):
        means, conics, opacities, feats, origins, offsets, seg_last, tiles, trans_k = \
            ctx.saved_tensors
        max_alpha = ctx.max_alpha
        dx, dy, gauss, raw, alpha, live = _pair_alpha(means, conics, opacities, origins, offsets,
                                                      max_alpha)
        w = alpha * trans_k

        g_pix = g_feat_sum[tiles]  # [P, A, F]
        fg = torch.einsum("paf,pf->pa", g_pix, feats)  # f_i . dL/dC per pixel
        grad_feats = torch.einsum("pa,paf->pf", w, g_pix)

        # S_i = sum_{j>i in the same tile} w_j (f_j . dL/dC): suffix sum via a segmented cumsum.
        csum = torch.cumsum((w * fg).double(), dim=0)
        suffix = (csum[seg_last] - csum).to(alpha.dtype)
        # dL/dalpha_i = T_i f_i.G - (S_i + T_final dL/dT_final) / (1 - alpha_i), for kept pairs
        kept = trans_k > 0
        g_alpha = torch.where(kept, trans_k * fg - (suffix + g_log_t[tiles]) / (1.0 - alpha),
                              torch.zeros_like(alpha))

        g_raw = torch.where(live & (raw < max_alpha), g_alpha, torch.zeros_like(g_alpha))
        grad_opac = (g_raw * gauss).sum(1)
        g_power = g_raw * raw
        gp_dx, gp_dy = g_power * dx, g_power * dy
        sum_dx, sum_dy = gp_dx.sum(1), gp_dy.sum(1)
        grad_conics = torch.stack([-0.5 * (gp_dx * dx).sum(1), -(gp_dx * dy).sum(1),
                                   -0.5 * (gp_dy * dy).sum(1)], dim=-1)
        ca, cb, cc = conics.unbind(-1)
        grad_means = torch.stack([ca * sum_dx + cb * sum_dy, cb * sum_dx + cc * sum_dy], dim=-1)
        return (grad_means, grad_conics, grad_opac, grad_feats,
                None, None, None, None, None, None, None)


def _footprint_pixels(means2d: Tensor, cov2d: Tensor, opacities: Tensor, in_depth: Tensor,
                      width: int, height: int) -> tuple[Tensor, Tensor]:
    """Inclusive pixel ranges [N, 2] (x) and [N, 2] (y) where a Gaussian can reach alpha 1/255.

    Empty ranges (min > max) mark Gaussians that touch no pixel.
    """
    thr = 2.0 * torch.log((opacities / ALPHA_THRESHOLD).clamp_min(1e-30))  # mahalanobis^2 bound
    thr = thr.clamp_min(0.0)
    # a tiny margin so float round-off never drops a pixel; the per-pixel test decides exactly
    ext_x = torch.sqrt(thr * cov2d[:, 0]) * (1 + 1e-4) + 1e-3
    ext_y = torch.sqrt(thr * cov2d[:, 2]) * (1 + 1e-4) + 1e-3
    x0 = torch.ceil(means2d[:, 0] - ext_x - 0.5).clamp(min=0)
    x1 = torch.floor(means2d[:, 0] + ext_x - 0.5).clamp(max=width - 1)
    y0 = torch.ceil(means2d[:, 1] - ext_y - 0.5).clamp(min=0)
    y1 = torch.floor(means2d[:, 1] + ext_y - 0.5).clamp(max=height - 1)
    ok = in_depth & (thr > 0) & (x0 <= x1) & (y0 <= y1) & torch.isfinite(x0 + x1 + y0 + y1)
    big = torch.full_like(x0, -1.0)
    x0, y0 = torch.where(ok, x0, -big), torch.where(ok, y0, -big)
    x1, y1 = torch.where(ok, x1, big), torch.where(ok, y1, big)
    return torch.stack([x0, x1], -1).long(), torch.stack([y0, y1], -1).long()


def composite_gaussians(means2d: Tensor, conics: Tensor, cov2d: Tensor, depths: Tensor,
                        in_depth: Tensor, opacities: Tensor, colors: Tensor, background: Tensor,
                        width: int, height: int, tile_size: int = 8,
                        max_chunk_elements: int = 1 << 21, max_alpha: float = MAX_ALPHA
                        ) -> tuple[Tensor, Tensor, Tensor]:
    """Alpha-composite projected Gaussians into an image.

    Args:
        means2d: [N, 2] pixel positions; conics, cov2d: [N, 3]; depths: [N]; in_depth: [N] bool.
        opacities: [N] in [0, 1]; colors: [N, 3]; background: [3].
        tile_size: tile edge in pixels (the result does not depend on it).
        max_chunk_elements: bound on (pairs x tile pixels) processed at once.
        max_alpha: the per-Gaussian alpha cap (0.99: 3DGS / DreamGaussian, the reference;
            0.999 reproduces gsplat's kernels).

    Returns:
        image [H, W, 3] (over the background), alpha [H, W, 1], depth [H, W, 1].
    """
    device, dtype = means2d.device, means2d.dtype
    ts = int(tile_size)
    tiles_x, tiles_y = -(-width // ts), -(-height // ts)
    n_tiles, area = tiles_x * tiles_y, ts * ts

    with torch.no_grad():
        xr, yr = _footprint_pixels(means2d.detach(), cov2d.detach(), opacities.detach(),
                                   in_depth, width, height)
        # Fixed shapes up to the pair count, so a CUDA call syncs with the host twice: for the
        # number of (Gaussian, tile) pairs and for the chunk bounds below. Undrawn Gaussians
        # sort last (stable, by depth otherwise) and get no pairs.
        drawn = (xr[:, 0] <= xr[:, 1]) & (yr[:, 0] <= yr[:, 1])
        key = torch.where(drawn, depths.detach(), torch.full_like(depths.detach(), math.inf))
        order = torch.argsort(key, stable=True)
        tx0, tx1 = xr[order, 0] // ts, xr[order, 1] // ts
        ty0, ty1 = yr[order, 0] // ts, yr[order, 1] // ts
        nx = tx1 - tx0 + 1
        counts = torch.where(drawn[order], nx * (ty1 - ty0 + 1), torch.zeros_like(nx))
        total = int(counts.sum())
        rank = torch.repeat_interleave(torch.arange(len(order), device=device), counts,
                                       output_size=total)
        first = torch.cumsum(counts, 0) - counts
        local = torch.arange(total, device=device) - first[rank]
        pair_tile = (ty0[rank] + local // nx[rank]) * tiles_x + tx0[rank] + local % nx[rank]
        pair_tile, perm = torch.sort(pair_tile, stable=True)
        pair_gauss = order[rank[perm]]
        tile_counts = torch.zeros(n_tiles, dtype=torch.long, device=device).index_add_(
            0, pair_tile, torch.ones_like(pair_tile))
        tile_start = torch.cumsum(tile_counts, 0) - tile_counts

        iy, ix = torch.meshgrid(torch.arange(ts, device=device), torch.arange(ts, device=device),
                                indexing="ij")
        offsets = torch.stack([ix.reshape(-1), iy.reshape(-1)], -1).to(dtype) + 0.5
        tile_ids = torch.arange(n_tiles, device=device)
        tile_origin = torch.stack([tile_ids % tiles_x, tile_ids // tiles_x], -1).to(dtype) * ts

        # group consecutive tiles into chunks of at most max_chunk_elements pair-pixels (one
        # device-to-host copy; the chunk loop below then reads only host values)
        starts_np, counts_np = torch.stack([tile_start, tile_counts]).cpu().numpy()
        chunk_of_tile = starts_np * area // max(int(max_chunk_elements), area)
        bounds = [0, *(np.nonzero(np.diff(chunk_of_tile))[0] + 1).tolist(), n_tiles]

    feats = torch.cat([colors, depths[:, None]], dim=-1)
    outs, out_tiles = [], []
    for t0, t1 in zip(bounds[:-1], bounds[1:]):
        p0 = int(starts_np[t0])
        p1 = int(starts_np[t1 - 1] + counts_np[t1 - 1])
        if p1 <= p0:
            continue
        gid = pair_gauss[p0:p1]
        tiles_local = pair_tile[p0:p1] - t0
        seg_first = tile_start[pair_tile[p0:p1]] - p0
        seg_last = seg_first + tile_counts[pair_tile[p0:p1]] - 1
        feat_sum, log_t = _CompositeChunk.apply(
            means2d[gid], conics[gid], opacities[gid], feats[gid],
            tile_origin[pair_tile[p0:p1]], offsets, seg_first, seg_last, tiles_local, t1 - t0,
            float(max_alpha))
        outs.append(torch.cat([feat_sum, log_t[..., None]], dim=-1))
        out_tiles.append(torch.arange(t0, t1, device=device))

    full = torch.zeros(n_tiles, area, feats.shape[1] + 1, dtype=dtype, device=device)
    if outs:
        full = full.index_copy(0, torch.cat(out_tiles), torch.cat(outs))
    img = full.reshape(tiles_y, tiles_x, ts, ts, -1).permute(0, 2, 1, 3, 4)
    img = img.reshape(tiles_y * ts, tiles_x * ts, -1)[:height, :width]
    trans = torch.exp(img[..., 4:5])
    image = img[..., 0:3] + trans * background.to(dtype)
    return image, 1.0 - trans, img[..., 3:4]


def rasterize_torch(means: Tensor, quats: Tensor, scales: Tensor, opacities: Tensor,
                    colors: Tensor, viewmat: Tensor, K: Tensor, width: int, height: int,
                    background: Tensor, near: float = 0.01, far: float = 1e10,
                    tile_size: int = 8, max_chunk_elements: int = 1 << 21,
                    max_alpha: float = MAX_ALPHA) -> GaussianRender:
    """Render Gaussians with the pure-PyTorch backend.

    Args:
        means [N, 3], quats [N, 4] (wxyz, any norm), scales [N, 3] (activated),
        opacities [N] (in [0, 1]), colors [N, 3]; viewmat [4, 4] world-to-camera (OpenCV);
        K [3, 3]; background [3]; near/far: depth culling planes; max_alpha: the alpha cap
        (see ``composite_gaussians``).
    """
    proj: Projection = project_gaussians(means, quats, scales, viewmat, K, width, height,
                                         near=near, far=far)
    means2d = proj.means2d
    if means2d.requires_grad:
        means2d.retain_grad()
    image, alpha, depth = composite_gaussians(
        means2d, proj.conics, proj.cov2d, proj.depths, proj.in_depth, opacities, colors,
        background, width, height, tile_size=tile_size, max_chunk_elements=max_chunk_elements,
        max_alpha=max_alpha)
    return GaussianRender(image=image, alpha=alpha, depth=depth, radii=proj.radii,
                          means2d=means2d, backend="torch")
