"""3D Gaussians: model, densification, PLY I/O and rasterizer backends (torch, gsplat, inria)."""

from hash3d_dg.gaussians.backends import (
    available_gaussian_backends,
    gaussian_backend_status,
    rasterize_gaussians,
    resolve_gaussian_backend,
)
from hash3d_dg.gaussians.densify import Densifier
from hash3d_dg.gaussians.model import (
    DEFAULT_LRS,
    SH_C0,
    GaussianModel,
    position_lr,
    rgb_to_sh0,
    set_group_lr,
    sh0_to_rgb,
)
from hash3d_dg.gaussians.ply import load_ply, save_ply
from hash3d_dg.gaussians.render_result import GaussianRender

__all__ = [
    "DEFAULT_LRS",
    "SH_C0",
    "Densifier",
    "GaussianModel",
    "GaussianRender",
    "available_gaussian_backends",
    "gaussian_backend_status",
    "load_ply",
    "position_lr",
    "rasterize_gaussians",
    "resolve_gaussian_backend",
    "rgb_to_sh0",
    "save_ply",
    "set_group_lr",
    "sh0_to_rgb",
]
