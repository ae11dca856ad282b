"""Compute of a whole default run (500 + 50 iterations) per hash3d mode.

GMACs per call kind come from the real stable-zero123 architecture on the meta device
(``flops.py``); call counts come from running the real stage loops with the tiny model (hits
depend on the view/timestep sampling and the table, not on the weights) at a small render size.
"""

from __future__ import annotations

import argparse

import torch

from hash3d_dg.bench.flops import (encode_backward_gmacs, meta_vae, shallow_gmacs, taesd_gmacs, unet_gmacs,
                                   vae_gmacs)
from hash3d_dg.bench.harness import (bench_config, describe_machine, run_stages, sample_reference,
                                     sized_guidance, standin_mesh)

MODES = ("off", "paper", "official", "fast")


def vae_encode_backward_gmacs(image_size: int = 256) -> float:
    """MACs of back-propagating through the frozen SD VAE encoder (input gradients only)."""
    return encode_backward_gmacs(meta_vae(), image_size)


def count_calls(mode: str, iters: int, iters_refine: int, seed: int = 0, size: int = 32,
                **hash3d_overrides) -> dict:
    cfg = bench_config(mode, iters, iters_refine, size=size, image_size=64, seed=seed, **hash3d_overrides)
    guidance = sized_guidance(cfg, torch.device("cpu"), torch.float32)
    ref = sample_reference(size, cfg, "cpu")
    guidance.set_reference(ref.image_nchw(), cfg.elevation)
    result = run_stages(cfg, guidance, ref, standin_mesh())
    s1, s2 = result["stage1"], result["stage2"]
    return {
        "stage1": {"sds_calls": iters * cfg.stage1.batch_size,
                   "unet_full_calls": s1["unet"]["full_calls"],
                   "unet_shallow_calls": s1["unet"]["shallow_calls"],
                   "cache_hits": s1["cache"]["hits"], "cache_attempts": s1["cache"]["attempts"]},
        "stage2": {"refine_calls": iters_refine,
                   "unet_full_calls": s2["unet"]["full_calls"],
                   "unet_shallow_calls": s2["unet"]["shallow_calls"],
                   "cache_hits": s2["cache"]["hits"], "cache_attempts": s2["cache"]["attempts"]},
    }


def per_call_gmacs(image_size: int = 256, cache_point="paper", vae: str = "full") -> dict:
    """GMACs of each call kind of a run: UNet CFG pair full / shallow at ``cache_point``, and the
    renders' autoencoder (``vae``: ``full`` = the SD VAE, ``tiny`` = TAESD)."""
    unet = unet_gmacs(image_size, 2)
    point = cache_point if isinstance(cache_point, str) else tuple(cache_point)
    out = {"unet_full_cfg_pair": unet["full"], "unet_shallow_cfg_pair": shallow_gmacs(point, image_size, 2)}
    if vae == "tiny":
        tiny = taesd_gmacs(image_size)
        out.update(vae_encode_forward=tiny["encode"], vae_encode_backward=tiny["encode_backward"],
                   vae_decode=tiny["decode"])
    else:
        full = vae_gmacs(image_size)
        out.update(vae_encode_forward=full["encode"], vae_encode_backward=vae_encode_backward_gmacs(image_size),
                   vae_decode=full["decode"])
    return out


def mode_settings(mode: str, cache_point=None, vae: str = "auto", **hash3d_overrides) -> tuple[object, str]:
    """``(cache point, vae kind)`` a mode runs with: its preset's cache point unless
    ``cache_point`` is given, and ``vae`` resolved as ``guidance.vae`` is (auto: tiny for fast)."""
    from hash3d_dg.cache import Hash3DConfig
    from hash3d_dg.guidance.loading import resolve_vae_kind

    preset = Hash3DConfig.preset(mode, **hash3d_overrides)
    return (cache_point or preset.cache_point), resolve_vae_kind(vae, mode)


