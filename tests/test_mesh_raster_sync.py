"""Sync-free torch mesh rasteriser: equal to a brute-force per-pixel reference, independent of
chunking, finite gradients at empty pixels, and (CUDA) at most one host sync per call."""

import warnings

import numpy as np
import pytest
import torch
import trimesh

from hash3d_dg.camera import Camera
from hash3d_dg.mesh.backends import _shade
from hash3d_dg.mesh.mesh import Mesh, sample_texture, vertex_normals
from hash3d_dg.mesh.rasterize_torch import rasterize_torch, rasterize_uv


def _soup(seed: int = 1) -> Mesh:
    """Random triangles around the origin: some cross the near plane, some are off screen,
    face 0 is degenerate (two equal vertices) and face 1 is a sliver."""
    g = torch.Generator().manual_seed(seed)
    v = (torch.rand(90, 3, generator=g, dtype=torch.float64) * 3.0 - 1.5)
    f = torch.randint(0, 90, (60, 3), generator=g)
    f[0] = torch.tensor([0, 0, 1])
    v[2] = v[3] + 1e-13
    f[1] = torch.tensor([3, 2, 4])
    return Mesh(v, f)


def _cases():
    ico = Mesh.from_trimesh(trimesh.creation.icosphere(subdivisions=2, radius=0.6))
    ico = Mesh(ico.v.double(), ico.f)
    wide = Camera.orbit(-20.0, 30.0, 2.0, width=48, height=40)
    close = Camera.orbit(10.0, 0.0, 1.2, width=40, height=36)  # inside the soup's extent
    return [(ico, wide), (ico, close), (_soup(), wide), (_soup(), close)]


def _brute_force(v: np.ndarray, f: np.ndarray, mvp: np.ndarray, width: int, height: int,
                 near: float):
    """Per pixel, every face: screen-space barycentrics from cross products of the projected
    corners (float64), coverage, 1/depth; nearest face (larger id on ties of the float32 depth).

    Returns ``tri [H, W]``, perspective ``bary [H, W, 3]``, ``depth [H, W]`` and ``clear [H, W]``:
    pixels whose answer cannot flip by rounding (no face within 1e-7 of an edge, and a nearest
    depth that beats the next by more than rounding)."""
    clip = np.concatenate([v, np.ones((len(v), 1))], 1) @ mvp.T
    w = clip[:, 3]
    xy = np.stack([(clip[:, 0] / w * 0.5 + 0.5) * width, (0.5 - clip[:, 1] / w * 0.5) * height], -1)
    px, py = np.meshgrid(np.arange(width) + 0.5, np.arange(height) + 0.5)
    p = np.stack([px, py], -1).reshape(-1, 1, 2)  # [P, 1, 2]
    a, b, c = xy[f[:, 0]], xy[f[:, 1]], xy[f[:, 2]]  # [F, 2]

    def cross(s, t):
        return s[..., 0] * t[..., 1] - s[..., 1] * t[..., 0]

    with np.errstate(all="ignore"):
        area = cross(b - a, c - a)
        ok = (w[f] >= max(near, 1e-12)).all(1) & (np.abs(area) > 1e-12) & np.isfinite(area)
        lam = np.stack([cross(b - p, c - p), cross(c - p, a - p), cross(a - p, b - p)], -1)
        lam = lam / area[None, :, None]  # [P, F, 3]
        inv_w = 1.0 / w[f]  # [F, 3]
        inv_depth = (lam * inv_w[None]).sum(-1)  # [P, F]
        lo = lam.min(-1)
        inside = ok[None] & (lo >= 0) & (inv_depth > 0)
        loose = ok[None] & (lo >= -1e-7) & (inv_depth > 0)
        near_edge = (loose & (lo < 1e-7)).any(1)
        key = np.where(inside, inv_depth.astype(np.float32).astype(np.float64), -np.inf)
        order = np.argsort(key, axis=1, kind="stable")  # ties: larger index last
        best, second = order[:, -1], order[:, -2]
        rows = np.arange(len(key))
        hit = np.isfinite(key[rows, best])
        gap = key[rows, best] - key[rows, second]
        clear = ~near_edge & (~hit | (gap > 1e-6 * np.abs(key[rows, best])))
        tri = np.where(hit, best, -1)
        q = lam[rows, best] * inv_w[best]
        s = q.sum(-1, keepdims=True)
        bary = np.where(hit[:, None], q / s, 0.0)
        depth = np.where(hit, 1.0 / s[:, 0], 0.0)
    shape = (height, width)
    return tri.reshape(shape), bary.reshape(shape + (3,)), depth.reshape(shape), clear.reshape(shape)


