"""Input images: loading, background removal (matting), re-centring on a square canvas.

The first step of the pipeline: a photo of an object becomes a ``size x size`` RGBA image whose
alpha marks the object, with the object's bounding box centred and its longer side filling
``fill`` (80%) of the canvas, as DreamGaussian and Zero-1-to-3 expect. Stage 1 matches the
reference view against :func:`composite_white` of that image plus its alpha as the mask.

Matting methods:

* ``alpha``: the image's own alpha channel (kept whenever it has real transparency);
* ``rembg``: the rembg segmentation model (imported lazily: slow first import, and it downloads
  its model on first use);
* ``border``: a fallback for photos on a plain background, estimated from the border colour.

Command line::

    python -m hash3d_dg.preprocess IMAGE_OR_DIR [--size 256] [--matting auto|alpha|rembg|border]
                                                [--fill 0.8] [--output DIR]

writes ``<stem>_rgba.png`` (8-bit RGBA) for each input image.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import io
import logging
import math
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from hash3d_dg.atomic import save_image_atomic
from hash3d_dg.errors import ConfigError, InputError, UserError

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".tif", ".tiff", ".bmp")
MATTING_METHODS: tuple[str, ...] = ("auto", "alpha", "rembg", "border")
MIN_SIDE = 16
# Alpha values at or below this count as transparent (half of one 8-bit step).
VISIBLE_ALPHA = 0.5 / 255.0
REMBG_ERROR = (
    "background removal needs rembg's model, which could not be loaded (offline?): "
    "supply an RGBA image with transparency, or use --matting border"
)


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


def _pixels_to_array(image: Image.Image, path: Path) -> np.ndarray:
    """Decoded PIL image -> float32 [H, W, 3] or [H, W, 4] in [0, 1] (grey is replicated)."""
    mode = image.mode
    has_key = "transparency" in image.info
    if mode == "PA" or (mode == "P" and has_key):
        image = image.convert("RGBA")
    elif mode == "P":
        image = image.convert("RGB")
    elif mode == "1":
        image = image.convert("L")
    elif mode == "La":
        image = image.convert("LA")
    elif mode == "RGBa":
        image = image.convert("RGBA")
    elif mode in ("RGBX", "CMYK", "YCbCr", "LAB", "HSV"):
        image = image.convert("RGB")
    elif mode in ("L", "RGB") and has_key:  # PNG colour-key transparency (tRNS)
        image = image.convert("LA" if mode == "L" else "RGBA")
    mode = image.mode

    if mode in ("RGB", "RGBA"):
        return np.asarray(image, dtype=np.float32) / 255.0
    if mode == "L":
        grey = np.asarray(image, dtype=np.float32) / 255.0
        return np.repeat(grey[..., None], 3, axis=2)
    if mode == "LA":
        grey_alpha = np.asarray(image, dtype=np.float32) / 255.0
        grey = grey_alpha[..., :1]
        return np.concatenate([grey, grey, grey, grey_alpha[..., 1:]], axis=2)
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        values = np.asarray(image)
        if mode == "I" and (values.min() < 0 or values.max() > 65535):
            raise InputError(
                f"{path} has 32-bit integer pixels outside the 16-bit range: "
                "save it as an 8- or 16-bit PNG"
            )
        grey = values.astype(np.float32) / 65535.0
        return np.repeat(grey[..., None], 3, axis=2)
    raise InputError(
        f"{path} has an unsupported pixel format ({mode}): save it as an 8-bit RGB or RGBA PNG"
    )


_SRGB_PROFILE = None


def _srgb_profile():
    global _SRGB_PROFILE  # noqa: PLW0603 - a constant built once (ImageCms profiles are immutable)
    if _SRGB_PROFILE is None:
        from PIL import ImageCms  # noqa: PLC0415 - only images with an ICC profile need it

        _SRGB_PROFILE = ImageCms.createProfile("sRGB")
    return _SRGB_PROFILE


def _convert_to_srgb(image: Image.Image, icc: bytes | None, path: Path) -> Image.Image:
    """Colours of an image with an embedded ICC profile, converted to sRGB (alpha kept).

    Palette images are expanded first (their palette is in the profile's space); CMYK goes
    through the profile rather than Pillow's naive formula. A profile that cannot be read or does
    not fit the pixels is ignored with a log line (the pixels are then taken as sRGB).
    """
    if not icc or image.mode not in ("RGB", "RGBA", "CMYK", "L", "LA", "P", "PA"):
        return image
    from PIL import ImageCms  # noqa: PLC0415

    if image.mode in ("P", "PA"):
        image = image.convert("RGBA" if image.mode == "PA" or "transparency" in image.info else "RGB")
    alpha = image.getchannel("A") if image.mode in ("RGBA", "LA") else None
    colour = image.convert({"RGBA": "RGB", "LA": "L"}.get(image.mode, image.mode))
    try:
        source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        if "srgb" in (ImageCms.getProfileDescription(source) or "").lower() and colour.mode == "RGB":
            return image  # already sRGB: nothing to do
        converted = ImageCms.profileToProfile(colour, source, _srgb_profile(), outputMode="RGB",
                                              renderingIntent=ImageCms.Intent.PERCEPTUAL)
    except (OSError, ValueError, ImageCms.PyCMSError) as error:
        logger.info("%s: its ICC profile cannot be applied (%s); taking the colours as sRGB",
                    path, str(error).splitlines()[0] if str(error) else type(error).__name__)
        return image
    if alpha is not None:
        converted.putalpha(alpha)
    return converted


# Longest side an input is decoded at: enough for any ref_size recentring, and bounded memory
# however large the photo (a 50-megapixel JPEG is decoded at 1/2-1/8 scale).
DEFAULT_MAX_SIDE = 2048


def load_image(path: str | os.PathLike[str], max_side: int | None = None) -> np.ndarray:
    """Read an image file into a float array.

    Accepts PNG, JPEG, WebP, GIF, TIFF, BMP (anything Pillow decodes): RGB or RGBA, 8 or 16 bit,
    greyscale with or without alpha, palette with or without transparency, CMYK and YCbCr.
    EXIF orientation is applied, an embedded ICC profile is converted to sRGB, and an animated
    image gives its first frame (said in one log line). With ``max_side``, an image whose longer
    side exceeds it is downscaled while decoding (JPEG at a reduced DCT scale, then Lanczos), so
    a huge photo never exists as a full-size float array.

    Returns:
        float32 [H, W, 3] (no alpha channel in the file) or [H, W, 4] (alpha last), in [0, 1],
        straight (not premultiplied) colour.

    Raises:
        InputError: missing file, a folder, not an image, truncated or corrupt data, an image
            smaller than 16 px on a side, or an unsupported pixel format.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"input image not found: {path} (check the path)")
    if path.is_dir():
        raise InputError(f"{path} is a folder, not an image: pass an image file (PNG, JPEG or WebP)")
    try:
        with Image.open(path) as image:
            original_size = image.size
            frames = int(getattr(image, "n_frames", 1) or 1)
            icc = image.info.get("icc_profile")
            if max_side is not None and max(image.size) > max_side:
                # In place; draws on JPEG's draft mode, so the full-size pixels are never decoded.
                image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
                logger.info("%s: %dx%d px, downscaled to %dx%d while loading", path, *original_size,
                            *image.size)
            image.load()  # force the full decode so truncated files fail here
            image = ImageOps.exif_transpose(image)
            image.load()
            image = _convert_to_srgb(image, icc, path)
    except UnidentifiedImageError:
        raise InputError(f"{path} is not an image that can be read: pass a PNG, JPEG or WebP file") from None
    except PermissionError:
        raise InputError(f"{path} cannot be read (permission denied): check the file's permissions") from None
    except Image.DecompressionBombError as error:
        raise InputError(f"{path} is too large to load safely ({error}): downscale it first") from None
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        raise InputError(
            f"{path} is truncated or corrupt ({error}): re-export or re-download the image"
        ) from None

    if frames > 1:
        logger.info("%s is animated (%d frames): using its first frame", path, frames)
    width, height = original_size
    if min(width, height) < MIN_SIDE:
        raise InputError(
            f"{path} is too small ({width}x{height} px): use an image at least {MIN_SIDE} px on "
            "each side (256 px or more works best)"
        )
    return _pixels_to_array(image, path)


