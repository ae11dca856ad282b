"""The reference (input) view that both stages match."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from hash3d_dg.camera import Camera


@dataclass
class ReferenceView:
    """The preprocessed input as tensors, plus the camera it was taken from.

    ``rgb`` is composited over white, as DreamGaussian matches it; ``mask`` is the alpha.
    """

    rgb: torch.Tensor  # [H, W, 3] in [0, 1], over white
    mask: torch.Tensor  # [H, W, 1] in [0, 1]
    camera: Camera  # orbit camera at (elevation, azimuth 0, radius), H x W pixels
    elevation: float

    @classmethod
    def from_rgba(cls, rgba: np.ndarray | torch.Tensor, elevation: float, radius: float,
                  fovy: float, size: int, device: torch.device | str = "cpu") -> "ReferenceView":
        """``rgba``: [H, W, 4] straight (not premultiplied) colour and alpha in [0, 1]."""
        t = torch.as_tensor(np.asarray(rgba, dtype=np.float32)).to(device)
        if t.shape[0] != size or t.shape[1] != size:
            t = F.interpolate(t.permute(2, 0, 1)[None], (size, size), mode="bilinear",
                              align_corners=False, antialias=True)[0].permute(1, 2, 0).clamp(0, 1)
        mask = t[..., 3:4]
        rgb = t[..., :3] * mask + (1.0 - mask)
        camera = Camera.orbit(elevation, 0.0, radius, width=size, fovy=fovy)
        return cls(rgb=rgb, mask=mask, camera=camera, elevation=float(elevation))

    def resized(self, size: int) -> "ReferenceView":
        def rs(t):
            return F.interpolate(t.permute(2, 0, 1)[None], (size, size), mode="bilinear",
                                 align_corners=False, antialias=True)[0].permute(1, 2, 0)
        return ReferenceView(rs(self.rgb), rs(self.mask), self.camera.resized(size), self.elevation)

    def image_nchw(self) -> torch.Tensor:
        """[1, 3, H, W] for the guidance's ``set_reference``."""
        return self.rgb.permute(2, 0, 1).unsqueeze(0)
