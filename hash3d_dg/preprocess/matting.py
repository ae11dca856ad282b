"""Background removal: rembg's segmentation model or a border-colour estimate."""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
from collections.abc import Iterator
from typing import Any

import numpy as np
from PIL import Image

from hash3d_dg.errors import ConfigError, InputError
from hash3d_dg.preprocess.io import REMBG_ERROR

logger = logging.getLogger(__name__)

def _to_uint8(array: np.ndarray) -> np.ndarray:
    return np.round(np.clip(array, 0.0, 1.0) * 255.0).astype(np.uint8)


@functools.lru_cache(maxsize=2)
def _rembg_session(model_name: str | None) -> Any:
    """Load (once per process and model) a rembg session; imports rembg on first call."""
    import rembg  # noqa: PLC0415 - deliberately lazy: slow import, downloads on first use

    return rembg.new_session() if model_name is None else rembg.new_session(model_name)


@contextlib.contextmanager
def _quiet_downloader() -> Iterator[None]:
    """Hide pooch's "Downloading data from ..." log line unless this module logs at INFO.

    rembg downloads its model with pooch, whose logger prints to stderr on its own; offline that
    line would precede the one-line error. Its progress bar (a real download) still shows.
    """
    if logger.isEnabledFor(logging.INFO) or importlib.util.find_spec("pooch") is None:
        yield
        return
    import pooch  # noqa: PLC0415 - rembg imports it anyway

    pooch_logger = pooch.get_logger()
    level = pooch_logger.level
    pooch_logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        pooch_logger.setLevel(level)


def _rembg_alpha(rgb: np.ndarray, model_name: str | None) -> np.ndarray:
    if importlib.util.find_spec("onnxruntime") is None:
        # Without onnxruntime, `import rembg` prints a hint and exits the interpreter.
        raise InputError(f"{REMBG_ERROR} [cause: onnxruntime is not installed]")
    try:
        logger.info("removing the background with rembg (its first use loads a model: can take a minute)")
        with _quiet_downloader():
            session = _rembg_session(model_name)
            import rembg  # noqa: PLC0415

            mask = rembg.remove(Image.fromarray(_to_uint8(rgb)), session=session, only_mask=True)
    except (Exception, SystemExit) as error:  # rembg can also exit the interpreter on import
        raise InputError(f"{REMBG_ERROR} [cause: {type(error).__name__}]") from error
    alpha = np.asarray(mask.convert("L"), dtype=np.float32) / 255.0
    if alpha.shape != rgb.shape[:2]:
        alpha = np.asarray(
            Image.fromarray(alpha).resize((rgb.shape[1], rgb.shape[0]), Image.Resampling.BILINEAR),
            dtype=np.float32,
        )
    return alpha


def _border_alpha(rgb: np.ndarray) -> np.ndarray:
    """Alpha for an object on a plain background, from the colour distance to the border colour."""
    from scipy import ndimage  # noqa: PLC0415 - only this method needs scipy

    height, width = rgb.shape[:2]
    band = max(1, round(0.02 * min(height, width)))
    border = np.concatenate(
        [
            rgb[:band].reshape(-1, 3),
            rgb[-band:].reshape(-1, 3),
            rgb[band:-band, :band].reshape(-1, 3),
            rgb[band:-band, -band:].reshape(-1, 3),
        ]
    )
    background = np.median(border, axis=0)
    distance = np.linalg.norm(rgb - background, axis=-1)
    border_distance = np.linalg.norm(border - background, axis=-1)
    # Robust noise level of the background (median + 5 MADs), so objects touching the border
    # do not inflate it; the soft threshold ramps from there over 0.1 (in RGB units).
    median = float(np.median(border_distance))
    mad = float(np.median(np.abs(border_distance - median)))
    low = float(np.clip(median + 5.0 * 1.4826 * mad, 0.04, 0.4))
    high = low + 0.1
    ramp = np.clip((distance - low) / (high - low), 0.0, 1.0)
    alpha = ramp * ramp * (3.0 - 2.0 * ramp)  # smoothstep

    core = alpha > 0.5
    eight = np.ones((3, 3), dtype=bool)
    labels, count = ndimage.label(core, structure=eight)
    if count == 0:
        return np.zeros((height, width), dtype=np.float32)
    sizes = ndimage.sum_labels(core, labels, index=np.arange(1, count + 1))
    largest = labels == (int(np.argmax(sizes)) + 1)

    # Fill small interior holes (object colours close to the background's), keep large ones
    # (real openings such as a handle's loop).
    holes = ndimage.binary_fill_holes(largest) & ~largest
    hole_labels, hole_count = ndimage.label(holes)
    if hole_count:
        hole_sizes = ndimage.sum_labels(holes, hole_labels, index=np.arange(1, hole_count + 1))
        small = np.flatnonzero(hole_sizes < 0.01 * largest.sum()) + 1
        small_holes = np.isin(hole_labels, small)
    else:
        small_holes = np.zeros_like(largest)
    solid = largest | small_holes
    support = ndimage.binary_dilation(solid, structure=eight, iterations=2)
    alpha = np.where(support, alpha, 0.0)
    alpha[small_holes] = 1.0
    alpha = ndimage.gaussian_filter(alpha, sigma=0.5)  # light feathering
    alpha[alpha < 2.0 / 255.0] = 0.0  # cut the feather's far tail (it would widen the bbox)
    return np.clip(alpha, 0.0, 1.0).astype(np.float32)


def remove_background(rgb: np.ndarray, method: str = "rembg", rembg_model: str | None = None) -> np.ndarray:
    """Estimate the object's alpha matte from a colour image.

    Args:
        rgb: [H, W, 3] float in [0, 1] (a 4th channel, if present, is ignored).
        method: ``"rembg"`` (segmentation model; imported lazily) or ``"border"`` (plain
            background: colour distance to the median border colour, largest connected
            component, light feathering).
        rembg_model: rembg model name; ``None`` uses rembg's default.

    Returns:
        alpha: [H, W] float32 in [0, 1].

    Raises:
        InputError: rembg or its model cannot be loaded (e.g. offline).
        ConfigError: unknown method.
    """
    rgb = np.asarray(rgb, dtype=np.float32)
    if rgb.ndim != 3 or rgb.shape[2] not in (3, 4):
        raise ValueError(f"expected an [H, W, 3] image, got shape {rgb.shape}")
    rgb = rgb[..., :3]
    if method == "rembg":
        return _rembg_alpha(rgb, rembg_model)
    if method == "border":
        return _border_alpha(rgb)
    raise ConfigError(f"unknown background removal method {method!r}: use 'rembg' or 'border'")