# --------------------------------------------------------------------------------------------
# Background removal


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


def find_images(path_or_dir: str | os.PathLike[str]) -> list[Path]:
    """Images to process: a file gives ``[file]``; a folder gives its images, sorted by name.

    A folder is listed non-recursively; files with suffix .png/.jpg/.jpeg/.webp (any case) are
    taken, hidden files (names starting with '.') are skipped.

    Raises:
        InputError: the path does not exist, or the folder holds no images.
    """
    path = Path(path_or_dir)
    if path.is_dir():
        images = sorted(
            entry
            for entry in path.iterdir()
            if entry.is_file() and entry.suffix.lower() in IMAGE_SUFFIXES and not entry.name.startswith(".")
        )
        if not images:
            raise InputError(f"no images (PNG, JPEG or WebP) in folder {path}: pass an image or a folder of images")
        return images
    if not path.exists():
        raise InputError(f"input image not found: {path} (check the path)")
    return [path]


def output_path(source: Path, output_dir: Path | None) -> Path:
    """Where the CLI writes a source image's result: ``<output_dir or its folder>/<name>_rgba.png``,
    ``name`` being the stem without a trailing ``_rgba``."""
    folder = output_dir if output_dir is not None else source.parent
    name = source.stem.removesuffix("_rgba") or source.stem  # cat_rgba.png -> cat_rgba.png, not cat_rgba_rgba.png
    target = folder / f"{name}_rgba.png"
    if target.resolve() == source.resolve():  # never overwrite the input itself
        target = folder / f"{source.stem}_rgba.png"
    return target


