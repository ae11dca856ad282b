"""Random-weight Zero-1-to-3 checkpoints of the full stable-zero123 architecture (or the tiny
one), written in the real checkpoint layout so the product loads them through ``load_zero123``.

Nothing can be downloaded on the benchmark machines, so ``bench gpu`` times the product on random
weights of the real sizes: UNet (SD-1.x, 8 input channels, ~860 M parameters), SD VAE (~84 M),
CLIP ViT-L/14 vision tower with a 768 projection (~304 M) and the 772 -> 768 camera projection,
saved as plain-named fp16 safetensors like ``ashawkey/stable-zero123-diffusers`` (~2.5 GB).

The modules are built on ``device`` (a GPU initialises ~1.2 G parameters in seconds where a CPU
takes minutes), cast to fp16 and saved with the classes' own ``save_pretrained``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from hash3d_dg.guidance.camera_projection import CLIPCameraProjection
from hash3d_dg.guidance.tiny import (TINY_CLIP_IMAGE_SIZE, TINY_EMBED_DIM, _ZERO123_PY_PLACEHOLDER,
                                     _write_json, feature_extractor_config, model_index,
                                     scheduler_config, stable_zero123_unet_config,
                                     stable_zero123_vae_config, tiny_image_encoder_config,
                                     tiny_unet_config, tiny_vae_config)

ARCHS = ("full", "tiny")


def full_image_encoder_config() -> CLIPVisionConfig:
    """CLIP ViT-L/14 vision tower at 224 px with a 768-d projection (the real image_encoder)."""
    return CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                            num_attention_heads=16, image_size=224, patch_size=14,
                            projection_dim=768, hidden_act="quick_gelu", layer_norm_eps=1e-5)


def _arch(arch: str) -> tuple[dict, dict, CLIPVisionConfig, int, int]:
    if arch == "full":
        return (stable_zero123_unet_config(), stable_zero123_vae_config(),
                full_image_encoder_config(), 768, 224)
    if arch == "tiny":
        return (tiny_unet_config(), tiny_vae_config(), tiny_image_encoder_config(), TINY_EMBED_DIM,
                TINY_CLIP_IMAGE_SIZE)
    raise ValueError(f"arch must be one of {', '.join(ARCHS)}, got {arch!r}")


def _save_random_parts(root: Path, device, seed: int, build, variant: str | None = None) -> None:
    """``build()``'s modules (name -> module), made on ``device`` from ``seed`` (the global RNG
    state left as it was), saved in fp16 safetensors under ``root/name`` one at a time."""
    root.mkdir(parents=True, exist_ok=True)
    device = torch.device(device)
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        with torch.device(device):
            parts = build()
    for name, module in parts.items():
        module.to("cpu", torch.float16).save_pretrained(root / name, safe_serialization=True, variant=variant)
        del module
    parts.clear()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def write_random_checkpoint(path: str | Path, arch: str = "full", seed: int = 0,
                            device: str | torch.device = "cpu") -> Path:
    """Write a random-weight stable-zero123 checkpoint (fp16 safetensors) at ``path``.

    ``path`` should contain "stable" so ``family=auto`` picks the stable camera embedding, as
    for the real repository. The global RNG state is left untouched.
    """
    unet_cfg, vae_cfg, clip_cfg, embed_dim, clip_size = _arch(arch)
    root = Path(path)
    _save_random_parts(root, device, seed, lambda: {
        "unet": UNet2DConditionModel(**unet_cfg), "vae": AutoencoderKL(**vae_cfg),
        "image_encoder": CLIPVisionModelWithProjection(clip_cfg),
        "clip_camera_projection": CLIPCameraProjection(embedding_dim=embed_dim, additional_embeddings=4)})
    (root / "clip_camera_projection" / "zero123.py").write_text(_ZERO123_PY_PLACEHOLDER)
    DDIMScheduler(**scheduler_config()).save_pretrained(root / "scheduler")
    _write_json(root / "feature_extractor" / "preprocessor_config.json",
                feature_extractor_config(clip_size))
    _write_json(root / "model_index.json", model_index())
    return root


def write_random_sd_checkpoint(path: str | Path, arch: str = "full", seed: int = 0,
                               device: str | torch.device = "cpu") -> Path:
    """Write a random-weight Stable Diffusion checkpoint in the layout of
    ``stabilityai/stable-diffusion-2-1-base`` (fp16 ``*.fp16.safetensors``) at ``path``.

    ``full``: SD 2.1's UNet (~865 M), SD VAE (~84 M) and 23-layer OpenCLIP ViT-H text tower
    (~340 M, vocabulary 49408); ``tiny``: the test checkpoint's sizes. The tokenizer is the tiny
    CLIP BPE of ``guidance.tiny_sd`` (the real 49408-token vocabulary cannot be downloaded
    here; its ids all fall inside the full tower's vocabulary). The global RNG state is left
    untouched.
    """
    from transformers import CLIPTextModel

    from hash3d_dg.guidance import tiny_sd

    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {', '.join(ARCHS)}, got {arch!r}")
    if arch == "tiny":
        return tiny_sd.write_tiny_sd_checkpoint(path, seed=seed)
    root = Path(path)
    _save_random_parts(root, device, seed, lambda: {
        "unet": UNet2DConditionModel(**tiny_sd.sd21_unet_config()),
        "vae": AutoencoderKL(**tiny_sd.sd21_vae_config()),
        "text_encoder": CLIPTextModel(tiny_sd.sd21_text_encoder_config())}, variant="fp16")
    tiny_sd.write_tiny_clip_tokenizer(root / "tokenizer")
    _write_json(root / "scheduler" / "scheduler_config.json",
                dict(tiny_sd.sd_scheduler_config(), _class_name="PNDMScheduler"))
    _write_json(root / "feature_extractor" / "preprocessor_config.json", feature_extractor_config(224))
    _write_json(root / "model_index.json", tiny_sd.sd_model_index())
    return root
