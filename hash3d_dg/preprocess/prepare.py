"""The whole preprocessing step: load -> matting -> re-centre."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hash3d_dg.errors import ConfigError, InputError
from hash3d_dg.preprocess.framing import composite_white, recentre
from hash3d_dg.preprocess.io import DEFAULT_MAX_SIDE, MATTING_METHODS, MIN_SIDE, VISIBLE_ALPHA, load_image
from hash3d_dg.preprocess.matting import remove_background

logger = logging.getLogger(__name__)


@dataclass
class PreparedImage:
    """A preprocessed input image.

    Attributes:
        rgba: [size, size, 4] float32 in [0, 1]; straight (not premultiplied) RGB, alpha = mask.
        name: the source file's stem (used to name outputs).
        source: the source file.
        had_alpha: whether the source file had an alpha channel (opaque or not).
        matting: the method that produced the alpha: ``"alpha"``, ``"rembg"`` or ``"border"``.
    """

    rgba: np.ndarray
    name: str
    source: Path
    had_alpha: bool
    matting: str


# --------------------------------------------------------------------------------------------
# Loading


# --------------------------------------------------------------------------------------------
# The whole step


def prepare_image(
    path: str | os.PathLike[str],
    size: int = 256,
    matting: str = "auto",
    fill: float = 0.8,
) -> PreparedImage:
    """Load an image, find the object's alpha, and centre it on a ``size x size`` canvas.

    Args:
        path: image file.
        size: output side in pixels.
        matting: ``"auto"`` (the image's alpha if it has real transparency, else rembg),
            ``"alpha"`` (require such an alpha channel), ``"rembg"`` or ``"border"`` (force
            that method, ignoring any alpha channel).
        fill: fraction of the canvas the object's longer side spans.

    Raises:
        InputError: unreadable image, no usable alpha for ``"alpha"``, rembg unavailable, or no
            visible object.
        ConfigError: unknown matting method, bad size or fill.
    """
    if matting not in MATTING_METHODS:
        raise ConfigError(f"unknown matting method {matting!r}: use one of {', '.join(MATTING_METHODS)}")
    if size < MIN_SIDE:
        raise ConfigError(f"size must be at least {MIN_SIDE} px, got {size}")
    if not 0.0 < fill <= 1.0:
        raise ConfigError(f"fill must be in (0, 1], got {fill}")
    path = Path(path)
    pixels = load_image(path, max_side=max(DEFAULT_MAX_SIDE, 4 * size))
    had_alpha = pixels.shape[2] == 4
    alpha = pixels[..., 3] if had_alpha else None
    has_transparency = alpha is not None and float(alpha.min()) < 1.0

    if had_alpha and float(alpha.max()) <= VISIBLE_ALPHA and matting in ("auto", "alpha"):
        raise InputError(
            f"{path} has no visible object: its alpha channel is fully transparent; "
            "supply an image whose alpha marks the object"
        )
    if matting == "alpha" and not has_transparency:
        what = "no alpha channel" if not had_alpha else "a fully opaque alpha channel"
        raise InputError(
            f"{path} has {what}, so --matting alpha cannot be used: supply an RGBA image with "
            "transparency, or use --matting rembg or --matting border"
        )

    method = matting
    if matting == "auto":
        method = "alpha" if has_transparency else "rembg"
    if method == "alpha":
        rgba = pixels
    else:
        rgb = composite_white(pixels) if had_alpha else pixels
        rgba = np.concatenate([rgb, remove_background(rgb, method)[..., None]], axis=2)
        if float(rgba[..., 3].max()) <= VISIBLE_ALPHA:
            raise InputError(
                f"{path} has no visible object: {method} matting found no foreground; supply an "
                "RGBA image with transparency" + (", or use --matting rembg" if method == "border" else "")
            )
    try:
        centred = recentre(rgba, size=size, fill=fill)
    except InputError as error:
        raise InputError(f"{path}: {error}") from None
    return PreparedImage(rgba=centred, name=path.stem, source=path, had_alpha=had_alpha, matting=method)


