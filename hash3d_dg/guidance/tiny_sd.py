"""Tiny random Stable Diffusion checkpoints in the real diffusers layout, and SD 2.1's architecture.

Weights cannot be downloaded in tests, so tests write a tiny checkpoint with the real diffusers /
transformers classes in the tree of ``stabilityai/stable-diffusion-2-1-base`` and load it through
the loader users hit (``hash3d_dg.guidance.sd_loading.load_stable_diffusion``)::

    model_index.json                       (StableDiffusionPipeline, no safety checker)
    unet/config.json, unet/diffusion_pytorch_model.fp16.safetensors
    vae/config.json, vae/diffusion_pytorch_model.fp16.safetensors
    text_encoder/config.json, text_encoder/model.fp16.safetensors
    tokenizer/vocab.json, tokenizer/merges.txt, tokenizer/tokenizer_config.json,
    tokenizer/special_tokens_map.json
    scheduler/scheduler_config.json        (PNDMScheduler, as the real repo; loaded as DDIM)
    feature_extractor/preprocessor_config.json

Weights are fp16 safetensors: with ``variant="fp16"`` under the hub's ``*.fp16.safetensors``
names (the real repo's fp16 files), with ``variant=None`` under plain names.

The tokenizer is a tiny CLIP byte-level BPE made here: CLIP's 256 byte symbols, the same with
the end-of-word mark ``</w>``, a few merges (enough to make common English pairs one token), and
``<|startoftext|>`` / ``<|endoftext|>``; ``model_max_length`` 77 as the real one.

``sd21_unet_config``, ``sd21_vae_config`` and ``sd21_text_encoder_config`` are the full-size
SD 2.1 architectures (FLOP counting on the meta device, ``bench gpu``'s random checkpoint).
"""

from __future__ import annotations

import json
from pathlib import Path

import diffusers
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from hash3d_dg.guidance.tiny import feature_extractor_config, scheduler_config, tiny_vae_config

#: Cross-attention size of the tiny SD UNet (= the tiny text encoder's hidden size; 1024 in SD 2.x).
TINY_SD_EMBED_DIM = 32
#: Token positions of CLIP's text tower (the real tokenizer's model_max_length).
MAX_TOKENS = 77
BOS, EOS = "<|startoftext|>", "<|endoftext|>"

#: Merges of the tiny BPE: a few frequent English pairs (so words split into several tokens,
#: not only bytes); the order is the merge priority.
_TINY_MERGES = [
    ("t", "h"), ("e", "r"), ("i", "n"), ("a", "n"), ("o", "n"), ("th", "e</w>"), ("c", "e"),
    ("r", "a"), ("m", "u"), ("mu", "g</w>"), ("o", "f</w>"), ("in", "g</w>"), ("l", "a"),
    ("e", "d</w>"), ("b", "l"), ("u", "e</w>"), ("bl", "ue</w>"), ("a", "s"), ("w", "i"),
]


def sd21_unet_config() -> dict:
    """Full-size SD 2.1(-base) UNet: linear projections in the transformers, per-level head
    counts [5, 10, 20, 20] (diffusers' ``attention_head_dim``; 64-channel heads), 1024-wide text
    context, 4 latent channels, 64x64 latents at 512 px."""
    return {
        "act_fn": "silu",
        "attention_head_dim": [5, 10, 20, 20],
        "block_out_channels": [320, 640, 1280, 1280],
        "center_input_sample": False,
        "cross_attention_dim": 1024,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "downsample_padding": 1,
        "dual_cross_attention": False,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "in_channels": 4,
        "layers_per_block": 2,
        "mid_block_scale_factor": 1,
        "norm_eps": 1e-5,
        "norm_num_groups": 32,
        "only_cross_attention": False,
        "out_channels": 4,
        "sample_size": 64,
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        "upcast_attention": False,
        "use_linear_projection": True,
    }


def sd21_vae_config() -> dict:
    """SD 2.1-base's VAE (the SD VAE, 512-px sample size)."""
    from hash3d_dg.guidance.tiny import stable_zero123_vae_config

    return dict(stable_zero123_vae_config(), sample_size=512)


def sd21_text_encoder_config() -> CLIPTextConfig:
    """SD 2.x's text tower (OpenCLIP ViT-H/14 text model without its last layer: 23 layers)."""
    return CLIPTextConfig(vocab_size=49408, hidden_size=1024, intermediate_size=4096,
                          num_hidden_layers=23, num_attention_heads=16, max_position_embeddings=MAX_TOKENS,
                          hidden_act="gelu", projection_dim=512, bos_token_id=0, eos_token_id=2, pad_token_id=1)


