"""The written GLB and OBJ files, read back WITHOUT the project's (or trimesh's) loader.

* GLB: the container parsed by hand (glTF 2.0 spec: 12-byte header, a JSON chunk and a BIN
  chunk; accessors read with numpy), node transforms applied, the embedded PNG decoded with PIL.
  Checked: world-frame positions of every face corner, the normals as given, glTF's uv
  convention (origin at the top-left: v_gltf = 1 - v), counter-clockwise front faces, the
  texture's pixels.
* OBJ: the text parsed line by line (``v``, ``vt``, ``vn``, ``f v/vt/vn``, 1-based). Checked:
  positions, uvs as stored (OBJ's v = 0 at the bottom), normals as given, the MTL's texture.

A writer and a reader that both changed axes, flipped v or negated normals would agree with each
other; they cannot agree with these parsers.
"""

from __future__ import annotations

import io
import json
import math
import struct

import numpy as np
import pytest
import torch
import trimesh
from PIL import Image

from hash3d_dg.mesh.export import export_glb, export_obj
from hash3d_dg.mesh.mesh import Mesh

_COMPONENTS = {5120: np.int8, 5121: np.uint8, 5122: np.int16, 5123: np.uint16, 5125: np.uint32,
               5126: np.float32}
_WIDTH = {"SCALAR": 1, "VEC2": 2, "VEC3": 3, "VEC4": 4, "MAT4": 16}


def parse_glb(data: bytes):
    magic, version, length = struct.unpack_from("<4sII", data, 0)
    assert magic == b"glTF" and version == 2 and length == len(data)
    offset, chunks = 12, {}
    while offset < length:
        size, kind = struct.unpack_from("<II", data, offset)
        chunks[kind] = data[offset + 8: offset + 8 + size]
        offset += 8 + size
    gltf = json.loads(chunks[0x4E4F534A].decode("utf-8"))
    return gltf, chunks.get(0x004E4942, b"")


def buffer_view(gltf, binary, index) -> bytes:
    view = gltf["bufferViews"][index]
    start = view.get("byteOffset", 0)
    return binary[start: start + view["byteLength"]], view.get("byteStride")


def accessor(gltf, binary, index) -> np.ndarray:
    acc = gltf["accessors"][index]
    raw, stride = buffer_view(gltf, binary, acc["bufferView"])
    dtype = np.dtype(_COMPONENTS[acc["componentType"]])
    width = _WIDTH[acc["type"]]
    item = dtype.itemsize * width
    stride = stride or item
    start = acc.get("byteOffset", 0)
    rows = [np.frombuffer(raw, dtype, width, start + i * stride) for i in range(acc["count"])]
    return np.stack(rows) if width > 1 else np.concatenate(rows)


