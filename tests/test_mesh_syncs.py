"""The mesh phase's host syncs (``bench launches --stages mesh``): a handful for the whole phase
on the accelerator's code path, and that path gives the CPU path's results bit for bit."""

import numpy as np
import torch
from scipy import ndimage

from hash3d_dg import accel
from hash3d_dg.bench.launches import count_mesh, mesh_config, mesh_scene

#: Box fit, the density grid's one group of chunk selections, the grid read for marching cubes,
#: the positions read for xatlas, the uv raster's chunk plan, the bake's final read.
MESH_SYNCS = 6


def test_mesh_phase_has_a_handful_of_syncs_and_no_blocking_upload():
    cfg = mesh_config(resolution=24, texture_size=32, bake_render_size=16)
    r = count_mesh(cfg, mesh_scene(200))
    # 24^3 points are 4 density chunks and the bake renders 19 views: a sync per chunk or per
    # view (an .item(), a nonzero, a boolean mask) would exceed the budget
    assert r["syncs"] <= MESH_SYNCS, r["sync_sites"]
    assert r["uploads"] == 0, r["upload_sites"]
    assert r["kernels"] > 500 and r["faces"] > 100  # the counter saw the phase


def test_accelerator_path_gives_the_cpu_path_mesh_bit_for_bit():
    from hash3d_dg.stages.meshing import extract_textured_mesh

    cfg = mesh_config(resolution=24, texture_size=32, bake_render_size=16)
    g = mesh_scene(200)
    plain, _ = extract_textured_mesh(g, cfg)
    with accel.virtual():
        virtual, _ = extract_textured_mesh(g, cfg)
    for name in ("v", "f", "vn", "vt", "ft", "albedo"):
        assert torch.equal(getattr(plain, name), getattr(virtual, name)), name


def test_atlas_mask_dilates_as_scipy():
    from hash3d_dg.mesh.bake import atlas_mask
    from hash3d_dg.mesh.mesh import Mesh

    rng = np.random.default_rng(0)
    tri = torch.as_tensor(np.where(rng.random((40, 33)) < 0.03, 0, -1))
    mesh = Mesh(torch.zeros(3, 3), torch.zeros(1, 3, dtype=torch.long))
    for dilate in (0, 1, 2, 3):
        expected = (tri >= 0).numpy()
        if dilate:
            expected = ndimage.binary_dilation(expected, iterations=dilate)
        assert np.array_equal(atlas_mask(mesh, 33, dilate, tri).numpy(), expected), dilate


def test_chunk_selections_equal_a_nonzero_per_chunk():
    """The chunks' boxes and Gaussian selections, compacted on the device in one group or in
    several (a small ``max_pairs``), are each chunk's own ``amin`` / ``amax`` / ``nonzero``."""
    from hash3d_dg.gaussians.model import _chunk_selections

    gen = torch.Generator().manual_seed(0)
    pts = torch.rand(1000, 3, generator=gen)
    g_lo = torch.rand(70, 3, generator=gen) * 0.9
    g_hi = g_lo + 0.1
    for max_pairs in (1 << 22, 140, 1):
        got = list(_chunk_selections(pts, g_lo, g_hi, 96, max_pairs))
        assert len(got) == 11
        for c, (lo, hi, sel) in enumerate(got):
            p = pts[c * 96:(c + 1) * 96]
            assert torch.equal(lo, p.amin(0)) and torch.equal(hi, p.amax(0))
            expected = torch.nonzero(((g_hi >= lo) & (g_lo <= hi)).all(-1)).squeeze(1)
            assert torch.equal(sel, expected), (max_pairs, c)
