"""Mesh export (GLB, OBJ + MTL + PNG) with atomic writes, and loading back.

Frame: vertices are written exactly as they are in the world frame (+y up, the reference camera
on +z, which is glTF's front); no axis change. uv convention: see :mod:`hash3d_dg.mesh.mesh`
(OBJ stores it as is; trimesh converts to glTF's flipped v on GLB export and back on load).

Atomicity: every output file is first written completely to a hidden temporary file in the
target folder (``.<name>.<random>.tmp``), flushed and fsynced, then moved over the target with
``os.replace``. On any error the temporary files are removed and no target file is created or
modified (for OBJ the PNG and MTL are moved before the OBJ that references them).
"""

from __future__ import annotations

import io
import logging
import os
import tempfile
from pathlib import Path

import numpy as np

from hash3d_dg.mesh.mesh import Mesh, albedo_to_uint8

logger = logging.getLogger(__name__)


def _write_file(handle, data: bytes) -> None:
    """Write ``data`` to an open binary file (a seam for tests that simulate a failing disk)."""
    handle.write(data)


def _atomic_write(files: list[tuple[Path, bytes]]) -> None:
    """Write all ``(path, data)`` to temporaries, then ``os.replace`` them in the given order."""
    temps: list[tuple[str, Path]] = []
    umask = os.umask(0)
    os.umask(umask)
    try:
        for path, data in files:
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            temps.append((tmp, path))
            with os.fdopen(fd, "wb") as handle:
                _write_file(handle, data)
                handle.flush()
                os.fsync(handle.fileno())
            os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; use the usual mode
        for tmp, path in temps:
            os.replace(tmp, path)
    except BaseException:
        for tmp, _ in temps:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
        raise


def export_glb(mesh: Mesh, path) -> Path:
    """Write ``mesh`` as a binary glTF with the albedo embedded as PBR ``baseColorTexture``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = mesh.to_trimesh().export(file_type="glb")
    _atomic_write([(path, bytes(data))])
    logger.debug("wrote %s (%d faces)", path, mesh.num_faces)
    return path


def _fmt(rows: np.ndarray, tag: str) -> str:
    return "".join(f"{tag} " + " ".join(f"{x:.9g}" for x in row) + "\n" for row in rows)


def obj_text(mesh: Mesh, mtl_name: str | None, material: str = "material0") -> str:
    """OBJ source of ``mesh`` (1-based ``f v/vt/vn``; uv as stored, v = 0 at the image bottom)."""
    v = mesh.v.detach().cpu().double().numpy()
    f = mesh.f.detach().cpu().numpy().astype(np.int64) + 1
    vn = None if mesh.vn is None else mesh.vn.detach().cpu().double().numpy()
    parts = ["# hash3d-dg mesh\n"]
    if mtl_name is not None:
        parts.append(f"mtllib {mtl_name}\n")
    parts.append(_fmt(v, "v"))
    if mesh.has_uv:
        parts.append(_fmt(mesh.vt.detach().cpu().double().numpy(), "vt"))
    if vn is not None:
        parts.append(_fmt(vn, "vn"))
    if mtl_name is not None:
        parts.append(f"usemtl {material}\n")
    ft = mesh.ft.detach().cpu().numpy().astype(np.int64) + 1 if mesh.has_uv else None
    for i in range(f.shape[0]):
        corners = []
        for k in range(3):
            a = f[i, k]
            if ft is not None and vn is not None:
                corners.append(f"{a}/{ft[i, k]}/{a}")
            elif ft is not None:
                corners.append(f"{a}/{ft[i, k]}")
            elif vn is not None:
                corners.append(f"{a}//{a}")
            else:
                corners.append(f"{a}")
        parts.append("f " + " ".join(corners) + "\n")
    return "".join(parts)


def export_obj(mesh: Mesh, path) -> Path:
    """Write ``<stem>.obj``, and with an albedo ``<stem>.mtl`` + ``<stem>_albedo.png`` beside it."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    files: list[tuple[Path, bytes]] = []
    mtl_name = None
    if mesh.albedo is not None and mesh.has_uv:
        png_name = f"{path.stem}_albedo.png"
        mtl_name = f"{path.stem}.mtl"
        buf = io.BytesIO()
        Image.fromarray(albedo_to_uint8(mesh.albedo), mode="RGB").save(buf, format="PNG")
        mtl = ("# hash3d-dg material\nnewmtl material0\nKa 1 1 1\nKd 1 1 1\nKs 0 0 0\n"
               f"Ns 0\nd 1\nillum 1\nmap_Kd {png_name}\n")
        files += [(path.with_name(png_name), buf.getvalue()),
                  (path.with_name(mtl_name), mtl.encode())]
    files.append((path, obj_text(mesh, mtl_name).encode()))
    _atomic_write(files)
    logger.debug("wrote %s (%d faces)", path, mesh.num_faces)
    return path


def load_mesh(path, device="cpu") -> Mesh:
    """Load a GLB/glTF/OBJ (or anything trimesh reads) with its uvs and base-colour texture."""
    import trimesh

    loaded = trimesh.load(str(path), process=False)
    if isinstance(loaded, trimesh.Scene):
        nodes = loaded.graph.nodes_geometry
        if len(nodes) == 0:
            raise ValueError(f"{path}: no mesh in the file")
        transform, name = loaded.graph[nodes[0]]
        if len(nodes) == 1 and np.allclose(transform, np.eye(4)):
            tm = loaded.geometry[name]  # as stored, file normals included
        else:  # several nodes or a node transform: bake transforms (normals are recomputed)
            geometries = loaded.dump()
            tm = geometries[0] if len(geometries) == 1 else trimesh.util.concatenate(geometries)
    else:
        tm = loaded
    return Mesh.from_trimesh(tm, device=device)
