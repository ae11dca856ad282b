"""Tiny random Zero-1-to-3 checkpoints in the real layout, and the real architectures' configs.

Weights cannot be downloaded in tests, so tests write a tiny checkpoint with the real diffusers /
transformers classes in exactly the tree of ``ashawkey/stable-zero123-diffusers`` (and
``ashawkey/zero123-xl-diffusers``, which has the same files) and load it through the same loader
users hit::

    model_index.json
    unet/config.json, unet/diffusion_pytorch_model.safetensors
    vae/config.json, vae/diffusion_pytorch_model.safetensors
    image_encoder/config.json, image_encoder/model.safetensors
    feature_extractor/preprocessor_config.json
    scheduler/scheduler_config.json
    clip_camera_projection/config.json, clip_camera_projection/diffusion_pytorch_model.safetensors,
    clip_camera_projection/zero123.py

All weights are saved as fp16 safetensors with plain names (no variant), like the real repos.

``stable_zero123_unet_config`` and ``stable_zero123_vae_config`` give the full-size
architectures (for FLOP counting on the meta device; no weights involved).

The tiny autoencoder option (``guidance.vae=tiny``) loads diffusers' ``AutoencoderTiny`` in the
layout of ``madebyollin/taesd``: ``config.json`` and ``diffusion_pytorch_model.safetensors`` at the
repository root. ``taesd_config`` is that architecture (for FLOP counting); ``write_tiny_taesd``
writes a tiny random one in the same layout for tests.
"""

from __future__ import annotations

import json
from pathlib import Path

import diffusers
import torch
from diffusers import AutoencoderKL, AutoencoderTiny, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from hash3d_dg.guidance.camera_projection import CLIPCameraProjection

#: CLIP's image normalisation (the real feature_extractor config uses these values).
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

#: Size of the tiny models' CLIP embedding / UNet cross-attention (768 in the real models).
TINY_EMBED_DIM = 32
#: Input resolution of the tiny CLIP vision tower (224 in the real models).
TINY_CLIP_IMAGE_SIZE = 32

_ZERO123_PY_PLACEHOLDER = (
    "# Placeholder for the Zero123Pipeline source file that the real checkpoints ship here.\n"
    "# hash3d_dg never imports or executes this file; CLIPCameraProjection is defined in\n"
    "# hash3d_dg/guidance/camera_projection.py.\n"
)


def stable_zero123_unet_config() -> dict:
    """Full-size Stable-Zero123 / Zero123-XL UNet config (SD-1.x UNet with 8 input channels).

    Use with ``UNet2DConditionModel.from_config(cfg)`` (e.g. on the meta device).
    """
    return {
        "act_fn": "silu",
        "attention_head_dim": 8,
        "block_out_channels": [320, 640, 1280, 1280],
        "center_input_sample": False,
        "cross_attention_dim": 768,
        "down_block_types": [
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "DownBlock2D",
        ],
        "downsample_padding": 1,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "in_channels": 8,
        "layers_per_block": 2,
        "mid_block_scale_factor": 1,
        "norm_eps": 1e-5,
        "norm_num_groups": 32,
        "out_channels": 4,
        "sample_size": 32,
        "up_block_types": [
            "UpBlock2D",
            "CrossAttnUpBlock2D",
            "CrossAttnUpBlock2D",
            "CrossAttnUpBlock2D",
        ],
    }


def stable_zero123_vae_config() -> dict:
    """Full-size SD VAE config (4 levels: latent = image / 8, scaling factor 0.18215)."""
    return {
        "act_fn": "silu",
        "block_out_channels": [128, 256, 512, 512],
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "in_channels": 3,
        "latent_channels": 4,
        "layers_per_block": 2,
        "norm_num_groups": 32,
        "out_channels": 3,
        "sample_size": 256,
        "scaling_factor": 0.18215,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
    }


def scheduler_config() -> dict:
    """The checkpoints' DDIM scheduler config (scaled_linear 0.00085-0.012, epsilon)."""
    return {
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "clip_sample": False,
        "num_train_timesteps": 1000,
        "prediction_type": "epsilon",
        "set_alpha_to_one": False,
        "steps_offset": 1,
        "trained_betas": None,
    }


def tiny_unet_config() -> dict:
    """A tiny SD-1.x-like UNet (2 levels, last up block a CrossAttnUpBlock2D), 8 in, 4 out."""
    return {
        "act_fn": "silu",
        "attention_head_dim": 8,
        "block_out_channels": [32, 64],
        "cross_attention_dim": TINY_EMBED_DIM,
        "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
        "in_channels": 8,
        "layers_per_block": 2,
        "norm_num_groups": 32,
        "out_channels": 4,
        "sample_size": 32,
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    }


def tiny_vae_config() -> dict:
    """A tiny 4-level VAE (latent = image / 8, 4 latent channels, scaling factor 0.18215)."""
    return {
        "act_fn": "silu",
        "block_out_channels": [8, 16, 16, 16],
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "in_channels": 3,
        "latent_channels": 4,
        "layers_per_block": 1,
        "norm_num_groups": 8,
        "out_channels": 3,
        "sample_size": 256,
        "scaling_factor": 0.18215,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
    }


