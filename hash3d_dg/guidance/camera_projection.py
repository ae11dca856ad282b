"""The Zero-1-to-3 camera projection: CLIP image embedding + 4 camera numbers -> UNet context.

The checkpoints ship this module's weights in their ``clip_camera_projection`` subfolder
(config ``{embedding_dim: 768, additional_embeddings: 4}``, one Linear ``proj``: 772 -> 768)
together with a ``zero123.py`` pipeline source file. That file is never executed here: this
class is a plain diffusers model with the same config and parameter names, so
``CLIPCameraProjection.from_pretrained(path, subfolder="clip_camera_projection")`` loads it.
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn


class CLIPCameraProjection(ModelMixin, ConfigMixin):
    """Linear projection of ``[CLIP image embedding, camera embedding]`` to the UNet's context.

    Args:
        embedding_dim: size E of the CLIP image embedding (768 for ViT-L/14) and of the output.
        additional_embeddings: number of camera numbers appended to the embedding (4).
    """

    @register_to_config
    def __init__(self, embedding_dim: int = 768, additional_embeddings: int = 4):
        super().__init__()
        self.embedding_dim = embedding_dim
        self.additional_embeddings = additional_embeddings
        self.proj = nn.Linear(embedding_dim + additional_embeddings, embedding_dim)

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        """Project ``embedding`` [B, 1, E + 4] (or [..., E + 4]) to [B, 1, E] (or [..., E])."""
        return self.proj(embedding)
