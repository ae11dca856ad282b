"""Zero-1-to-3 guidance: checkpoint loading, camera embeddings, SDS, refine, tiny test models."""

from hash3d_dg.guidance.camera_projection import CLIPCameraProjection
from hash3d_dg.guidance.loading import ModelLoadError, Zero123Components, load_zero123, resolve_family
from hash3d_dg.guidance.tiny import stable_zero123_unet_config, stable_zero123_vae_config, write_tiny_checkpoint
from hash3d_dg.guidance.zero123 import Zero123Guidance

__all__ = [
    "CLIPCameraProjection",
    "ModelLoadError",
    "Zero123Components",
    "Zero123Guidance",
    "load_zero123",
    "resolve_family",
    "stable_zero123_unet_config",
    "stable_zero123_vae_config",
    "write_tiny_checkpoint",
]
