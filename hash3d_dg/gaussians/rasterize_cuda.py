"""CUDA rasterizer backends: gsplat and the 3DGS ``diff_gaussian_rasterization`` (inria).

Both return the same ``GaussianRender`` as the torch backend. Neither is ever called without a
CUDA device (gsplat would try a JIT build of its op and fail).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from hash3d_dg.gaussians.projection import project_gaussians
from hash3d_dg.gaussians.render_result import GaussianRender

GSPLAT_MAX_ALPHA = 0.999
"""gsplat 1.5.3's per-Gaussian alpha cap (``RasterizeToPixels3DGSFwd.cu``); the reference is 0.99."""


def rasterize_gsplat(means: Tensor, quats: Tensor, scales: Tensor, opacities: Tensor,
                     colors: Tensor, viewmat: Tensor, K: Tensor, width: int, height: int,
                     background: Tensor, near: float = 0.01, far: float = 1e10,
                     tile_size: int = 16) -> GaussianRender:
    """Render with gsplat's CUDA kernels (classic 3DGS rasterization, eps2d 0.3).

    Calls gsplat's public building blocks (projection, tile intersection, rasterization)
    rather than ``gsplat.rasterization`` so that the [N, 2] ``means2d`` handed back is the very
    tensor fed to the rasterizer (its ``.grad`` is then the pixel-space gradient).

    Agreement with the reference (3DGS / DreamGaussian's rasterizer, and the torch backend):

    * alpha cap: gsplat's kernels compute ``alpha = min(GSPLAT_MAX_ALPHA, o * g)`` with 0.999,
      the reference ``min(0.99, o * g)``. They differ only where ``o * g > 0.99``, the
      cores of near-opaque Gaussians, which there let 0.1 % of what lies behind through instead
      of 1 %. It is left as is: passing opacities clamped at 0.99 would fix the cap but scale
      every pixel of those Gaussians by up to 1 %, and measured farther from the reference
      (``tools/alpha_clamp.py``, torch backend emulating both: mean image error 1.3e-4 against
      1.0e-6 unclamped, means2d-gradient error 3.5e-3 against 1.1e-3, 3000 Gaussians of
      opacity 0.95-1). ``rasterize_torch(..., max_alpha=GSPLAT_MAX_ALPHA)`` reproduces gsplat;
    * radii: gsplat's are per-axis, up to 3.33 sigma and 0 below opacity 1/255 (opacity-aware);
      the radii returned here are the reference's ``ceil(3 sqrt(max eigenvalue))`` with the
      same visibility test as the torch backend (``project_gaussians``), so densification
      statistics (which count a Gaussian as seen when its radius is > 0) do not depend on the
      backend. A Gaussian visible by that rule but culled by gsplat touches no pixel and gets a
      zero gradient, as in the torch backend (``tools/radii_visibility.py`` measured the
      difference the rules make);
    * ``means2d`` of Gaussians gsplat culls is uninitialised memory in gsplat: those rows are
      replaced by our projection (they are not rasterized, so nothing else changes).
    """
    import gsplat

    radii2, means2d_c, depths, conics, _ = gsplat.fully_fused_projection(
        means, None, quats, scales, viewmat[None], K[None], width, height, eps2d=0.3,
        near_plane=near, far_plane=far, packed=False, opacities=opacities)
    with torch.no_grad():
        ours = project_gaussians(means.detach(), quats.detach(), scales.detach(), viewmat, K,
                                 width, height, near=near, far=far)
        drawn = (radii2[0] > 0).all(dim=-1)
    means2d = torch.where(drawn[:, None], means2d_c[0], ours.means2d)
    if means2d.requires_grad:
        means2d.retain_grad()
    feats = torch.cat([colors, depths[0][:, None]], dim=-1)[None]  # [1, N, 4]
    tiles_x, tiles_y = math.ceil(width / tile_size), math.ceil(height / tile_size)
    _, isect_ids, flatten_ids = gsplat.isect_tiles(means2d[None], radii2, depths, tile_size,
                                                   tiles_x, tiles_y, packed=False)
    offsets = gsplat.isect_offset_encode(isect_ids, 1, tiles_x, tiles_y).reshape(
        1, tiles_y, tiles_x)
    bg = torch.cat([background.to(feats), feats.new_zeros(1)])[None]
    rgbd, alpha = gsplat.rasterize_to_pixels(means2d[None], conics, feats, opacities[None],
                                             width, height, tile_size, offsets, flatten_ids,
                                             backgrounds=bg)
    return GaussianRender(image=rgbd[0, ..., :3], alpha=alpha[0], depth=rgbd[0, ..., 3:4],
                          radii=ours.radii, means2d=means2d, backend="gsplat")


def _inria_projection_matrix(near: float, far: float, tan_half_fovx: float,
                             tan_half_fovy: float, device: torch.device | str = "cpu"
                             ) -> Tensor:
    """3DGS ``getProjectionMatrix``: OpenCV camera space -> clip space with z in [0, 1]."""
    proj = torch.zeros(4, 4, dtype=torch.float64, device=device)
    proj[0, 0] = 1.0 / tan_half_fovx
    proj[1, 1] = 1.0 / tan_half_fovy
    proj[3, 2] = 1.0
    proj[2, 2] = far / (far - near)
    proj[2, 3] = -(far * near) / (far - near)
    return proj