def sd_scheduler_config() -> dict:
    """The real repo's ``scheduler_config.json`` values (its class: PNDMScheduler; scaled_linear
    0.00085-0.012, epsilon, steps_offset 1)."""
    return dict(scheduler_config(), skip_prk_steps=True)


def tiny_sd_unet_config() -> dict:
    """A tiny SD-2.x-like UNet: linear projections, per-level head counts, 4 in / 4 out."""
    return {
        "act_fn": "silu",
        "attention_head_dim": [2, 4],
        "block_out_channels": [32, 64],
        "cross_attention_dim": TINY_SD_EMBED_DIM,
        "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
        "in_channels": 4,
        "layers_per_block": 2,
        "norm_num_groups": 32,
        "out_channels": 4,
        "sample_size": 64,
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
        "use_linear_projection": True,
    }


def bytes_to_unicode() -> dict[int, str]:
    """CLIP's (GPT-2's) map of the 256 bytes to printable unicode symbols."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    extra = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def tiny_clip_vocab(merges: list[tuple[str, str]] | None = None) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The tiny BPE's vocabulary (token -> id, CLIP's order: bytes, bytes + ``</w>``, merges,
    the two specials) and its merges."""
    merges = list(_TINY_MERGES if merges is None else merges)
    base = list(bytes_to_unicode().values())
    tokens = base + [b + "</w>" for b in base] + ["".join(m) for m in merges] + [BOS, EOS]
    if len(set(tokens)) != len(tokens):
        raise ValueError("a merge makes a token the vocabulary already has")
    return {token: i for i, token in enumerate(tokens)}, merges


def write_tiny_clip_tokenizer(path: str | Path) -> Path:
    """Write the tiny CLIP tokenizer (vocab.json, merges.txt, configs) at ``path``."""
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    vocab, merges = tiny_clip_vocab()
    (root / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (root / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    special = {"bos_token": BOS, "eos_token": EOS, "pad_token": EOS, "unk_token": EOS}
    _write_json(root / "special_tokens_map.json", special)
    _write_json(root / "tokenizer_config.json", dict(special, model_max_length=MAX_TOKENS, do_lower_case=True,
                                                    tokenizer_class="CLIPTokenizer", errors="replace",
                                                    add_prefix_space=False))
    return root


def tiny_text_encoder_config() -> CLIPTextConfig:
    """A tiny CLIP text tower over the tiny BPE's vocabulary (77 positions as the real one)."""
    vocab, _ = tiny_clip_vocab()
    return CLIPTextConfig(vocab_size=len(vocab), hidden_size=TINY_SD_EMBED_DIM, intermediate_size=64,
                          num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=MAX_TOKENS,
                          hidden_act="gelu", projection_dim=TINY_SD_EMBED_DIM,
                          bos_token_id=vocab[BOS], eos_token_id=vocab[EOS], pad_token_id=vocab[EOS])


def sd_model_index() -> dict:
    """``model_index.json`` of the real SD 2.1-base repo."""
    return {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        "feature_extractor": ["transformers", "CLIPImageProcessor"],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "PNDMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_tiny_sd_checkpoint(path: str | Path, seed: int = 0, variant: str | None = "fp16",
                             unet_config: dict | None = None) -> Path:
    """Write a tiny randomly initialised Stable Diffusion checkpoint (about 2 MB) at ``path``.

    Args:
        path: target directory (created; files there are overwritten).
        seed: seed of the initialisation (the global RNG state is left untouched).
        variant: ``"fp16"``: weights under the hub's ``*.fp16.safetensors`` names; None: plain
            names (both hold fp16 tensors).
        unet_config: another UNet config (default ``tiny_sd_unet_config()``).

    Returns:
        The checkpoint directory.
    """
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**(unet_config or tiny_sd_unet_config()))
        vae = AutoencoderKL(**tiny_vae_config())
        text_encoder = CLIPTextModel(tiny_text_encoder_config())
    kwargs = dict(safe_serialization=True, variant=variant)
    unet.half().save_pretrained(root / "unet", **kwargs)
    vae.half().save_pretrained(root / "vae", **kwargs)
    text_encoder.half().save_pretrained(root / "text_encoder", **kwargs)
    write_tiny_clip_tokenizer(root / "tokenizer")
    _write_json(root / "scheduler" / "scheduler_config.json",
                dict(sd_scheduler_config(), _class_name="PNDMScheduler", _diffusers_version=diffusers.__version__))
    _write_json(root / "feature_extractor" / "preprocessor_config.json", feature_extractor_config(224))
    _write_json(root / "model_index.json", sd_model_index())
    return root
