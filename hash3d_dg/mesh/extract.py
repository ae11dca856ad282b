"""Density field -> clean triangle mesh (box fit, marching cubes, clean-up, decimation)."""

from __future__ import annotations

import logging
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from hash3d_dg import accel
from hash3d_dg.mesh.mesh import Mesh
from hash3d_dg.mesh.timing import StepClock

logger = logging.getLogger(__name__)


@torch.no_grad()
def sample_density_grid(density_fn: Callable[[Tensor], Tensor], bound: float, resolution: int,
                        block_size: int = 64, device="cpu", centre=(0.0, 0.0, 0.0)) -> np.ndarray:
    """Evaluate ``density_fn`` on a ``resolution^3`` grid over ``centre + [-bound, bound]^3``.

    ``density_fn`` maps points ``[N, 3]`` to densities ``[N]`` (or ``[N, 1]``). The grid is
    visited in ``block_size^3`` blocks so at most that many points are alive at once. Returns a
    float32 array indexed ``[ix, iy, iz]`` (x, y, z of ``centre_i + linspace(-bound, bound,
    resolution)``). The blocks fill a grid on ``device``, read back to the host once.
    """
    base = torch.linspace(-bound, bound, resolution, device=device)
    axes = [base + float(c) for c in centre]
    grid = torch.empty((resolution,) * 3, dtype=torch.float32, device=device)
    for i0 in range(0, resolution, block_size):
        for j0 in range(0, resolution, block_size):
            for k0 in range(0, resolution, block_size):
                xs, ys, zs = (axes[0][i0:i0 + block_size], axes[1][j0:j0 + block_size],
                              axes[2][k0:k0 + block_size])
                pts = torch.stack(torch.meshgrid(xs, ys, zs, indexing="ij"), dim=-1)
                d = density_fn(pts.reshape(-1, 3)).reshape(len(xs), len(ys), len(zs))
                grid[i0:i0 + len(xs), j0:j0 + len(ys), k0:k0 + len(zs)] = d.detach().float()
    return grid.cpu().numpy()


def fitted_box(means: Tensor, opacities: Tensor | None = None, fill: float = 0.9,
               min_opacity: float = 0.005, scales: Tensor | None = None,
               pad_sigma: float = 0.0) -> tuple[tuple[float, float, float], float]:
    """DreamGaussian's normalisation as a sampling box: the centre of the means' bounding box
    (Gaussians with opacity > ``min_opacity``) and the half side ``max extent / (2 * fill)``, so
    the box maps to +-1 and the object to +-``fill`` along its longest axis.

    With ``scales`` [N, 3] and ``pad_sigma > 0`` each Gaussian is bounded by its mean +- ``pad_sigma``
    times its largest scale, so a density level set reaching past the means is not cut off.

    Returns ``(centre (x, y, z), half side)``.
    """
    pts = means.detach().float()
    if pts.shape[0] == 0:
        raise ValueError("fitted_box: no Gaussian to bound")
    pad = None
    if scales is not None and pad_sigma > 0:
        pad = float(pad_sigma) * scales.detach().float().amax(-1, keepdim=True)
    lo, hi = (pts, pts) if pad is None else (pts - pad, pts + pad)
    if opacities is not None:  # the kept Gaussians when any (masked with where: no host sync)
        keep = opacities.detach().reshape(-1, 1) > min_opacity
        any_kept = keep.any()
        lo = torch.where(any_kept, torch.where(keep, lo, float("inf")), lo)
        hi = torch.where(any_kept, torch.where(keep, hi, float("-inf")), hi)
    lo, hi = lo.amin(0), hi.amax(0)
    centre = 0.5 * (lo + hi)
    *centre_xyz, extent = torch.cat([centre, (hi - lo).amax()[None]]).tolist()  # one host read
    half = max(extent, 1e-6) / (2.0 * float(fill))
    return tuple(centre_xyz), half

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


def clean_pymeshlab(vertices: np.ndarray, faces: np.ndarray, merge_close_pct: float = 1.0,
                    min_component_pct: float = 20.0, min_component_faces: int = 64
                    ) -> tuple[np.ndarray, np.ndarray]:
    """DreamGaussian's clean-up with pymeshlab: drop unreferenced vertices, merge vertices closer
    than ``merge_close_pct`` % of the bounding-box diagonal, drop duplicate and null faces, drop
    connected components smaller than ``min_component_pct`` % of the diagonal or with fewer than
    ``min_component_faces`` faces, repair non-manifold edges (removing faces) and vertices
    (splitting them). A percentage or count of 0 skips that step. When the component limits
    would remove every face (a tiny mesh), they are skipped."""
    import pymeshlab as pml

    ms = pml.MeshSet()
    ms.add_mesh(pml.Mesh(np.asarray(vertices, np.float64), np.asarray(faces, np.int32)))
    ms.meshing_remove_unreferenced_vertices()
    if merge_close_pct > 0:
        ms.meshing_merge_close_vertices(threshold=pml.PercentageValue(float(merge_close_pct)))
    ms.meshing_remove_duplicate_faces()
    ms.meshing_remove_null_faces()
    if min_component_pct > 0:
        ms.meshing_remove_connected_component_by_diameter(
            mincomponentdiag=pml.PercentageValue(float(min_component_pct)))
    if min_component_faces > 0:
        ms.meshing_remove_connected_component_by_face_number(
            mincomponentsize=int(min_component_faces))
    ms.meshing_repair_non_manifold_edges(method=0)  # 0: remove the faces
    ms.meshing_repair_non_manifold_vertices(vertdispratio=0)
    ms.meshing_remove_unreferenced_vertices()
    m = ms.current_mesh()
    if m.face_number() == 0 and (min_component_pct > 0 or min_component_faces > 0):
        # every component was "small" (a tiny mesh): keep them rather than return nothing
        logger.warning("clean-up: every component is below the size limits; keeping them all")
        return clean_pymeshlab(vertices, faces, merge_close_pct, 0.0, 0)
    return np.asarray(m.vertex_matrix(), np.float64), np.asarray(m.face_matrix(), np.int64)


