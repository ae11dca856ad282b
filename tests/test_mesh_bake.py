"""Bake modes, the fitted sampling box and the pymeshlab clean-up."""

import math

import numpy as np
import pytest
import torch
import trimesh

from hash3d_dg.camera import Camera
from hash3d_dg.mesh.backends import rasterize_mesh
from hash3d_dg.mesh.bake import DEFAULT_BAKE_VIEWS, bake_texture, front_first
from hash3d_dg.mesh.extract import clean_pymeshlab, extract_mesh, fitted_box
from hash3d_dg.mesh.mesh import Mesh

RED, BLUE = torch.tensor([0.9, 0.1, 0.1]), torch.tensor([0.1, 0.1, 0.9])


@pytest.fixture(scope="module")
def sphere():
    s = trimesh.creation.icosphere(subdivisions=3, radius=0.6)
    mesh = Mesh(torch.tensor(s.vertices, dtype=torch.float32), torch.tensor(s.faces))
    return mesh.compute_normals().unwrap_uv(texture_size=128)


def _view_coloured_source(sphere):
    """A 'source' whose colour depends on the camera: red from the front view, blue elsewhere."""
    def render_fn(cam):
        r = rasterize_mesh(sphere, cam, backend="torch")
        front = abs(cam.elevation) < 1e-6 and abs(cam.azimuth) < 1e-6
        colour = RED if front else BLUE
        return colour * r.alpha + (1 - r.alpha), r.alpha
    return render_fn


def _texel_normals(mesh: Mesh, size: int):
    from hash3d_dg.mesh.rasterize_torch import rasterize_uv

    tri, bary = rasterize_uv(mesh.vt, mesh.ft, size)
    inside = tri >= 0
    n = (mesh.vn[mesh.f[tri[inside]]] * bary[inside][..., None]).sum(1)
    return inside, torch.nn.functional.normalize(n, dim=-1)


def test_first_view_wins_in_first_mode_and_is_averaged_otherwise(sphere):
    render_fn = _view_coloured_source(sphere)
    kw = dict(radius=2.0, render_size=96, texture_size=128)
    first = bake_texture(sphere, render_fn, mode="first", **kw)
    avg = bake_texture(sphere, render_fn, mode="average", **kw)
    inside, n = _texel_normals(sphere, 128)
    facing = n[:, 2] > 0.8  # seen by the front view at cos > 0.5 (away from chart borders)
    back = n[:, 2] < -0.5  # never seen by the front view
    f_tex, a_tex = first[inside], avg[inside]
    assert (f_tex[facing] - RED).abs().max() < 1e-4  # exactly the front view's colour
    assert float((a_tex[facing] - RED).abs().max(-1).values.mean()) > 0.2  # blurred toward blue
    assert (f_tex[back] - BLUE).abs().max() < 1e-4 and (a_tex[back] - BLUE).abs().max() < 1e-4
    front = bake_texture(sphere, render_fn, mode="front", **kw)[inside]
    assert (front[facing] - RED).abs().max() < 1e-4 and (front[back] - BLUE).abs().max() < 1e-4


def test_an_input_view_missing_from_the_bake_views_is_added_first(sphere):
    seen = []

    def render_fn(cam):
        seen.append((round(cam.elevation, 6), round(cam.azimuth, 6)))
        r = rasterize_mesh(sphere, cam, backend="torch")
        return r.rgb, r.alpha

    bake_texture(sphere, render_fn, views=((0.0, 0.0), (0.0, 90.0)), mode="front",
                 front=(-20.0, 0.0), render_size=16, texture_size=32)
    assert seen == [(-20.0, 0.0), (0.0, 0.0), (0.0, 90.0)]


def test_front_first_orders_by_angle_from_the_input_view():
    order = front_first(DEFAULT_BAKE_VIEWS, (0.0, 0.0))
    assert order[0] == (0.0, 0.0) and sorted(order) == sorted(DEFAULT_BAKE_VIEWS)
    d = lambda el, az: np.array([math.cos(math.radians(el)) * math.sin(math.radians(az)),  # noqa
                                 -math.sin(math.radians(el)),
                                 math.cos(math.radians(el)) * math.cos(math.radians(az))])
    cos = [float(d(*v) @ d(0.0, 0.0)) for v in order]
    assert all(a >= b - 1e-9 for a, b in zip(cos, cos[1:]))
    assert front_first(DEFAULT_BAKE_VIEWS, (-30.0, 0.0))[0] == (-45.0, 0.0)


def test_unknown_bake_mode_is_refused(sphere):
    with pytest.raises(ValueError, match="bake mode"):
        bake_texture(sphere, _view_coloured_source(sphere), mode="median", render_size=16,
                     texture_size=32)


def _ball(centre, radius):
    c = torch.tensor(centre, dtype=torch.float32)
    return lambda p: 1.0 + 4.0 * (radius - (p - c).norm(dim=-1))