def node_matrix(node) -> np.ndarray:
    if "matrix" in node:
        return np.asarray(node["matrix"], dtype=np.float64).reshape(4, 4).T  # column-major
    m = np.eye(4)
    x, y, z, w = node.get("rotation", [0, 0, 0, 1])
    rot = np.array([[1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
                    [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
                    [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)]])
    m[:3, :3] = rot * np.asarray(node.get("scale", [1, 1, 1]))[None, :]
    m[:3, 3] = node.get("translation", [0, 0, 0])
    return m


def mesh_world_transform(gltf) -> tuple[int, np.ndarray]:
    """(mesh index, world matrix) of the single mesh node, walking the scene graph."""
    found = []

    def walk(i, parent):
        node = gltf["nodes"][i]
        m = parent @ node_matrix(node)
        if "mesh" in node:
            found.append((node["mesh"], m))
        for c in node.get("children", []):
            walk(c, m)

    for root in gltf["scenes"][gltf.get("scene", 0)]["nodes"]:
        walk(root, np.eye(4))
    assert len(found) == 1, found
    return found[0]


def textured_mesh(seed=0) -> Mesh:
    """An icosphere with its own (non-geometric) unit normals, a uv per face corner and a random
    8-bit texture: nothing is symmetric, so any axis swap, flip or negation shows."""
    tm = trimesh.creation.icosphere(subdivisions=1, radius=0.6)
    v = torch.tensor(tm.vertices, dtype=torch.float32) * torch.tensor([1.0, 0.8, 0.5])
    v = v + torch.tensor([0.1, -0.2, 0.3])
    f = torch.tensor(tm.faces, dtype=torch.int64)
    g = torch.Generator().manual_seed(seed)
    vn = torch.nn.functional.normalize(torch.randn(v.shape[0], 3, generator=g), dim=-1)
    vt = torch.rand(3 * f.shape[0], 2, generator=g) * 0.9 + 0.05
    ft = torch.arange(3 * f.shape[0]).reshape(-1, 3)
    albedo = torch.round(torch.rand(16, 24, 3, generator=g) * 255) / 255
    return Mesh(v, f, vn, vt, ft, albedo)


def expected_pixels(albedo: torch.Tensor) -> np.ndarray:
    return np.round(albedo.numpy() * 255).astype(np.uint8)  # exact for 8-bit values


# ------------------------------------------------------------------ GLB

def test_glb_by_hand_world_frame_normals_uvs_texture(tmp_path):
    mesh = textured_mesh()
    gltf, binary = parse_glb(export_glb(mesh, tmp_path / "m.glb").read_bytes())
    index, world = mesh_world_transform(gltf)
    prims = gltf["meshes"][index]["primitives"]
    assert len(prims) == 1
    prim = prims[0]
    assert prim.get("mode", 4) == 4  # triangles
    pos = accessor(gltf, binary, prim["attributes"]["POSITION"]).astype(np.float64)
    nrm = accessor(gltf, binary, prim["attributes"]["NORMAL"]).astype(np.float64)
    uv = accessor(gltf, binary, prim["attributes"]["TEXCOORD_0"]).astype(np.float64)
    tri = accessor(gltf, binary, prim["indices"]).astype(np.int64).reshape(-1, 3)
    pos = pos @ world[:3, :3].T + world[:3, 3]
    nrm = nrm @ np.linalg.inv(world[:3, :3])  # normals: inverse transpose
    nrm /= np.linalg.norm(nrm, axis=1, keepdims=True)

    f = mesh.f.numpy()
    assert tri.shape == f.shape
    np.testing.assert_allclose(pos[tri], mesh.v.numpy()[f], rtol=0, atol=1e-6)
    np.testing.assert_allclose(nrm[tri], mesh.vn.numpy()[f], rtol=0, atol=1e-6)
    corner_uv = mesh.vt.numpy()[mesh.ft.numpy()]
    np.testing.assert_allclose(uv[tri][..., 0], corner_uv[..., 0], rtol=0, atol=1e-6)
    np.testing.assert_allclose(uv[tri][..., 1], 1.0 - corner_uv[..., 1], rtol=0, atol=1e-6)

    material = gltf["materials"][prim["material"]]
    tex = gltf["textures"][material["pbrMetallicRoughness"]["baseColorTexture"]["index"]]
    image = gltf["images"][tex["source"]]
    assert image["mimeType"] == "image/png"
    png, _ = buffer_view(gltf, binary, image["bufferView"])
    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    np.testing.assert_array_equal(pixels, expected_pixels(mesh.albedo))


def test_glb_front_is_plus_z_and_faces_are_counter_clockwise(tmp_path):
    """A triangle in front of the origin, CCW seen from +z (the reference camera's side):
    glTF's front is +z and front faces are CCW, so the file keeps both as they are."""
    v = torch.tensor([[-0.5, -0.3, 0.4], [0.5, -0.3, 0.4], [0.0, 0.6, 0.4]])
    mesh = Mesh(v, torch.tensor([[0, 1, 2]])).compute_normals()
    gltf, binary = parse_glb(export_glb(mesh, tmp_path / "t.glb").read_bytes())
    index, world = mesh_world_transform(gltf)
    prim = gltf["meshes"][index]["primitives"][0]
    pos = accessor(gltf, binary, prim["attributes"]["POSITION"]).astype(np.float64)
    pos = pos @ world[:3, :3].T + world[:3, 3]
    tri = accessor(gltf, binary, prim["indices"]).astype(np.int64).reshape(-1, 3)[0]
    a, b, c = pos[tri]
    np.testing.assert_allclose(pos[tri], v.numpy(), atol=1e-7)
    assert np.cross(b - a, c - a)[2] > 0  # CCW from +z
    nrm = accessor(gltf, binary, prim["attributes"]["NORMAL"])
    np.testing.assert_allclose(nrm[tri], [[0, 0, 1]] * 3, atol=1e-6)


# ------------------------------------------------------------------ OBJ

def parse_obj(text: str):
    v, vt, vn, faces = [], [], [], []
    mtllib = usemtl = None
    for line in text.splitlines():
        parts = line.split()
        if not parts or parts[0].startswith("#"):
            continue
        tag, rest = parts[0], parts[1:]
        if tag == "v":
            v.append([float(x) for x in rest])
        elif tag == "vt":
            vt.append([float(x) for x in rest])
        elif tag == "vn":
            vn.append([float(x) for x in rest])
        elif tag == "f":
            faces.append([[int(i) - 1 if i else -1 for i in corner.split("/")] for corner in rest])
        elif tag == "mtllib":
            mtllib = rest[0]
        elif tag == "usemtl":
            usemtl = rest[0]
    return np.array(v), np.array(vt), np.array(vn), np.array(faces), mtllib, usemtl


def test_obj_by_hand_positions_uvs_normals_texture(tmp_path):
    mesh = textured_mesh(seed=1)
    path = export_obj(mesh, tmp_path / "m.obj")
    v, vt, vn, faces, mtllib, usemtl = parse_obj(path.read_text())
    assert faces.shape == (mesh.num_faces, 3, 3)
    f = mesh.f.numpy()
    np.testing.assert_allclose(v[faces[..., 0]], mesh.v.numpy()[f], rtol=0, atol=1e-7)
    np.testing.assert_allclose(vt[faces[..., 1]], mesh.vt.numpy()[mesh.ft.numpy()], rtol=0, atol=1e-7)
    np.testing.assert_allclose(vn[faces[..., 2]], mesh.vn.numpy()[f], rtol=0, atol=1e-7)
    # the material: map_Kd names the PNG beside the OBJ, which holds the texture (row 0 = top)
    mtl = (tmp_path / mtllib).read_text()
    assert f"newmtl {usemtl}" in mtl
    png = next(line.split()[1] for line in mtl.splitlines() if line.startswith("map_Kd"))
    pixels = np.asarray(Image.open(tmp_path / png).convert("RGB"))
    np.testing.assert_array_equal(pixels, expected_pixels(mesh.albedo))


def test_obj_normals_of_a_sphere_point_outward(tmp_path):
    """Independent of the stored normals' source: area-weighted normals of a sphere centred at
    the origin point along the position, and faces wind counter-clockwise seen from outside."""
    tm = trimesh.creation.icosphere(subdivisions=2, radius=0.7)
    mesh = Mesh(torch.tensor(tm.vertices, dtype=torch.float32),
                torch.tensor(tm.faces, dtype=torch.int64)).compute_normals()
    v, _, vn, faces, _, _ = parse_obj(export_obj(mesh, tmp_path / "s.obj").read_text())
    radial = v / np.linalg.norm(v, axis=1, keepdims=True)
    assert (np.sum(vn * radial, axis=1) > 0.99).all()
    assert np.allclose(np.linalg.norm(vn, axis=1), 1.0, atol=1e-6)
    p = v[faces[..., 0]]
    outward = np.einsum("ij,ij->i", np.cross(p[:, 1] - p[:, 0], p[:, 2] - p[:, 0]), p.mean(1))
    assert (outward > 0).all()
    assert math.isclose(np.linalg.norm(v, axis=1).mean(), 0.7, rel_tol=1e-5)


@pytest.mark.parametrize("with_normals", [True, False])
def test_obj_without_uvs_writes_plain_corners(tmp_path, with_normals):
    v = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    mesh = Mesh(v, torch.tensor([[0, 1, 2]]))
    if with_normals:
        mesh = mesh.compute_normals()
    text = export_obj(mesh, tmp_path / "p.obj").read_text()
    face = next(line for line in text.splitlines() if line.startswith("f "))
    assert face == ("f 1//1 2//2 3//3" if with_normals else "f 1 2 3")
    assert "mtllib" not in text and not (tmp_path / "p.mtl").exists()


def test_obj_with_uvs_and_no_normals_writes_position_uv_corners(tmp_path):
    v = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    mesh = Mesh(v, torch.tensor([[0, 1, 2]]), None, torch.tensor([[0.1, 0.2], [0.9, 0.2], [0.1, 0.8]]),
                torch.tensor([[2, 0, 1]]))
    text = export_obj(mesh, tmp_path / "u.obj").read_text()
    assert next(line for line in text.splitlines() if line.startswith("f ")) == "f 1/3 2/1 3/2"
    assert "mtllib" not in text  # uvs without a texture: no material
    _, vt, _, faces, _, _ = parse_obj(text)
    np.testing.assert_allclose(vt[faces[0, :, 1]], [[0.1, 0.8], [0.1, 0.2], [0.9, 0.2]])


def test_obj_texture_without_uvs_is_not_written(tmp_path):
    v = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    mesh = Mesh(v, torch.tensor([[0, 1, 2]]), albedo=torch.rand(4, 4, 3))
    export_obj(mesh, tmp_path / "t.obj")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.obj"]


def test_mtl_is_a_plain_albedo_material(tmp_path):
    """Every MTL line is a known statement; the material is a plain albedo: white ambient and
    diffuse factors (the texture carries the colour), no specular, opaque, no lighting model
    beyond colour (illum 1), and map_Kd the PNG."""
    export_obj(textured_mesh(), tmp_path / "m.obj")
    statements = {}
    for line in (tmp_path / "m.mtl").read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        key, *values = line.split()
        statements[key] = values
    assert statements == {"newmtl": ["material0"], "Ka": ["1", "1", "1"], "Kd": ["1", "1", "1"],
                          "Ks": ["0", "0", "0"], "Ns": ["0"], "d": ["1"], "illum": ["1"],
                          "map_Kd": ["m_albedo.png"]}
    assert (tmp_path / "m.obj").read_text().startswith("# hash3d-dg mesh\nmtllib m.mtl\n")


@pytest.mark.parametrize("kind", ["glb", "obj"])
def test_export_creates_missing_folders_and_writes_hidden_temporaries_beside_the_target(
        tmp_path, monkeypatch, kind):
    import os

    from hash3d_dg.mesh import export as export_mod

    moves = []
    real_replace = os.replace

    def replace(src, dst):
        moves.append((str(src), str(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(export_mod.os, "replace", replace)
    old = os.umask(0o022)
    try:
        target = tmp_path / "a" / "b" / f"model.{kind}"
        (export_glb if kind == "glb" else export_obj)(textured_mesh(), target)
    finally:
        os.umask(old)
    assert target.exists()
    for src, dst in moves:
        assert os.path.dirname(src) == os.path.dirname(dst) == str(target.parent)
        name = os.path.basename(src)
        assert name.startswith("." + os.path.basename(dst) + ".") and name.endswith(".tmp"), name
        assert (os.stat(dst).st_mode & 0o777) == 0o644  # 0666 under the umask 022, not mkstemp's 0600
    assert [os.path.basename(d) for _, d in moves][-1] == f"model.{kind}"  # the OBJ last


def _glb_bytes(gltf: dict, binary: bytes = b"") -> bytes:
    text = json.dumps(gltf).encode()
    text += b" " * (-len(text) % 4)
    binary += b"\0" * (-len(binary) % 4)
    chunks = struct.pack("<II", len(text), 0x4E4F534A) + text
    if binary:
        chunks += struct.pack("<II", len(binary), 0x004E4942) + binary
    return struct.pack("<4sII", b"glTF", 2, 12 + len(chunks)) + chunks


def test_load_mesh_refuses_a_file_without_a_mesh(tmp_path):
    from hash3d_dg.mesh.export import load_mesh

    path = tmp_path / "empty.glb"
    path.write_bytes(_glb_bytes({"asset": {"version": "2.0"}, "scene": 0,
                                 "scenes": [{"nodes": [0]}], "nodes": [{"name": "empty"}]}))
    with pytest.raises(ValueError, match="empty.glb: no mesh in the file"):
        load_mesh(path)


def test_load_mesh_applies_node_transforms_and_joins_several_meshes(tmp_path):
    from hash3d_dg.mesh.export import load_mesh

    tri = trimesh.Trimesh([[0, 0, 0], [1, 0, 0], [0, 1, 0]], [[0, 1, 2]], process=False)
    shift = np.eye(4)
    shift[:3, 3] = [0.0, 0.0, 2.0]
    one = trimesh.Scene()
    one.add_geometry(tri, transform=shift)
    path = tmp_path / "one.glb"
    path.write_bytes(one.export(file_type="glb"))
    back = load_mesh(path)
    np.testing.assert_allclose(back.v[back.f].numpy()[0], [[0, 0, 2], [1, 0, 2], [0, 1, 2]], atol=1e-6)

    two = trimesh.Scene()
    two.add_geometry(tri, node_name="a", geom_name="a")
    two.add_geometry(tri.copy(), node_name="b", geom_name="b", transform=shift)
    path = tmp_path / "two.glb"
    path.write_bytes(two.export(file_type="glb"))
    back = load_mesh(path)
    assert back.num_faces == 2
    corners = sorted(map(tuple, back.v[back.f].numpy().reshape(-1, 3).round(6).tolist()))
    assert corners == sorted([(0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 2), (1, 0, 2), (0, 1, 2)])


def test_load_mesh_keeps_vertices_as_stored(tmp_path):
    """No processing on load: coincident vertices of separate triangles stay separate."""
    from hash3d_dg.mesh.export import load_mesh

    v = torch.tensor([[0.0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 0], [1, 0, 0], [0, -1, 0]])
    mesh = Mesh(v, torch.tensor([[0, 1, 2], [3, 5, 4]])).compute_normals()
    for path in (export_obj(mesh, tmp_path / "d.obj"), export_glb(mesh, tmp_path / "d.glb")):
        back = load_mesh(path)
        assert back.num_vertices == 6, path
        assert back.v.device.type == "cpu"
    assert load_mesh(tmp_path / "d.glb", device="meta").v.device.type == "meta"
