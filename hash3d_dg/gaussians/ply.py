"""Gaussian PLY files in the standard 3D Gaussian Splatting layout.

One ``vertex`` element, binary little endian, float32 properties in this order:
``x y z nx ny nz f_dc_0 f_dc_1 f_dc_2 opacity scale_0 scale_1 scale_2 rot_0 rot_1 rot_2 rot_3``
holding raw (pre-activation) values as 3DGS stores them: opacity logits, log scales,
unnormalised (w, x, y, z) quaternions, zero normals, and no ``f_rest_*`` (SH degree 0). This is
what 3DGS / DreamGaussian write for ``sh_degree = 0`` and what splat viewers read.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch

from hash3d_dg.output.atomic import atomic_path
from hash3d_dg.gaussians.model import GaussianModel

log = logging.getLogger(__name__)

PLY_FIELDS = ("x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2", "opacity",
              "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3")

_PLY_TYPES = {
    "char": "i1", "int8": "i1", "uchar": "u1", "uint8": "u1",
    "short": "i2", "int16": "i2", "ushort": "u2", "uint16": "u2",
    "int": "i4", "int32": "i4", "uint": "u4", "uint32": "u4",
    "float": "f4", "float32": "f4", "double": "f8", "float64": "f8",
}


def save_ply(model: GaussianModel, path: str | os.PathLike) -> None:
    """Write ``model`` to ``path`` (atomically: a temporary file in the same folder, then
    ``os.replace``)."""
    path = Path(path)
    p = {k: v.detach().float().cpu().numpy() for k, v in model.params.items()}
    n = model.num_points
    columns = [p["means"], np.zeros((n, 3), np.float32), p["sh0"], p["opacities"][:, None],
               p["scales"], p["quats"]]
    data = np.ascontiguousarray(np.concatenate(columns, axis=1), dtype="<f4")
    header = "ply\nformat binary_little_endian 1.0\n" + f"element vertex {n}\n" + "".join(
        f"property float {name}\n" for name in PLY_FIELDS) + "end_header\n"
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        fh.write(header.encode("ascii"))
        fh.write(data.tobytes())


def _read_header(fh) -> tuple[str, int, list[tuple[str, str]]]:
    """Parse a PLY header; returns (format, vertex count, [(property name, numpy type)])."""
    if fh.readline().strip() != b"ply":
        raise ValueError("not a PLY file (missing 'ply' magic)")
    fmt, count, props, element = None, None, [], None
    while True:
        line = fh.readline()
        if not line:
            raise ValueError("PLY header has no end_header")
        words = line.decode("ascii", errors="replace").split()
        if not words or words[0] in ("comment", "obj_info"):
            continue
        if words[0] == "end_header":
            break
        if words[0] == "format":
            fmt = words[1]
        elif words[0] == "element":
            if element == "vertex":
                raise ValueError("only a PLY whose single element is 'vertex' is supported")
            element = words[1]
            if element != "vertex":
                raise ValueError(f"unsupported PLY element {element!r} before 'vertex'")
            count = int(words[2])
        elif words[0] == "property":
            if words[1] == "list":
                raise ValueError("list properties are not supported in a Gaussian PLY")
            if words[1] not in _PLY_TYPES:
                raise ValueError(f"unknown PLY property type {words[1]!r}")
            props.append((words[2], _PLY_TYPES[words[1]]))
    if fmt not in ("binary_little_endian", "binary_big_endian"):
        raise ValueError(f"unsupported PLY format {fmt!r} (binary only)")
    if count is None:
        raise ValueError("PLY has no vertex element")
    return fmt, count, props


def load_ply(path: str | os.PathLike, device: str | torch.device = "cpu") -> GaussianModel:
    """Read a 3DGS-layout Gaussian PLY (any property order; extra properties are ignored;
    higher-order SH ``f_rest_*`` are dropped with a warning)."""
    with open(path, "rb") as fh:
        fmt, count, props = _read_header(fh)
        endian = "<" if fmt == "binary_little_endian" else ">"
        dtype = np.dtype([(name, endian + t) for name, t in props])
        data = np.frombuffer(fh.read(dtype.itemsize * count), dtype=dtype, count=count)
    names = {name for name, _ in props}
    required = [f for f in PLY_FIELDS if not f.startswith("n")]
    missing = [f for f in required if f not in names]
    if missing:
        raise ValueError(f"{path}: not a Gaussian splat PLY, missing properties {missing}")
    if any(name.startswith("f_rest_") for name in names):
        log.warning("%s: higher-order SH coefficients (f_rest_*) dropped; SH degree 0 is kept",
                    path)

    def cols(*fields: str) -> torch.Tensor:
        arr = np.stack([np.asarray(data[f], dtype=np.float32) for f in fields], axis=1)
        return torch.from_numpy(arr).to(device)

    return GaussianModel(
        means=cols("x", "y", "z"), sh0=cols("f_dc_0", "f_dc_1", "f_dc_2"),
        opacities=cols("opacity")[:, 0], scales=cols("scale_0", "scale_1", "scale_2"),
        quats=cols("rot_0", "rot_1", "rot_2", "rot_3"))
