"""The output of every Gaussian rasterizer backend."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass
class GaussianRender:
    """One rendered view of a set of 3D Gaussians (all images HWC).

    Attributes:
        image: [H, W, 3] colour composited over the background.
        alpha: [H, W, 1] accumulated opacity, ``1 - final transmittance``.
        depth: [H, W, 1] alpha-weighted camera-space z, ``sum_i w_i z_i`` (0 where empty);
            divide by ``alpha`` for the expected depth.
        radii: [N] int screen radius in pixels of each Gaussian (0 = culled / not visible).
        means2d: [N, 2] projected pixel positions (pixel (u, v) has its centre at
            (u + 0.5, v + 0.5)). A non-leaf tensor with ``retain_grad()`` called, so after
            ``backward()`` its ``.grad`` holds the view-space (pixel) gradient used by
            densification. ``None`` grad if the render was made without autograd.
        backend: name of the backend that produced the render.
    """

    image: Tensor
    alpha: Tensor
    depth: Tensor
    radii: Tensor
    means2d: Tensor
    backend: str

    @property
    def height(self) -> int:
        return int(self.image.shape[0])

    @property
    def width(self) -> int:
        return int(self.image.shape[1])
