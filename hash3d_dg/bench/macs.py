"""Compute of a whole default run (500 + 50 iterations) per hash3d mode.

GMACs per call kind come from the real stable-zero123 architecture on the meta device
(``flops.py``); call counts come from running the real stage loops with the tiny model (hits
depend on the view/timestep sampling and the table, not on the weights) at a small render size.
"""

from __future__ import annotations

import argparse

import torch

from hash3d_dg.bench.flops import count_gmacs, meta_vae, unet_gmacs, vae_gmacs
from hash3d_dg.bench.harness import (bench_config, describe_machine, run_stages, sample_reference,
                                     sized_guidance, standin_mesh)

MODES = ("off", "paper", "official")


def vae_encode_backward_gmacs(image_size: int = 256) -> float:
    """MACs of back-propagating through the frozen VAE encoder (input gradients only)."""
    vae = meta_vae()
    image = torch.empty(1, 3, image_size, image_size, device="meta", requires_grad=True)

    def forward_backward():
        latent = vae.encode(image).latent_dist.mean
        latent.backward(torch.empty_like(latent))

    vae.requires_grad_(False)
    total = count_gmacs(forward_backward)
    with torch.no_grad():
        forward = count_gmacs(vae.encode, image)
    return total - forward


def count_calls(mode: str, iters: int, iters_refine: int, seed: int = 0, size: int = 32) -> dict:
    cfg = bench_config(mode, iters, iters_refine, size=size, image_size=64, seed=seed)
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


def macs_report(iters: int = 500, iters_refine: int = 50, seed: int = 0, image_size: int = 256,
                cache_point: str = "last_subblock", modes=MODES) -> dict:
    unet = unet_gmacs(image_size, 2)
    vae = vae_gmacs(image_size)
    per_call = {
        "unet_full_cfg_pair": unet["full"],
        "unet_shallow_cfg_pair": unet["shallow_by_point"][cache_point],
        "vae_encode_forward": vae["encode"],
        "vae_encode_backward": vae_encode_backward_gmacs(image_size),
        "vae_decode": vae["decode"],
    }
    out = {"modes": {}, "gmacs_per_call": {k: round(v, 3) for k, v in per_call.items()},
           "iters": iters, "iters_refine": iters_refine, "image_size": image_size,
           "cache_point": cache_point,
           "not_counted": "rasterizers (Gaussian splatting, mesh) and the stage-2 render backward: "
                          "not matrix work, small next to the networks",
           "machine": describe_machine()}
    for mode in modes:
        calls = count_calls(mode, iters, iters_refine, seed)
        c1, c2 = calls["stage1"], calls["stage2"]
        s1 = (c1["sds_calls"] * (per_call["vae_encode_forward"] + per_call["vae_encode_backward"])
              + c1["unet_full_calls"] * per_call["unet_full_cfg_pair"]
              + c1["unet_shallow_calls"] * per_call["unet_shallow_cfg_pair"])
        s2 = (c2["refine_calls"] * (per_call["vae_encode_forward"] + per_call["vae_decode"])
              + c2["unet_full_calls"] * per_call["unet_full_cfg_pair"]
              + c2["unet_shallow_calls"] * per_call["unet_shallow_cfg_pair"])
        unet_only = ((c1["unet_full_calls"] + c2["unet_full_calls"]) * per_call["unet_full_cfg_pair"]
                     + (c1["unet_shallow_calls"] + c2["unet_shallow_calls"]) * per_call["unet_shallow_cfg_pair"])
        out["modes"][mode] = {"stage1_tmacs": round(s1 / 1e3, 3), "stage2_tmacs": round(s2 / 1e3, 3),
                              "total_tmacs": round((s1 + s2) / 1e3, 3),
                              "unet_tmacs": round(unet_only / 1e3, 3), "calls": calls}
    off = out["modes"].get("off")
    for mode, entry in out["modes"].items():
        if off:
            entry["ratio_to_off"] = round(entry["total_tmacs"] / off["total_tmacs"], 4)
            entry["unet_ratio_to_off"] = round(entry["unet_tmacs"] / off["unet_tmacs"], 4)
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--iters", type=int, default=500)
    p.add_argument("--iters-refine", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-point", default="last_subblock", choices=["last_subblock", "last_block"])
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))


def run_from_args(args) -> dict:
    return macs_report(args.iters, args.iters_refine, args.seed, 256, args.cache_point, tuple(args.modes))