def run_tmacs(per_call: dict, calls: dict) -> dict:
    """Whole-run TMACs of one mode from GMACs per call kind and the stage loops' call counts:
    stage 1 = SDS calls x (encoder forward + backward) + UNet full / shallow calls; stage 2 =
    refine calls x (encoder forward + decoder) + UNet full / shallow calls."""
    c1, c2 = calls["stage1"], calls["stage2"]
    s1 = (c1["sds_calls"] * (per_call["vae_encode_forward"] + per_call["vae_encode_backward"])
          + c1["unet_full_calls"] * per_call["unet_full_cfg_pair"]
          + c1["unet_shallow_calls"] * per_call["unet_shallow_cfg_pair"])
    s2 = (c2["refine_calls"] * (per_call["vae_encode_forward"] + per_call["vae_decode"])
          + c2["unet_full_calls"] * per_call["unet_full_cfg_pair"]
          + c2["unet_shallow_calls"] * per_call["unet_shallow_cfg_pair"])
    unet_only = ((c1["unet_full_calls"] + c2["unet_full_calls"]) * per_call["unet_full_cfg_pair"]
                 + (c1["unet_shallow_calls"] + c2["unet_shallow_calls"]) * per_call["unet_shallow_cfg_pair"])
    return {"stage1_tmacs": round(s1 / 1e3, 3), "stage2_tmacs": round(s2 / 1e3, 3),
            "total_tmacs": round((s1 + s2) / 1e3, 3), "unet_tmacs": round(unet_only / 1e3, 3)}


def macs_report(iters: int = 500, iters_refine: int = 50, seed: int = 0, image_size: int = 256,
                cache_point=None, modes=MODES, vae: str = "auto") -> dict:
    """Whole-run TMACs per mode: GMACs per call (real architectures, meta device) times the call
    counts of the real stage loops. ``cache_point`` overrides every mode's preset point; ``vae``
    is ``guidance.vae`` for every mode (auto: tiny for ``fast``, full otherwise)."""
    out = {"modes": {}, "iters": iters, "iters_refine": iters_refine, "image_size": image_size,
           "cache_point_override": cache_point, "vae": vae,
           "not_counted": "rasterizers (Gaussian splatting, mesh) and the stage-2 render backward: "
                          "not matrix work, small next to the networks",
           "machine": describe_machine()}
    for mode in modes:
        point, vae_kind = mode_settings(mode, cache_point, vae)
        per_call = per_call_gmacs(image_size, point, vae_kind)
        calls = count_calls(mode, iters, iters_refine, seed,
                            **({"cache_point": point} if mode != "off" else {}))
        entry = run_tmacs(per_call, calls)
        entry.update(cache_point=point if mode != "off" else None, vae=vae_kind,
                     gmacs_per_call={k: round(v, 3) for k, v in per_call.items()}, calls=calls)
        out["modes"][mode] = entry
    off = out["modes"].get("off")
    for mode, entry in out["modes"].items():
        if off:
            entry["ratio_to_off"] = round(entry["total_tmacs"] / off["total_tmacs"], 4)
            entry["speedup_vs_off"] = round(off["total_tmacs"] / entry["total_tmacs"], 3)
            entry["unet_ratio_to_off"] = round(entry["unet_tmacs"] / off["unet_tmacs"], 4)
    return out


def _cache_point_arg(text: str):
    """``paper`` | ``last_subblock`` | ``last_block`` | ``U,S`` (e.g. ``-1,1``)."""
    from hash3d_dg.cache.config import CACHE_POINTS

    if text in CACHE_POINTS:
        return text
    try:
        u, s = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"cache point must be one of {', '.join(CACHE_POINTS)} or U,S") from None
    return [u, s]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--iters", type=int, default=500)
    p.add_argument("--iters-refine", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-point", type=_cache_point_arg, default=None,
                   help="override every mode's cache point: paper, last_subblock, last_block or U,S "
                        "(default: each mode's preset)")
    p.add_argument("--vae", default="auto", choices=["auto", "full", "tiny"],
                   help="guidance.vae for every mode (default auto: tiny for fast, full otherwise)")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    p.add_argument("--task", default="image", choices=["image", "text"],
                   help="image: stable-zero123 at 256 px; text: Stable Diffusion 2.1 at 512 px (default: image)")


def run_from_args(args) -> dict:
    """The image task (``--task text`` is ``text_costs.run_macs_from_args``: see ``bench.__main__``)."""
    return macs_report(args.iters, args.iters_refine, args.seed, 256, args.cache_point,
                       tuple(args.modes), args.vae)
