"""The 3D Gaussian model of stage 1 (SH degree 0, as DreamGaussian's image-to-3D configs)."""

from __future__ import annotations

import math
from typing import Mapping

import numpy as np
import torch
from torch import Tensor, nn

from hash3d_dg.gaussians.knn import mean_sq_dist_to_neighbours
from hash3d_dg.gaussians.projection import covariance_3d, precision_3d, quat_to_rotmat
from hash3d_dg.gaussians.render_result import GaussianRender

SH_C0 = 0.28209479177387814
"""Degree-0 real spherical harmonic, Y_0^0 = 1 / (2 sqrt(pi)); rgb = 0.5 + SH_C0 * sh0."""

PARAM_KEYS = ("means", "sh0", "opacities", "scales", "quats")

DEFAULT_LRS: dict[str, float] = {
    "means": 1e-3,      # initial value of the position schedule (see position_lr)
    "sh0": 0.01,        # DreamGaussian feature_lr
    "opacities": 0.05,  # opacity_lr
    "scales": 0.005,    # scaling_lr
    "quats": 0.005,     # rotation_lr
}
"""DreamGaussian's stage-1 learning rates (configs/image.yaml), keyed by parameter name."""


def sh0_to_rgb(sh0: Tensor) -> Tensor:
    """RGB [..., 3] of degree-0 SH coefficients, clamped at 0 like the 3DGS/gsplat SH evaluation."""
    return (0.5 + SH_C0 * sh0).clamp_min(0.0)


def rgb_to_sh0(rgb: Tensor) -> Tensor:
    """Degree-0 SH coefficients [..., 3] of an RGB colour (inverts ``sh0_to_rgb`` for rgb >= 0)."""
    return (rgb - 0.5) / SH_C0


def position_lr(step: int, lr_init: float = 1e-3, lr_final: float = 2e-5,
                delay_mult: float = 0.02, max_steps: int = 500, delay_steps: int = 0,
                spatial_lr_scale: float = 1.0) -> float:
    """Learning rate of the means at ``step`` (3DGS ``get_expon_lr_func``).

    Log-linear interpolation from ``lr_init`` to ``lr_final`` over ``max_steps`` (clamped after),
    times a reverse-cosine warm-up ``delay_mult + (1 - delay_mult) sin(pi/2 clip(step /
    delay_steps))`` when ``delay_steps > 0``. DreamGaussian uses ``delay_steps = 0``, so
    ``delay_mult`` then has no effect. Both ends are multiplied by ``spatial_lr_scale``; note that
    DreamGaussian's random initialisation sets its ``spatial_lr_scale`` to 10
    (``create_from_pcd(pcd, 10)``), i.e. an effective 1e-2 -> 2e-4 with the default config.
    """
    lr_init, lr_final = lr_init * spatial_lr_scale, lr_final * spatial_lr_scale
    if lr_init == lr_final:
        return float(lr_init)
    if step < 0 or (lr_init == 0.0 and lr_final == 0.0):
        return 0.0
    if delay_steps > 0:
        delay_rate = delay_mult + (1 - delay_mult) * math.sin(
            0.5 * math.pi * min(max(step / delay_steps, 0.0), 1.0))
    else:
        delay_rate = 1.0
    t = min(max(step / max_steps, 0.0), 1.0)
    return float(delay_rate * math.exp(math.log(lr_init) * (1 - t) + math.log(lr_final) * t))


def set_group_lr(optimizer: torch.optim.Optimizer, name: str, lr: float) -> None:
    """Set the learning rate of the optimizer's param group called ``name``."""
    for group in optimizer.param_groups:
        if group.get("name") == name:
            group["lr"] = float(lr)
            return
    raise KeyError(f"optimizer has no param group named {name!r}")


def _morton_order(points: Tensor, bits: int = 10) -> Tensor:
    """Permutation [P] sorting points [P, 3] along a Z-order curve (spatially coherent chunks)."""
    lo, hi = points.amin(0), points.amax(0)
    cells = ((points - lo) / (hi - lo).clamp_min(1e-12) * ((1 << bits) - 1)).long()
    code = torch.zeros(points.shape[0], dtype=torch.long, device=points.device)
    for bit in range(bits):
        for axis in range(3):
            code |= ((cells[:, axis] >> bit) & 1) << (3 * bit + axis)
    return torch.argsort(code)


