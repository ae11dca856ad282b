"""Is the shallow (cached) UNet path exact? shallow(x, feature_of(x)) against the full forward."""

from __future__ import annotations

import torch

from hash3d_dg.cache.config import CACHE_POINTS


def _unets(seed: int, text: bool = False, sd21_full: bool = False):
    """(name, UNet, context tokens): the tiny checkpoint's UNet plus a second layout (1 layer per
    block, plain last block); with ``text`` the tiny SD 2.x UNet (linear projections, per-level
    head counts, 77 tokens); with ``sd21_full`` the full-size SD 2.1 UNet (random weights)."""
    from diffusers import UNet2DConditionModel

    from hash3d_dg.guidance.tiny import tiny_unet_config

    base = tiny_unet_config()
    variant = dict(base, layers_per_block=1, down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
                   up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"])
    models = [("tiny_stable_zero123", base, 1), ("variant_plain_last_block", variant, 1)]
    if text or sd21_full:
        from hash3d_dg.guidance.tiny_sd import sd21_unet_config, tiny_sd_unet_config

        models = [("tiny_sd2", tiny_sd_unet_config(), 77)] if text else []
        if sd21_full:
            models.append(("sd21_full_size_random", sd21_unet_config(), 77))
    for name, config, tokens in models:
        torch.manual_seed(seed)
        yield name, UNet2DConditionModel(**config).eval().requires_grad_(False), tokens


def exactness_report(seed: int = 0, batch: int = 2, latent_size: int = 8, text: bool = False,
                     sd21_full: bool = False) -> dict:
    """Max |shallow - full| per UNet and cache point, fp32 on CPU, CFG batch of ``batch``
    (``text``: the SD 2.x UNets instead, see ``_unets``)."""
    from hash3d_dg.guidance.unet_split import UNetSplit

    results = {}
    worst = 0.0
    generator = torch.Generator().manual_seed(seed)
    for name, unet, tokens in _unets(seed, text, sd21_full):
        cfg = unet.config
        sample = torch.randn(batch, cfg.in_channels, latent_size, latent_size, generator=generator)
        timestep = torch.tensor([523] * batch)
        context = torch.randn(batch, tokens, cfg.cross_attention_dim, generator=generator)
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
    return {"max_abs_diff": worst, "dtype": "float32", "device": "cpu", "latent_size": latent_size,
            "models": results}


def add_arguments(p) -> None:
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--task", default="image", choices=["image", "text"],
                   help="text: the SD 2.x UNets (tiny; --sd21-full adds the full-size SD 2.1 one)")
    p.add_argument("--sd21-full", action="store_true",
                   help="with --task text: also the full-size SD 2.1 UNet, random weights (~4 GB, minutes on CPU)")
    p.add_argument("--latent-size", type=int, default=8)


def run_from_args(args) -> dict:
    return exactness_report(args.seed, latent_size=args.latent_size, text=args.task == "text",
                            sd21_full=args.sd21_full)
