"""Export/load round trips, atomic writes, glTF validation, and texture baking."""

import math
import os

import numpy as np
import pytest
import torch
import trimesh

from hash3d_dg.camera import Camera
from hash3d_dg.mesh import export as export_mod
from hash3d_dg.mesh.backends import rasterize_mesh
from hash3d_dg.mesh.bake import DEFAULT_BAKE_VIEWS, bake_texture
from hash3d_dg.mesh.export import export_glb, export_obj, load_mesh
from hash3d_dg.mesh.mesh import Mesh
from hash3d_dg.mesh.validate import install_gltf_validator, validate_gltf


@pytest.fixture(scope="module")
def textured_sphere() -> Mesh:
    mesh = Mesh.from_trimesh(trimesh.creation.icosphere(subdivisions=2, radius=0.6))
    mesh = mesh.compute_normals().unwrap_uv(texture_size=64)
    gen = torch.Generator().manual_seed(0)
    tex = torch.round(torch.rand(64, 64, 3, generator=gen) * 255) / 255  # exactly 8-bit
    return Mesh(mesh.v, mesh.f, mesh.vn, mesh.vt, mesh.ft, tex)


def _corner_uvs(m: Mesh) -> torch.Tensor:
    return m.vt[m.ft]


def _check_round_trip(src: Mesh, back: Mesh) -> None:
    assert back.num_faces == src.num_faces
    torch.testing.assert_close(back.v[back.f], src.v[src.f], atol=1e-7, rtol=0)
    torch.testing.assert_close(_corner_uvs(back), _corner_uvs(src), atol=1e-6, rtol=0)
    torch.testing.assert_close(back.albedo, src.albedo, atol=0, rtol=0)
    for el, az in ((-20.0, 30.0), (10.0, 200.0)):
        cam = Camera.orbit(el, az, 2.0, width=64)
        a = rasterize_mesh(src, cam, backend="torch", background=torch.ones(3))
        b = rasterize_mesh(back, cam, backend="torch", background=torch.ones(3))
        assert float((a.rgb - b.rgb).abs().max()) < 1e-4


def test_glb_round_trip(tmp_path, textured_sphere):
    path = export_glb(textured_sphere, tmp_path / "model.glb")
    assert path == tmp_path / "model.glb" and sorted(os.listdir(tmp_path)) == ["model.glb"]
    back = load_mesh(path)
    _check_round_trip(textured_sphere, back)
    torch.testing.assert_close(back.vn[back.f], textured_sphere.vn[textured_sphere.f],
                               atol=1e-6, rtol=0)


def test_obj_round_trip(tmp_path, textured_sphere):
    path = export_obj(textured_sphere, tmp_path / "model.obj")
    assert sorted(os.listdir(tmp_path)) == ["model.mtl", "model.obj", "model_albedo.png"]
    assert "map_Kd model_albedo.png" in (tmp_path / "model.mtl").read_text()
    _check_round_trip(textured_sphere, load_mesh(path))


def test_export_keeps_the_world_frame(tmp_path):
    """The front (+z) of the world is glTF's front: vertices are written unchanged."""
    v = torch.tensor([[0.0, 0.0, 0.5], [0.3, 0.0, 0.0], [0.0, 0.7, 0.0]])
    mesh = Mesh(v, torch.tensor([[0, 1, 2]])).compute_normals()
    back = load_mesh(export_glb(mesh, tmp_path / "t.glb"))
    torch.testing.assert_close(back.v[back.f], v[None], atol=0, rtol=0)
    assert back.vn[0, 2] > 0


