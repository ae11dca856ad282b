"""Mesh rasteriser: coverage, barycentrics, depth, orientation, z-buffer, gradients, backends."""

import numpy as np
import pytest
import torch
import trimesh
from scipy.spatial import ConvexHull

from hash3d_dg.camera import Camera
from hash3d_dg.mesh.backends import (available_mesh_backends, rasterize_mesh,
                                     resolve_mesh_backend)
from hash3d_dg.mesh.mesh import Mesh
from hash3d_dg.mesh.rasterize_torch import rasterize_torch


def _mesh(v, f, dtype=torch.float32, **kw) -> Mesh:
    return Mesh(torch.tensor(v, dtype=dtype), torch.tensor(f, dtype=torch.int64), **kw)


def _pixel_rays(cam: Camera):
    """Ray origin and world directions ``[H, W, 3]`` through pixel centres (from K and c2w)."""
    K = cam.K_np
    u, v = np.meshgrid(np.arange(cam.width) + 0.5, np.arange(cam.height) + 0.5)
    d_cv = np.stack([(u - K[0, 2]) / K[0, 0], (v - K[1, 2]) / K[1, 1], np.ones_like(u)], -1)
    d_gl = d_cv * np.array([1.0, -1.0, -1.0])  # OpenCV camera axes -> OpenGL camera axes
    return cam.campos, d_gl @ cam.c2w[:3, :3].T


def test_single_triangle_matches_analytic_reference():
    tri = np.array([[-0.5, -0.4, 0.1], [0.6, -0.3, -0.2], [0.0, 0.5, 0.3]])
    cam = Camera.orbit(0.0, 0.0, 2.0, width=40, height=32)
    r = rasterize_mesh(_mesh(tri, [[0, 1, 2]]), cam, backend="torch")
    # reference: intersect each pixel ray with the triangle's plane, solve barycentrics in 3D
    o, d = _pixel_rays(cam)
    n = np.cross(tri[1] - tri[0], tri[2] - tri[0])
    t = ((tri[0] - o) @ n) / (d @ n)
    p = o + t[..., None] * d
    m = np.stack([tri[1] - tri[0], tri[2] - tri[0]], 1)
    l12 = np.linalg.lstsq(m, (p - tri[0]).reshape(-1, 3).T, rcond=None)[0].T.reshape(*t.shape, 2)
    lam = np.concatenate([1.0 - l12.sum(-1, keepdims=True), l12], -1)
    inside = (lam >= 0).all(-1)
    clear = np.abs(lam).min(-1) > 1e-3  # ignore pixel centres on an edge
    covered = (r.tri_id == 0).numpy()
    assert inside.sum() > 100
    np.testing.assert_array_equal(covered[clear], inside[clear])
    assert ((r.tri_id == -1).numpy() | covered).all()
    # barycentrics reproduce the 3D point under the pixel; depth is its view-axis distance
    bary = r.bary.numpy()[covered]
    np.testing.assert_allclose(bary @ tri, p[covered], atol=1e-5)
    forward = -cam.c2w[:3, 2]
    np.testing.assert_allclose(r.depth[..., 0].numpy()[covered], (p[covered] - o) @ forward,
                               rtol=1e-5)
    assert (r.depth[..., 0][~torch.from_numpy(covered)] == 0).all()
    assert (r.alpha[..., 0].numpy() == covered).all()


def test_cube_silhouette_area_matches_projected_hull():
    box = trimesh.creation.box(extents=(1.0, 1.0, 1.0))
    mesh = Mesh.from_trimesh(box)
    cam = Camera.orbit(-30.0, 30.0, 2.5, width=128)
    r = rasterize_mesh(mesh, cam, backend="torch")
    verts = np.asarray(box.vertices)
    cam_pts = verts @ cam.viewmat_np[:3, :3].T + cam.viewmat_np[:3, 3]
    pix = cam_pts @ cam.K_np.T
    hull_area = ConvexHull(pix[:, :2] / pix[:, 2:]).volume
    area = float(r.alpha.sum())
    assert abs(area - hull_area) / hull_area < 0.015
    # antialiased coverage (2x2 supersampling) is fractional and still matches the area
    aa = rasterize_mesh(mesh, cam, backend="torch", antialias=True)
    values = torch.unique(aa.alpha)
    assert set(values.tolist()) <= {0.0, 0.25, 0.5, 0.75, 1.0} and len(values) > 2
    assert abs(float(aa.alpha.sum()) - hull_area) / hull_area < 0.01


