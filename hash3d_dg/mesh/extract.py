"""Density field -> clean triangle mesh (marching cubes, largest component, decimation)."""

from __future__ import annotations

import logging
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from hash3d_dg.mesh.mesh import Mesh

logger = logging.getLogger(__name__)


@torch.no_grad()
def sample_density_grid(density_fn: Callable[[Tensor], Tensor], bound: float, resolution: int,
                        block_size: int = 64, device="cpu") -> np.ndarray:
    """Evaluate ``density_fn`` on a ``resolution^3`` grid over ``[-bound, bound]^3``.

    ``density_fn`` maps points ``[N, 3]`` to densities ``[N]`` (or ``[N, 1]``). The grid is
    visited in ``block_size^3`` blocks so at most that many points are alive at once. Returns a
    float32 array indexed ``[ix, iy, iz]`` (x, y, z of ``linspace(-bound, bound, resolution)``).
    """
    axis = torch.linspace(-bound, bound, resolution, device=device)
    grid = np.empty((resolution,) * 3, dtype=np.float32)
    for i0 in range(0, resolution, block_size):
        for j0 in range(0, resolution, block_size):
            for k0 in range(0, resolution, block_size):
                xs, ys, zs = (axis[i0:i0 + block_size], axis[j0:j0 + block_size],
                              axis[k0:k0 + block_size])
                pts = torch.stack(torch.meshgrid(xs, ys, zs, indexing="ij"), dim=-1)
                d = density_fn(pts.reshape(-1, 3)).reshape(len(xs), len(ys), len(zs))
                grid[i0:i0 + len(xs), j0:j0 + len(ys), k0:k0 + len(zs)] = (
                    d.detach().float().cpu().numpy())
    return grid


def _largest_component(vertices: np.ndarray, faces: np.ndarray):
    """The connected component (by shared edges) with the most faces, cleaned, as a Trimesh."""
    import trimesh

    tm = trimesh.Trimesh(vertices, faces, process=True)  # merges duplicate vertices
    tm.update_faces(tm.nondegenerate_faces())
    tm.update_faces(tm.unique_faces())
    tm.remove_unreferenced_vertices()
    labels = trimesh.graph.connected_component_labels(tm.face_adjacency, node_count=len(tm.faces))
    if labels.size:
        counts = np.bincount(labels)
        keep = labels == int(np.argmax(counts))
        if len(counts) > 1:
            logger.info("extract: %d components, keeping the largest (%d of %d faces)",
                        len(counts), int(keep.sum()), len(tm.faces))
        tm.update_faces(keep)
        tm.remove_unreferenced_vertices()
    return tm


def _decimate(tm, target: int):
    """Quadric decimation (fast_simplification) down to at most ``target`` faces."""
    import fast_simplification
    import trimesh

    v, f = np.asarray(tm.vertices, np.float64), np.asarray(tm.faces, np.int64)
    goal = target
    for _ in range(5):  # the simplifier can overshoot its target slightly: tighten and retry
        reduction = 1.0 - goal / len(f)
        v2, f2 = fast_simplification.simplify(v, f.astype(np.int32), target_reduction=reduction)
        if len(f2) <= target:
            break
        goal = max(4, int(goal * target / len(f2)) - 1)
    out = trimesh.Trimesh(v2, f2, process=True)
    out.update_faces(out.nondegenerate_faces())
    out.update_faces(out.unique_faces())
    out.remove_unreferenced_vertices()
    return out


def extract_mesh(density_fn: Callable[[Tensor], Tensor], bound: float = 1.0,
                 resolution: int = 128, threshold: float = 1.0, block_size: int = 64,
                 decimate_target: int = 100_000, device="cpu") -> Mesh:
    """Extract the ``threshold`` iso-surface of a density field as an outward-facing mesh.

    Steps: sample the grid (bounded memory, see :func:`sample_density_grid`); pad it with one
    layer below the threshold so surfaces touching the box are closed; PyMCubes marching cubes;
    merge duplicate vertices, drop degenerate and duplicate faces and unreferenced vertices;
    keep the largest connected component; decimate to ``decimate_target`` faces when above it;
    orient triangles counter-clockwise seen from outside (positive signed volume); compute
    area-weighted vertex normals. Densities above the threshold are inside.

    Returns a :class:`Mesh` on ``device`` (float32 positions in world units).
    Raises ValueError when nothing crosses the threshold.
    """
    import mcubes

    grid = sample_density_grid(density_fn, bound, resolution, block_size, device)
    finite = np.isfinite(grid)
    if not finite.all():
        grid = np.where(finite, grid, np.float32(threshold - 1.0))
    gmin, gmax = float(grid.min()), float(grid.max())
    if not (gmax > threshold and gmin < threshold):
        raise ValueError(f"no surface: density in [{gmin:.4g}, {gmax:.4g}] never crosses the "
                         f"threshold {threshold:g} on the {resolution}^3 grid over +-{bound:g}")
    pad_value = min(gmin, threshold) - 1.0
    padded = np.pad(grid, 1, mode="constant", constant_values=pad_value)
    verts, faces = mcubes.marching_cubes(padded, float(threshold))
    spacing = 2.0 * bound / (resolution - 1)
    verts = (verts - 1.0) * spacing - bound  # undo the pad, index -> world
    if len(faces) == 0:
        raise ValueError(f"no surface: marching cubes found no triangle at threshold {threshold:g}")
    tm = _largest_component(verts, faces.astype(np.int64))
    if len(tm.faces) > decimate_target:
        n0 = len(tm.faces)
        tm = _decimate(tm, decimate_target)
        logger.info("extract: decimated %d -> %d faces", n0, len(tm.faces))
    if tm.volume < 0:  # marching cubes winding is inward for this sign convention: flip it
        tm.invert()
    mesh = Mesh(torch.as_tensor(np.asarray(tm.vertices), dtype=torch.float32, device=device),
                torch.as_tensor(np.asarray(tm.faces), dtype=torch.int64, device=device))
    return mesh.compute_normals()
