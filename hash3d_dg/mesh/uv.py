"""uv atlas generation with xatlas, isolated in a child process.

xatlas 0.0.11 can crash the interpreter with a segmentation fault on some inputs (seen here on a
perfectly regular 82k-face icosphere; 100k-face marching-cubes meshes were fine). A crash there
would kill a whole run after its expensive stage 1, so xatlas runs in a short-lived child
Python (numpy + xatlas only). If the child dies, the unwrap is retried on positions with a tiny
random jitter (1e-5, then 1e-4 of the bounding-box diagonal; the jitter only steers xatlas'
chart building: the mesh keeps its exact positions), then a clear error is raised.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile

import numpy as np

logger = logging.getLogger(__name__)

_WORKER = r"""
import sys
import numpy as np
import xatlas
data = np.load(sys.argv[1])
atlas = xatlas.Atlas()
atlas.add_mesh(data["v"], data["f"])
pack = xatlas.PackOptions()
pack.resolution = int(data["resolution"])
pack.padding = int(data["padding"])
pack.bilinear = True
atlas.generate(chart_options=xatlas.ChartOptions(), pack_options=pack)
vmapping, indices, uvs = atlas[0]
np.savez(sys.argv[2], vmapping=vmapping, indices=indices, uvs=uvs,
         charts=np.int64(atlas.chart_count))
"""

JITTERS = (0.0, 1e-5, 1e-4)


def xatlas_unwrap(v: np.ndarray, f: np.ndarray, resolution: int = 1024, padding: int = 4,
                  timeout: float | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Run xatlas on ``v [V, 3]``, ``f [F, 3]``.

    Returns ``vmapping [T]`` (uv vertex -> input vertex), ``indices [F, 3]`` (uv faces, same
    order as ``f``), ``uvs [T, 2]`` in [0, 1], and the chart count.
    """
    v = np.ascontiguousarray(v, dtype=np.float32)
    f = np.ascontiguousarray(f, dtype=np.uint32)
    diag = float(np.linalg.norm(v.max(0) - v.min(0))) if len(v) else 1.0
    rng = np.random.default_rng(0)
    last_error = ""
    with tempfile.TemporaryDirectory(prefix="hash3d-xatlas-") as tmp:
        src, dst = os.path.join(tmp, "in.npz"), os.path.join(tmp, "out.npz")
        for jitter in JITTERS:
            pos = v if jitter == 0 else v + rng.normal(0.0, jitter * diag, v.shape).astype(np.float32)
            np.savez(src, v=pos, f=f, resolution=np.int64(resolution), padding=np.int64(padding))
            proc = subprocess.run([sys.executable, "-c", _WORKER, src, dst], capture_output=True,
                                  text=True, timeout=timeout)
            if proc.returncode == 0:
                out = np.load(dst)
                return (out["vmapping"].astype(np.int64), out["indices"].astype(np.int64),
                        out["uvs"].astype(np.float32), int(out["charts"]))
            last_error = f"exit status {proc.returncode}: {proc.stderr.strip()[-300:]}"
            logger.warning("xatlas failed (%s) on %d faces with jitter %g; retrying", last_error,
                           len(f), jitter)
    raise RuntimeError(f"xatlas could not unwrap this mesh ({len(f)} faces): {last_error}")