def _to_trimesh(vertices: np.ndarray, faces: np.ndarray):
    """A trimesh with duplicate vertices merged and degenerate/duplicate faces dropped."""
    import trimesh

    tm = trimesh.Trimesh(vertices, faces, process=True)
    tm.update_faces(tm.nondegenerate_faces())
    tm.update_faces(tm.unique_faces())
    tm.remove_unreferenced_vertices()
    return tm


def _keep_largest(tm):
    """Only the connected component (by shared edges) with the most faces."""
    import trimesh

    labels = trimesh.graph.connected_component_labels(tm.face_adjacency, node_count=len(tm.faces))
    if labels.size:
        counts = np.bincount(labels)
        if len(counts) > 1:
            keep = labels == int(np.argmax(counts))
            logger.info("extract: %d components, keeping the largest (%d of %d faces)",
                        len(counts), int(keep.sum()), len(tm.faces))
            tm.update_faces(keep)
            tm.remove_unreferenced_vertices()
    return tm


def extract_mesh(density_fn: Callable[[Tensor], Tensor], bound: float = 1.0,
                 resolution: int = 128, threshold: float = 1.0, block_size: int = 64,
                 decimate_target: int = 100_000, device="cpu", centre=(0.0, 0.0, 0.0),
                 clean: str = "basic", merge_close_pct: float = 1.0,
                 min_component_pct: float = 20.0, min_component_faces: int = 64,
                 keep_largest: bool | None = None, clock: StepClock | None = None) -> Mesh:
    """Extract the ``threshold`` iso-surface of a density field as an outward-facing mesh.

    Steps (timed by ``clock`` when given: ``density``, ``marching_cubes``, ``cleanup``,
    ``decimation``): sample the grid over ``centre +- bound`` (bounded memory, see
    :func:`sample_density_grid`; :func:`fitted_box` gives DreamGaussian's box); pad it with one
    layer below the threshold so surfaces touching the box are closed; PyMCubes marching cubes;
    clean up: ``clean="pymeshlab"`` runs :func:`clean_pymeshlab`, ``"basic"`` only merges
    duplicate vertices and drops degenerate/duplicate faces (trimesh); keep the largest connected
    component when ``keep_largest`` (default: only with ``basic``); decimate to
    ``decimate_target`` faces when above it (fast_simplification's quadric decimation); orient
    triangles counter-clockwise seen from outside (positive signed volume); compute area-weighted
    vertex normals. Densities above the threshold are inside.

    Returns a :class:`Mesh` on ``device`` (float32 positions in world units).
    Raises ValueError when nothing crosses the threshold.
    """
    import mcubes

    if clean not in ("basic", "pymeshlab"):
        raise ValueError(f"unknown mesh clean-up {clean!r}: expected basic or pymeshlab")
    clock = clock if clock is not None else StepClock()
    with clock.step("density"):
        grid = sample_density_grid(density_fn, bound, resolution, block_size, device, centre)
    with clock.step("marching_cubes"):
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
        verts = (verts - 1.0) * spacing - bound + np.asarray(centre, np.float64)  # index -> world
    if len(faces) == 0:
        raise ValueError(f"no surface: marching cubes found no triangle at threshold {threshold:g}")
    with clock.step("cleanup"):
        faces = faces.astype(np.int64)
        if clean == "pymeshlab":
            verts, faces = clean_pymeshlab(verts, faces, merge_close_pct, min_component_pct,
                                           min_component_faces)
            if len(faces) == 0:
                raise ValueError("no surface: the clean-up removed every face")
        tm = _to_trimesh(verts, faces)
        if keep_largest if keep_largest is not None else clean == "basic":
            tm = _keep_largest(tm)
    with clock.step("decimation"):
        if len(tm.faces) > decimate_target:
            n0 = len(tm.faces)
            tm = _decimate(tm, decimate_target)
            logger.info("extract: decimated %d -> %d faces", n0, len(tm.faces))
    if tm.volume < 0:  # marching cubes winding is inward for this sign convention: flip it
        tm.invert()
    mesh = Mesh(accel.upload(np.asarray(tm.vertices), device, torch.float32),
                accel.upload(np.asarray(tm.faces), device, torch.int64))
    return mesh.compute_normals()
