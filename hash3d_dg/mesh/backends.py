"""Mesh rendering front end: backend choice, shading shared by the backends, ``MeshRender``.

Images are HWC with row 0 at the TOP of the image: a ``Camera.orbit(0, 0, 2)`` view shows +y up
and +x to the right (neither flipped nor mirrored).

Backends:

* ``torch``: :mod:`hash3d_dg.mesh.rasterize_torch`, pure PyTorch on any device, memory bounded.
* ``nvdiffrast``: :mod:`hash3d_dg.mesh.rasterize_nvdiffrast`, CUDA only, when importable.

Both produce the visible triangle and perspective-correct barycentrics per pixel; the shading
(uv / normal interpolation, bilinear texture lookup with ``grid_sample`` so gradients reach the
texture, compositing over the background) is the same code for both.

Antialiasing (``antialias=True``): with ``nvdiffrast`` the composited rgb and alpha go through
``dr.antialias`` (analytic edge blend, gives silhouette gradients to vertex positions); with
``torch`` rgb and alpha are rendered at 2x2 supersampling and box-filtered (smooth edges, but no
silhouette gradients). The other outputs (depth, tri_id, bary, uv, normal) are never blended.

Texture filtering (``texture_filter``): ``bilinear`` (default), or ``mipmap``: trilinear
``linear-mipmap-linear`` lookups whose level of detail comes from the uv footprint of a pixel.
With ``torch`` the uv derivatives are central differences of the visible triangle's
perspective-correct uv half a pixel to either side (``attribute_derivatives``) and the pyramid is
2x2 box-filtered (``mip_pyramid``); with ``nvdiffrast`` they come from ``dr.interpolate(...,
rast_db, diff_attrs='all')`` and the lookup is ``dr.texture(..., filter_mode=
'linear-mipmap-linear')``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from hash3d_dg.camera import Camera
from hash3d_dg.mesh.mesh import (Mesh, mip_level, mip_pyramid, sample_texture, sample_texture_mip,
                                 vertex_normals)
from hash3d_dg.mesh.rasterize_nvdiffrast import (antialias_nvdiffrast, nvdiffrast_available,
                                                 rasterize_nvdiffrast, texture_nvdiffrast)
from hash3d_dg.mesh.rasterize_torch import (Pixels, attribute_derivatives, gather_corners,
                                             rasterize_torch)


MESH_BACKENDS = ("torch", "nvdiffrast")
TEXTURE_FILTERS = ("bilinear", "mipmap")


@dataclass
class MeshRender:
    """One rendered view (row 0 = image top).

    Attributes:
        rgb: ``[H, W, 3]`` textured albedo composited over the background.
        alpha: ``[H, W, 1]`` coverage (0/1, fractional at edges with antialias).
        depth: ``[H, W, 1]`` camera-space distance along the view axis, 0 where empty.
        tri_id: ``[H, W]`` int64 visible face index, -1 where empty.
        bary: ``[H, W, 3]`` perspective-correct barycentrics of the visible face, 0 where empty.
        uv: ``[H, W, 2]`` interpolated uv (mesh convention, v = 0 at the texture bottom), 0 empty.
        normal: ``[H, W, 3]`` interpolated, renormalised world-space vertex normals, 0 empty.
        backend: the backend that rendered it.
    """

    rgb: Tensor
    alpha: Tensor
    depth: Tensor
    tri_id: Tensor
    bary: Tensor
    uv: Tensor
    normal: Tensor
    backend: str


def available_mesh_backends(device) -> dict[str, bool]:
    """``{backend name: usable on device}``."""
    device = torch.device(device)
    return {"torch": True,
            "nvdiffrast": device.type == "cuda" and torch.cuda.is_available()
            and nvdiffrast_available()}


def resolve_mesh_backend(name: str, device) -> str:
    """``auto`` -> ``nvdiffrast`` on CUDA when importable, else ``torch``; check explicit names."""
    avail = available_mesh_backends(device)
    if name == "auto":
        return "nvdiffrast" if avail["nvdiffrast"] else "torch"
    if name not in avail:
        raise ValueError(f"unknown mesh backend {name!r}; choose one of auto, "
                         + ", ".join(MESH_BACKENDS))
    if not avail[name]:
        raise ValueError(f"mesh backend {name!r} is unavailable on device {device} (it needs CUDA "
                         f"and the nvdiffrast package); use 'torch' or 'auto'")
    return name


def _scatter(n_pix: int, idx: Tensor, values: Tensor) -> Tensor:
    """Dense ``[n_pix, C]`` tensor with ``values [N, C]`` at rows ``idx`` and zeros elsewhere."""
    out = values.new_zeros((n_pix,) + tuple(values.shape[1:]))
    return out.index_put((idx,), values)


def _shade(tri_id: Tensor, bary: Tensor, f: Tensor, vn: Tensor, vt: Tensor | None,
           ft: Tensor | None, texture: Tensor | None, lookup=None,
           all_pixels: bool | None = None) -> dict[str, Tensor]:
    """Interpolate uv / normals and sample the texture at covered pixels.

    Args:
        tri_id: ``[H, W]``; bary: ``[H, W, 3]``; f/ft: ``[F, 3]``; vn: ``[V, 3]``; vt: ``[T, 2]``;
        texture: ``[Th, Tw, 3]`` or None (untextured surfaces are white).
        lookup: optional ``(texture, uv [N, 2]) -> [N, 3]`` replacing the bilinear lookup
            (N = covered pixels in ``nonzero(tri_id.view(-1) >= 0)`` order).
        all_pixels: evaluate every pixel, empty ones masked to 0 (no host sync unless a lookup
            is given: its covered-pixel contract needs one ``nonzero``), or the covered ones
            only; None: every pixel off the CPU (:class:`~hash3d_dg.mesh.rasterize_torch.Pixels`).

    Returns dict of ``fg [H, W, 3]`` (surface colour, 0 where empty), ``alpha [H, W, 1]``,
    ``uv [H, W, 2]``, ``normal [H, W, 3]``.
    """
    h, w = tri_id.shape
    px = Pixels(tri_id, all_pixels)
    b = px.select(bary.reshape(-1, 3))  # [N, 3]
    dtype = bary.dtype

    def corners(attr: Tensor, faces: Tensor) -> Tensor:  # [N, 3, C]; zeros at empty pixels
        attr = attr.to(dtype)
        return gather_corners(attr, faces, attr.new_zeros((3, attr.shape[1])), px.tid)

    normal = (corners(vn, f) * b[..., None]).sum(dim=1)
    normal = torch.nn.functional.normalize(normal, dim=-1)
    if vt is not None and ft is not None:
        uv = (corners(vt, ft) * b[..., None]).sum(dim=1)
    else:
        uv = b.new_zeros((b.shape[0], 2))
    if texture is not None and vt is not None:
        if lookup is None:
            fg = sample_texture(texture.to(dtype), uv)
        elif px.all_pixels:  # the lookup takes the covered pixels only: one nonzero
            idx = torch.nonzero(px.covered).squeeze(1)
            fg = _scatter(h * w, idx, lookup(texture.to(dtype), uv[idx]))
        else:
            fg = lookup(texture.to(dtype), uv)
    else:
        fg = b.new_ones((b.shape[0], 3))
    return {"fg": px.expand(fg).view(h, w, 3),
            "uv": px.expand(uv).view(h, w, 2),
            "normal": px.expand(normal).view(h, w, 3),
            "alpha": px.covered.to(dtype).view(h, w, 1)}


def _background(background: Tensor | None, h: int, w: int, like: Tensor) -> Tensor:
    """Background as ``[H, W, 3]`` or a broadcastable ``[3]`` (None -> black)."""
    if background is None:
        return like.new_zeros(3)
    bg = background.to(device=like.device, dtype=like.dtype)
    if bg.ndim == 1:
        return bg
    if bg.shape[:2] != (h, w):
        raise ValueError(f"background {tuple(bg.shape)} does not match the image {h}x{w}")
    return bg


def rasterize_mesh(mesh: Mesh, camera: Camera, background: Tensor | None = None,
                   backend: str = "auto", vertex_offsets: Tensor | None = None,
                   albedo: Tensor | None = None, antialias: bool = False,
                   texture_filter: str = "bilinear") -> MeshRender:
    """Render ``mesh`` from ``camera`` (see the module docstring for conventions).

    Args:
        mesh: the mesh; its device sets where rendering happens.
        camera: ``camera.mvp()`` maps world to OpenGL clip space; ``camera.width/height``.
        background: ``[3]`` colour or ``[H, W, 3]`` image (None: black).
        backend: ``auto``, ``torch`` or ``nvdiffrast``.
        vertex_offsets: optional ``[V, 3]`` added to ``mesh.v`` (e.g. a trainable parameter);
            gradients flow through the perspective-correct barycentrics. Vertex normals are then
            recomputed from the displaced positions (differentiably).
        albedo: optional ``[Th, Tw, 3]`` texture overriding ``mesh.albedo`` (e.g. trainable).
        antialias: smooth silhouette edges of rgb/alpha (see module docstring).
        texture_filter: ``bilinear`` or ``mipmap`` (trilinear, ``linear-mipmap-linear``: the
            level of detail comes from each pixel's uv footprint, so a minified texture is
            averaged over the texels a pixel covers and its gradient spreads over them).
    """
    if texture_filter not in TEXTURE_FILTERS:
        raise ValueError(f"unknown texture filter {texture_filter!r}: expected one of "
                         + ", ".join(TEXTURE_FILTERS))
    device = mesh.v.device
    name = resolve_mesh_backend(backend, device)
    f = mesh.f
    if vertex_offsets is not None:
        v = mesh.v.to(vertex_offsets.dtype) + vertex_offsets
        vn = vertex_normals(v, f)
    else:
        v = mesh.v
        vn = mesh.vn if mesh.vn is not None else vertex_normals(mesh.v, f)
    texture = albedo if albedo is not None else mesh.albedo
    dtype = v.dtype if texture is None else torch.promote_types(v.dtype, texture.dtype)
    v = v.to(dtype)
    h, w = camera.height, camera.width
    mvp = camera.mvp(device=device, dtype=dtype)

    mip = texture_filter == "mipmap" and texture is not None and mesh.vt is not None
    pyramid = mip_pyramid(texture.to(dtype)) if mip else None  # shared by the lookups

    def torch_lookup(tri):
        if not mip:
            return None
        uv_dx, uv_dy = attribute_derivatives(v.detach(), f, mvp, tri, mesh.vt, mesh.ft)

        def lookup(tex, uv):
            level = mip_level(uv_dx, uv_dy, tex.shape[:2])
            return sample_texture_mip(tex, uv, level, pyramid)
        return lookup

    if name == "torch":
        tri_id, bary, depth = rasterize_torch(v, f, mvp, w, h, near=camera.near)
        bg = _background(background, h, w, bary)
        if antialias:  # the 1x shading would be thrown away: only its geometry is returned
            sh = _shade(tri_id, bary, f, vn, mesh.vt, mesh.ft, None)
        else:
            sh = _shade(tri_id, bary, f, vn, mesh.vt, mesh.ft, texture, torch_lookup(tri_id))
        alpha = sh["alpha"]
        rgb = sh["fg"] * alpha + bg * (1.0 - alpha)
        if antialias:
            tri2, bary2, _ = rasterize_torch(v, f, mvp, 2 * w, 2 * h, near=camera.near)
            sh2 = _shade(tri2, bary2, f, vn, mesh.vt, mesh.ft, texture, torch_lookup(tri2))
            bg2 = bg if bg.ndim == 1 else bg.repeat_interleave(2, 0).repeat_interleave(2, 1)
            rgb2 = sh2["fg"] * sh2["alpha"] + bg2 * (1.0 - sh2["alpha"])
            pooled = torch.nn.functional.avg_pool2d(
                torch.cat([rgb2, sh2["alpha"]], -1).permute(2, 0, 1).unsqueeze(0), 2)
            pooled = pooled[0].permute(1, 2, 0)
            rgb, alpha = pooled[..., :3], pooled[..., 3:]
        return MeshRender(rgb=rgb, alpha=alpha, depth=depth.unsqueeze(-1), tri_id=tri_id,
                          bary=bary, uv=sh["uv"], normal=sh["normal"], backend=name)

    # nvdiffrast: shade in its bottom-row-first layout, antialias, then flip rows
    tri_id, bary, depth, state = rasterize_nvdiffrast(v, f, mvp, w, h)
    lookup = None
    if mip:
        covered = torch.nonzero(tri_id.reshape(-1) >= 0).squeeze(1)
        lookup = lambda tex, uv: texture_nvdiffrast(  # noqa: E731
            tex, mesh.vt, mesh.ft, state).reshape(-1, tex.shape[-1])[covered]
    sh = _shade(tri_id, bary, f, vn, mesh.vt, mesh.ft, texture, lookup)
    bg = _background(background, h, w, bary)
    if bg.ndim == 3:
        bg = bg.flip(0)
    alpha = sh["alpha"]
    rgb = sh["fg"] * alpha + bg * (1.0 - alpha)
    if antialias:
        both = antialias_nvdiffrast(torch.cat([rgb, alpha], -1), state)
        rgb, alpha = both[..., :3], both[..., 3:]
    flip = lambda t: t.flip(0)  # noqa: E731
    return MeshRender(rgb=flip(rgb), alpha=flip(alpha), depth=flip(depth.unsqueeze(-1)),
                      tri_id=flip(tri_id), bary=flip(bary), uv=flip(sh["uv"]),
                      normal=flip(sh["normal"]), backend=name)
