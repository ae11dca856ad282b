"""Is the shallow (cached) UNet path exact? shallow(x, feature_of(x)) against the full forward."""

from __future__ import annotations

import torch

from hash3d_dg.cache.config import CACHE_POINTS


def _unets(seed: int):
    """The tiny checkpoint's UNet plus a second layout (1 layer per block, plain last block)."""
    from diffusers import UNet2DConditionModel

    from hash3d_dg.guidance.tiny import tiny_unet_config

    base = tiny_unet_config()
    variant = dict(base, layers_per_block=1, down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
                   up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"])
    for name, config in (("tiny_stable_zero123", base), ("variant_plain_last_block", variant)):
        torch.manual_seed(seed)
        yield name, UNet2DConditionModel(**config).eval().requires_grad_(False)


def exactness_report(seed: int = 0, batch: int = 2, latent_size: int = 8) -> dict:
    """Max |shallow - full| per UNet and cache point, fp32 on CPU, CFG batch of ``batch``."""
    from hash3d_dg.guidance.unet_split import UNetSplit

    results = {}
    worst = 0.0
    generator = torch.Generator().manual_seed(seed)
    for name, unet in _unets(seed):
        cfg = unet.config
        sample = torch.randn(batch, cfg.in_channels, latent_size, latent_size, generator=generator)
        timestep = torch.tensor([523] * batch)
        context = torch.randn(batch, 1, cfg.cross_attention_dim, generator=generator)
        with torch.no_grad():
            reference = unet(sample, timestep, encoder_hidden_states=context).sample
            per_point = {}
            for point in CACHE_POINTS:
                split = UNetSplit(unet, point)
                full, feature = split.full(sample, timestep, context)
                shallow = split.shallow(sample, timestep, context, feature)
                diff = float((shallow - reference).abs().max())
                per_point[point] = {"max_abs_diff": diff,
                                    "full_vs_diffusers": float((full - reference).abs().max()),
                                    "feature_shape": list(feature.shape)}
                worst = max(worst, diff)
        results[name] = per_point
    return {"max_abs_diff": worst, "dtype": "float32", "device": "cpu", "models": results}


def add_arguments(p) -> None:
    p.add_argument("--seed", type=int, default=0)


def run_from_args(args) -> dict:
    return exactness_report(args.seed)
