"""Orbit cameras with the Zero-1-to-3 / DreamGaussian conventions.

World frame: +y up, the reference camera sits on +z looking at the origin.

* elevation (degrees) lies in (-90, 90); it goes from +y to -y, so a *negative* elevation looks
  down on the object from above.
* azimuth (degrees) turns from +z toward +x.
* position = r * (cos(el) sin(az), -sin(el), cos(el) cos(az)).

``Camera.c2w`` is an OpenGL camera-to-world matrix (camera looks along its -z, +y up).
Rasterizers consume ``Camera.viewmat`` (world-to-camera in the OpenCV convention: x right,
y down, z forward) and ``Camera.K`` (pixel intrinsics, pixel centres at integer + 0.5), or
``Camera.mvp`` (OpenGL clip-space transform) for the mesh rasterizer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

DEFAULT_RADIUS = 2.0
DEFAULT_FOVY = 49.1
DEFAULT_NEAR = 0.01
DEFAULT_FAR = 100.0


def _normalize(v: np.ndarray) -> np.ndarray:
    return v / max(float(np.linalg.norm(v)), 1e-20)


def look_at(campos: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Rotation (columns right, up, backward) of an OpenGL camera at ``campos`` facing ``target``."""
    forward = _normalize(np.asarray(campos, np.float64) - np.asarray(target, np.float64))
    up = np.array([0.0, 1.0, 0.0])
    right = np.cross(up, forward)
    if np.linalg.norm(right) < 1e-9:  # looking straight up or down: pick any right vector
        right = np.array([1.0, 0.0, 0.0])
    right = _normalize(right)
    up = _normalize(np.cross(forward, right))
    return np.stack([right, up, forward], axis=1)


def orbit_position(elevation: float, azimuth: float, radius: float) -> np.ndarray:
    el, az = math.radians(elevation), math.radians(azimuth)
    return radius * np.array(
        [math.cos(el) * math.sin(az), -math.sin(el), math.cos(el) * math.cos(az)]
    )


def orbit_c2w(elevation: float, azimuth: float, radius: float = DEFAULT_RADIUS,
              target: np.ndarray | None = None) -> np.ndarray:
    """4x4 OpenGL camera-to-world matrix of an orbit camera (degrees)."""
    target = np.zeros(3) if target is None else np.asarray(target, np.float64)
    campos = orbit_position(elevation, azimuth, radius) + target
    c2w = np.eye(4)
    c2w[:3, :3] = look_at(campos, target)
    c2w[:3, 3] = campos
    return c2w


def intrinsics(fovy_deg: float, width: int, height: int) -> np.ndarray:
    """Pinhole intrinsics with square pixels; the vertical field of view is ``fovy_deg``."""
    fy = height / (2.0 * math.tan(math.radians(fovy_deg) / 2.0))
    return np.array([[fy, 0.0, width / 2.0], [0.0, fy, height / 2.0], [0.0, 0.0, 1.0]])


def perspective_gl(fovy_deg: float, aspect: float, near: float, far: float) -> np.ndarray:
    """OpenGL projection (camera space with -z forward -> clip space)."""
    f = 1.0 / math.tan(math.radians(fovy_deg) / 2.0)
    return np.array(
        [
            [f / aspect, 0.0, 0.0, 0.0],
            [0.0, f, 0.0, 0.0],
            [0.0, 0.0, (far + near) / (near - far), 2.0 * far * near / (near - far)],
            [0.0, 0.0, -1.0, 0.0],
        ]
    )


_GL_TO_CV = np.diag([1.0, -1.0, -1.0, 1.0])


@dataclass(frozen=True)
class Camera:
    """A pinhole camera. ``elevation``/``azimuth``/``radius`` are kept when it is an orbit camera."""

    c2w: np.ndarray  # [4, 4] float64, OpenGL convention
    width: int
    height: int
    fovy: float = DEFAULT_FOVY  # degrees
    near: float = DEFAULT_NEAR
    far: float = DEFAULT_FAR
    elevation: float | None = None
    azimuth: float | None = None
    radius: float | None = None

    @classmethod
    def orbit(cls, elevation: float, azimuth: float, radius: float = DEFAULT_RADIUS,
              width: int = 256, height: int | None = None, fovy: float = DEFAULT_FOVY,
              near: float = DEFAULT_NEAR, far: float = DEFAULT_FAR) -> "Camera":
        return cls(orbit_c2w(elevation, azimuth, radius), width, height or width, fovy, near, far,
                   float(elevation), float(azimuth), float(radius))

    def resized(self, width: int, height: int | None = None) -> "Camera":
        return Camera(self.c2w, width, height or width, self.fovy, self.near, self.far,
                      self.elevation, self.azimuth, self.radius)

    @property
    def campos(self) -> np.ndarray:
        return self.c2w[:3, 3].copy()

    @property
    def viewmat_np(self) -> np.ndarray:
        """World-to-camera, OpenCV convention (x right, y down, z forward)."""
        return _GL_TO_CV @ np.linalg.inv(self.c2w)

    @property
    def K_np(self) -> np.ndarray:
        return intrinsics(self.fovy, self.width, self.height)

    @property
    def mvp_np(self) -> np.ndarray:
        """World -> OpenGL clip space."""
        proj = perspective_gl(self.fovy, self.width / self.height, self.near, self.far)
        return proj @ np.linalg.inv(self.c2w)

    def viewmat(self, device=None, dtype=torch.float32) -> torch.Tensor:
        return _to_device(self.viewmat_np, device, dtype)

    def K(self, device=None, dtype=torch.float32) -> torch.Tensor:
        return _to_device(self.K_np, device, dtype)

    def mvp(self, device=None, dtype=torch.float32) -> torch.Tensor:
        return _to_device(self.mvp_np, device, dtype)

    def viewmat_and_K(self, device=None, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """``(viewmat(), K())`` uploaded together: one pinned, non-blocking copy on CUDA."""
        if device is None:
            return self.viewmat(None, dtype), self.K(None, dtype)
        from hash3d_dg.accel import upload_many

        viewmat, K = upload_many([self.viewmat_np, self.K_np], device, dtype)
        return viewmat, K


def _to_device(array: np.ndarray, device, dtype) -> torch.Tensor:
    """A host matrix on ``device``: pinned and non-blocking on CUDA (``accel.upload``), the
    same tensor as ``torch.as_tensor(array, dtype=dtype)`` on the CPU."""
    if device is None:
        return torch.as_tensor(array, dtype=dtype)
    from hash3d_dg.accel import upload

    return upload(array, device, dtype)


def wrap_azimuth(azimuth: float) -> float:
    """Map degrees into [-180, 180)."""
    return (azimuth + 180.0) % 360.0 - 180.0
