"""Density -> mesh extraction: watertight, accurate, outward, decimated, largest component."""

import math

import numpy as np
import pytest
import torch

from hash3d_dg.mesh.extract import extract_mesh, sample_density_grid

R0 = 0.5


def sphere_density(p: torch.Tensor, centre=(0.1, -0.05, 0.0), radius=R0) -> torch.Tensor:
    """Crosses 1 at distance ``radius`` from ``centre``; larger inside."""
    return 1.0 + 4.0 * (radius - (p - torch.tensor(centre)).norm(dim=-1))


@pytest.fixture(scope="module")
def sphere():
    return extract_mesh(sphere_density, bound=1.0, resolution=64, threshold=1.0, block_size=24)


def test_sphere_is_watertight_accurate_and_outward(sphere):
    tm = sphere.to_trimesh()
    assert tm.is_watertight
    exact = 4.0 / 3.0 * math.pi * R0 ** 3
    assert abs(sphere.signed_volume() - exact) / exact < 0.03  # positive: triangles face out
    centre = torch.tensor([0.1, -0.05, 0.0])
    radial = torch.nn.functional.normalize(sphere.v - centre, dim=-1)
    assert (sphere.vn * radial).sum(-1).min() > 0.9  # vertex normals point outward
    fc = sphere.v[sphere.f].mean(1) - centre
    assert ((sphere.face_normals() * fc).sum(-1) > 0).all()
    dist = (sphere.v - centre).norm(dim=-1)
    assert (dist - R0).abs().max() < 0.02
    assert sphere.v.dtype == torch.float32 and sphere.f.dtype == torch.int64


def test_decimation_respects_the_target(sphere):
    small = extract_mesh(sphere_density, resolution=64, decimate_target=600)
    assert small.num_faces <= 600 < sphere.num_faces
    exact = 4.0 / 3.0 * math.pi * R0 ** 3
    assert abs(small.signed_volume() - exact) / exact < 0.05
    assert small.to_trimesh().is_watertight


def test_two_blobs_keep_the_largest():
    def density(p):
        a = sphere_density(p, (-0.4, 0.0, 0.0), 0.4)
        b = sphere_density(p, (0.6, 0.1, 0.0), 0.2)
        return torch.maximum(a, b)

    mesh = extract_mesh(density, resolution=64)
    assert mesh.v[:, 0].max() < 0.05  # only the big blob (x in [-0.8, 0]) is left
    exact = 4.0 / 3.0 * math.pi * 0.4 ** 3
    assert abs(mesh.signed_volume() - exact) / exact < 0.03


def test_surface_touching_the_box_is_closed():
    mesh = extract_mesh(lambda p: sphere_density(p, (0.0, 0.0, 0.0), 0.7), bound=0.5,
                        resolution=32)
    assert mesh.to_trimesh().is_watertight and mesh.signed_volume() > 0


def test_blocked_sampling_matches_one_block():
    f = lambda p: torch.sin(3 * p[:, 0]) + p[:, 1] * p[:, 2]  # noqa: E731
    a = sample_density_grid(f, 1.0, 19, block_size=5)
    b = sample_density_grid(f, 1.0, 19, block_size=64)
    np.testing.assert_array_equal(a, b)
    axis = np.linspace(-1, 1, 19)
    np.testing.assert_allclose(a[3, 7, 11], np.sin(3 * axis[3]) + axis[7] * axis[11], rtol=1e-5)


def test_no_crossing_is_a_clear_error():
    with pytest.raises(ValueError, match="never crosses the threshold"):
        extract_mesh(lambda p: torch.zeros(p.shape[0]), resolution=16)