def _failing_writer(fail_on_call: int):
    calls = {"n": 0}

    def write(handle, data):
        calls["n"] += 1
        if calls["n"] == fail_on_call:
            handle.write(data[: len(data) // 2])
            raise OSError("disk full (simulated)")
        handle.write(data)

    return write


@pytest.mark.parametrize("kind,fail_on", [("glb", 1), ("obj", 1), ("obj", 2), ("obj", 3)])
def test_failed_export_leaves_nothing_behind(tmp_path, monkeypatch, textured_sphere, kind, fail_on):
    monkeypatch.setattr(export_mod, "_write_file", _failing_writer(fail_on))
    exporter = export_glb if kind == "glb" else export_obj
    with pytest.raises(OSError, match="simulated"):
        exporter(textured_sphere, tmp_path / f"model.{kind}")
    assert os.listdir(tmp_path) == []


def test_failed_export_keeps_an_existing_file(tmp_path, monkeypatch, textured_sphere):
    target = tmp_path / "model.glb"
    target.write_bytes(b"old")
    monkeypatch.setattr(export_mod, "_write_file", _failing_writer(1))
    with pytest.raises(OSError):
        export_glb(textured_sphere, target)
    assert os.listdir(tmp_path) == ["model.glb"] and target.read_bytes() == b"old"


def test_glb_passes_the_khronos_validator(tmp_path, textured_sphere):
    if not install_gltf_validator():
        pytest.skip("node/npm or the gltf-validator package is unavailable")
    report = validate_gltf(export_glb(textured_sphere, tmp_path / "model.glb"))
    if report is None:
        pytest.skip("gltf-validator unavailable")
    assert report["issues"]["numErrors"] == 0, report["issues"]["messages"]
    info = report["info"]
    assert info["drawCallCount"] == 1 and info["totalTriangleCount"] == textured_sphere.num_faces
    assert info["hasTextures"] and any(
        r.get("mimeType") == "image/png" and r.get("image", {}).get("width") == 64
        for r in info["resources"])


# ---------------------------------------------------------------------------------- baking
def _cube_with_hand_uvs(tex_h: int = 64, tex_w: int = 96) -> Mesh:
    """A unit cube, 4 vertices per face; face k's uv is cell (k % 3, k // 3) of a 3x2 grid.

    Its texture gives every face its own colour plus gradients along both texture axes, so a
    wrong orientation of the baked texture would show up as a colour error.
    """
    verts, faces, uvs = [], [], []
    k = 0
    for axis in range(3):
        for sign in (1.0, -1.0):
            t1, t2 = [a for a in range(3) if a != axis]
            quad = []
            for s1, s2 in ((-1, -1), (1, -1), (1, 1), (-1, 1)):
                p = [0.0, 0.0, 0.0]
                p[axis], p[t1], p[t2] = 0.5 * sign, 0.5 * s1, 0.5 * s2
                quad.append(p)
            n = np.cross(np.subtract(quad[1], quad[0]), np.subtract(quad[2], quad[0]))
            order = [0, 1, 2, 3] if n[axis] * sign > 0 else [0, 3, 2, 1]
            col, row = k % 3, k // 3
            m = 0.04
            cell = [(col + m) / 3, (col + 1 - m) / 3, (row + m) / 2, (row + 1 - m) / 2]
            corner_uv = [(cell[0], cell[2]), (cell[1], cell[2]), (cell[1], cell[3]),
                         (cell[0], cell[3])]
            base = len(verts)
            verts += [quad[i] for i in order]
            uvs += [corner_uv[i] for i in order]
            faces += [[base, base + 1, base + 2], [base, base + 2, base + 3]]
            k += 1
    rows, cols = torch.meshgrid(torch.linspace(0, 1, tex_h), torch.linspace(0, 1, tex_w),
                                indexing="ij")
    cell_id = (torch.floor(cols * 2.999) + 3 * torch.floor((1 - rows) * 1.999)).long()
    palette = torch.tensor([[0.9, 0.2, 0.2], [0.2, 0.8, 0.3], [0.2, 0.3, 0.9],
                            [0.9, 0.8, 0.2], [0.7, 0.2, 0.8], [0.2, 0.8, 0.8]])
    fx = (cols * 3) % 1.0
    fy = (rows * 2) % 1.0
    tex = palette[cell_id] * (0.55 + 0.45 * fx[..., None]) + 0.25 * fy[..., None]
    mesh = Mesh(torch.tensor(verts), torch.tensor(faces), vt=torch.tensor(uvs, dtype=torch.float32),
                ft=torch.tensor(faces), albedo=tex.clamp(0, 1))
    return mesh.compute_normals()


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return -10.0 * math.log10(float(((a - b) ** 2).mean()))


def test_bake_reproduces_the_source_from_held_out_views():
    source = _cube_with_hand_uvs()
    size = 96

    def render_fn(cam):
        r = rasterize_mesh(source, cam, backend="torch")
        return r.rgb, r.alpha

    target = Mesh(source.v, source.f, source.vn).unwrap_uv(texture_size=128)  # a new atlas
    tex = bake_texture(target, render_fn, radius=2.2, render_size=size, texture_size=128)
    assert tex.shape == (128, 128, 3) and tex.min() >= 0 and tex.max() <= 1
    baked = Mesh(target.v, target.f, target.vn, target.vt, target.ft, tex)
    for el, az in ((-25.0, 20.0), (30.0, 160.0), (-60.0, -110.0)):
        cam = Camera.orbit(el, az, 2.2, width=size)
        want = rasterize_mesh(source, cam, backend="torch").rgb
        got = rasterize_mesh(baked, cam, backend="torch").rgb
        assert _psnr(got, want) > 35.0, (el, az, _psnr(got, want))


def test_default_bake_views_cover_front_sides_back_top_bottom():
    views = set(DEFAULT_BAKE_VIEWS)
    for az in (0.0, 90.0, -90.0, 180.0):
        assert (0.0, az) in views
    els = [el for el, _ in DEFAULT_BAKE_VIEWS]
    assert min(els) < -80 and max(els) > 80


def test_bake_needs_uvs():
    mesh = Mesh(torch.rand(3, 3), torch.tensor([[0, 1, 2]]))
    with pytest.raises(ValueError, match="unwrap_uv"):
        bake_texture(mesh, lambda cam: (None, None))