@pytest.mark.parametrize("all_pixels", [True, False])
@pytest.mark.parametrize("case", range(4))
def test_matches_brute_force_per_pixel_reference(case, all_pixels):
    mesh, cam = _cases()[case]
    mvp = cam.mvp(dtype=torch.float64)
    tri, bary, depth = rasterize_torch(mesh.v, mesh.f, mvp, cam.width, cam.height, near=cam.near,
                                       all_pixels=all_pixels)
    rt, rb, rd, clear = _brute_force(mesh.v.numpy(), mesh.f.numpy(), mvp.numpy(), cam.width,
                                     cam.height, cam.near)
    assert clear.mean() > 0.9 and (rt[clear] >= 0).sum() > 100
    np.testing.assert_array_equal(tri.numpy()[clear], rt[clear])
    same = (tri.numpy() == rt) & (rt >= 0)
    np.testing.assert_allclose(bary.numpy()[same], rb[same], atol=1e-9)
    np.testing.assert_allclose(depth.numpy()[same], rd[same], rtol=1e-9)
    empty = tri.numpy() < 0
    assert (bary.numpy()[empty] == 0).all() and (depth.numpy()[empty] == 0).all()


@pytest.mark.parametrize("case", [0, 3])
def test_any_chunk_budget_gives_the_same_result(case):
    mesh, cam = _cases()[case]
    mvp = cam.mvp(dtype=torch.float64)
    ref = rasterize_torch(mesh.v, mesh.f, mvp, cam.width, cam.height, near=cam.near)
    for budget in (1, 7, 50, 333, 4096):
        out = rasterize_torch(mesh.v, mesh.f, mvp, cam.width, cam.height, near=cam.near,
                              pair_budget=budget)
        assert all(torch.equal(x, y) for x, y in zip(ref, out)), budget
    # the sync-free all-pixel attribute pass gives the same values as the covered-pixel one
    out = rasterize_torch(mesh.v, mesh.f, mvp, cam.width, cam.height, near=cam.near,
                          all_pixels=True)
    assert all(torch.equal(x, y) for x, y in zip(ref, out))


def test_uv_raster_paths_agree():
    mesh = Mesh.from_trimesh(trimesh.creation.icosphere(subdivisions=2, radius=0.6))
    mesh = mesh.unwrap_uv(texture_size=48)
    a = rasterize_uv(mesh.vt, mesh.ft, 48, all_pixels=False)
    b = rasterize_uv(mesh.vt, mesh.ft, 48, all_pixels=True, pair_budget=11)
    assert (a[0] >= 0).sum() > 300
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_empty_and_fully_culled_inputs():
    cam = Camera.orbit(0.0, 0.0, 2.0, width=12, height=10)
    v = torch.tensor([[0.0, 0.0, 5.0], [1.0, 0.0, 5.0], [0.0, 1.0, 5.0]])  # behind the camera
    for f in (torch.zeros((0, 3), dtype=torch.int64), torch.tensor([[0, 1, 2]])):
        for all_pixels in (True, False):
            tri, bary, depth = rasterize_torch(v, f, cam.mvp(), 12, 10, near=cam.near,
                                               all_pixels=all_pixels)
            assert (tri == -1).all() and (bary == 0).all() and (depth == 0).all()
            sh = _shade(tri, bary, f, torch.zeros_like(v), None, None, None,
                        all_pixels=all_pixels)
            assert all((t == 0).all() for t in sh.values())


def test_gradients_are_finite_when_the_first_face_is_degenerate_and_culled():
    # empty pixels evaluate a stand-in triangle; face 0 (what clamp_min(0) points them at) being
    # degenerate or behind the camera must not leak NaN into the vertex gradients
    mesh, cam = _cases()[3]
    v = mesh.v.float().requires_grad_(True)
    tri, bary, depth = rasterize_torch(v, mesh.f, cam.mvp(), cam.width, cam.height,
                                       near=cam.near, all_pixels=True)
    sh = _shade(tri, bary, mesh.f, vertex_normals(v, mesh.f), None, None, None, all_pixels=True)
    assert (tri < 0).any() and (tri >= 0).sum() > 100
    (depth.sum() + bary[..., 0].sum() + sh["normal"].sum()).backward()
    assert torch.isfinite(v.grad).all() and v.grad.abs().sum() > 0


