"""Loading input images: decode, orientation, colour (ICC to sRGB), bounded size; the
constants every preprocessing step shares."""

from __future__ import annotations

import io
import logging
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from hash3d_dg.errors import InputError


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