def taesd_config() -> dict:
    """TAESD's architecture (``madebyollin/taesd`` config.json): 4 encoder / decoder stages of 64
    channels, latent = image / 8 with 4 channels, latents already in the SD-scaled space."""
    return {
        "act_fn": "relu",
        "decoder_block_out_channels": [64, 64, 64, 64],
        "encoder_block_out_channels": [64, 64, 64, 64],
        "force_upcast": False,
        "in_channels": 3,
        "latent_channels": 4,
        "latent_magnitude": 3,
        "latent_shift": 0.5,
        "num_decoder_blocks": [3, 3, 3, 1],
        "num_encoder_blocks": [1, 3, 3, 3],
        "out_channels": 3,
        "scaling_factor": 1.0,
        "upsampling_scaling_factor": 2,
    }


def tiny_taesd_config() -> dict:
    """A tiny ``AutoencoderTiny`` with TAESD's structure (same stages, latent = image / 8)."""
    return dict(taesd_config(), encoder_block_out_channels=[8, 8, 8, 8],
                decoder_block_out_channels=[8, 8, 8, 8], num_encoder_blocks=[1, 1, 1, 1],
                num_decoder_blocks=[1, 1, 1, 1])


def write_tiny_taesd(path: str | Path, seed: int = 0) -> Path:
    """Write a tiny random ``AutoencoderTiny`` in the ``madebyollin/taesd`` layout at ``path``
    (``config.json`` + fp16 ``diffusion_pytorch_model.safetensors``); returns the directory."""
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderTiny(**tiny_taesd_config())
    vae.half().save_pretrained(root, safe_serialization=True)
    return root


def tiny_image_encoder_config() -> CLIPVisionConfig:
    """A tiny CLIP ViT whose projection size equals the tiny UNet's cross-attention size."""
    return CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=TINY_CLIP_IMAGE_SIZE,
        patch_size=8,
        projection_dim=TINY_EMBED_DIM,
    )


def feature_extractor_config(size: int = 224) -> dict:
    """CLIPImageProcessor config as in the real checkpoints (bicubic, centre crop, CLIP mean/std).

    ``size`` is the shortest-edge resize and the square crop (224 in the real models).
    """
    return {
        "crop_size": {"height": size, "width": size},
        "do_center_crop": True,
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor",
        "image_mean": list(CLIP_MEAN),
        "image_processor_type": "CLIPImageProcessor",
        "image_std": list(CLIP_STD),
        "resample": 3,
        "rescale_factor": 1 / 255,
        "size": {"shortest_edge": size},
    }


def model_index() -> dict:
    """The checkpoints' ``model_index.json`` content."""
    return {
        "_class_name": "Zero123Pipeline",
        "_diffusers_version": diffusers.__version__,
        "clip_camera_projection": ["zero123", "CLIPCameraProjection"],
        "feature_extractor": ["transformers", "CLIPImageProcessor"],
        "image_encoder": ["transformers", "CLIPVisionModelWithProjection"],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_tiny_checkpoint(path: str | Path, family: str = "stable", seed: int = 0) -> Path:
    """Write a tiny randomly initialised Zero-1-to-3 checkpoint (a few MB) at ``path``.

    Args:
        path: target directory (created; existing files are overwritten).
        family: "stable" or "xl". The two real families share architecture and file layout, so
            this only selects a different random initialisation (seed offset); the loader tells
            the families apart by the directory name, as with the real checkpoints.
        seed: random seed of the initialisation (the global RNG state is left untouched).

    Returns:
        The checkpoint directory as a ``Path``.
    """
    if family not in ("stable", "xl"):
        raise ValueError(f"family must be 'stable' or 'xl', got {family!r}")
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + (0 if family == "stable" else 1000))
        unet = UNet2DConditionModel(**tiny_unet_config())
        vae = AutoencoderKL(**tiny_vae_config())
        image_encoder = CLIPVisionModelWithProjection(tiny_image_encoder_config())
        projection = CLIPCameraProjection(embedding_dim=TINY_EMBED_DIM, additional_embeddings=4)
    unet.half().save_pretrained(root / "unet", safe_serialization=True)
    vae.half().save_pretrained(root / "vae", safe_serialization=True)
    image_encoder.half().save_pretrained(root / "image_encoder", safe_serialization=True)
    projection.half().save_pretrained(root / "clip_camera_projection", safe_serialization=True)
    (root / "clip_camera_projection" / "zero123.py").write_text(_ZERO123_PY_PLACEHOLDER)
    DDIMScheduler(**scheduler_config()).save_pretrained(root / "scheduler")
    _write_json(
        root / "feature_extractor" / "preprocessor_config.json",
        feature_extractor_config(TINY_CLIP_IMAGE_SIZE),
    )
    _write_json(root / "model_index.json", model_index())
    return root