def _skip_previous_outputs(images: list[Path], output_dir: Path | None) -> tuple[list[Path], list[Path]]:
    """Split off ``<stem>_rgba.png`` files that are this tool's own earlier outputs.

    Only when the results go to the images' own folder: a file ``x_rgba.png`` is skipped when an
    image ``x.<ext>`` is in the same list (it is that image's earlier result).
    """
    stems = {image.stem for image in images}
    keep: list[Path] = []
    skipped: list[Path] = []
    for image in images:
        same_folder = output_dir is None or output_dir.resolve() == image.parent.resolve()
        if same_folder and image.name.endswith("_rgba.png") and image.name[: -len("_rgba.png")] in stems:
            skipped.append(image)
        else:
            keep.append(image)
    return keep, skipped


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m hash3d_dg.preprocess",
        description="Cut out and centre the object of each image; writes <stem>_rgba.png (8-bit RGBA).",
    )
    parser.add_argument("image", metavar="IMAGE_OR_DIR", help="an image file or a folder of images")
    parser.add_argument("--size", type=int, default=256, help="output side in pixels (default 256)")
    parser.add_argument("--matting", choices=MATTING_METHODS, default="auto", help="how to find the object (default auto)")
    parser.add_argument("--fill", type=float, default=0.8, help="fraction of the canvas the object spans (default 0.8)")
    parser.add_argument("--output", type=Path, default=None, metavar="DIR", help="output folder (default: next to each image)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress on stderr")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (0 ok, 2 if any image failed)."""
    args = _build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        if args.size < MIN_SIDE:
            raise ConfigError(f"--size must be at least {MIN_SIDE}, got {args.size}")
        if not 0.0 < args.fill <= 1.0:
            raise ConfigError(f"--fill must be in (0, 1], got {args.fill}")
        if args.output is not None and args.output.exists() and not args.output.is_dir():
            raise ConfigError(f"--output {args.output} is a file, not a folder: pass a folder")
        images = find_images(args.image)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    images, skipped = _skip_previous_outputs(images, args.output)
    for image in skipped:
        print(f"{image}: skipped (an earlier result of this tool)")
    failures = 0
    for image in images:
        target = output_path(image, args.output)
        try:
            prepared = prepare_image(image, size=args.size, matting=args.matting, fill=args.fill)
            try:
                save_image_atomic(target, prepared.rgba)
            except OSError as error:
                raise InputError(f"cannot write {target}: {error.strerror or error}") from None
        except UserError as error:
            failures += 1
            print(f"error: {error}", file=sys.stderr)
            continue
        print(f"{image} -> {target} (matting: {prepared.matting}, {args.size}x{args.size})")
    return 2 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