def test_fitted_box_keeps_an_object_outside_the_unit_box_whole():
    centre, r = (1.3, 0.2, -0.1), 0.4
    density = _ball(centre, r)
    means = torch.tensor(centre) + torch.tensor(
        trimesh.creation.icosphere(2, radius=r).vertices, dtype=torch.float32)
    box_centre, half = fitted_box(means, torch.ones(len(means)), fill=0.9)
    assert np.allclose(box_centre, centre, atol=1e-5) and abs(half - 2 * r / 1.8) < 1e-5
    mesh = extract_mesh(density, bound=half, centre=box_centre, resolution=48, clean="pymeshlab")
    exact = 4.0 / 3.0 * math.pi * r ** 3
    assert abs(mesh.signed_volume() - exact) / exact < 0.03 and mesh.to_trimesh().is_watertight
    cut = extract_mesh(density, bound=1.0, resolution=48)  # the fixed +-1 box cuts it
    assert cut.signed_volume() < 0.5 * exact
    # Gaussians below the opacity floor do not stretch the box
    far = torch.cat([means, torch.tensor([[9.0, 9.0, 9.0]])])
    opac = torch.cat([torch.ones(len(means)), torch.tensor([0.001])])
    assert abs(fitted_box(far, opac)[1] - half) < 1e-5


def test_pymeshlab_cleanup_drops_floaters_keeps_big_parts_and_repairs():
    big = trimesh.creation.icosphere(3, radius=0.5)
    second = trimesh.creation.icosphere(2, radius=0.3)
    second.apply_translation([1.2, 0, 0])
    floater = trimesh.creation.icosphere(1, radius=0.03)
    floater.apply_translation([0, 1.0, 0])
    parts = trimesh.util.concatenate([big, second, floater])
    v, f = np.asarray(parts.vertices), np.asarray(parts.faces)
    # a fin: one extra triangle on an edge of the big sphere (3 faces on that edge), and a
    # split vertex: face 7 uses its own copy (1e-6 away) of its first corner
    a, b = big.faces[0][:2]
    c = big.faces[7][0]
    v = np.vstack([v, [[0.0, 0.0, 0.9]], [v[c] + 1e-6]])
    f = np.vstack([f, [[a, b, len(v) - 2]]])
    f[7, 0] = len(v) - 1
    v2, f2 = clean_pymeshlab(v, f, merge_close_pct=0.1, min_component_pct=10.0,
                             min_component_faces=64)
    tm = trimesh.Trimesh(v2, f2, process=False)
    comps = tm.split(only_watertight=False)
    assert len(comps) == 2  # the floater is gone, the second body stays
    edges = np.sort(tm.edges, axis=1)
    _, counts = np.unique(edges, axis=0, return_counts=True)
    assert counts.max() <= 2  # no non-manifold edge left
    assert (np.linalg.norm(v2 - v[c], axis=1) < 1e-4).sum() == 1  # the split vertex was merged


def test_mesh_phase_fidelity_scores_a_mesh_against_its_source(sphere):
    from hash3d_dg.bench.mesh_phase import _eval_cameras, fidelity

    textured = sphere.with_albedo(torch.rand(128, 128, 3, generator=torch.Generator().manual_seed(3)))
    cameras = _eval_cameras(0.0, 48)
    white = torch.ones(3)

    def refs_of(mesh):
        out = {}
        for group, cams in cameras.items():
            out[group] = []
            for cam in cams:
                r = rasterize_mesh(mesh, cam, background=white, backend="torch")
                out[group].append((r.rgb, r.alpha))
        return out

    same = fidelity(textured, cameras, refs_of(textured))
    assert same["iou"] == 1.0 and same["psnr_input"] == float("inf")
    grey = textured.with_albedo(torch.full((128, 128, 3), 0.5))
    other = fidelity(grey, cameras, refs_of(textured))
    assert other["iou"] == 1.0 and 5.0 < other["psnr_held_out"] < 20.0
    small = Mesh(sphere.v * 0.8, sphere.f, sphere.vn, sphere.vt, sphere.ft, textured.albedo)
    assert 0.55 < fidelity(small, cameras, refs_of(textured))["iou"] < 0.75  # area ratio 0.64


def test_pymeshlab_cleanup_keeps_a_mesh_whose_every_component_is_small():
    tiny = trimesh.creation.icosahedron()  # 20 faces, fewer than the 64-face floater limit
    v2, f2 = clean_pymeshlab(tiny.vertices, tiny.faces, min_component_faces=64)
    assert len(f2) == 20


def test_fitted_box_padding_bounds_each_gaussian_by_its_extent():
    means = torch.tensor([[-1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.5, 0.0]])
    scales = torch.tensor([[0.1, 0.05, 0.05], [0.2, 0.1, 0.1], [0.3, 0.3, 0.3]])
    opac = torch.tensor([1.0, 1.0, 0.001])  # the third is transparent: neither it nor its scale counts
    centre, half = fitted_box(means, opac, fill=0.9, scales=scales, pad_sigma=3.0)
    lo, hi = -1.0 - 0.3, 1.0 + 0.6  # x extent dominates: mean -+ 3 x largest scale
    assert abs(half - (hi - lo) / (2 * 0.9)) < 1e-6
    assert abs(centre[0] - 0.5 * (lo + hi)) < 1e-6
    assert fitted_box(means, opac, fill=0.9, scales=scales, pad_sigma=0.0) == fitted_box(means, opac, fill=0.9)
