"""A synthetic object with ground truth for the oracle quality benchmark.

The object is a smooth, lumpy blob (a star-shaped surface ``r(direction)`` over a latitude /
longitude grid) with a colourful procedural albedo in a parametric uv atlas: a rainbow whose hue
follows the longitude (so front, sides and back differ), latitude bands and a coarse checker.
It is rendered with the project's own mesh rasteriser (``hash3d_dg.mesh.rasterize_mesh``),
supersampled ``ssaa`` times and area-averaged, over a white background.

World frame (design.md section 4): +y up, the reference camera (elevation 0, azimuth 0) sits on
+z. Longitude 0 faces +z, so the reference view sees the red-orange part of the rainbow.
"""

from __future__ import annotations

import colorsys
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from hash3d_dg.camera import Camera
from hash3d_dg.mesh import Mesh, rasterize_mesh


def blob_radius(lat: np.ndarray, lon: np.ndarray, base: float = 0.6) -> np.ndarray:
    """Distance from the origin of the surface point at latitude ``lat`` (radians, +pi/2 at +y)
    and longitude ``lon`` (radians, 0 at +z, +pi/2 at +x): an ellipsoid-like blob with two
    low-frequency lumps, so that no two opposite views look alike."""
    lump = (0.10 * np.cos(lat) ** 2 * np.cos(2.0 * lon - 0.6)
            + 0.07 * np.sin(lat) * np.cos(lon + 1.2))
    stretch = 1.0 + 0.12 * np.sin(lat) ** 2  # a little taller than wide
    return base * stretch * (1.0 + lump)


def scene_texture(size: int = 512, sectors: int = 6, bands: int = 3) -> torch.Tensor:
    """Procedural albedo ``[size, size, 3]`` in [0, 1], row 0 = image top (v = 1).

    Texel ``(u, v)``: hue = u (+ a small v shear), latitude bands of different saturation, and a
    ``sectors x bands`` checker darkening every other cell.
    """
    centres = (np.arange(size) + 0.5) / size
    u, v_top = np.meshgrid(centres, centres)  # row 0 is the top of the image: v = 1 - row/size
    v = 1.0 - v_top
    hue = (u + 0.08 * v) % 1.0
    band = np.minimum((v * bands).astype(int), bands - 1)
    sector = np.minimum((u * sectors).astype(int), sectors - 1)
    saturation = np.where(band % 2 == 0, 0.85, 0.55)
    value = np.where((band + sector) % 2 == 0, 0.95, 0.6)
    rgb = np.zeros((size, size, 3))
    hsv_to_rgb = np.vectorize(colorsys.hsv_to_rgb)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = hsv_to_rgb(hue, saturation, value)
    return torch.tensor(rgb, dtype=torch.float32)