def inria_matrices(viewmat: Tensor, K: Tensor, width: int, height: int, near: float,
                   far: float) -> tuple[Tensor, Tensor, Tensor, float, float]:
    """The 3DGS rasterizer's camera inputs, float64 on ``viewmat``'s device.

    Returns ``(viewmatrix, projmatrix, campos, tanfovx, tanfovy)``: the rasterizer multiplies
    row vectors, ``[p, 1] @ viewmatrix`` (camera space) and ``[p, 1] @ projmatrix`` (clip space;
    pixel ``((ndc + 1) W - 1) / 2``, centres at integers), so both are transposes of the
    column-vector matrices.
    """
    fx, fy = float(K[0, 0]), float(K[1, 1])
    tanfovx, tanfovy = 0.5 * width / fx, 0.5 * height / fy
    view_t = viewmat.detach().double().T.contiguous()
    full_proj = view_t @ _inria_projection_matrix(near, far, tanfovx, tanfovy,
                                                  device=view_t.device).T
    campos = torch.linalg.inv(viewmat.detach().double())[:3, 3]
    return view_t, full_proj, campos, tanfovx, tanfovy


def rasterize_inria(means: Tensor, quats: Tensor, scales: Tensor, opacities: Tensor,
                    colors: Tensor, viewmat: Tensor, K: Tensor, width: int, height: int,
                    background: Tensor, near: float = 0.01, far: float = 100.0
                    ) -> GaussianRender:
    """Render with ``diff_gaussian_rasterization`` (graphdeco 3DGS or DreamGaussian's fork).

    The rasterizer takes a transposed view matrix and a full projection matrix (its own
    convention, principal point at the image centre). Its ``means2D`` gradient is in NDC units
    and its pixel centres sit at integers; ``means2d`` here is our pixel projection (centres at
    +0.5) wired so that its ``.grad`` is the pixel-space gradient, like the other backends.
    Depth and alpha come from the fork's extra outputs when present (DreamGaussian's fork returns
    image, radii, depth, alpha), otherwise from a second pass with colours (z, 1, 0).
    Its own culling differs from ours at the edges: Gaussians at camera depth <= 0.2 are dropped
    (3DGS ``in_frustum``; ours: ``near``), and its radii are zeroed when their 16-pixel tile
    rectangle is empty. Under ``torch.no_grad()`` ``means2d`` carries no gradient.
    """
    from diff_gaussian_rasterization import (  # type: ignore[import-not-found]
        GaussianRasterizationSettings, GaussianRasterizer)

    view_t, full_proj, campos, tanfovx, tanfovy = inria_matrices(viewmat, K, width, height,
                                                                  near, far)
    dev = means.device
    fields = dict(image_height=int(height), image_width=int(width), tanfovx=tanfovx,
                  tanfovy=tanfovy, bg=background.float().to(dev), scale_modifier=1.0,
                  viewmatrix=view_t.float().to(dev), projmatrix=full_proj.float().to(dev),
                  sh_degree=0, campos=campos.float().to(dev), prefiltered=False, debug=False)
    if "antialiasing" in getattr(GaussianRasterizationSettings, "_fields", ()):
        fields["antialiasing"] = False
    rasterizer = GaussianRasterizer(raster_settings=GaussianRasterizationSettings(**fields))

    proj = project_gaussians(means.detach(), quats.detach(), scales.detach(), viewmat, K,
                             width, height, near=near, far=far)
    delta = torch.zeros_like(proj.means2d, requires_grad=True)
    means2d = proj.means2d + delta
    if means2d.requires_grad:  # False under torch.no_grad() (evaluation, baking)
        means2d.retain_grad()
    ndc_per_px = torch.tensor([2.0 / width, 2.0 / height], dtype=means2d.dtype, device=dev)
    screen = torch.cat([(means2d - means2d.detach()) * ndc_per_px,
                        means2d.new_zeros(means2d.shape[0], 1)], dim=-1)
    q = quats / quats.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    common = dict(means3D=means, means2D=screen, shs=None, opacities=opacities[:, None],
                  scales=scales, rotations=q, cov3D_precomp=None)
    out = rasterizer(colors_precomp=colors, **common)
    image, radii = out[0], out[1]
    if len(out) >= 4:
        depth, alpha = out[2], out[3]
    else:
        z = means @ viewmat[2, :3] + viewmat[2, 3]  # camera-space depth
        aux_feats = torch.stack([z, torch.ones_like(z), torch.zeros_like(z)], dim=-1)
        fields["bg"] = torch.zeros(3, device=dev)
        aux = GaussianRasterizer(raster_settings=GaussianRasterizationSettings(**fields))
        aux_out = aux(colors_precomp=aux_feats, **common)[0]
        depth, alpha = aux_out[0:1], aux_out[1:2]
    return GaussianRender(image=image.permute(1, 2, 0), alpha=alpha.reshape(1, height, width)
                          .permute(1, 2, 0), depth=depth.reshape(1, height, width)
                          .permute(1, 2, 0), radii=radii.to(torch.int32), means2d=means2d,
                          backend="inria")
