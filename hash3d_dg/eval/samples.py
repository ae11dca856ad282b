"""Procedural sample inputs the project makes itself (for ``data/`` and the tests).

Each sample is a small scene of analytic shapes (spheres, a box) rendered by a ray caster in
numpy from the reference camera of the pipeline (on +z at radius 2, fovy 49.1 deg, +y up),
lit by Lambert + ambient light, and anti-aliased by regular supersampling, so its alpha has
soft edges like a matted photo. Rendering is deterministic.

    python -m hash3d_dg.eval.samples [FOLDER]    # writes FOLDER/<name>.png (default: data/)
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hash3d_dg.output.atomic import save_image_atomic

SAMPLE_NAMES: tuple[str, ...] = ("ball", "box", "snowman")

CAMERA_RADIUS = 2.0
CAMERA_FOVY_DEG = 49.1
LIGHT_DIRECTION = np.array([-0.35, 0.55, 0.75])  # toward the light: upper left, in front
AMBIENT = 0.35
SUPERSAMPLING = 4  # SUPERSAMPLING x SUPERSAMPLING rays per pixel


@dataclass
class Hits:
    """Ray-scene intersections for N rays.

    Attributes:
        t: [N] distance along the (unit) ray to the nearest hit, ``inf`` where nothing is hit.
        normal: [N, 3] unit surface normal at the hit (world frame).
        albedo: [N, 3] surface colour in [0, 1].
    """

    t: np.ndarray
    normal: np.ndarray
    albedo: np.ndarray

    @staticmethod
    def empty(n: int) -> Hits:
        return Hits(np.full(n, np.inf), np.zeros((n, 3)), np.zeros((n, 3)))

    def merge(self, other: Hits) -> Hits:
        """Nearest of two hit sets (a union of shapes)."""
        closer = other.t < self.t
        return Hits(
            np.where(closer, other.t, self.t),
            np.where(closer[:, None], other.normal, self.normal),
            np.where(closer[:, None], other.albedo, self.albedo),
        )


Shader = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (points [N,3], normals [N,3]) -> albedo [N,3]


def _rotation(yaw_deg: float, pitch_deg: float, roll_deg: float = 0.0) -> np.ndarray:
    """Object-to-world rotation: roll about z, then pitch about x, then yaw about y. [3, 3]"""
    y, p, r = (math.radians(a) for a in (yaw_deg, pitch_deg, roll_deg))
    yaw = np.array([[math.cos(y), 0, math.sin(y)], [0, 1, 0], [-math.sin(y), 0, math.cos(y)]])
    pitch = np.array([[1, 0, 0], [0, math.cos(p), -math.sin(p)], [0, math.sin(p), math.cos(p)]])
    roll = np.array([[math.cos(r), -math.sin(r), 0], [math.sin(r), math.cos(r), 0], [0, 0, 1]])
    return yaw @ pitch @ roll


def _solid(colour: Sequence[float]) -> Shader:
    rgb = np.asarray(colour, dtype=np.float64)
    return lambda points, normals: np.broadcast_to(rgb, points.shape).copy()


def intersect_sphere(
    origins: np.ndarray,
    directions: np.ndarray,
    centre: Sequence[float],
    radius: float,
    shader: Shader,
    scale: Sequence[float] = (1.0, 1.0, 1.0),
) -> Hits:
    """Hits of rays with an axis-aligned ellipsoid (a sphere of ``radius`` scaled by ``scale``).

    Args:
        origins: [N, 3] ray origins; directions: [N, 3] unit ray directions.
        shader: colour of the surface from (points, normals) in the world frame.
    """
    centre_ = np.asarray(centre, dtype=np.float64)
    scale_ = np.asarray(scale, dtype=np.float64) * radius
    # Map the ellipsoid to the unit sphere; t is preserved because the ray is scaled, not renormalised.
    o = (origins - centre_) / scale_
    d = directions / scale_
    a = np.einsum("ij,ij->i", d, d)
    b = np.einsum("ij,ij->i", o, d)
    c = np.einsum("ij,ij->i", o, o) - 1.0
    disc = b * b - a * c
    hit = disc >= 0.0
    root = np.sqrt(np.where(hit, disc, 0.0))
    t_near = (-b - root) / a
    t_far = (-b + root) / a
    t = np.where(t_near > 1e-9, t_near, t_far)
    hit &= t > 1e-9
    t = np.where(hit, t, np.inf)
    points = origins + directions * np.where(hit, t, 0.0)[:, None]
    normals = (points - centre_) / (scale_ * scale_)
    normals /= np.maximum(np.linalg.norm(normals, axis=1, keepdims=True), 1e-12)
    albedo = np.where(hit[:, None], shader(points, normals), 0.0)
    return Hits(t, normals, albedo)


def intersect_box(
    origins: np.ndarray,
    directions: np.ndarray,
    centre: Sequence[float],
    half_size: Sequence[float],
    rotation: np.ndarray,
    face_colours: np.ndarray,
) -> Hits:
    """Hits of rays with an oriented box (slab method in the box's frame).

    Args:
        origins, directions: [N, 3] rays (unit directions).
        half_size: the box's half extents along its own axes.
        rotation: [3, 3] box-to-world rotation.
        face_colours: [6, 3] colours of the faces -x, +x, -y, +y, -z, +z (box frame).
    """
    half = np.asarray(half_size, dtype=np.float64)
    o = (origins - np.asarray(centre, dtype=np.float64)) @ rotation  # = R^T (origin - centre)
    d = directions @ rotation
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = 1.0 / d
        t1 = (-half - o) * inv
        t2 = (half - o) * inv
    t_lo = np.nan_to_num(np.minimum(t1, t2), nan=-np.inf)
    t_hi = np.nan_to_num(np.maximum(t1, t2), nan=np.inf)
    t_enter = t_lo.max(axis=1)
    t_exit = t_hi.min(axis=1)
    hit = (t_exit >= t_enter) & (t_exit > 1e-9)
    t = np.where(hit, np.where(t_enter > 1e-9, t_enter, t_exit), np.inf)
    axis = t_lo.argmax(axis=1)
    rows = np.arange(len(axis))
    sign = np.where(d[rows, axis] > 0, -1.0, 1.0)  # entering face faces against the ray
    normal_local = np.zeros_like(o)
    normal_local[rows, axis] = sign
    face = 2 * axis + (sign > 0)
    albedo = np.where(hit[:, None], np.asarray(face_colours, dtype=np.float64)[face], 0.0)
    return Hits(t, normal_local @ rotation.T, albedo)


def _ball(origins: np.ndarray, directions: np.ndarray) -> Hits:
    """A beach ball: six coloured gores around a tilted axis, white caps at its poles."""
    spin = _rotation(20.0, 55.0, -15.0)
    gores = np.array(
        [[0.9, 0.15, 0.12], [0.98, 0.85, 0.15], [0.15, 0.4, 0.9], [0.95, 0.95, 0.95], [0.2, 0.7, 0.3], [0.95, 0.5, 0.1]]
    )

    def shade(points: np.ndarray, normals: np.ndarray) -> np.ndarray:
        local = normals @ spin  # normal in the ball's own frame
        angle = np.arctan2(local[:, 0], local[:, 2])
        index = np.floor((angle + np.pi) / (2 * np.pi) * 6).astype(int) % 6
        colour = gores[index]
        cap = np.abs(local[:, 1]) > 0.9
        return np.where(cap[:, None], np.array([0.97, 0.97, 0.97]), colour)

    return intersect_sphere(origins, directions, (0.0, 0.0, 0.0), 0.55, shade)


def _box(origins: np.ndarray, directions: np.ndarray) -> Hits:
    """A box turned 35 deg about y and tipped toward the camera, each face its own colour."""
    faces = np.array(
        [[0.85, 0.25, 0.2], [0.2, 0.55, 0.85], [0.95, 0.8, 0.2], [0.3, 0.75, 0.35], [0.6, 0.35, 0.75], [0.95, 0.55, 0.2]]
    )
    return intersect_box(origins, directions, (0.0, 0.0, 0.0), (0.5, 0.36, 0.36), _rotation(35.0, 20.0), faces)


def _snowman(origins: np.ndarray, directions: np.ndarray) -> Hits:
    """Three stacked snowballs with coal eyes and buttons and a carrot-coloured nose."""
    snow = _solid((0.93, 0.95, 0.98))
    coal = _solid((0.08, 0.08, 0.1))
    carrot = _solid((0.95, 0.45, 0.1))
    hits = Hits.empty(len(origins))
    for centre, radius in (((0.0, -0.42, 0.0), 0.34), ((0.0, 0.05, 0.0), 0.25), ((0.0, 0.4, 0.0), 0.17)):
        hits = hits.merge(intersect_sphere(origins, directions, centre, radius, snow))
    head = np.array([0.0, 0.4, 0.0])
    for x in (-0.06, 0.06):
        eye = head + 0.17 * np.array([x / 0.17, 0.25, math.sqrt(max(0.0, 1 - (x / 0.17) ** 2 - 0.0625))])
        hits = hits.merge(intersect_sphere(origins, directions, eye, 0.025, coal))
    nose = head + np.array([0.0, 0.0, 0.19])
    hits = hits.merge(intersect_sphere(origins, directions, nose, 0.03, carrot, scale=(1.0, 1.0, 2.5)))
    for y in (0.13, 0.04, -0.05):
        z = math.sqrt(max(0.0, 0.25**2 - (y - 0.05) ** 2))
        hits = hits.merge(intersect_sphere(origins, directions, (0.0, y, z), 0.022, coal))
    return hits


_SCENES: dict[str, Callable[[np.ndarray, np.ndarray], Hits]] = {"ball": _ball, "box": _box, "snowman": _snowman}


def camera_rays(size: int, supersampling: int = SUPERSAMPLING) -> tuple[np.ndarray, np.ndarray]:
    """Rays of the reference camera (on +z at ``CAMERA_RADIUS``, looking at the origin, +y up).

    Returns:
        origins [N, 3], directions [N, 3] (unit), N = (size * supersampling)^2, ordered row-major
        over the supersampled grid (top row first).
    """
    n = size * supersampling
    tan_half = math.tan(math.radians(CAMERA_FOVY_DEG) / 2.0)
    coords = (np.arange(n) + 0.5) / n * 2.0 - 1.0  # sample centres in [-1, 1]
    xs = coords * tan_half
    ys = -coords * tan_half  # image rows go down, +y goes up
    grid_x, grid_y = np.meshgrid(xs, ys)
    directions = np.stack([grid_x, grid_y, -np.ones_like(grid_x)], axis=-1).reshape(-1, 3)
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    origins = np.broadcast_to(np.array([0.0, 0.0, CAMERA_RADIUS]), directions.shape)
    return np.ascontiguousarray(origins), directions


def render_sample(name: str, size: int = 256, supersampling: int = SUPERSAMPLING) -> np.ndarray:
    """Render a procedural sample object.

    Args:
        name: one of :data:`SAMPLE_NAMES`.
        size: image side in pixels.
        supersampling: rays per pixel along each axis (anti-aliasing).

    Returns:
        [size, size, 4] float32 RGBA in [0, 1], straight colour; alpha is the pixel's coverage.
    """
    if name not in _SCENES:
        raise ValueError(f"unknown sample {name!r}: choose one of {', '.join(SAMPLE_NAMES)}")
    origins, directions = camera_rays(size, supersampling)
    hits = _SCENES[name](origins, directions)
    covered = np.isfinite(hits.t)
    light = LIGHT_DIRECTION / np.linalg.norm(LIGHT_DIRECTION)
    lambert = np.clip(hits.normal @ light, 0.0, None)
    colour = hits.albedo * (AMBIENT + (1.0 - AMBIENT) * lambert)[:, None] * covered[:, None]

    n = size * supersampling
    blocks = (size, supersampling, size, supersampling)
    alpha = covered.reshape(n, n).astype(np.float64).reshape(blocks).mean(axis=(1, 3))
    premultiplied = colour.reshape(n, n, 3).reshape(*blocks, 3).mean(axis=(1, 3))
    rgb = np.divide(premultiplied, alpha[..., None], out=np.zeros_like(premultiplied), where=alpha[..., None] > 0)
    return np.concatenate([np.clip(rgb, 0.0, 1.0), alpha[..., None]], axis=2).astype(np.float32)


def write_samples(folder: str | os.PathLike[str], size: int = 256) -> list[Path]:
    """Render every sample and write ``<folder>/<name>.png`` (8-bit RGBA); returns the paths."""
    folder = Path(folder)
    return [save_image_atomic(folder / f"{name}.png", render_sample(name, size), optimize=True) for name in SAMPLE_NAMES]


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: write the sample images into a folder (default ``data/``)."""
    parser = argparse.ArgumentParser(prog="python -m hash3d_dg.eval.samples", description=__doc__.splitlines()[0])
    parser.add_argument("folder", nargs="?", type=Path, default=Path("data"), help="output folder (default data/)")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (default 256)")
    args = parser.parse_args(argv)
    for path in write_samples(args.folder, args.size):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
