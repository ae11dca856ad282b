"""Procedural sample inputs: visible objects, soft edges, determinism, and analytic checks of
the ray caster (sphere silhouette area, flat box faces, mirror symmetry)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hash3d_dg.eval import samples
from hash3d_dg.preprocess import prepare_image, remove_background
from hash3d_dg.eval.samples import SAMPLE_NAMES, render_sample, write_samples

DATA = Path(__file__).resolve().parents[1] / "data"
SIZE = 64


@pytest.fixture(scope="module")
def renders() -> dict[str, np.ndarray]:
    return {name: render_sample(name, SIZE) for name in SAMPLE_NAMES}


def test_sample_names():
    assert set(SAMPLE_NAMES) == {"ball", "box", "snowman"}
    with pytest.raises(ValueError):
        render_sample("teapot", SIZE)


@pytest.mark.parametrize("name", SAMPLE_NAMES)
def test_each_sample_is_a_visible_object_with_soft_edges(renders, name):
    rgba = renders[name]
    assert rgba.shape == (SIZE, SIZE, 4) and rgba.dtype == np.float32
    assert 0.0 <= rgba.min() and rgba.max() <= 1.0
    alpha = rgba[..., 3]
    coverage = alpha.mean()
    assert 0.08 < coverage < 0.6  # an object, not the whole frame
    assert (alpha == 1.0).sum() > 100  # a solid interior
    soft = (alpha > 0) & (alpha < 1)
    assert soft.sum() > 40  # anti-aliased edges
    # The object does not touch the image border (a clean cut-out).
    assert alpha[0].max() == alpha[-1].max() == alpha[:, 0].max() == alpha[:, -1].max() == 0.0
    # Shaded, not flat: the colours of the interior vary.
    assert rgba[..., :3][alpha == 1.0].std(axis=0).max() > 0.05


@pytest.mark.parametrize("name", SAMPLE_NAMES)
def test_samples_are_deterministic(renders, name):
    np.testing.assert_array_equal(render_sample(name, SIZE), renders[name])


def test_ball_silhouette_area_matches_the_perspective_projection(renders):
    # A sphere of radius r at distance R subtends asin(r / R); on the image plane that is a disc
    # of radius tan(asin(r / R)) / tan(fovy / 2) * size / 2 pixels.
    r, distance = 0.55, samples.CAMERA_RADIUS
    tan_half = math.tan(math.radians(samples.CAMERA_FOVY_DEG) / 2)
    radius_px = math.tan(math.asin(r / distance)) / tan_half * SIZE / 2
    area = renders["ball"][..., 3].sum()
    assert abs(area / (math.pi * radius_px**2) - 1) < 0.01
    alpha = renders["ball"][..., 3]
    np.testing.assert_allclose(alpha, alpha[::-1, :], atol=1e-6)  # centred: symmetric both ways
    np.testing.assert_allclose(alpha, alpha[:, ::-1], atol=1e-6)


def test_box_faces_are_flat_and_three_are_visible():
    # Under a directional light every flat face has one colour; a box in general position shows
    # three faces, so its fully covered pixels have three dominant colours (edge pixels mix).
    rgba = render_sample("box", 96)
    interior = rgba[rgba[..., 3] == 1.0][:, :3]
    colours, counts = np.unique(np.round(interior * 255).astype(int), axis=0, return_counts=True)
    assert (counts > 60).sum() == 3
    assert counts[counts > 60].sum() > 0.9 * len(interior)


def test_snowman_is_mirror_symmetric(renders):
    alpha = renders["snowman"][..., 3]
    np.testing.assert_allclose(alpha, alpha[:, ::-1], atol=1e-6)
    # three stacked balls: taller than wide
    rows = np.flatnonzero(alpha.max(axis=1) > 0)
    cols = np.flatnonzero(alpha.max(axis=0) > 0)
    assert rows.size > 1.5 * cols.size


def test_write_samples(tmp_path):
    paths = write_samples(tmp_path, size=SIZE)
    assert [p.name for p in paths] == [f"{name}.png" for name in SAMPLE_NAMES]
    for path, name in zip(paths, SAMPLE_NAMES):
        with Image.open(path) as image:
            assert image.mode == "RGBA" and image.size == (SIZE, SIZE)
            pixels = np.asarray(image)
        expected = np.round(render_sample(name, SIZE) * 255).astype(np.uint8)
        np.testing.assert_array_equal(pixels, expected)
        # a usable input: prepare_image keeps its alpha
        prepared = prepare_image(path, size=SIZE)
        assert prepared.matting == "alpha"


@pytest.mark.parametrize("name", SAMPLE_NAMES)
def test_committed_data_files_match_the_renderer(name):
    path = DATA / f"{name}.png"
    if not path.exists():
        pytest.skip(f"{path} not generated (python -m hash3d_dg.eval.samples data)")
    assert path.stat().st_size < 100_000
    with Image.open(path) as image:
        pixels = np.asarray(image)
    np.testing.assert_array_equal(pixels, np.round(render_sample(name, 256) * 255).astype(np.uint8))


def test_border_matting_recovers_a_sample_on_a_plain_background(renders):
    # The snowman is white on white would be hopeless; on a mid-blue backdrop it is separable.
    rgba = render_sample("ball", 128)
    backdrop = np.array([0.2, 0.35, 0.6], np.float32)
    rgb = rgba[..., :3] * rgba[..., 3:] + backdrop * (1 - rgba[..., 3:])
    alpha = remove_background(rgb, method="border")
    found, truth = alpha > 0.5, rgba[..., 3] > 0.5
    assert (found & truth).sum() / (found | truth).sum() > 0.97
