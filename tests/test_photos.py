"""Photos as they come: every variant is an image the test makes itself, loaded through the same
``load_image`` / ``prepare_image`` the product uses."""

import io
import json
import logging
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageCms, ImageDraw

from hash3d_dg.preprocess import VISIBLE_ALPHA, find_images, load_image, prepare_image

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ encodings

def test_cmyk_jpeg(tmp_path):
    Image.new("CMYK", (40, 30), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg", quality=95)  # pure red
    pixels = load_image(tmp_path / "cmyk.jpg")
    assert pixels.shape == (30, 40, 3)
    np.testing.assert_allclose(pixels.mean(axis=(0, 1)), [1.0, 0.0, 0.0], atol=0.03)


def test_ycbcr_jpeg(tmp_path):
    Image.new("RGB", (40, 30), (200, 30, 60)).convert("YCbCr").save(tmp_path / "ycc.jpg", quality=95)
    pixels = load_image(tmp_path / "ycc.jpg")
    np.testing.assert_allclose(pixels.mean(axis=(0, 1)) * 255, [200, 30, 60], atol=3)


def _png16_rgba(array: np.ndarray) -> bytes:
    """A 16-bit RGBA PNG written by hand (Pillow writes no 16-bit colour PNGs)."""
    height, width, _ = array.shape
    raw = b"".join(b"\x00" + array[y].astype(">u2").tobytes() for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 16, 6, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def test_16bit_rgba_png(tmp_path):
    array = np.zeros((32, 48, 4), np.uint16)
    array[8:24, 12:36] = [65535, 32768, 0, 65535]  # an opaque orange box on transparency
    (tmp_path / "rgba16.png").write_bytes(_png16_rgba(array))
    pixels = load_image(tmp_path / "rgba16.png")
    assert pixels.shape == (32, 48, 4)
    np.testing.assert_allclose(pixels[16, 24], [1.0, 0.5, 0.0, 1.0], atol=1 / 255)
    assert pixels[0, 0, 3] == 0.0
    prepared = prepare_image(tmp_path / "rgba16.png", size=64)
    assert prepared.matting == "alpha"


def test_grey_alpha_and_palette_transparency_prepare(tmp_path):
    la = Image.new("LA", (60, 40), (0, 0))
    ImageDraw.Draw(la).rectangle([10, 10, 30, 30], fill=(180, 255))
    la.save(tmp_path / "la.png")
    pal = Image.new("P", (60, 40), 0)
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    ImageDraw.Draw(pal).ellipse([5, 5, 35, 35], fill=1)
    pal.save(tmp_path / "pal.png", transparency=0)
    for name, colour in (("la.png", [180 / 255] * 3), ("pal.png", [1.0, 0.0, 0.0])):
        prepared = prepare_image(tmp_path / name, size=32)
        assert prepared.matting == "alpha" and prepared.had_alpha
        opaque = prepared.rgba[..., 3] > 0.99
        np.testing.assert_allclose(prepared.rgba[opaque][:, :3].mean(0), colour, atol=0.02)


# ------------------------------------------------------------------ ICC profiles

def _s15(x: float) -> bytes:
    return struct.pack(">i", round(x * 65536))


def _xyz_tag(xyz) -> bytes:
    return b"XYZ " + b"\0" * 4 + b"".join(_s15(v) for v in xyz)


def _rgb_profile(red, green, blue, description: str) -> bytes:
    """A minimal ICC v2 matrix/TRC display profile with linear tone curves and the given
    (D50-adapted) XYZ primaries."""
    text = description.encode("ascii") + b"\0"
    desc = (b"desc" + b"\0" * 4 + struct.pack(">I", len(text)) + text + b"\0" * 8 + b"\0" * 3 + b"\0" * 67)
    linear = b"curv" + b"\0" * 4 + struct.pack(">I", 0)  # no entries: identity
    tags = [(b"desc", desc), (b"wtpt", _xyz_tag((0.9642, 1.0, 0.8249))), (b"rXYZ", _xyz_tag(red)),
            (b"gXYZ", _xyz_tag(green)), (b"bXYZ", _xyz_tag(blue)), (b"rTRC", linear),
            (b"gTRC", linear), (b"bTRC", linear), (b"cprt", b"text" + b"\0" * 4 + b"none\0")]
    offset = 128 + 4 + 12 * len(tags)
    table, data = struct.pack(">I", len(tags)), b""
    for sig, body in tags:
        body += b"\0" * (-len(body) % 4)
        table += sig + struct.pack(">II", offset + len(data), len(body))
        data += body
    size = offset + len(data)
    header = (struct.pack(">I", size) + b"\0" * 4 + struct.pack(">I", 0x02100000) + b"mntrRGB XYZ "
              + b"\0" * 12 + b"acsp" + b"\0" * 24 + struct.pack(">I", 0)
              + _s15(0.9642) + _s15(1.0) + _s15(0.8249) + b"\0" * 48)
    assert len(header) == 128
    return header + table + data


SRGB_D50 = {"r": (0.4361, 0.2225, 0.0139), "g": (0.3851, 0.7169, 0.0971), "b": (0.1431, 0.0606, 0.7141)}


def test_icc_profile_is_converted_to_srgb(tmp_path):
    # A profile whose red channel is sRGB's green, green is blue and blue is red, with linear
    # tone curves: pure primaries come out permuted, and 50 % grey becomes sRGB's encoding of
    # linear 0.5 (0.7354), both independent of any colour library.
    icc = _rgb_profile(SRGB_D50["g"], SRGB_D50["b"], SRGB_D50["r"], "permuted linear test profile")
    image = Image.new("RGBA", (64, 16))
    for x, value in enumerate([(255, 0, 0, 255), (0, 255, 0, 255), (0, 0, 255, 255), (128, 128, 128, 100)]):
        ImageDraw.Draw(image).rectangle([16 * x, 0, 16 * x + 15, 15], fill=value)
    image.save(tmp_path / "icc.png", icc_profile=icc)
    pixels = load_image(tmp_path / "icc.png")[8, 8::16]
    np.testing.assert_allclose(pixels[0, :3], [0, 1, 0], atol=0.03)
    np.testing.assert_allclose(pixels[1, :3], [0, 0, 1], atol=0.03)
    np.testing.assert_allclose(pixels[2, :3], [1, 0, 0], atol=0.03)
    srgb_half = 1.055 * (128 / 255) ** (1 / 2.4) - 0.055
    np.testing.assert_allclose(pixels[3, :3], [srgb_half] * 3, atol=0.02)
    assert pixels[3, 3] == pytest.approx(100 / 255)  # alpha is not colour-managed


def test_srgb_profile_leaves_pixels_alone(tmp_path):
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    values = np.random.default_rng(0).integers(0, 256, (20, 20, 3), dtype=np.uint8)
    Image.fromarray(values).save(tmp_path / "srgb.png", icc_profile=srgb)
    np.testing.assert_array_equal(np.round(load_image(tmp_path / "srgb.png") * 255), values)


# ------------------------------------------------------------------ animations

@pytest.mark.parametrize("suffix, options", [(".gif", {}), (".webp", {"lossless": True}), (".png", {})])
def test_animated_image_gives_its_first_frame(tmp_path, caplog, suffix, options):
    frames = [Image.new("RGB", (32, 32), colour) for colour in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    path = tmp_path / f"anim{suffix}"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0, **options)
    with caplog.at_level(logging.INFO, logger="hash3d_dg.preprocess"):
        pixels = load_image(path)
    np.testing.assert_allclose(pixels[..., :3].mean(axis=(0, 1)), [1, 0, 0], atol=0.02)
    lines = [r.getMessage() for r in caplog.records if "animated" in r.getMessage()]
    assert len(lines) == 1 and "3 frames" in lines[0] and "first frame" in lines[0]
    assert path in find_images(tmp_path)


# ------------------------------------------------------------------ very large photos

_MEASURE = """
import json, resource, sys
from hash3d_dg.preprocess import prepare_image
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
prepared = prepare_image(sys.argv[1], size=256, matting=sys.argv[2])
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
alpha = prepared.rgba[..., 3]
rows, cols = (alpha > 0.5).any(1).nonzero()[0], (alpha > 0.5).any(0).nonzero()[0]
print(json.dumps({"peak_mb": (after - before) / 1024, "box": [int(rows[0]), int(rows[-1]), int(cols[0]), int(cols[-1])]}))
"""


@pytest.mark.parametrize("kind", ["jpeg", "png"])
def test_50_megapixel_photo_runs_in_bounded_memory(tmp_path, kind):
    size = (8660, 5774)  # 50.0 megapixels
    if kind == "jpeg":
        image = Image.new("RGB", size, (255, 255, 255))
        ImageDraw.Draw(image).ellipse([3000, 1500, 5774, 4274], fill=(200, 40, 40))
        path, matting = tmp_path / "big.jpg", "border"
        image.save(path, quality=90)
    else:
        image = Image.new("RGBA", size, (0, 0, 0, 0))
        ImageDraw.Draw(image).ellipse([3000, 1500, 5774, 4274], fill=(200, 40, 40, 255))
        path, matting = tmp_path / "big.png", "auto"
        image.save(path, compress_level=1)
    del image
    proc = subprocess.run([sys.executable, "-c", _MEASURE, str(path), matting], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    # Measured here: 273 MB (JPEG, decoded at 1/4 scale; border matting at 2048 px) and 439 MB
    # (PNG: the 8-bit RGBA pixels plus Pillow's premultiplied copy while resizing), against 2.9 GB
    # and 2.3 GB before decoding was bounded. One full-size float32 RGBA copy is 800 MB.
    assert result["peak_mb"] < 600, result
    top, bottom, left, right = result["box"]
    assert abs((bottom - top + 1) - 0.8 * 256) <= 3 and abs((right - left + 1) - 0.8 * 256) <= 3
    assert abs((top + bottom) / 2 - 127.5) <= 1.5 and abs((left + right) / 2 - 127.5) <= 1.5


# ------------------------------------------------------------------ framing

def _rgba_with(mask: np.ndarray, colour=(0.2, 0.6, 0.9)) -> np.ndarray:
    rgba = np.zeros(mask.shape + (4,), np.float32)
    rgba[..., :3] = colour
    rgba[..., 3] = mask
    return rgba


def _save(path: Path, rgba: np.ndarray) -> Path:
    Image.fromarray(np.round(rgba * 255).astype(np.uint8)).save(path)
    return path


@pytest.mark.parametrize("case", ["fills_frame", "touches_left_border", "touches_corner"])
def test_object_touching_the_border_is_never_cropped(tmp_path, case):
    height, width = 200, 300
    yy, xx = np.mgrid[0:height, 0:width] + 0.5
    if case == "fills_frame":  # an ellipse touching all four borders
        mask = ((xx - 150) / 150) ** 2 + ((yy - 100) / 100) ** 2 <= 1
    elif case == "touches_left_border":
        mask = ((xx - 40) / 60) ** 2 + ((yy - 100) / 50) ** 2 <= 1  # cut by the image's left edge
    else:
        mask = (xx < 120) & (yy < 90)
    mask = mask.astype(np.float32)
    size = 128
    prepared = prepare_image(_save(tmp_path / f"{case}.png", _rgba_with(mask)), size=size)
    alpha = prepared.rgba[..., 3]
    visible = alpha > VISIBLE_ALPHA
    # Nothing reaches the canvas border, so nothing was cut off ...
    assert not (visible[0].any() or visible[-1].any() or visible[:, 0].any() or visible[:, -1].any())
    # ... the object's longer side spans 80 % of the canvas ...
    rows, cols = np.flatnonzero(visible.any(1)), np.flatnonzero(visible.any(0))
    extent = max(rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1)
    assert abs(extent - 0.8 * size) <= 2
    # ... and all of its area arrived: the area scales with the square of the scale factor.
    src_rows, src_cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    scale = 0.8 * size / max(src_rows[-1] - src_rows[0] + 1, src_cols[-1] - src_cols[0] + 1)
    assert alpha.sum() == pytest.approx(mask.sum() * scale**2, rel=0.03)


def test_tiny_object_is_found_and_enlarged(tmp_path):
    yy, xx = np.mgrid[0:800, 0:1000] + 0.5
    mask = ((xx - 700) ** 2 + (yy - 200) ** 2 <= 10**2).astype(np.float32)  # ~314 px
    assert 250 < mask.sum() < 400
    size = 128
    prepared = prepare_image(_save(tmp_path / "tiny.png", _rgba_with(mask, (0.9, 0.1, 0.1))), size=size)
    alpha = prepared.rgba[..., 3]
    visible = alpha > 0.5
    rows, cols = np.flatnonzero(visible.any(1)), np.flatnonzero(visible.any(0))
    assert abs((rows[-1] - rows[0] + 1) - 0.8 * size) <= 3
    assert abs((rows[0] + rows[-1]) / 2 - (size - 1) / 2) <= 1.5
    assert abs((cols[0] + cols[-1]) / 2 - (size - 1) / 2) <= 1.5
    assert alpha.sum() == pytest.approx(np.pi * (0.4 * size) ** 2, rel=0.05)
    np.testing.assert_allclose(prepared.rgba[visible][:, :3].mean(0), [0.9, 0.1, 0.1], atol=0.02)


def test_exif_orientation_survives_downscaling(tmp_path):
    # A portrait phone photo: stored landscape (4000 x 3000) with EXIF orientation 6 (rotate 90 CW).
    image = Image.new("RGB", (4000, 3000), (255, 255, 255))
    ImageDraw.Draw(image).rectangle([0, 0, 999, 2999], fill=(255, 0, 0))  # red: stored left quarter
    exif = Image.Exif()
    exif[0x0112] = 6
    image.save(tmp_path / "phone.jpg", exif=exif.tobytes(), quality=90)
    pixels = load_image(tmp_path / "phone.jpg", max_side=1000)
    assert pixels.shape == (1000, 750, 3)  # upright portrait, downscaled
    # Rotating 90 degrees clockwise puts the stored left edge at the top.
    assert pixels[:200].mean(axis=(0, 1))[1] < 0.1 and pixels[-200:].mean(axis=(0, 1))[1] > 0.9