@torch.no_grad()
def _chunk_selections(ordered: Tensor, g_lo: Tensor, g_hi: Tensor, chunk: int, max_pairs: int):
    """Per chunk of ``chunk`` consecutive rows of ``ordered [P, 3]``, in order: its box ``(lo,
    hi)`` and the indices (ascending, as ``nonzero`` gives them) of the Gaussians whose box
    ``[g_lo, g_hi]`` meets it. Chunks are tested in groups of at most ``max_pairs``
    chunk-Gaussian pairs with one host read per group (the counts); the indices are compacted
    on the device (cumsum + scatter), so no chunk waits on a ``nonzero`` of its own."""
    n_pts, n_g = ordered.shape[0], g_lo.shape[0]
    n_chunks = -(-n_pts // chunk)
    pad = ordered[-1:].expand(n_chunks * chunk - n_pts, 3)  # repeated rows change no min / max
    boxes = torch.cat([ordered, pad]).view(n_chunks, chunk, 3)
    lo_all, hi_all = boxes.amin(1), boxes.amax(1)
    per_group = max(1, max_pairs // max(1, n_g))
    for c0 in range(0, n_chunks, per_group):
        lo, hi = lo_all[c0:c0 + per_group], hi_all[c0:c0 + per_group]
        hit = ((g_hi[None] >= lo[:, None]) & (g_lo[None] <= hi[:, None])).all(-1)  # [c, N]
        counts = hit.sum(1).tolist()  # the group's one host read
        flat = hit.reshape(-1)
        total = sum(counts)
        dest = torch.where(flat, torch.cumsum(flat, 0) - 1, total)  # misses go to a spare slot
        cols = torch.arange(n_g, device=hit.device).repeat(hit.shape[0])
        packed = torch.empty(total + 1, dtype=torch.long, device=hit.device).scatter_(0, dest, cols)
        start = 0
        for i, n in enumerate(counts):
            yield lo[i], hi[i], packed[start:start + n]
            start += n


class GaussianModel(nn.Module):
    """3D Gaussians with raw (pre-activation) parameters in ``self.params``.

    ``params`` keys: ``means`` [N, 3]; ``sh0`` [N, 3] degree-0 SH colour coefficients
    (rgb = 0.5 + SH_C0 * sh0); ``opacities`` [N] logits; ``scales`` [N, 3] logs;
    ``quats`` [N, 4] (w, x, y, z), unnormalised.
    """

    def __init__(self, means: Tensor, sh0: Tensor, opacities: Tensor, scales: Tensor,
                 quats: Tensor) -> None:
        super().__init__()
        n = means.shape[0]
        shapes = {"means": (n, 3), "sh0": (n, 3), "opacities": (n,), "scales": (n, 3),
                  "quats": (n, 4)}
        values = {"means": means, "sh0": sh0, "opacities": opacities, "scales": scales,
                  "quats": quats}
        for key, shape in shapes.items():
            if tuple(values[key].shape) != shape:
                raise ValueError(f"{key} must have shape {shape}, got {tuple(values[key].shape)}")
        self.params = nn.ParameterDict(
            {key: nn.Parameter(values[key].detach().clone()) for key in PARAM_KEYS})

    # ------------------------------------------------------------------ construction
    @classmethod
    def random_init(cls, num_points: int = 5000, radius: float = 0.5, seed: int = 0,
                    device: str | torch.device = "cpu") -> "GaussianModel":
        """DreamGaussian's initial blob.

        Points uniform in a ball of ``radius``; colours ``sh0 ~ U[0, 1/255)`` (rgb ~ 0.5 grey with
        a tiny random tint, exactly as DreamGaussian); opacity 0.1; isotropic scales
        ``sqrt(mean squared distance to the 3 nearest neighbours)`` (clamped at 1e-7 before the
        root, as 3DGS); identity rotations.
        """
        rng = np.random.default_rng(seed)
        phi = rng.random(num_points) * 2 * np.pi
        theta = np.arccos(rng.random(num_points) * 2 - 1)
        r = radius * np.cbrt(rng.random(num_points))
        xyz = np.stack([r * np.sin(theta) * np.cos(phi), r * np.sin(theta) * np.sin(phi),
                        r * np.cos(theta)], axis=1)
        sh0 = rng.random((num_points, 3)) / 255.0
        means = torch.tensor(xyz, dtype=torch.float32, device=device)
        dist2 = mean_sq_dist_to_neighbours(means).clamp_min(1e-7)
        scales = torch.log(torch.sqrt(dist2))[:, None].repeat(1, 3)
        quats = torch.zeros(num_points, 4, device=device)
        quats[:, 0] = 1.0
        opacities = torch.full((num_points,), math.log(0.1 / 0.9), device=device)
        return cls(means, torch.tensor(sh0, dtype=torch.float32, device=device), opacities,
                   scales, quats)

    # ------------------------------------------------------------------ activations
    @property
    def num_points(self) -> int:
        return int(self.params["means"].shape[0])

    @property
    def get_means(self) -> Tensor:
        """[N, 3] world positions."""
        return self.params["means"]

    @property
    def get_colors(self) -> Tensor:
        """[N, 3] RGB, ``max(0, 0.5 + SH_C0 * sh0)`` (may exceed 1, as in 3DGS)."""
        return sh0_to_rgb(self.params["sh0"])

    @property
    def get_opacities(self) -> Tensor:
        """[N] opacities in (0, 1)."""
        return torch.sigmoid(self.params["opacities"])

    @property
    def get_scales(self) -> Tensor:
        """[N, 3] standard deviations along the local axes."""
        return torch.exp(self.params["scales"])

    @property
    def get_quats(self) -> Tensor:
        """[N, 4] unit quaternions (w, x, y, z)."""
        q = self.params["quats"]
        return q / q.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    def covariances(self) -> Tensor:
        """[N, 3, 3] world-space covariances."""
        return covariance_3d(self.get_quats, self.get_scales)

    # ------------------------------------------------------------------ rendering
    def render(self, camera, background: Tensor, backend: str = "auto",
               tile_size: int | None = None) -> GaussianRender:
        """Render from ``camera`` (hash3d_dg.camera.Camera) over ``background`` [3].

        The image is clamped to [0, 1], as DreamGaussian's renderer does (colours may exceed 1,
        and a backend's composite with them): saturated pixels then pass no gradient and the VAE
        never sees values above 1. Alpha and depth are returned as rasterized.
        """
        from hash3d_dg.gaussians.backends import rasterize_gaussians

        out = rasterize_gaussians(self.get_means, self.get_quats, self.get_scales,
                                  self.get_opacities, self.get_colors, camera, background,
                                  backend=backend, tile_size=tile_size)
        out.image = out.image.clamp(0.0, 1.0)
        return out

    def density(self, points: Tensor, chunk: int = 4096, sigma_cutoff: float = 3.0,
                max_pairs: int = 1 << 22) -> Tensor:
        """Opacity-weighted Gaussian density at ``points`` [P, 3] -> [P].

        ``sum_i o_i exp(-0.5 (p - mu_i)^T Sigma_i^-1 (p - mu_i))`` where each term is cut to 0
        beyond ``sigma_cutoff`` Mahalanobis distance (so the result is independent of the
        chunking). Memory is bounded: points are processed in spatially coherent chunks of
        ``chunk`` (Z-order), each against only the Gaussians whose ``sigma_cutoff`` bounding box
        meets the chunk's box, at most ``max_pairs`` point-Gaussian pairs at a time.
        """
        if points.ndim != 2 or points.shape[1] != 3:
            raise ValueError(f"points must be [P, 3], got {tuple(points.shape)}")
        device = self.params["means"].device
        pts = points.to(device=device, dtype=self.params["means"].dtype)
        out = torch.zeros(pts.shape[0], dtype=pts.dtype, device=device)
        if pts.shape[0] == 0 or self.num_points == 0:
            return out.to(points.device)
        means, opac = self.get_means, self.get_opacities
        prec = precision_3d(self.get_quats, self.get_scales)  # [N, 3, 3]
        with torch.no_grad():
            cov = covariance_3d(self.get_quats, self.get_scales)
            half = sigma_cutoff * torch.sqrt(torch.diagonal(cov, dim1=-2, dim2=-1))
            g_lo, g_hi = means.detach() - half, means.detach() + half
            order = _morton_order(pts)
        cut2 = sigma_cutoff * sigma_cutoff
        results = []
        boxes = _chunk_selections(pts[order], g_lo, g_hi, chunk, max_pairs)
        for start, (lo, hi, sel) in zip(range(0, pts.shape[0], chunk), boxes):
            idx = order[start:start + chunk]
            p = pts[idx]
            val = torch.zeros(p.shape[0], dtype=pts.dtype, device=device)
            if sel.shape[0] == 0:
                results.append((idx, val))
                continue
            # Mahalanobis distances as one GEMM: m2 = f(p) . g(mu, P) in float64 around the
            # chunk centre (p^T P p - 2 p^T P mu + mu^T P mu).
            centre = 0.5 * (lo + hi)
            q = (p - centre).double()
            feat_p = torch.stack([q[:, 0] ** 2, q[:, 1] ** 2, q[:, 2] ** 2,
                                  2 * q[:, 0] * q[:, 1], 2 * q[:, 0] * q[:, 2],
                                  2 * q[:, 1] * q[:, 2], q[:, 0], q[:, 1], q[:, 2],
                                  torch.ones_like(q[:, 0])], dim=-1)  # [c, 10]
            step = max(1, max_pairs // max(1, p.shape[0]))
            for g0 in range(0, sel.shape[0], step):
                g = sel[g0:g0 + step]
                mu, pr = (means[g] - centre).double(), prec[g].double()
                pmu = (pr @ mu[..., None])[..., 0]
                feat_g = torch.stack([pr[:, 0, 0], pr[:, 1, 1], pr[:, 2, 2], pr[:, 0, 1],
                                      pr[:, 0, 2], pr[:, 1, 2], -2 * pmu[:, 0], -2 * pmu[:, 1],
                                      -2 * pmu[:, 2], (mu * pmu).sum(-1)], dim=-1)  # [g, 10]
                m2 = (feat_p @ feat_g.T).to(pts.dtype)  # [c, g]
                term = torch.where(m2 <= cut2, torch.exp(-0.5 * m2), torch.zeros_like(m2))
                val = val + term @ opac[g]
            results.append((idx, val))
        idx_all = torch.cat([r[0] for r in results])
        val_all = torch.cat([r[1] for r in results])
        out = out.index_copy(0, idx_all, val_all)
        return out.to(points.device)

    # ------------------------------------------------------------------ optimisation
    def make_optimizer(self, lrs: Mapping[str, float] | None = None,
                       fused: bool = False) -> torch.optim.Adam:
        """Adam with one named param group per parameter key (3DGS: ``lr=0``, ``eps=1e-15``).

        ``lrs`` maps every key of ``params`` to its learning rate (default ``DEFAULT_LRS``);
        the ``means`` rate is meant to follow ``position_lr`` (set it with ``set_group_lr``).
        ``fused``: Adam's fused kernel (one launch per step, no host reads; the CUDA default of
        ``stage1.fused_adam=auto``).
        """
        lrs = dict(DEFAULT_LRS if lrs is None else lrs)
        unknown, missing = set(lrs) - set(PARAM_KEYS), set(PARAM_KEYS) - set(lrs)
        if unknown or missing:
            raise ValueError(f"lrs must give exactly {PARAM_KEYS}; unknown {sorted(unknown)}, "
                             f"missing {sorted(missing)}")
        groups = [{"params": [self.params[k]], "lr": float(lrs[k]), "name": k}
                  for k in PARAM_KEYS]
        return torch.optim.Adam(groups, lr=0.0, eps=1e-15, **({"fused": True} if fused else {}))

    def rotation_matrices(self) -> Tensor:
        """[N, 3, 3] rotation matrices of the Gaussians."""
        return quat_to_rotmat(self.params["quats"])
