"""The triangle-mesh type shared by extraction, rasterisation, baking, refinement and export.

Texture convention (kept by every module of this package):

* ``vt`` holds uv coordinates in [0, 1]; ``u`` grows to the right of the texture image and ``v``
  grows *upward*: ``v = 0`` is the BOTTOM row of the image, ``v = 1`` its top (OpenGL, OBJ and
  trimesh convention; glTF stores ``1 - v`` and trimesh converts on export/load).
* ``albedo`` is an image tensor ``[Th, Tw, 3]`` whose row 0 is the TOP of the image (the way PIL
  and every image file store it). The texel of uv ``(u, v)`` therefore sits at column
  ``u * Tw`` and row ``(1 - v) * Th`` (continuous coordinates, texel centres at integer + 0.5),
  which is exactly ``torch.nn.functional.grid_sample`` with ``align_corners=False`` on the grid
  ``(2u - 1, 1 - 2v)`` (see :func:`uv_to_grid`).
* Positions and uvs have separate index buffers: ``f`` indexes ``v``/``vn``, ``ft`` indexes
  ``vt``; both are ``[F, 3]`` and face ``i`` of one is face ``i`` of the other. Triangles are
  counter-clockwise seen from outside (normals point outward).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import Tensor

from hash3d_dg import accel

logger = logging.getLogger(__name__)


def uv_to_grid(uv: Tensor) -> Tensor:
    """Map uv ``[..., 2]`` (v = 0 at the image bottom) to ``grid_sample`` coordinates ``[..., 2]``."""
    return torch.stack([uv[..., 0] * 2.0 - 1.0, 1.0 - uv[..., 1] * 2.0], dim=-1)


def sample_texture(texture: Tensor, uv: Tensor) -> Tensor:
    """Bilinearly sample ``texture [Th, Tw, C]`` at ``uv [N, 2]`` -> ``[N, C]`` (differentiable in both).

    Border texels are clamped (``padding_mode="border"``); ``align_corners=False``.
    """
    if uv.shape[0] == 0:
        return texture.new_zeros((0, texture.shape[-1]))
    tex = texture.permute(2, 0, 1).unsqueeze(0)  # [1, C, Th, Tw]
    grid = uv_to_grid(uv).to(tex.dtype).view(1, 1, -1, 2)
    out = torch.nn.functional.grid_sample(tex, grid, mode="bilinear", padding_mode="border",
                                          align_corners=False)
    return out[0, :, 0, :].transpose(0, 1)


def mip_pyramid(texture: Tensor, levels: int | None = None) -> list[Tensor]:
    """Box-filtered mip levels of ``texture [Th, Tw, C]`` (level 0 = the texture), each level
    the 2x2 mean of the one above (``adaptive_avg_pool2d``, so odd sizes round down and a level
    never drops below 1 texel). Differentiable: gradients reach the level-0 texels."""
    out = [texture]
    tex = texture.permute(2, 0, 1).unsqueeze(0)
    while (levels is None or len(out) < levels) and max(tex.shape[-2:]) > 1:
        size = (max(1, tex.shape[-2] // 2), max(1, tex.shape[-1] // 2))
        tex = torch.nn.functional.adaptive_avg_pool2d(tex, size)
        out.append(tex[0].permute(1, 2, 0))
    return out


def mip_level(uv_dx: Tensor, uv_dy: Tensor, texture_hw: tuple[int, int]) -> Tensor:
    """Level of detail ``[N]`` from uv derivatives per pixel step (``[N, 2]`` each): log2 of the
    longer of the two footprint axes in level-0 texels (the OpenGL rule), clamped at 0."""
    scale = uv_dx.new_tensor([float(texture_hw[1]), float(texture_hw[0])])
    fx = (uv_dx * scale).norm(dim=-1)
    fy = (uv_dy * scale).norm(dim=-1)
    return torch.log2(torch.maximum(fx, fy).clamp_min(1e-12)).clamp_min(0.0)


def sample_texture_mip(texture: Tensor, uv: Tensor, level: Tensor,
                       pyramid: list[Tensor] | None = None) -> Tensor:
    """Trilinear (``linear-mipmap-linear``) lookup of ``texture [Th, Tw, C]`` at ``uv [N, 2]``
    with level of detail ``level [N]`` (see :func:`mip_level`): bilinear samples of the two
    nearest mip levels, blended linearly. ``level`` 0 is exactly :func:`sample_texture`.
    Differentiable in the texture and in ``uv`` (not in ``level``)."""
    if uv.shape[0] == 0:
        return texture.new_zeros((0, texture.shape[-1]))
    levels = pyramid if pyramid is not None else mip_pyramid(texture)
    lod = level.detach().to(uv.dtype).clamp(0.0, float(len(levels) - 1))
    lo = torch.floor(lod).long()
    frac = (lod - lo.to(lod.dtype))[:, None]
    out = texture.new_zeros((uv.shape[0], texture.shape[-1])).to(torch.promote_types(
        texture.dtype, uv.dtype))
    for k in range(int(lo.max()) + 1):
        here = lo == k
        if not bool(here.any()):
            continue
        idx = torch.nonzero(here).squeeze(1)
        sample = sample_texture(levels[k], uv[idx])
        fr = frac[idx]
        if k + 1 < len(levels) and bool((fr > 0).any()):
            sample = sample * (1.0 - fr) + sample_texture(levels[k + 1], uv[idx]) * fr
        out = out.index_put((idx,), sample.to(out.dtype))
    return out


def vertex_normals(v: Tensor, f: Tensor) -> Tensor:
    """Area-weighted unit vertex normals ``[V, 3]`` of vertices ``v [V, 3]`` and faces ``f [F, 3]``.

    Each face adds its unnormalised normal (cross product = 2 x area x unit normal) to its three
    vertices. Differentiable in ``v``. Vertices without a face get ``(0, 0, 1)``.
    """
    v0, v1, v2 = v[f[:, 0]], v[f[:, 1]], v[f[:, 2]]
    fn = torch.cross(v1 - v0, v2 - v0, dim=-1)
    vn = torch.zeros_like(v)
    idx = f.reshape(-1)
    vn = vn.index_add(0, idx, fn.repeat_interleave(3, dim=0))
    length = vn.norm(dim=-1, keepdim=True)
    fallback = torch.zeros_like(vn)
    fallback[:, 2] = 1.0
    return torch.where(length > 1e-20, vn / length.clamp_min(1e-20), fallback)


@dataclass
class Mesh:
    """A triangle mesh, optionally with a uv atlas and an albedo texture (see the module docstring).

    Attributes:
        v: ``[V, 3]`` float32 vertex positions (world frame: +y up, front +z).
        f: ``[F, 3]`` int64 position indices, counter-clockwise seen from outside.
        vn: ``[V, 3]`` unit vertex normals or None.
        vt: ``[T, 2]`` uv coordinates in [0, 1], v = 0 at the image bottom, or None.
        ft: ``[F, 3]`` int64 uv indices (face i of ``f`` <-> face i of ``ft``) or None.
        albedo: ``[Th, Tw, 3]`` float texture in [0, 1], row 0 = image top, or None.
    """

    v: Tensor
    f: Tensor
    vn: Tensor | None = None
    vt: Tensor | None = None
    ft: Tensor | None = None
    albedo: Tensor | None = None

    def __post_init__(self) -> None:
        if self.v.ndim != 2 or self.v.shape[-1] != 3:
            raise ValueError(f"Mesh.v must be [V, 3], got {tuple(self.v.shape)}")
        if self.f.ndim != 2 or self.f.shape[-1] != 3:
            raise ValueError(f"Mesh.f must be [F, 3], got {tuple(self.f.shape)}")
        if (self.vt is None) != (self.ft is None):
            raise ValueError("Mesh.vt and Mesh.ft must be given together")
        if self.ft is not None and self.ft.shape != self.f.shape:
            raise ValueError(f"Mesh.ft {tuple(self.ft.shape)} must match Mesh.f {tuple(self.f.shape)}")
        if self.albedo is not None and (self.albedo.ndim != 3 or self.albedo.shape[-1] != 3):
            raise ValueError(f"Mesh.albedo must be [Th, Tw, 3], got {tuple(self.albedo.shape)}")

    # ------------------------------------------------------------------ basic properties
    @property
    def device(self) -> torch.device:
        return self.v.device

    @property
    def has_uv(self) -> bool:
        return self.vt is not None and self.ft is not None

    @property
    def num_vertices(self) -> int:
        return int(self.v.shape[0])

    @property
    def num_faces(self) -> int:
        return int(self.f.shape[0])

    def to(self, device) -> "Mesh":
        """A copy on ``device``."""
        mv = lambda t: None if t is None else t.to(device)  # noqa: E731
        return Mesh(mv(self.v), mv(self.f), mv(self.vn), mv(self.vt), mv(self.ft), mv(self.albedo))

    def detach(self) -> "Mesh":
        dt = lambda t: None if t is None else t.detach()  # noqa: E731
        return Mesh(dt(self.v), dt(self.f), dt(self.vn), dt(self.vt), dt(self.ft), dt(self.albedo))

    def with_albedo(self, albedo: Tensor | None) -> "Mesh":
        return replace(self, albedo=albedo)

    # ------------------------------------------------------------------ geometry
    def compute_normals(self) -> "Mesh":
        """A copy with area-weighted vertex normals ``vn``."""
        return replace(self, vn=vertex_normals(self.v, self.f))

    def face_normals(self) -> Tensor:
        """Unit face normals ``[F, 3]`` (counter-clockwise winding)."""
        v0, v1, v2 = self.v[self.f[:, 0]], self.v[self.f[:, 1]], self.v[self.f[:, 2]]
        return torch.nn.functional.normalize(torch.cross(v1 - v0, v2 - v0, dim=-1), dim=-1)

    def signed_volume(self) -> float:
        """Signed enclosed volume (positive for a closed mesh with outward-facing triangles)."""
        v = self.v.double()
        v0, v1, v2 = v[self.f[:, 0]], v[self.f[:, 1]], v[self.f[:, 2]]
        return float((v0 * torch.cross(v1, v2, dim=-1)).sum() / 6.0)

    def unwrap_uv(self, texture_size: int = 1024, padding: int = 4) -> "Mesh":
        """A copy with an xatlas uv atlas (``vt``, ``ft``); positions ``v``/``f`` are unchanged.

        ``texture_size``/``padding`` set xatlas' packing resolution and the gap (in texels) kept
        between charts, so bilinear sampling and texel dilation do not bleed across charts.
        xatlas runs in a child process (see :mod:`hash3d_dg.mesh.uv`).
        """
        from hash3d_dg.mesh.uv import xatlas_unwrap

        # one host read for both: float64 holds every float32 position and int64 index exactly
        both = torch.cat([self.v.detach().double(), self.f.double()]).cpu().numpy()
        n_v = self.v.shape[0]
        v, f = both[:n_v], both[n_v:].astype(np.int64)  # xatlas_unwrap takes float32 positions
        vmapping, indices, uvs, charts = xatlas_unwrap(v, f, texture_size, padding)
        # xatlas keeps the face order; check that its corners map back to ours.
        if not np.array_equal(vmapping[indices], f):
            raise RuntimeError("xatlas changed the face order or vertices; cannot keep f unchanged")
        dev = self.v.device
        vt, ft = accel.upload(uvs, dev, torch.float32), accel.upload(indices, dev, torch.int64)
        logger.info("xatlas: %d faces, %d uv vertices, %d charts", self.num_faces, vt.shape[0],
                    charts)
        return replace(self, vt=vt, ft=ft)

    # ------------------------------------------------------------------ trimesh interop
    @classmethod
    def from_trimesh(cls, tm, device="cpu") -> "Mesh":
        """Build a Mesh from a ``trimesh.Trimesh`` (uvs and a base-colour texture are kept)."""
        import trimesh

        v = torch.as_tensor(np.asarray(tm.vertices, dtype=np.float32), device=device)
        f = torch.as_tensor(np.asarray(tm.faces, dtype=np.int64), device=device)
        # Normals stored in a file are kept by trimesh; otherwise it computes them.
        vn = torch.as_tensor(np.asarray(tm.vertex_normals, dtype=np.float32), device=device)
        vt = ft = albedo = None
        visual = tm.visual
        if isinstance(visual, trimesh.visual.texture.TextureVisuals):
            if visual.uv is not None and len(visual.uv) == len(tm.vertices):
                vt = torch.as_tensor(np.asarray(visual.uv, dtype=np.float32), device=device)
                ft = f.clone()
            image = _material_image(visual.material)
            if image is not None:
                arr = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
                albedo = torch.as_tensor(arr, device=device)
        return cls(v, f, vn, vt, ft, albedo)

    def to_trimesh(self):
        """A ``trimesh.Trimesh`` in the same frame (no axis change).

        With uvs, vertices are split so that each (position, uv) pair becomes one trimesh vertex
        (trimesh stores one uv per vertex); the albedo becomes a ``PBRMaterial`` base-colour
        texture (metallic 0, roughness 1: the texture is a plain albedo).
        """
        import trimesh
        from PIL import Image

        v = self.v.detach().cpu().numpy().astype(np.float64)
        f = self.f.detach().cpu().numpy().astype(np.int64)
        vn = None if self.vn is None else self.vn.detach().cpu().numpy().astype(np.float64)
        if not self.has_uv:
            return trimesh.Trimesh(vertices=v, faces=f, vertex_normals=vn, process=False)
        vt = self.vt.detach().cpu().numpy().astype(np.float64)
        ft = self.ft.detach().cpu().numpy().astype(np.int64)
        corners = np.stack([f.reshape(-1), ft.reshape(-1)], axis=1)
        pairs, inverse = np.unique(corners, axis=0, return_inverse=True)
        faces = inverse.reshape(-1, 3)
        material = None
        if self.albedo is not None:
            image = Image.fromarray(albedo_to_uint8(self.albedo), mode="RGB")
            material = trimesh.visual.material.PBRMaterial(
                baseColorTexture=image, metallicFactor=0.0, roughnessFactor=1.0)
        visual = trimesh.visual.texture.TextureVisuals(uv=vt[pairs[:, 1]], material=material)
        return trimesh.Trimesh(vertices=v[pairs[:, 0]], faces=faces,
                               vertex_normals=None if vn is None else vn[pairs[:, 0]],
                               visual=visual, process=False)


def albedo_to_uint8(albedo: Tensor) -> np.ndarray:
    """``[Th, Tw, 3]`` float texture in [0, 1] -> ``uint8`` array (rounded, clamped)."""
    arr = albedo.detach().float().clamp(0.0, 1.0).cpu().numpy()
    return np.round(arr * 255.0).astype(np.uint8)


def _material_image(material):
    """The base-colour PIL image of a trimesh material (PBR or simple), or None."""
    if material is None:
        return None
    image = getattr(material, "baseColorTexture", None)
    if image is None:
        image = getattr(material, "image", None)
    return image