def test_shade_with_and_without_a_lookup_agree():
    mesh = Mesh.from_trimesh(trimesh.creation.icosphere(subdivisions=2, radius=0.6))
    mesh = mesh.unwrap_uv(texture_size=32).compute_normals()
    tex = torch.rand(32, 32, 3, generator=torch.Generator().manual_seed(3))
    cam = Camera.orbit(-20.0, 30.0, 2.0, width=40, height=32)
    tri, bary, _ = rasterize_torch(mesh.v, mesh.f, cam.mvp(), 40, 32, near=cam.near)
    plain = _shade(tri, bary, mesh.f, mesh.vn, mesh.vt, mesh.ft, tex, all_pixels=False)
    for all_pixels in (True, False):
        for lookup in (None, sample_texture):
            other = _shade(tri, bary, mesh.f, mesh.vn, mesh.vt, mesh.ft, tex, lookup=lookup,
                           all_pixels=all_pixels)
            for k in plain:
                assert torch.equal(plain[k], other[k]), (k, all_pixels, lookup)
    empty = tri < 0
    assert empty.any() and (plain["fg"][empty] == 0).all() and (plain["normal"][empty] == 0).all()


def _count_syncs(fn, sites=None):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            out = fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    found = [w for w in caught if "synchroniz" in str(w.message)]
    if sites is not None:  # where each sync came from, for the assertion message
        sites.extend(f"{w.filename}:{w.lineno}" for w in found)
    return out, len(found)


def test_accelerator_path_call_has_one_host_sync_on_the_cpu_counter():
    """The launch counter (``bench launches``) on the CPU, on the path CUDA takes
    (``all_pixels``): one device-to-host read per call, the chunk plan's box sizes."""
    from hash3d_dg import accel
    from hash3d_dg.bench.launches import LaunchCounter

    mesh = Mesh.from_trimesh(trimesh.creation.icosphere(subdivisions=3, radius=0.6))
    mesh = mesh.unwrap_uv(texture_size=64).compute_normals()
    cam = Camera.orbit(-20.0, 30.0, 2.0, width=96, height=80)
    mvp = cam.mvp(device=torch.device("cpu"))
    tex = torch.rand(64, 64, 3, device=torch.device("cpu"))
    for budget in (1 << 19, 500):
        with accel.virtual(), LaunchCounter() as counter:
            tri, bary, _ = rasterize_torch(mesh.v, mesh.f, mvp, 96, 80, near=cam.near,
                                           pair_budget=budget, all_pixels=True)
            _shade(tri, bary, mesh.f, mesh.vn, mesh.vt, mesh.ft, tex, all_pixels=True)
        counts = counter.take()
        assert counts.syncs == 1 and counts.uploads == 0, counts.sites


@pytest.mark.cuda
def test_cuda_call_has_one_host_sync_and_matches_cpu():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    mesh = Mesh.from_trimesh(trimesh.creation.icosphere(subdivisions=3, radius=0.6))
    mesh = mesh.unwrap_uv(texture_size=64).compute_normals()
    tex = torch.rand(64, 64, 3)
    cam = Camera.orbit(-20.0, 30.0, 2.0, width=96, height=80)
    gm = mesh.to("cuda")
    gtex, mvp = tex.cuda(), cam.mvp(device="cuda")
    for budget in (1 << 19, 500):  # one chunk, many chunks (all_pixels is the default on CUDA)
        rasterize_torch(gm.v, gm.f, mvp, 96, 80, near=cam.near, pair_budget=budget)  # warm up
        sites: list[str] = []
        (tri, bary, depth), n = _count_syncs(
            lambda: rasterize_torch(gm.v, gm.f, mvp, 96, 80, near=cam.near, pair_budget=budget),
            sites)
        # the chunk plan's single device -> host copy (the H200 run saw 2: the sites say where)
        assert n == 1, (n, sites)
        sh, n_shade = _count_syncs(lambda: _shade(tri, bary, gm.f, gm.vn, gm.vt, gm.ft, gtex))
        assert n_shade == 0, n_shade
    ref = rasterize_torch(mesh.v, mesh.f, cam.mvp(), 96, 80, near=cam.near)
    assert torch.equal(tri.cpu(), ref[0])
    assert (bary.cpu() - ref[1]).abs().max() < 1e-5 and (depth.cpu() - ref[2]).abs().max() < 1e-5
