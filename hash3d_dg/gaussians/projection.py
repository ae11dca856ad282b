"""EWA projection of 3D Gaussians to the image plane (pure PyTorch, differentiable).

Conventions (the same as 3DGS and gsplat):

* ``viewmat`` is the world-to-camera 4x4 in the OpenCV convention (x right, y down, z forward),
  ``K`` the 3x3 pixel intrinsics; pixel (u, v) has its centre at (u + 0.5, v + 0.5), so a
  point on the optical axis lands on ``(cx, cy)`` = ``(W/2, H/2)`` for ``Camera.K()``.
* 2D covariance ``J W Sigma W^T J^T + eps2d * I`` with the Jacobian ``J`` of the perspective
  projection evaluated at the mean, whose x/z and y/z are clamped to 1.3x the field of view
  (as 3DGS/gsplat, for stability of Gaussians far outside the image); ``eps2d = 0.3`` px^2 is the
  3DGS low-pass filter.
* Quaternions are (w, x, y, z), normalised here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

ALPHA_THRESHOLD = 1.0 / 255.0
"""Pixels where a Gaussian's alpha falls below this are skipped (3DGS, gsplat)."""


def quat_to_rotmat(quats: Tensor) -> Tensor:
    """Rotation matrices [..., 3, 3] from quaternions [..., 4] (w, x, y, z), normalised first."""
    q = quats / quats.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    w, x, y, z = q.unbind(-1)
    rows = [
        1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
    ]
    return torch.stack(rows, dim=-1).reshape(quats.shape[:-1] + (3, 3))


def covariance_3d(quats: Tensor, scales: Tensor) -> Tensor:
    """World-space covariances [N, 3, 3] = R S S^T R^T from quats [N, 4] and scales [N, 3]."""
    m = quat_to_rotmat(quats) * scales[..., None, :]
    return m @ m.transpose(-1, -2)


def precision_3d(quats: Tensor, scales: Tensor) -> Tensor:
    """Inverse covariances [N, 3, 3] = R S^-2 R^T (exact, no matrix inversion)."""
    m = quat_to_rotmat(quats) / scales[..., None, :]
    return m @ m.transpose(-1, -2)


@dataclass
class Projection:
    """Per-Gaussian screen-space quantities of one camera (N Gaussians).

    Attributes:
        means2d: [N, 2] pixel positions of the means (0 for Gaussians outside the depth range).
        depths: [N] camera-space z of the means.
        cov2d: [N, 3] (xx, xy, yy) of the low-passed 2D covariance.
        conics: [N, 3] (a, b, c) of its inverse: the exponent is
            ``-0.5 * (a dx^2 + c dy^2) - b dx dy``.
        radii: [N] int32 ``ceil(3 * sqrt(max eigenvalue of cov2d))``, 0 where culled (outside
            ``near < z < far`` or a 3-sigma square that misses the image).
        in_depth: [N] bool, ``near < z < far``.
    """

    means2d: Tensor
    depths: Tensor
    cov2d: Tensor
    conics: Tensor
    radii: Tensor
    in_depth: Tensor


def project_gaussians(means: Tensor, quats: Tensor, scales: Tensor, viewmat: Tensor, K: Tensor,
                      width: int, height: int, near: float = 0.01, far: float = 1e10,
                      eps2d: float = 0.3) -> Projection:
    """Project Gaussians (means [N, 3], quats [N, 4], activated scales [N, 3]) into one camera.

    ``viewmat`` [4, 4] world-to-camera (OpenCV), ``K`` [3, 3]. Differentiable w.r.t. means,
    quats and scales; matches ``gsplat.cuda._torch_impl._fully_fused_projection`` for means2d,
    depths and conics (its radii are per-axis 3.33 sigma; ours are 3 sigma of the major axis).
    """
    rot, trans = viewmat[:3, :3], viewmat[:3, 3]
    pts = means @ rot.T + trans
    x, y, z = pts.unbind(-1)
    in_depth = (z > near) & (z < far)
    one = torch.ones_like(z)
    zs = torch.where(in_depth, z, one)
    xs = torch.where(in_depth, x, torch.zeros_like(x))
    ys = torch.where(in_depth, y, torch.zeros_like(y))

    cov_cam = rot @ covariance_3d(quats, scales) @ rot.T  # [N, 3, 3]

    fx, fy, cx, cy = K[0, 0], K[1, 1], K[0, 2], K[1, 2]
    tan_fovx, tan_fovy = 0.5 * width / fx, 0.5 * height / fy
    lim_x_pos, lim_x_neg = (width - cx) / fx + 0.3 * tan_fovx, cx / fx + 0.3 * tan_fovx
    lim_y_pos, lim_y_neg = (height - cy) / fy + 0.3 * tan_fovy, cy / fy + 0.3 * tan_fovy
    txc = zs * torch.clamp(xs / zs, -lim_x_neg, lim_x_pos)
    tyc = zs * torch.clamp(ys / zs, -lim_y_neg, lim_y_pos)

    zero = torch.zeros_like(zs)
    j0 = torch.stack([fx / zs, zero, -fx * txc / zs**2], dim=-1)  # [N, 3]
    j1 = torch.stack([zero, fy / zs, -fy * tyc / zs**2], dim=-1)
    cj0 = (cov_cam @ j0[..., None])[..., 0]
    cj1 = (cov_cam @ j1[..., None])[..., 0]
    a = (j0 * cj0).sum(-1) + eps2d
    b = (j0 * cj1).sum(-1)
    c = (j1 * cj1).sum(-1) + eps2d
    det = (a * c - b * b).clamp_min(1e-10)
    conics = torch.stack([c / det, -b / det, a / det], dim=-1)

    u = fx * xs / zs + K[0, 1] * ys / zs + cx
    v = fy * ys / zs + cy
    means2d = torch.where(in_depth[:, None], torch.stack([u, v], dim=-1),
                          torch.zeros_like(pts[:, :2]))

    with torch.no_grad():
        mid = 0.5 * (a + c)
        lam_max = mid + torch.sqrt((mid * mid - det).clamp_min(0.0))
        radius = torch.ceil(3.0 * torch.sqrt(lam_max))
        visible = (in_depth & (u + radius > 0) & (u - radius < width)
                   & (v + radius > 0) & (v - radius < height))
        radii = torch.where(visible, radius, torch.zeros_like(radius)).to(torch.int32)
    return Projection(means2d=means2d, depths=z, cov2d=torch.stack([a, b, c], dim=-1),
                      conics=conics, radii=radii, in_depth=in_depth)