# ------------------------------------------------------------------ mesh type: normals, uv atlas
def test_vertex_normals_are_area_weighted():
    from hash3d_dg.mesh.mesh import Mesh

    v = torch.tensor([[0.0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 2], [0, 2, 0]])
    f = torch.tensor([[0, 1, 2], [0, 4, 3]])  # areas 0.5 (normal +z) and 2 (normal +x)
    vn = Mesh(v, f).compute_normals().vn
    torch.testing.assert_close(vn[0], torch.tensor([4.0, 0.0, 1.0]) / math.sqrt(17.0))
    torch.testing.assert_close(vn[1], torch.tensor([0.0, 0.0, 1.0]))


def test_unwrap_uv_makes_a_non_overlapping_atlas_and_keeps_geometry():
    import trimesh

    from hash3d_dg.mesh.mesh import Mesh
    from hash3d_dg.mesh.rasterize_torch import rasterize_uv

    mesh = Mesh.from_trimesh(trimesh.creation.icosphere(subdivisions=2, radius=0.5))
    atlas = mesh.unwrap_uv(texture_size=256, padding=2)
    assert torch.equal(atlas.v, mesh.v) and torch.equal(atlas.f, mesh.f)
    assert atlas.ft.shape == mesh.f.shape and atlas.vt.min() >= 0 and atlas.vt.max() <= 1
    # every uv triangle has area, and the rasterised atlas covers the sum of their areas
    # (overlapping charts would cover less)
    c = atlas.vt[atlas.ft].double()
    e1, e2 = c[:, 1] - c[:, 0], c[:, 2] - c[:, 0]
    areas = 0.5 * (e1[:, 0] * e2[:, 1] - e1[:, 1] * e2[:, 0]).abs()
    assert areas.min() > 0
    tri_id, bary = rasterize_uv(atlas.vt, atlas.ft, 256)
    covered = int((tri_id >= 0).sum())
    assert abs(covered - float(areas.sum()) * 256 ** 2) / covered < 0.03
    # the texel centres' barycentrics reproduce their uv
    rows, cols = torch.nonzero(tri_id >= 0, as_tuple=True)
    uv = (atlas.vt[atlas.ft[tri_id[rows, cols]]] * bary[rows, cols][..., None]).sum(1)
    torch.testing.assert_close(uv[:, 0], (cols + 0.5) / 256, atol=1e-5, rtol=0)
    torch.testing.assert_close(uv[:, 1], 1 - (rows + 0.5) / 256, atol=1e-5, rtol=0)
    # trimesh view: one vertex per (position, uv) pair, same corners
    tm = atlas.to_trimesh()
    pairs = torch.unique(torch.stack([atlas.f.reshape(-1), atlas.ft.reshape(-1)], 1), dim=0)
    assert len(tm.vertices) == len(pairs)
    np.testing.assert_allclose(np.asarray(tm.visual.uv)[tm.faces], atlas.vt[atlas.ft].numpy(),
                               atol=1e-7)
    np.testing.assert_allclose(np.asarray(tm.vertices)[tm.faces], atlas.v[atlas.f].numpy(),
                               atol=1e-7)


def test_xatlas_crash_is_retried_then_reported(tmp_path, monkeypatch):
    import trimesh

    from hash3d_dg.mesh import uv as uv_mod

    marker = tmp_path / "crashed"
    crash_once = (f"import os, signal, pathlib\nm = pathlib.Path({str(marker)!r})\n"
                  "if not m.exists():\n    m.touch()\n    os.kill(os.getpid(), signal.SIGSEGV)\n")
    monkeypatch.setattr(uv_mod, "_WORKER", crash_once + uv_mod._WORKER)
    tm = trimesh.creation.icosphere(subdivisions=1)
    vmapping, indices, uvs, _ = uv_mod.xatlas_unwrap(tm.vertices, tm.faces, 64, 1)
    assert marker.exists()
    np.testing.assert_array_equal(vmapping[indices], tm.faces)
    monkeypatch.setattr(uv_mod, "_WORKER", "import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)\n")
    with pytest.raises(RuntimeError, match="xatlas could not unwrap"):
        uv_mod.xatlas_unwrap(tm.vertices, tm.faces, 64, 1)