def build_scene_mesh(n_lat: int = 40, n_lon: int = 80, texture_size: int = 512) -> Mesh:
    """The ground-truth mesh: an ``n_lat x n_lon`` latitude/longitude grid with a parametric uv
    atlas (u = longitude / 2pi, v = latitude from the bottom pole) and ``scene_texture``.

    Positions are shared across the uv seam (watertight); the seam column gets its own uvs.
    """
    lats = np.linspace(-math.pi / 2, math.pi / 2, n_lat + 1)  # bottom pole -> top pole
    lons = np.linspace(0.0, 2.0 * math.pi, n_lon + 1)
    # Positions: one per (interior latitude, longitude) plus the two poles.
    lat_g, lon_g = np.meshgrid(lats[1:-1], lons[:-1], indexing="ij")  # [n_lat-1, n_lon]
    r = blob_radius(lat_g, lon_g)
    ring = np.stack([r * np.cos(lat_g) * np.sin(lon_g), r * np.sin(lat_g),
                     r * np.cos(lat_g) * np.cos(lon_g)], axis=-1).reshape(-1, 3)
    south = np.array([[0.0, -blob_radius(np.array(-math.pi / 2), np.array(0.0)), 0.0]])
    north = np.array([[0.0, blob_radius(np.array(math.pi / 2), np.array(0.0)), 0.0]])
    v = np.concatenate([ring, south, north])
    s_idx, n_idx = len(ring), len(ring) + 1

    def pos(i: int, j: int) -> int:  # latitude row i in 0..n_lat, longitude column j in 0..n_lon
        if i == 0:
            return s_idx
        if i == n_lat:
            return n_idx
        return (i - 1) * n_lon + (j % n_lon)

    # UVs: a full (n_lat+1) x (n_lon+1) grid; pole rows keep one uv per column (per triangle).
    uu, vv = np.meshgrid(lons / (2 * math.pi), (lats + math.pi / 2) / math.pi)
    vt = np.stack([uu, vv], axis=-1).reshape(-1, 2)

    def uv(i: int, j: int) -> int:
        return i * (n_lon + 1) + j

    faces, tfaces = [], []
    for i in range(n_lat):
        for j in range(n_lon):
            a, b, c, d = (i, j), (i, j + 1), (i + 1, j + 1), (i + 1, j)
            # counter-clockwise seen from outside: longitude grows toward +x from +z (to the
            # right when looking at -z), latitude grows upward
            for tri in ((a, b, c), (a, c, d)):
                p = [pos(*q) for q in tri]
                if len(set(p)) < 3:
                    continue  # degenerate at a pole
                faces.append(p)
                tfaces.append([uv(*q) for q in tri])
    mesh = Mesh(v=torch.tensor(v, dtype=torch.float32), f=torch.tensor(faces, dtype=torch.int64),
                vt=torch.tensor(vt, dtype=torch.float32), ft=torch.tensor(tfaces, dtype=torch.int64),
                albedo=scene_texture(texture_size))
    mesh = mesh.compute_normals()
    if mesh.signed_volume() < 0:  # keep the outward winding whatever the grid orientation
        mesh = Mesh(v=mesh.v, f=mesh.f.flip(1), vt=mesh.vt, ft=mesh.ft.flip(1),
                    albedo=mesh.albedo).compute_normals()
    return mesh


def render_mesh_rgba(mesh: Mesh, camera: Camera, ssaa: int = 2, backend: str = "auto"
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Render ``mesh`` from ``camera`` at ``ssaa`` times its size and area-average back.

    Returns:
        rgb ``[H, W, 3]`` composited over white and alpha ``[H, W, 1]``, both in [0, 1].
    """
    white = torch.ones(3, device=mesh.device)
    inner = camera.resized(camera.width * ssaa, camera.height * ssaa)
    out = rasterize_mesh(mesh, inner, background=white, backend=backend)
    stacked = torch.cat([out.rgb, out.alpha], dim=-1).permute(2, 0, 1)[None]
    if ssaa > 1:
        stacked = F.avg_pool2d(stacked, ssaa)
    stacked = stacked[0].permute(1, 2, 0).clamp(0.0, 1.0)
    return stacked[..., :3], stacked[..., 3:4]


@dataclass
class OracleScene:
    """The ground-truth object and how to render it.

    Attributes:
        mesh: the textured ground-truth mesh.
        ssaa: supersampling factor of every ground-truth render.
        backend: mesh rasteriser backend (``auto`` | ``torch`` | ``nvdiffrast``).
    """

    mesh: Mesh
    ssaa: int = 2
    backend: str = "auto"

    @classmethod
    def default(cls, texture_size: int = 512, ssaa: int = 2, backend: str = "auto",
                device: torch.device | str = "cpu") -> "OracleScene":
        return cls(build_scene_mesh(texture_size=texture_size).to(device), ssaa, backend)

    @torch.no_grad()
    def render(self, elevation: float, azimuth: float, radius: float, size: int,
               fovy: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Ground truth from an orbit camera: rgb ``[size, size, 3]`` over white, alpha
        ``[size, size, 1]``."""
        camera = Camera.orbit(elevation, azimuth, radius, width=size, fovy=fovy)
        return render_mesh_rgba(self.mesh, camera, self.ssaa, self.backend)

    @torch.no_grad()
    def rgba(self, elevation: float, azimuth: float, radius: float, size: int,
             fovy: float) -> np.ndarray:
        """Straight (un-premultiplied) RGBA ``[size, size, 4]`` float32, for ``ReferenceView``."""
        rgb, alpha = self.render(elevation, azimuth, radius, size, fovy)
        # rgb = a * c + (1 - a) * 1 -> c = (rgb - (1 - a)) / a where covered
        a = alpha.clamp_min(1e-6)
        colour = torch.where(alpha > 1e-6, (rgb - (1.0 - alpha)) / a, torch.ones_like(rgb))
        return torch.cat([colour.clamp(0, 1), alpha], dim=-1).cpu().numpy().astype(np.float32)
