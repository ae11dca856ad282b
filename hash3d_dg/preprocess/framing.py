"""Re-centring the object on a square canvas and compositing over white."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from hash3d_dg.errors import ConfigError, InputError
from hash3d_dg.preprocess.io import VISIBLE_ALPHA

# --------------------------------------------------------------------------------------------
# Re-centring and compositing


def _resample_channel(
    channel: np.ndarray,
    box: tuple[float, float, float, float],
    size: int,
    resample: Image.Resampling = Image.Resampling.LANCZOS,
) -> np.ndarray:
    """Resample the ``box`` region (continuous pixel coordinates) of a [H, W] channel to [size, size]."""
    image = Image.fromarray(np.ascontiguousarray(channel, dtype=np.float32))
    return np.asarray(image.resize((size, size), resample, box=box), dtype=np.float32)


def recentre(rgba: np.ndarray, size: int = 256, fill: float = 0.8) -> np.ndarray:
    """Centre the object on a transparent square canvas.

    The visible pixels' bounding box (alpha > half an 8-bit step) is centred exactly (sub-pixel)
    on the canvas and scaled so that its longer side spans ``fill * size`` pixels. Resampling is
    Lanczos on premultiplied colour, so transparent pixels' colour never bleeds into the edges.
    Lanczos ringing is cut outside the object's footprint (the pixels a bilinear resampling of
    the visible mask reaches), so no faint halo widens the bounding box: re-centring a re-centred
    image keeps it in place.

    Args:
        rgba: [H, W, 4] float in [0, 1], straight colour.
        size: canvas side in pixels.
        fill: fraction of the canvas the bounding box's longer side spans, in (0, 1].

    Returns:
        [size, size, 4] float32 in [0, 1], straight colour (0 where alpha is 0).

    Raises:
        InputError: the alpha channel is fully transparent.
    """
    rgba = np.asarray(rgba, dtype=np.float32)
    if rgba.ndim != 3 or rgba.shape[2] != 4:
        raise ValueError(f"expected an [H, W, 4] image, got shape {rgba.shape}")
    if not 0.0 < fill <= 1.0:
        raise ConfigError(f"fill must be in (0, 1], got {fill}")
    if size < 1:
        raise ConfigError(f"size must be positive, got {size}")
    alpha = np.clip(rgba[..., 3], 0.0, 1.0)
    visible = alpha > VISIBLE_ALPHA
    if not visible.any():
        raise InputError("the image has no visible object: its alpha channel is fully transparent")
    rows = np.flatnonzero(visible.any(axis=1))
    cols = np.flatnonzero(visible.any(axis=0))
    y0, y1 = int(rows[0]), int(rows[-1]) + 1
    x0, x1 = int(cols[0]), int(cols[-1]) + 1

    # Source square (continuous pixel coordinates) that maps onto the whole canvas.
    half = max(y1 - y0, x1 - x0) / (2.0 * fill)
    left, top = (x0 + x1) / 2.0 - half, (y0 + y1) / 2.0 - half
    ix0, iy0 = math.floor(left), math.floor(top)
    ix1, iy1 = math.ceil(left + 2.0 * half), math.ceil(top + 2.0 * half)

    premultiplied = np.concatenate([rgba[..., :3] * alpha[..., None], alpha[..., None]], axis=2)
    height, width = alpha.shape
    padded = np.zeros((iy1 - iy0, ix1 - ix0, 4), dtype=np.float32)
    sy0, sy1 = max(iy0, 0), min(iy1, height)
    sx0, sx1 = max(ix0, 0), min(ix1, width)
    padded[sy0 - iy0 : sy1 - iy0, sx0 - ix0 : sx1 - ix0] = premultiplied[sy0:sy1, sx0:sx1]

    box = (left - ix0, top - iy0, left - ix0 + 2.0 * half, top - iy0 + 2.0 * half)
    out = np.stack([_resample_channel(padded[..., c], box, size) for c in range(4)], axis=2)
    footprint = _resample_channel(
        (padded[..., 3] > VISIBLE_ALPHA).astype(np.float32), box, size, Image.Resampling.BILINEAR
    )
    out[footprint <= 0.0] = 0.0

    # Un-premultiply by the resampled alpha *before* clipping it: ringing scales colour and alpha
    # alike, so a uniformly coloured object keeps its exact colour up to its edges.
    raw_alpha = out[..., 3:4]
    out_alpha = np.clip(out[..., 3], 0.0, 1.0)
    out_alpha[out_alpha <= VISIBLE_ALPHA] = 0.0  # ringing below half an 8-bit step
    straight = np.divide(out[..., :3], raw_alpha, out=np.zeros_like(out[..., :3]), where=out_alpha[..., None] > 0)
    return np.concatenate([np.clip(straight, 0.0, 1.0), out_alpha[..., None]], axis=2).astype(np.float32)


def composite_white(rgba: np.ndarray) -> np.ndarray:
    """RGB over a white background.

    Args:
        rgba: [H, W, 4] float in [0, 1], straight colour.

    Returns:
        [H, W, 3] float32: ``rgb * alpha + (1 - alpha)``.
    """
    rgba = np.asarray(rgba, dtype=np.float32)
    if rgba.ndim != 3 or rgba.shape[2] != 4:
        raise ValueError(f"expected an [H, W, 4] image, got shape {rgba.shape}")
    alpha = rgba[..., 3:4]
    return (rgba[..., :3] * alpha + (1.0 - alpha)).astype(np.float32)