def test_image_orientation_row0_is_top_and_x_right():
    cam = Camera.orbit(0.0, 0.0, 2.0, width=32)
    up = _mesh([[-0.1, 0.4, 0.0], [0.1, 0.4, 0.0], [0.0, 0.6, 0.0]], [[0, 1, 2]])
    right = _mesh([[0.4, -0.1, 0.0], [0.6, 0.0, 0.0], [0.4, 0.1, 0.0]], [[0, 1, 2]])
    rows = torch.nonzero(rasterize_mesh(up, cam, backend="torch").tri_id >= 0)[:, 0]
    cols = torch.nonzero(rasterize_mesh(right, cam, backend="torch").tri_id >= 0)[:, 1]
    assert rows.numel() > 0 and rows.max() < 16
    assert cols.numel() > 0 and cols.min() >= 16


def test_zbuffer_nearest_wins_regardless_of_order():
    cam = Camera.orbit(0.0, 0.0, 2.0, width=24)
    far = [[-0.5, -0.5, 0.0], [0.5, -0.5, 0.0], [0.0, 0.5, 0.0]]
    near = [[-0.5, 0.5, 0.3], [0.0, -0.5, 0.3], [0.5, 0.5, 0.3]]
    for order in (0, 1):
        v = far + near if order == 0 else near + far
        near_id = 1 - order
        r = rasterize_mesh(_mesh(v, [[0, 1, 2], [3, 4, 5]]), cam, backend="torch")
        only_near = rasterize_mesh(_mesh(near, [[0, 1, 2]]), cam, backend="torch").tri_id >= 0
        assert only_near.sum() > 20
        assert (r.tri_id[only_near] == near_id).all()
        np.testing.assert_allclose(r.depth[only_near].numpy(), 1.7, rtol=1e-5)


def test_near_plane_culls_triangles_behind_the_camera():
    cam = Camera.orbit(0.0, 0.0, 2.0, width=16)
    v = [[-0.5, -0.5, 0.0], [0.5, -0.5, 0.0], [0.0, 0.5, 3.0],  # crosses the camera plane
         [-0.2, -0.2, 0.0], [0.2, -0.2, 0.0], [0.0, 0.2, 0.0]]
    r = rasterize_mesh(_mesh(v, [[0, 1, 2], [3, 4, 5]]), cam, backend="torch")
    assert set(torch.unique(r.tri_id).tolist()) == {-1, 1}
    assert torch.isfinite(r.rgb).all() and torch.isfinite(r.depth).all()


def test_chunking_does_not_change_the_result():
    mesh = Mesh.from_trimesh(trimesh.creation.icosphere(subdivisions=2, radius=0.7))
    cam = Camera.orbit(-20.0, 40.0, 1.6, width=48, height=40)
    a = rasterize_torch(mesh.v, mesh.f, cam.mvp(), 48, 40, near=cam.near)
    b = rasterize_torch(mesh.v, mesh.f, cam.mvp(), 48, 40, near=cam.near, pair_budget=7)
    assert torch.equal(a[0], b[0])
    assert torch.equal(a[1], b[1]) and torch.equal(a[2], b[2])


def _smooth_case(dtype=torch.float64):
    """A tilted triangle covering the whole 6x6 view, uvs inside (0.2, 0.8)."""
    v = [[-3.0, -2.0, -0.2], [3.0, -2.0, 0.1], [0.0, 3.0, 0.3]]
    vt = [[0.5 + 0.1 * x, 0.5 + 0.1 * y] for x, y, _ in v]
    mesh = _mesh(v, [[0, 1, 2]], dtype, vt=torch.tensor(vt, dtype=dtype),
                 ft=torch.tensor([[0, 1, 2]]))
    return mesh, Camera.orbit(0.0, 0.0, 2.0, width=6)


