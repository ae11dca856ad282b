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

    ``rgb`` is composited over white, as DreamGaussian matches it; ``mask`` is the alpha. A run
    without an input image (text to 3D) has a reference camera but no pixels
    (``camera_only``: ``rgb`` and ``mask`` None); the stages then skip the reference-view loss.
    """

    rgb: torch.Tensor | None  # [H, W, 3] in [0, 1], over white
    mask: torch.Tensor | None  # [H, W, 1] in [0, 1]
    camera: Camera  # orbit camera at (elevation, azimuth 0, radius), H x W pixels
    elevation: float
    where: torch.device | None = None  # the device of a camera-only view

    @classmethod
    def camera_only(cls, elevation: float, radius: float, fovy: float, size: int,
                    device: torch.device | str = "cpu") -> "ReferenceView":
        """The training camera of a run without an input image: azimuth 0 faces +z, +y up."""
        camera = Camera.orbit(elevation, 0.0, radius, width=size, fovy=fovy)
        return cls(rgb=None, mask=None, camera=camera, elevation=float(elevation), where=torch.device(device))

    @property
    def has_image(self) -> bool:
        return self.rgb is not None

    @property
    def device(self) -> torch.device:
        return self.rgb.device if self.rgb is not None else self.where

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
        if self.rgb is None:
            return ReferenceView(None, None, self.camera.resized(size), self.elevation, self.where)

        def rs(t):
            return F.interpolate(t.permute(2, 0, 1)[None], (size, size), mode="bilinear",
                                 align_corners=False, antialias=True)[0].permute(1, 2, 0)
        return ReferenceView(rs(self.rgb), rs(self.mask), self.camera.resized(size), self.elevation)

    def image_nchw(self) -> torch.Tensor:
        """[1, 3, H, W] for the guidance's ``set_reference``."""
        if self.rgb is None:
            raise ValueError("a camera-only reference view has no image")
        return self.rgb.permute(2, 0, 1).unsqueeze(0)
