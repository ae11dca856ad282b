"""Image metrics used in reports and benchmarks."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def psnr(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """PSNR in dB of images in [0, 1] (any matching shapes); ``mask`` restricts the pixels."""
    diff = (pred.detach().float() - target.detach().float()) ** 2
    if mask is not None:
        mask = mask.detach().float().expand_as(diff)
        mse = float((diff * mask).sum() / mask.sum().clamp_min(1.0))
    else:
        mse = float(diff.mean())
    return float("inf") if mse <= 0 else -10.0 * math.log10(mse)


def mask_iou(pred: torch.Tensor, target: torch.Tensor, threshold: float = 0.5) -> float:
    """Intersection over union of two soft masks thresholded at ``threshold``."""
    a = pred.detach() > threshold
    b = target.detach() > threshold
    union = (a | b).sum().item()
    return 1.0 if union == 0 else (a & b).sum().item() / union


def ssim(pred: torch.Tensor, target: torch.Tensor, window: int = 11, sigma: float = 1.5) -> float:
    """Structural similarity (Wang et al. 2004, Gaussian window) of HWC images in [0, 1]."""
    x = pred.detach().float().permute(2, 0, 1).unsqueeze(0)
    y = target.detach().float().permute(2, 0, 1).unsqueeze(0)
    channels = x.shape[1]
    coords = torch.arange(window, dtype=torch.float32) - (window - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = (g / g.sum()).to(x.device)
    kernel = (g[:, None] * g[None, :]).expand(channels, 1, window, window).contiguous()

    def blur(t):
        return F.conv2d(t, kernel, groups=channels)

    mu_x, mu_y = blur(x), blur(y)
    sxx = blur(x * x) - mu_x**2
    syy = blur(y * y) - mu_y**2
    sxy = blur(x * y) - mu_x * mu_y
    c1, c2 = 0.01**2, 0.03**2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (sxx + syy + c2))
    return float(ssim_map.mean())