def test_gradcheck_wrt_albedo():
    mesh, cam = _smooth_case()
    # shrink the triangle so some pixels show the background too
    mesh = Mesh(mesh.v * 0.25, mesh.f, vt=mesh.vt, ft=mesh.ft)
    tex = torch.rand(4, 5, 3, dtype=torch.float64, requires_grad=True)
    bg = torch.tensor([0.2, 0.3, 0.4], dtype=torch.float64)
    r = rasterize_mesh(mesh, cam, background=bg, backend="torch", albedo=tex)
    assert 0 < float(r.alpha.sum()) < 36
    torch.autograd.gradcheck(
        lambda t: rasterize_mesh(mesh, cam, background=bg, backend="torch", albedo=t).rgb,
        (tex,))


def test_gradcheck_wrt_vertex_offsets():
    mesh, cam = _smooth_case()
    rows, cols = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")
    # a linear texture: bilinear lookups are then linear in uv, so the render is smooth
    tex = torch.stack([0.1 * cols + 0.05 * rows, 0.3 - 0.02 * cols + 0.07 * rows,
                       0.01 * cols + 0.1 * rows], -1).double()
    offsets = (0.02 * torch.randn(3, 3, dtype=torch.float64)).requires_grad_()
    r = rasterize_mesh(mesh, cam, backend="torch", albedo=tex, vertex_offsets=offsets)
    assert bool((r.tri_id == 0).all())

    def f(off):
        out = rasterize_mesh(mesh, cam, backend="torch", albedo=tex, vertex_offsets=off)
        return out.rgb, out.depth, out.uv, out.normal

    torch.autograd.gradcheck(f, (offsets,))


def test_untextured_mesh_is_white_and_normals_are_interpolated():
    mesh = Mesh.from_trimesh(trimesh.creation.icosphere(subdivisions=3, radius=0.5))
    cam = Camera.orbit(0.0, 0.0, 2.0, width=32)
    r = rasterize_mesh(mesh, cam, backend="torch")
    hit = r.tri_id >= 0
    assert torch.allclose(r.rgb[hit], torch.ones(3))
    centre = r.normal[16, 16]
    assert centre[2] > 0.99  # the sphere's front faces +z, toward the camera
    np.testing.assert_allclose(r.normal[hit].norm(dim=-1).numpy(), 1.0, atol=1e-5)


def test_backend_resolution():
    assert resolve_mesh_backend("auto", "cpu") == "torch"
    assert available_mesh_backends("cpu")["torch"]
    with pytest.raises(ValueError, match="unknown mesh backend"):
        resolve_mesh_backend("opengl", "cpu")
    if not available_mesh_backends("cpu")["nvdiffrast"]:
        with pytest.raises(ValueError, match="unavailable"):
            resolve_mesh_backend("nvdiffrast", "cpu")


@pytest.mark.cuda
def test_nvdiffrast_matches_torch_backend():
    pytest.importorskip("nvdiffrast.torch")
    mesh = Mesh.from_trimesh(trimesh.creation.icosphere(subdivisions=3, radius=0.6))
    mesh = mesh.unwrap_uv(texture_size=64)
    mesh.albedo = torch.rand(64, 64, 3)
    cam = Camera.orbit(-20.0, 30.0, 2.0, width=96, height=80)
    mesh = mesh.to("cuda")
    a = rasterize_mesh(mesh, cam, backend="torch", background=torch.ones(3))
    b = rasterize_mesh(mesh, cam, backend="nvdiffrast", background=torch.ones(3))
    assert b.backend == "nvdiffrast"
    same = a.tri_id == b.tri_id
    assert float(same.float().mean()) > 0.99
    both = same & (a.tri_id >= 0)
    assert (a.bary[both] - b.bary[both]).abs().max() < 1e-3
    assert (a.depth[both] - b.depth[both]).abs().max() < 1e-3
    assert (a.rgb[both] - b.rgb[both]).abs().max() < 1e-2
    assert (a.normal[both] - b.normal[both]).abs().max() < 1e-3
    aa = rasterize_mesh(mesh, cam, backend="nvdiffrast", antialias=True)
    assert aa.rgb.shape == (80, 96, 3)
