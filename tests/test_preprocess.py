"""Input handling: loading every supported variant, clear one-line errors, matting, re-centring,
the preprocess CLI, and the atomic output helpers. rembg is never imported here."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hash3d_dg import preprocess
from hash3d_dg.preprocess import framing
from hash3d_dg.output.atomic import atomic_path, save_image_atomic, write_json_atomic
from hash3d_dg.errors import ConfigError, InputError, UserError
from hash3d_dg.preprocess import (
    composite_white,
    find_images,
    load_image,
    main,
    prepare_image,
    recentre,
    remove_background,
)

REPO = Path(__file__).resolve().parents[1]
PHOTOS = Path(__file__).resolve().parents[2] / "shared" / "photos"


def _rng() -> np.random.Generator:
    return np.random.default_rng(1234)


def _disc_alpha(height: int, width: int, cy: float, cx: float, radius: float, supersample: int = 4) -> np.ndarray:
    """Anti-aliased disc coverage [H, W] by supersampling (pixel centres at integer + 0.5)."""
    offsets = (np.arange(supersample) + 0.5) / supersample
    ys = (np.arange(height)[:, None] + offsets[None, :]).reshape(-1)
    xs = (np.arange(width)[:, None] + offsets[None, :]).reshape(-1)
    inside = (ys[:, None] - cy) ** 2 + (xs[None, :] - cx) ** 2 <= radius**2
    return inside.reshape(height, supersample, width, supersample).mean(axis=(1, 3)).astype(np.float32)


def _bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def _rgba_png(path: Path, height: int = 48, width: int = 40) -> np.ndarray:
    """Write an RGBA PNG with a soft disc on transparent black; return the uint8 pixels."""
    alpha = _disc_alpha(height, width, height / 2, width / 2, min(height, width) / 3)
    pixels = np.zeros((height, width, 4), dtype=np.uint8)
    pixels[..., 0] = 200
    pixels[..., 1] = np.linspace(0, 255, width, dtype=np.uint8)[None, :]
    pixels[..., 2] = 40
    pixels[..., 3] = np.round(alpha * 255).astype(np.uint8)
    Image.fromarray(pixels).save(path)
    return pixels


# --------------------------------------------------------------------------------------------
# load_image: every supported variant


def test_load_rgb8_and_rgba8_png_exact(tmp_path):
    pixels = _rng().integers(0, 256, size=(20, 24, 4), dtype=np.uint8)
    Image.fromarray(pixels[..., :3]).save(tmp_path / "rgb.png")
    Image.fromarray(pixels).save(tmp_path / "rgba.png")
    rgb = load_image(tmp_path / "rgb.png")
    rgba = load_image(tmp_path / "rgba.png")
    assert rgb.dtype == np.float32 and rgb.shape == (20, 24, 3)
    assert rgba.dtype == np.float32 and rgba.shape == (20, 24, 4)
    np.testing.assert_allclose(rgb, pixels[..., :3] / 255.0, atol=1e-6)
    np.testing.assert_allclose(rgba, pixels / 255.0, atol=1e-6)


def test_load_16bit_greyscale_png(tmp_path):
    grey = _rng().integers(0, 65536, size=(18, 30), dtype=np.uint16)
    image = Image.fromarray(grey)
    assert image.mode == "I;16"
    image.save(tmp_path / "grey16.png")
    loaded = load_image(tmp_path / "grey16.png")
    assert loaded.shape == (18, 30, 3)
    for channel in range(3):  # full 16-bit precision, replicated to RGB
        np.testing.assert_allclose(loaded[..., channel], grey / 65535.0, atol=1e-6)


def test_load_greyscale_with_alpha(tmp_path):
    pixels = _rng().integers(0, 256, size=(16, 20, 2), dtype=np.uint8)
    Image.fromarray(pixels, mode="LA").save(tmp_path / "la.png")
    loaded = load_image(tmp_path / "la.png")
    assert loaded.shape == (16, 20, 4)
    for channel in range(3):
        np.testing.assert_allclose(loaded[..., channel], pixels[..., 0] / 255.0, atol=1e-6)
    np.testing.assert_allclose(loaded[..., 3], pixels[..., 1] / 255.0, atol=1e-6)


def test_load_palette_with_transparency(tmp_path):
    palette = [255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (256 * 3 - 9)
    indices = np.zeros((16, 16), dtype=np.uint8)
    indices[4:12, 4:12] = 1
    indices[6:10, 6:10] = 2
    image = Image.fromarray(indices, mode="P")
    image.putpalette(palette)
    image.save(tmp_path / "pal.png", transparency=0)  # index 0 (red) fully transparent
    loaded = load_image(tmp_path / "pal.png")
    assert loaded.shape == (16, 16, 4)
    np.testing.assert_array_equal(loaded[..., 3], (indices != 0).astype(np.float32))
    np.testing.assert_allclose(loaded[5, 5], [0, 1, 0, 1])
    np.testing.assert_allclose(loaded[7, 7], [0, 0, 1, 1])
    # A palette image without transparency has no alpha channel.
    image.save(tmp_path / "pal_opaque.png")
    assert load_image(tmp_path / "pal_opaque.png").shape == (16, 16, 3)


def test_load_jpeg_and_webp(tmp_path):
    yy, xx = np.mgrid[0:32, 0:40]
    smooth = np.stack([xx / 39.0, yy / 31.0, np.full_like(xx, 0.5, dtype=float)], axis=2)
    pixels = np.round(smooth * 255).astype(np.uint8)
    Image.fromarray(pixels).save(tmp_path / "photo.JPG", quality=95)
    jpeg = load_image(tmp_path / "photo.JPG")
    assert jpeg.shape == (32, 40, 3)
    assert np.abs(jpeg - pixels / 255.0).mean() < 0.02  # lossy, but close

    rgba = np.concatenate([pixels, np.full((32, 40, 1), 128, np.uint8)], axis=2)
    Image.fromarray(rgba).save(tmp_path / "cut.webp", lossless=True)
    webp = load_image(tmp_path / "cut.webp")
    assert webp.shape == (32, 40, 4)
    np.testing.assert_allclose(webp, rgba / 255.0, atol=1e-6)


def test_load_applies_exif_orientation(tmp_path):
    pixels = np.zeros((20, 40, 3), dtype=np.uint8)
    pixels[:, :20] = 255  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    Image.fromarray(pixels).save(tmp_path / "phone.jpg", exif=exif, quality=95)
    loaded = load_image(tmp_path / "phone.jpg")
    assert loaded.shape == (40, 20, 3)
    assert loaded[:20].mean() > 0.9 and loaded[20:].mean() < 0.1  # left half is now the top


# --------------------------------------------------------------------------------------------
# load_image / prepare_image: one-line errors


def _bad_inputs(tmp_path: Path) -> dict[str, Path]:
    text = tmp_path / "notes.png"
    text.write_text("this is not an image\nsecond line\n")
    good = io.BytesIO()
    Image.fromarray(_rng().integers(0, 256, size=(64, 64, 3), dtype=np.uint8)).save(good, "PNG")
    truncated = tmp_path / "half.png"
    truncated.write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    tiny = tmp_path / "tiny.png"
    Image.new("RGBA", (1, 1), (255, 0, 0, 255)).save(tiny)
    folder = tmp_path / "a_folder"
    folder.mkdir()
    return {
        "missing": tmp_path / "does_not_exist.png",
        "directory": folder,
        "text": text,
        "truncated": truncated,
        "tiny": tiny,
    }


@pytest.mark.parametrize("kind", ["missing", "directory", "text", "truncated", "tiny"])
def test_load_image_bad_inputs_give_one_line_input_error(tmp_path, kind):
    path = _bad_inputs(tmp_path)[kind]
    with pytest.raises(InputError) as caught:
        load_image(path)
    message = str(caught.value)
    assert "\n" not in message and message.strip() == message and len(message) > 20
    assert str(path) in message
    expected_words = {
        "missing": "not found",
        "directory": "folder",
        "text": "not an image",
        "truncated": "truncated",
        "tiny": "too small",
    }
    assert expected_words[kind] in message


def test_all_transparent_alpha_is_an_input_error(tmp_path):
    Image.new("RGBA", (32, 32), (10, 200, 30, 0)).save(tmp_path / "empty.png")
    with pytest.raises(InputError, match="no visible object.*fully transparent") as caught:
        prepare_image(tmp_path / "empty.png", size=32)
    assert "\n" not in str(caught.value)
    with pytest.raises(InputError, match="no visible object"):
        recentre(np.zeros((20, 20, 4), np.float32), size=32)


def test_user_error_is_always_one_line():
    error = UserError("first line\nsecond line\n")
    assert str(error) == "first line second line"
    assert issubclass(InputError, UserError) and issubclass(ConfigError, UserError)


# --------------------------------------------------------------------------------------------
# recentre / composite_white


@pytest.mark.parametrize(
    ("height", "width", "box", "size", "fill"),
    [
        (100, 150, (10, 50, 90, 120), 64, 0.8),  # wide box, upscaled
        (300, 200, (20, 260, 150, 190), 64, 0.8),  # tall box near a corner, downscaled
        (120, 120, (0, 40, 0, 100), 128, 0.8),  # touches the image border
        (90, 90, (30, 60, 20, 80), 64, 0.5),
    ],
)
def test_recentre_centres_bbox_and_scales_longer_side(height, width, box, size, fill):
    y0, y1, x0, x1 = box
    rgba = np.zeros((height, width, 4), np.float32)
    rgba[y0:y1, x0:x1] = [0.2, 0.6, 0.9, 1.0]
    out = recentre(rgba, size=size, fill=fill)
    assert out.shape == (size, size, 4) and out.dtype == np.float32
    oy0, oy1, ox0, ox1 = _bbox(out[..., 3] > 0.5)
    assert abs((oy0 + oy1) / 2 - size / 2) <= 1.0
    assert abs((ox0 + ox1) / 2 - size / 2) <= 1.0
    longer_side = max(oy1 - oy0, ox1 - ox0)
    assert abs(longer_side - fill * size) <= 1.5
    # aspect ratio kept: the shorter side scales by the same factor
    zoom = fill * size / max(y1 - y0, x1 - x0)
    assert abs(min(oy1 - oy0, ox1 - ox0) - zoom * min(y1 - y0, x1 - x0)) <= 1.5
    # the object's colour survives, nothing outside the (slightly widened) footprint
    inside = out[..., 3] > 0.99
    np.testing.assert_allclose(out[inside][:, :3].mean(axis=0), [0.2, 0.6, 0.9], atol=0.01)
    assert out[..., 3][_bbox_outside(out[..., 3] > 0.5, margin=2)].max() == 0.0


def _bbox_outside(mask: np.ndarray, margin: int) -> np.ndarray:
    y0, y1, x0, x1 = _bbox(mask)
    outside = np.ones_like(mask)
    outside[max(y0 - margin, 0) : y1 + margin, max(x0 - margin, 0) : x1 + margin] = False
    return outside


def test_recentre_maps_the_bbox_centre_to_the_canvas_centre_subpixel():
    # recentre is the similarity x_out = (x - bbox_centre) * zoom + size / 2 (bbox of the
    # visible pixels, in continuous pixel coordinates); check it on a disc's alpha centroid.
    alpha = _disc_alpha(90, 130, cy=31.3, cx=87.6, radius=17.2)
    rgba = np.concatenate([np.ones((90, 130, 3), np.float32), alpha[..., None]], axis=2)
    size = 128
    out = recentre(rgba, size=size)
    y0, y1, x0, x1 = _bbox(alpha > preprocess.VISIBLE_ALPHA)
    zoom = 0.8 * size / max(y1 - y0, x1 - x0)

    def centroid(weight: np.ndarray) -> np.ndarray:
        ys, xs = np.mgrid[0 : weight.shape[0], 0 : weight.shape[1]] + 0.5
        return np.array([(weight * ys).sum(), (weight * xs).sum()]) / weight.sum()

    expected = (centroid(alpha) - [(y0 + y1) / 2, (x0 + x1) / 2]) * zoom + size / 2
    np.testing.assert_allclose(centroid(out[..., 3]), expected, atol=0.05)
    assert abs(out[..., 3].sum() / (alpha.sum() * zoom**2) - 1) < 0.005


def test_recentre_is_stable_when_repeated():
    alpha = _disc_alpha(100, 100, 40, 55, 22)
    rgba = np.concatenate([np.full((100, 100, 3), 0.5, np.float32), alpha[..., None]], axis=2)
    once = recentre(rgba, size=96)
    twice = recentre(once, size=96)
    assert _bbox(once[..., 3] > 0) == _bbox(twice[..., 3] > 0)
    # Interpolation widens the visible bbox by about a pixel, so a second pass shrinks the
    # object by about a pixel over the bbox's 77 (here ~3% in area), and no more.
    assert 0.96 < twice[..., 3].sum() / once[..., 3].sum() <= 1.0


def test_premultiplied_resampling_leaves_no_dark_fringe():
    # A white object whose transparent surroundings are black (as in many RGBA files).
    alpha = _disc_alpha(150, 150, 75, 75, 60)
    rgba = np.zeros((150, 150, 4), np.float32)
    rgba[..., :3] = (alpha > 0)[..., None].astype(np.float32)
    rgba[..., 3] = alpha
    out = recentre(rgba, size=64)  # a strong downscale mixes edge and background pixels
    assert composite_white(out).min() > 0.995
    visible = out[..., 3] > 0.02
    assert out[..., :3][visible].min() > 0.99  # straight colour stays white at the edge
    # The same resampling on straight (non-premultiplied) colour does produce the fringe, so
    # the check above can fail.
    box = (0.0, 0.0, 150.0, 150.0)
    straight = np.stack([framing._resample_channel(rgba[..., c], box, 64) for c in range(4)], axis=2)
    assert composite_white(np.clip(straight, 0, 1)).min() < 0.9


def test_composite_white():
    rgba = np.array([[[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.25]]], np.float32)
    np.testing.assert_allclose(composite_white(rgba), [[[1, 0, 0], [1, 1, 1], [0.75, 0.75, 1.0]]], atol=1e-6)


# --------------------------------------------------------------------------------------------
# Matting


def _disc_on_plain_background(size: int = 128) -> tuple[np.ndarray, np.ndarray]:
    rng = _rng()
    true_alpha = _disc_alpha(size, size, 70, 58, 34)
    background = np.array([0.25, 0.55, 0.8], np.float32)
    colour = np.array([0.9, 0.35, 0.1], np.float32)
    rgb = true_alpha[..., None] * colour + (1 - true_alpha[..., None]) * background
    # a darker band on the object (still far from the background colour)
    rgb[60:66] = np.where(true_alpha[60:66, :, None] > 0.99, [0.6, 0.2, 0.05], rgb[60:66])
    # a small distractor blob, and sensor noise
    distractor = _disc_alpha(size, size, 15, 112, 4)
    rgb = distractor[..., None] * np.array([0.1, 0.1, 0.1]) + (1 - distractor[..., None]) * rgb
    rgb = np.clip(rgb + rng.normal(0, 0.015, rgb.shape), 0, 1).astype(np.float32)
    return rgb, true_alpha


def test_border_matting_recovers_a_disc():
    rgb, true_alpha = _disc_on_plain_background()
    alpha = remove_background(rgb, method="border")
    assert alpha.shape == true_alpha.shape and alpha.dtype == np.float32
    assert 0.0 <= alpha.min() and alpha.max() <= 1.0
    found, truth = alpha > 0.5, true_alpha > 0.5
    iou = (found & truth).sum() / (found | truth).sum()
    assert iou > 0.95
    assert alpha[5:25, 100:125].max() == 0.0  # the distractor (not the largest component) is gone
    assert np.abs(alpha - true_alpha).mean() < 0.01


def test_border_matting_fills_small_holes_keeps_large_ones():
    size = 128
    outer = _disc_alpha(size, size, 64, 64, 50)
    small = _disc_alpha(size, size, 30, 64, 3)  # a background-coloured speck on the object
    large = _disc_alpha(size, size, 72, 64, 20)  # a real opening (a ring)
    coverage = np.clip(outer - small - large, 0, 1)
    rgb = coverage[..., None] * np.array([0.8, 0.2, 0.2]) + (1 - coverage[..., None]) * np.array([0.95, 0.95, 0.95])
    alpha = remove_background(rgb.astype(np.float32), method="border")
    assert alpha[30, 64] > 0.99  # speck filled
    assert alpha[72, 64] == 0.0  # opening kept


def test_rembg_unavailable_gives_one_line_hint(tmp_path, monkeypatch):
    # `import rembg` fails (as when it cannot load): the error says what to do instead.
    monkeypatch.setitem(sys.modules, "rembg", None)
    rgb = np.full((32, 32, 3), 0.5, np.float32)
    with pytest.raises(InputError) as caught:
        remove_background(rgb, method="rembg")
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(preprocess.REMBG_ERROR) and "--matting border" in message
    # An RGB image with matting "auto" needs rembg, and gets the same hint.
    Image.fromarray(np.full((32, 32, 3), 128, np.uint8)).save(tmp_path / "opaque.png")
    with pytest.raises(InputError, match="--matting border"):
        prepare_image(tmp_path / "opaque.png", size=32)


def test_remove_background_unknown_method():
    with pytest.raises(ConfigError):
        remove_background(np.zeros((20, 20, 3), np.float32), method="magic")


# --------------------------------------------------------------------------------------------
# prepare_image


def test_prepare_image_keeps_alpha(tmp_path):
    pixels = _rgba_png(tmp_path / "thing.png", height=60, width=50)
    prepared = prepare_image(tmp_path / "thing.png", size=64)
    assert prepared.matting == "alpha" and prepared.had_alpha
    assert prepared.name == "thing" and prepared.source == tmp_path / "thing.png"
    assert prepared.rgba.shape == (64, 64, 4) and prepared.rgba.dtype == np.float32
    # Alpha mass scales with the squared zoom factor.
    source_alpha = pixels[..., 3] / 255.0
    y0, y1, x0, x1 = _bbox(source_alpha > preprocess.VISIBLE_ALPHA)
    zoom = 0.8 * 64 / max(y1 - y0, x1 - x0)
    assert abs(prepared.rgba[..., 3].sum() / (source_alpha.sum() * zoom**2) - 1) < 0.02


def test_prepare_image_matting_choices(tmp_path):
    rgb, true_alpha = _disc_on_plain_background()
    Image.fromarray(np.round(rgb * 255).astype(np.uint8)).save(tmp_path / "plain.png")
    prepared = prepare_image(tmp_path / "plain.png", size=64, matting="border")
    assert prepared.matting == "border" and not prepared.had_alpha
    oy0, oy1, ox0, ox1 = _bbox(prepared.rgba[..., 3] > 0)
    assert abs((oy0 + oy1) / 2 - 32) <= 1 and abs((ox0 + ox1) / 2 - 32) <= 1
    assert abs(max(oy1 - oy0, ox1 - ox0) - 0.8 * 64) <= 1.5
    oy0, oy1, ox0, ox1 = _bbox(prepared.rgba[..., 3] > 0.5)  # the disc itself: a soft edge less
    assert 0.8 * 64 - 4 <= max(oy1 - oy0, ox1 - ox0) <= 0.8 * 64
    with pytest.raises(InputError, match="--matting alpha"):
        prepare_image(tmp_path / "plain.png", matting="alpha")
    Image.new("RGBA", (32, 32), (0, 0, 0, 255)).save(tmp_path / "opaque_rgba.png")
    with pytest.raises(InputError, match="fully opaque alpha"):
        prepare_image(tmp_path / "opaque_rgba.png", matting="alpha")
    with pytest.raises(ConfigError):
        prepare_image(tmp_path / "plain.png", matting="nope")
    # "border" on a uniform image finds nothing to cut out.
    Image.new("RGB", (32, 32), (90, 90, 90)).save(tmp_path / "uniform.png")
    with pytest.raises(InputError, match="no visible object"):
        prepare_image(tmp_path / "uniform.png", matting="border", size=32)


def test_prepare_image_on_rgba_never_imports_rembg(tmp_path):
    _rgba_png(tmp_path / "cut.png")
    code = (
        "import sys; from hash3d_dg.preprocess import prepare_image; "
        f"p = prepare_image({str(tmp_path / 'cut.png')!r}, size=32); "
        "assert p.matting == 'alpha'; print('rembg' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


@pytest.mark.skipif(not PHOTOS.is_dir(), reason="no ../shared/photos (only in the development checkout)")
def test_real_photos_keep_their_alpha_and_are_centred():
    photos = sorted(PHOTOS.glob("*.png"))
    assert photos
    for photo in photos:
        source_alpha = load_image(photo)[..., 3]
        prepared = prepare_image(photo)
        assert prepared.matting == "alpha" and prepared.had_alpha
        assert prepared.rgba.shape == (256, 256, 4)
        # Centred by the visible pixels' bbox (alpha > 0), as DreamGaussian does.
        y0, y1, x0, x1 = _bbox(prepared.rgba[..., 3] > 0)
        assert abs((y0 + y1) / 2 - 128) <= 1 and abs((x0 + x1) / 2 - 128) <= 1
        assert abs(max(y1 - y0, x1 - x0) - 0.8 * 256) <= 2
        sy0, sy1, sx0, sx1 = _bbox(source_alpha > preprocess.VISIBLE_ALPHA)
        zoom = 0.8 * 256 / max(sy1 - sy0, sx1 - sx0)
        assert abs(prepared.rgba[..., 3].sum() / (source_alpha.sum() * zoom**2) - 1) < 0.02


# --------------------------------------------------------------------------------------------
# find_images and the CLI


def test_find_images(tmp_path):
    for name in ["b.PNG", "a.jpg", "c.webp", "d.jpeg", "notes.txt", ".hidden.png"]:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "e.png").write_bytes(b"x")
    assert [p.name for p in find_images(tmp_path)] == ["a.jpg", "b.PNG", "c.webp", "d.jpeg"]
    assert find_images(tmp_path / "a.jpg") == [tmp_path / "a.jpg"]
    with pytest.raises(InputError, match="no images"):
        find_images(_empty(tmp_path))
    with pytest.raises(InputError, match="not found"):
        find_images(tmp_path / "missing.png")


def _empty(tmp_path: Path) -> Path:
    folder = tmp_path / "empty"
    folder.mkdir()
    (folder / "readme.txt").write_text("no images")
    return folder


def test_cli_writes_rgba_png(tmp_path, capsys):
    _rgba_png(tmp_path / "toy.png")
    assert main([str(tmp_path / "toy.png"), "--size", "48"]) == 0
    out = tmp_path / "toy_rgba.png"
    with Image.open(out) as image:
        assert image.mode == "RGBA" and image.size == (48, 48)
    captured = capsys.readouterr()
    assert len(captured.out.strip().splitlines()) == 1 and "toy_rgba.png" in captured.out
    assert captured.err == ""
    # Re-running on the folder skips the earlier result instead of making toy_rgba_rgba.png.
    assert main([str(tmp_path), "--size", "48"]) == 0
    assert not (tmp_path / "toy_rgba_rgba.png").exists()


def _run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "hash3d_dg.preprocess", *args], cwd=REPO, capture_output=True, text=True, timeout=120
    )


def test_cli_bad_input_one_line_exit_2_no_files(tmp_path):
    bad = _bad_inputs(tmp_path)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    result = _run_cli(str(bad["truncated"]), "--output", str(out_dir), "--size", "32")
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "truncated" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert list(out_dir.iterdir()) == []


@pytest.mark.parametrize("kind", ["missing", "text", "tiny"])
def test_cli_bad_inputs_in_process(tmp_path, capsys, kind):
    path = _bad_inputs(tmp_path)[kind]
    out_dir = tmp_path / "out"
    assert main([str(path), "--output", str(out_dir)]) == 2
    captured = capsys.readouterr()
    assert len(captured.err.strip().splitlines()) == 1
    assert not out_dir.exists() or list(out_dir.iterdir()) == []


def test_cli_folder_with_good_and_bad_image(tmp_path):
    _rgba_png(tmp_path / "good.png")
    (tmp_path / "bad.png").write_text("not an image")
    result = _run_cli(str(tmp_path), "--size", "32")
    assert result.returncode == 2
    assert (tmp_path / "good_rgba.png").exists() and not (tmp_path / "bad_rgba.png").exists()
    assert len(result.stderr.strip().splitlines()) == 1 and "bad.png" in result.stderr
    assert "Traceback" not in result.stderr
    assert "good_rgba.png" in result.stdout


def test_cli_rejects_bad_settings(tmp_path, capsys):
    _rgba_png(tmp_path / "toy.png")
    assert main([str(tmp_path / "toy.png"), "--fill", "1.5"]) == 2
    assert main([str(tmp_path / "toy.png"), "--size", "4"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 2
    assert not (tmp_path / "toy_rgba.png").exists()


# --------------------------------------------------------------------------------------------
# Atomic output helpers


def test_atomic_path_replaces_on_success_and_keeps_old_file_on_failure(tmp_path):
    target = tmp_path / "result.json"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            assert tmp.parent == tmp_path and tmp.name.startswith(".result.json.tmp-") and tmp.suffix == ".json"
            tmp.write_text("half-written")
            raise RuntimeError("boom")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.json"]

    write_json_atomic(target, {"a": [1, 2.5], "b": "ü"})
    assert json.loads(target.read_text(encoding="utf-8")) == {"a": [1, 2.5], "b": "ü"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.json"]
    mode = target.stat().st_mode & 0o777
    assert mode & 0o600 == 0o600


def test_save_image_atomic_float_and_pil(tmp_path):
    rgba = np.zeros((8, 8, 4), np.float32)
    rgba[..., 0] = 1.0
    rgba[..., 3] = 0.5
    path = save_image_atomic(tmp_path / "sub" / "x.png", rgba)
    loaded = np.asarray(Image.open(path))
    assert loaded.dtype == np.uint8 and loaded.shape == (8, 8, 4)
    assert (loaded[..., 0] == 255).all() and (loaded[..., 3] == 128).all()
    save_image_atomic(tmp_path / "y.png", Image.new("RGB", (4, 4), (1, 2, 3)))
    assert np.asarray(Image.open(tmp_path / "y.png"))[0, 0].tolist() == [1, 2, 3]
    new_file_mode = 0o666 & ~_umask()
    assert (path.stat().st_mode & 0o777) == new_file_mode


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
