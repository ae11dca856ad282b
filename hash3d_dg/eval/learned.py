"""A learned oracle: a small pixel-space, view-conditioned denoiser trained on the oracle scene.

The analytic oracle (``oracle.OracleDenoiser``) defines its "deep feature" as the clean render of
the conditioning camera: it does not depend on the timestep and carries no noise, so the cache's
timestep fall-back, trajectory reuse and cache point cost nothing there. This module trains a
real (small) diffusers ``UNet2DConditionModel`` on renders of the same object, so the Hash3D
table can be judged through the same ``UNetSplit`` the product uses, on features that drift with
the timestep and carry the noise of the pass that made them.

Model (``model_config``): pixel space, 32x32, input = concat(noisy view [3], reference view [3],
camera planes [6]) (the reference as Zero-1-to-3 concatenates the input image's latent); output
epsilon [3]; blocks 32/64/64
(``CrossAttnDownBlock2D``, ``CrossAttnDownBlock2D``, ``DownBlock2D`` / ``UpBlock2D``,
``CrossAttnUpBlock2D``, ``CrossAttnUpBlock2D``; the blocks' transformers cross-attend to the
camera only, the 8x8 mid block keeps self-attention), ``layers_per_block`` 1 (the ``paper`` and ``last_subblock``
points then coincide). The relative camera is 4 context tokens
(``camera_tokens``): token k carries Zero-1-to-3's camera number ``T_k`` of
``T = [rad(d_el), sin(rad(d_az)), cos(rad(d_az)), d_radius]`` as a one-hot position plus the
value and its Fourier features; the cross-attention layers learn the rest. The camera also
enters as 6 constant input planes (``camera_planes``): a first run with the tokens alone still
ignored the camera after 500 steps (right- and wrong-camera errors equal), so the run was
restarted from that checkpoint with the planes added (``--init-from``, zero-initialised
``conv_in`` weights for the new channels: the same function at the start). Both enter the
shallow path too (``conv_in`` and the last up block's cross-attention), as Zero-1-to-3's camera
tokens do at the ``paper`` point.

Data (``make_dataset``): the oracle scene (``OracleScene.default``) and ``EXTRA_OBJECTS``
procedural variants of it (reshaped, re-coloured, turned), rendered over white at 32 px from
random orbit cameras (elevation uniform in [-40, 40], azimuth uniform, radius 2), each object
with its reference view (elevation 0, azimuth 0, radius 2) as the conditioning image. Training
samples the oracle object half of the time.

Training (``train``): DDPM epsilon loss under stable-zero123's schedule (scaled_linear
0.00085-0.012, 1000 steps), t uniform in [0, 999], each sample's error weighted by
``clamp((1 - abar_t) / abar_t, 1, max_weight)`` (``--max-weight``; the plain loss at 1): the
epsilon loss scales a clean-image error by ``abar_t / (1 - abar_t)``, so at high noise, where the
camera decides what the view looks like, it barely rewards using the camera (two runs with the
plain loss still ignored it, right- and wrong-camera errors equal to 1 %), AdamW, cosine learning rate over
``max(step / steps, elapsed / budget)``, EMA of the weights (the EMA is what is shipped),
deterministic seed. Periodic checkpoints, so an interrupted run still leaves weights.

    python -m hash3d_dg.eval.learned train --steps 6000 --minutes 75 --seed 0

Weights: ``weights/learned_oracle.safetensors`` (fp16) + ``weights/learned_oracle.json``
(provenance: command, seed, steps, losses, held-out errors, DDIM sample PSNRs).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
WEIGHTS_PATH = WEIGHTS_DIR / "learned_oracle.safetensors"
PROVENANCE_PATH = WEIGHTS_DIR / "learned_oracle.json"

IMAGE_SIZE = 32
RADIUS = 2.0
FOVY = 49.1
REFERENCE = (0.0, 0.0, RADIUS)  # elevation, azimuth, radius of the conditioning view
TOKEN_DIM = 16
N_TOKENS = 4
FOURIER_FREQS = (1.0, 2.0, 4.0, 8.0)
N_PLANES = 6  # camera input planes: rad(d_el), sin/cos(d_az), sin/cos(2 d_az), d_radius
ELEVATION_RANGE = (-40.0, 40.0)
EXTRA_OBJECTS = 3
ORACLE_SHARE = 0.5

#: stable-zero123's noise schedule (as ``oracle.SCHEDULER_CONFIG``).
SCHEDULER_CONFIG = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                    "beta_schedule": "scaled_linear", "clip_sample": False, "set_alpha_to_one": False,
                    "steps_offset": 1, "prediction_type": "epsilon"}


def model_config(layers_per_block: int = 1, blocks: tuple[int, ...] = (32, 64, 64)) -> dict:
    """The learned oracle's ``UNet2DConditionModel`` config."""
    return {
        "sample_size": IMAGE_SIZE, "in_channels": 6 + N_PLANES, "out_channels": 3,
        "block_out_channels": list(blocks), "layers_per_block": int(layers_per_block),
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        "cross_attention_dim": TOKEN_DIM, "attention_head_dim": 8, "norm_num_groups": 8,
        # the blocks' transformers attend to the camera tokens only (self-attention over 1024
        # pixels was 78 % of a CPU training step); the 8x8 mid block keeps its self-attention
        "only_cross_attention": True,
        "act_fn": "silu", "flip_sin_to_cos": True, "freq_shift": 0,
    }


def build_unet(config: dict | None = None, seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(int(seed))
    return _plain_attention(UNet2DConditionModel.from_config(config or model_config()))


def _plain_attention(unet):
    """Classic (baddbmm + softmax) attention: on CPU faster than SDPA's flash kernel for these
    small shapes (4 key tokens), and the same on every machine."""
    from diffusers.models.attention_processor import AttnProcessor

    unet.set_attn_processor(AttnProcessor())
    return unet


def alphas_cumprod() -> torch.Tensor:
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, 0)


def camera_planes(context: torch.Tensor, size: int = IMAGE_SIZE) -> torch.Tensor:
    """``[N, 3]`` relative cameras -> ``[N, 6, S, S]`` constant input planes ``rad(d_el),
    sin(d_az), cos(d_az), sin(2 d_az), cos(2 d_az), d_radius``."""
    c = torch.as_tensor(context, dtype=torch.float64).reshape(-1, 3)
    el, az, dr = torch.deg2rad(c[:, 0]), torch.deg2rad(c[:, 1]), c[:, 2]
    v = torch.stack([el, torch.sin(az), torch.cos(az), torch.sin(2 * az), torch.cos(2 * az), dr], 1)
    return v.float()[:, :, None, None].expand(-1, -1, size, size)


def model_inputs(x_t: torch.Tensor, cameras: torch.Tensor, reference: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The UNet's ``(sample [N, 12, S, S], encoder_hidden_states [N, 4, 16])`` for noisy views
    ``x_t``: concat(x_t, reference view, camera planes) and the camera tokens."""
    n, size = x_t.shape[0], x_t.shape[-1]
    ref = reference.expand(n, -1, -1, -1) if reference.ndim == 3 else reference
    cams = torch.as_tensor(cameras).detach().cpu()
    sample = torch.cat([x_t, ref.to(x_t), camera_planes(cams, size).to(x_t)], dim=1)
    return sample, camera_tokens(cams).to(x_t)


def camera_tokens(context: torch.Tensor) -> torch.Tensor:
    """``[N, 3]`` relative cameras ``(d_elevation deg, d_azimuth deg, d_radius)`` -> ``[N, 4, 16]``
    context tokens (see the module docstring). Deterministic, no parameters."""
    c = torch.as_tensor(context, dtype=torch.float64).reshape(-1, 3)
    el, az, dr = torch.deg2rad(c[:, 0]), torch.deg2rad(c[:, 1]), c[:, 2]
    values = torch.stack([el, torch.sin(az), torch.cos(az), dr], dim=1)  # [N, 4]
    n = values.shape[0]
    out = torch.zeros(n, N_TOKENS, TOKEN_DIM, dtype=torch.float64)
    out[:, :, :N_TOKENS] = torch.eye(N_TOKENS, dtype=torch.float64)
    out[:, :, N_TOKENS] = values
    for j, f in enumerate(FOURIER_FREQS):
        out[:, :, N_TOKENS + 1 + 2 * j] = torch.sin(math.pi * f * values)
        out[:, :, N_TOKENS + 2 + 2 * j] = torch.cos(math.pi * f * values)
    return out.float()


# ---------------------------------------------------------------------------------- data

def object_meshes(n_extra: int = EXTRA_OBJECTS, texture_size: int = 256) -> list:
    """The oracle scene's mesh and ``n_extra`` procedural variants (stretched, turned about +y,
    colours permuted / hue-mirrored), deterministic."""
    from hash3d_dg.eval.oracle_scene import build_scene_mesh
    from hash3d_dg.mesh import Mesh

    base = build_scene_mesh(texture_size=texture_size)
    meshes = [base]
    variants = [  # (scale xyz, turn deg, albedo op)
        ((1.15, 0.8, 0.95), 90.0, "gbr"),
        ((0.85, 1.15, 1.1), -120.0, "mirror"),
        ((1.0, 1.0, 0.7), 200.0, "dark"),
    ]
    for scale, turn, op in variants[:n_extra]:
        v = base.v * torch.tensor(scale, dtype=base.v.dtype)
        a = math.radians(turn)
        rot = torch.tensor([[math.cos(a), 0.0, math.sin(a)], [0.0, 1.0, 0.0],
                            [-math.sin(a), 0.0, math.cos(a)]], dtype=v.dtype)
        v = v @ rot.T
        alb = base.albedo
        if op == "gbr":
            alb = alb[..., [1, 2, 0]]
        elif op == "mirror":
            alb = alb.flip(1)
        elif op == "dark":
            alb = (alb * 0.7 + 0.15 * alb.mean(-1, keepdim=True)).clamp(0, 1)
        meshes.append(Mesh(v=v.contiguous(), f=base.f, vt=base.vt, ft=base.ft,
                           albedo=alb.contiguous()).compute_normals())
    return meshes


def render_view(mesh, elevation: float, azimuth: float, radius: float = RADIUS,
                size: int = IMAGE_SIZE, ssaa: int = 2) -> torch.Tensor:
    """``[3, S, S]`` in [-1, 1] over white."""
    from hash3d_dg.eval.oracle_scene import render_mesh_rgba
    from hash3d_dg.camera import Camera

    camera = Camera.orbit(float(elevation), float(azimuth), float(radius), width=size, fovy=FOVY)
    rgb, _ = render_mesh_rgba(mesh, camera, ssaa, "torch")
    return rgb.permute(2, 0, 1) * 2.0 - 1.0


@dataclass
class Dataset:
    images: torch.Tensor  # [M, 3, S, S] in [-1, 1]
    cameras: torch.Tensor  # [M, 3] (d_el, d_az, d_r) relative to the reference view
    objects: torch.Tensor  # [M] object index
    references: torch.Tensor  # [n_objects, 3, S, S]


def sample_cameras(n: int, generator: torch.Generator) -> torch.Tensor:
    el = torch.empty(n, dtype=torch.float64).uniform_(*ELEVATION_RANGE, generator=generator)
    az = torch.empty(n, dtype=torch.float64).uniform_(-180.0, 180.0, generator=generator)
    return torch.stack([el, az, torch.zeros(n, dtype=torch.float64)], dim=1)


@torch.no_grad()
def make_dataset(n_oracle: int = 4000, n_extra_each: int = 1000, seed: int = 0,
                 meshes: list | None = None) -> Dataset:
    meshes = meshes if meshes is not None else object_meshes()
    g = torch.Generator().manual_seed(int(seed) + 12345)
    images, cams, objs = [], [], []
    for k, mesh in enumerate(meshes):
        n = n_oracle if k == 0 else n_extra_each
        c = sample_cameras(n, g)
        for el, az, dr in c.tolist():
            images.append(render_view(mesh, REFERENCE[0] + el, REFERENCE[1] + az, RADIUS + dr))
        cams.append(c)
        objs.append(torch.full((n,), k, dtype=torch.long))
    refs = torch.stack([render_view(m, *REFERENCE) for m in meshes])
    return Dataset(torch.stack(images), torch.cat(cams), torch.cat(objs), refs)


@torch.no_grad()
def heldout_batch(n: int = 32, seed: int = 777) -> dict:
    """A fixed held-out batch of the oracle object: cameras, images, timesteps, noise."""
    meshes = object_meshes(0)
    g = torch.Generator().manual_seed(seed)
    cams = sample_cameras(n, g)
    images = torch.stack([render_view(meshes[0], el, az, RADIUS + dr) for el, az, dr in cams.tolist()])
    t = torch.linspace(20, 980, n).round().long()
    noise = torch.randn(images.shape, generator=g)
    ref = render_view(meshes[0], *REFERENCE)
    return {"cameras": cams, "images": images, "t": t, "noise": noise, "reference": ref}


# ---------------------------------------------------------------------------------- model use

def predict(unet, x_t: torch.Tensor, t: torch.Tensor, cameras: torch.Tensor,
            reference: torch.Tensor) -> torch.Tensor:
    """Epsilon ``[N, 3, S, S]``; ``reference`` ``[3, S, S]`` or ``[N, 3, S, S]``."""
    sample, tokens = model_inputs(x_t, cameras, reference)
    return unet(sample, t, tokens).sample


def psnr_pm1(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR of images in [-1, 1] (mapped to [0, 1])."""
    mse = (((a.clamp(-1, 1) - b) / 2.0) ** 2).flatten(1).mean(1)
    return -10.0 * torch.log10(mse.clamp_min(1e-10))


@torch.no_grad()
def evaluate(unet, batch: dict | None = None) -> dict:
    """Held-out noise-prediction error (MSE) and one-step clean-image PSNR."""
    batch = batch or heldout_batch()
    ab = alphas_cumprod().float()[batch["t"]].view(-1, 1, 1, 1)
    x0, eps = batch["images"], batch["noise"]
    x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
    pred = predict(unet, x_t, batch["t"], batch["cameras"], batch["reference"])
    x0_hat = (x_t - (1 - ab).sqrt() * pred) / ab.sqrt()
    return {"eps_mse": round(float(F.mse_loss(pred, eps)), 5),
            "x0_psnr": round(float(psnr_pm1(x0_hat, x0).mean()), 3)}


@torch.no_grad()
def ddim_samples(unet, n: int = 8, steps: int = 50, seed: int = 4321) -> dict:
    """DDIM samples from pure noise for held-out cameras of the oracle object; PSNR against the
    right view and against a wrong one (azimuth + 180 deg) and against a 45-degree neighbour."""
    from diffusers import DDIMScheduler

    meshes = object_meshes(0)
    g = torch.Generator().manual_seed(seed)
    cams = sample_cameras(n, g)
    right = torch.stack([render_view(meshes[0], el, az) for el, az, _ in cams.tolist()])
    wrong = torch.stack([render_view(meshes[0], el, az + 180.0) for el, az, _ in cams.tolist()])
    near = torch.stack([render_view(meshes[0], el, az + 45.0) for el, az, _ in cams.tolist()])
    ref = render_view(meshes[0], *REFERENCE)
    sched = DDIMScheduler.from_config(SCHEDULER_CONFIG)
    sched.set_timesteps(steps)
    x = torch.randn(right.shape, generator=g)
    for t in sched.timesteps:
        eps = predict(unet, x, t.expand(n), cams, ref)
        x = sched.step(eps, t, x).prev_sample
    pr, pw, pn = psnr_pm1(x, right), psnr_pm1(x, wrong), psnr_pm1(x, near)
    return {"steps": steps, "n": n, "psnr_right": round(float(pr.mean()), 2),
            "psnr_wrong_180": round(float(pw.mean()), 2), "psnr_wrong_45": round(float(pn.mean()), 2),
            "right_minus_wrong_180": round(float((pr - pw).mean()), 2),
            "per_sample_right": [round(v, 2) for v in pr.tolist()],
            "per_sample_wrong_180": [round(v, 2) for v in pw.tolist()]}


# ---------------------------------------------------------------------------------- weights

def save_weights(unet, path: Path | str = WEIGHTS_PATH, provenance: dict | None = None,
                 provenance_path: Path | str | None = None) -> None:
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in unet.state_dict().items()}
    tmp = path.with_suffix(".tmp")
    save_file(state, str(tmp), metadata={"config": json.dumps(dict(unet.config))})
    os.replace(tmp, path)
    if provenance is not None:
        ppath = Path(provenance_path) if provenance_path else path.with_suffix(".json")
        tmpj = ppath.with_suffix(".json.tmp")
        tmpj.write_text(json.dumps(provenance, indent=2) + "\n")
        os.replace(tmpj, ppath)


def load_unet(path: Path | str = WEIGHTS_PATH, dtype: torch.dtype = torch.float32):
    """The shipped learned oracle (fp16 on disk) as a frozen ``UNet2DConditionModel`` in ``dtype``."""
    from diffusers import UNet2DConditionModel
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    with safe_open(str(path), "pt") as fh:
        config = json.loads(fh.metadata()["config"])
    unet = _plain_attention(UNet2DConditionModel.from_config(config))
    unet.load_state_dict({k: v.to(dtype) for k, v in load_file(str(path)).items()})
    if dtype != torch.float32:
        unet = unet.to(dtype)
    return unet.eval().requires_grad_(False)


# ---------------------------------------------------------------------------------- training

def _expand_conv_in(state: dict, target: dict) -> dict:
    """``state`` with ``conv_in.weight`` zero-padded to ``target``'s input channels."""
    state = dict(state)
    w, want = state["conv_in.weight"], target["conv_in.weight"]
    if w.shape != want.shape:
        pad = torch.zeros(want.shape[0], want.shape[1] - w.shape[1], *w.shape[2:], dtype=w.dtype)
        state["conv_in.weight"] = torch.cat([w, pad], dim=1)
    return state


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parent, check=True).stdout.strip()
    except Exception:  # pragma: no cover
        return None


def train(steps: int = 6000, minutes: float = 75.0, seed: int = 0, batch_size: int = 16,
          lr: float = 1e-3, ema_decay: float = 0.999, layers_per_block: int = 1,
          n_oracle: int = 4000, n_extra_each: int = 1000, threads: int = 1,
          work_dir: str = ".learned_run", out: Path | str = WEIGHTS_PATH,
          checkpoint_every: int = 250, log_every: int = 50, resume: bool = False,
          command: str | None = None, init_from: str | None = None,
          max_weight: float = 1.0, init_note: str | None = None) -> dict:
    """Train the learned oracle; see the module docstring. Returns the provenance dict."""
    torch.set_num_threads(int(threads))
    torch.manual_seed(int(seed))
    np.random.seed(int(seed))
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    data_path = work / f"data_seed{seed}_{n_oracle}_{n_extra_each}.pt"
    if data_path.exists():
        data = Dataset(**torch.load(data_path))
    else:
        data = make_dataset(n_oracle, n_extra_each, seed)
        torch.save(data.__dict__, data_path)
    log.info("data: %d renders of %d objects in %.1f s", len(data.images), len(data.references),
             time.perf_counter() - start)
    held = heldout_batch()

    config = model_config(layers_per_block)
    unet = build_unet(config, seed).train()
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    prior: dict | None = None
    if init_from:
        prior_state = torch.load(init_from)
        for model, key in ((unet, "unet"), (ema, "ema")):
            model.load_state_dict(_expand_conv_in(prior_state[key], model.state_dict()))
        expanded = prior_state["unet"]["conv_in.weight"].shape != unet.state_dict()["conv_in.weight"].shape
        prior = {"checkpoint": str(init_from), "steps": int(prior_state["step"]),
                 "minutes": round(prior_state["elapsed"] / 60, 1),
                 "conv_in_expanded": bool(expanded),
                 "earlier": prior_state.get("prior"), "note": init_note}
        log.info("initialised from %s (step %d)", init_from, prior["steps"])
    n_params = sum(p.numel() for p in unet.parameters())
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(int(seed) + 1)
    abar = alphas_cumprod().float()
    oracle_idx = (data.objects == 0).nonzero().squeeze(1)
    other_idx = (data.objects != 0).nonzero().squeeze(1)
    step, elapsed_before, losses = 0, 0.0, []
    ckpt = work / "checkpoint.pt"
    if resume and ckpt.exists():
        state = torch.load(ckpt)
        unet.load_state_dict(state["unet"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        g.set_state(state["generator"])
        step, elapsed_before, losses = state["step"], state["elapsed"], state["losses"]
        log.info("resumed at step %d", step)
    budget = float(minutes) * 60.0
    t0 = time.perf_counter() - elapsed_before
    warmup = 200
    history = []
    init_eval = evaluate(ema, held) if step == 0 else None
    if init_eval:
        log.info("init: %s (%d params)", init_eval, n_params)

    def progress() -> float:
        return max(step / steps, (time.perf_counter() - t0) / budget)

    def provenance(final: bool) -> dict:
        recent = losses[-200:]
        return {
            "command": command or " ".join(sys.argv), "seed": seed, "steps": step,
            "planned_steps": steps, "minutes_budget": minutes,
            "train_seconds": round(time.perf_counter() - t0, 1), "finished": final,
            "batch_size": batch_size, "lr": lr, "max_weight": max_weight, "ema_decay": ema_decay, "threads": threads,
            "params": n_params, "config": config,
            "data": {"renders": len(data.images), "objects": len(data.references),
                     "oracle_renders": int(len(oracle_idx)), "oracle_share": ORACLE_SHARE,
                     "image_size": IMAGE_SIZE, "elevation_range": list(ELEVATION_RANGE),
                     "reference": list(REFERENCE)},
            "final_loss": round(float(np.mean(recent)), 5) if recent else None,
            "init_eval": init_eval, "history": history, "git_commit": _git_commit(),
            "initialised_from": prior,
        }

    log.info("training %d params, %d steps / %.0f min, batch %d", n_params, steps, minutes, batch_size)
    while step < steps and progress() < 1.0:
        p = progress()
        lr_now = lr * min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))
        for group in opt.param_groups:
            group["lr"] = lr_now
        n_or = int(round(batch_size * ORACLE_SHARE))
        idx = torch.cat([oracle_idx[torch.randint(len(oracle_idx), (n_or,), generator=g)],
                         other_idx[torch.randint(len(other_idx), (batch_size - n_or,), generator=g)]])
        x0 = data.images[idx]
        cams = data.cameras[idx]
        ref = data.references[data.objects[idx]]
        t = torch.randint(0, 1000, (batch_size,), generator=g)
        eps = torch.randn(x0.shape, generator=g)
        ab = abar[t].view(-1, 1, 1, 1)
        x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
        pred = predict(unet, x_t, t, cams, ref)
        per = (pred - eps).square().flatten(1).mean(1)
        if max_weight > 1.0:  # weight high-noise samples toward their clean-image error
            per = per * ((1 - ab.view(-1)) / ab.view(-1)).clamp(1.0, float(max_weight))
        loss = per.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        step += 1
        decay = min(ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), unet.parameters()):
                pe.lerp_(pm, 1.0 - decay)
        losses.append(float(loss.detach()))
        if step % log_every == 0:
            log.info("step %d loss %.4f (mean of last %d: %.4f) lr %.2e elapsed %.1f min", step,
                     losses[-1], log_every, np.mean(losses[-log_every:]), lr_now,
                     (time.perf_counter() - t0) / 60)
        if step % checkpoint_every == 0:
            ev = evaluate(ema, held)
            history.append({"step": step, "minutes": round((time.perf_counter() - t0) / 60, 2),
                            "loss": round(float(np.mean(losses[-checkpoint_every:])), 5), **ev})
            log.info("checkpoint step %d: ema %s", step, ev)
            torch.save({"unet": unet.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                        "generator": g.get_state(), "step": step, "elapsed": time.perf_counter() - t0,
                        "losses": losses, "prior": prior}, work / "checkpoint.tmp")
            os.replace(work / "checkpoint.tmp", ckpt)
            save_weights(ema, out, provenance(False))

    final = evaluate(ema, held)
    prov = provenance(True)
    prov["heldout"] = final
    prov["heldout_at_start"] = init_eval
    log.info("final held-out (ema): %s", final)
    samples = ddim_samples(ema)
    prov["ddim_samples"] = samples
    log.info("DDIM samples: %s", samples)
    save_weights(ema, out, prov)
    return prov


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hash3d_dg.eval.learned", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train the learned oracle and write its weights")
    p.add_argument("--steps", type=int, default=6000)
    p.add_argument("--minutes", type=float, default=75.0, help="wall-clock budget (stops early)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--layers-per-block", type=int, default=1)
    p.add_argument("--n-oracle", type=int, default=4000)
    p.add_argument("--n-extra", type=int, default=1000, help="renders of each extra object")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: on the shared 2-core machine 2 threads were 4x slower)")
    p.add_argument("--work-dir", default=".learned_run")
    p.add_argument("--out", default=str(WEIGHTS_PATH))
    p.add_argument("--checkpoint-every", type=int, default=250)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--max-weight", type=float, default=1.0,
                   help="weight each sample's eps MSE by clamp((1 - abar_t) / abar_t, 1, this) "
                        "(1: the plain DDPM loss)")
    p.add_argument("--init-from", default=None,
                   help="start from this checkpoint.pt's weights (conv_in widened if needed)")
    p.add_argument("--init-note", default=None,
                   help="free text recorded with --init-from in the provenance (how the checkpoint was made)")
    p = sub.add_parser("eval", help="held-out error and DDIM samples of saved weights")
    p.add_argument("--weights", default=str(WEIGHTS_PATH))
    p.add_argument("--random", action="store_true", help="a random-init model instead")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.command == "train":
        cmd = "python -m hash3d_dg.eval.learned " + " ".join(argv if argv is not None else sys.argv[1:])
        prov = train(args.steps, args.minutes, args.seed, args.batch_size, args.lr,
                     layers_per_block=args.layers_per_block, n_oracle=args.n_oracle,
                     n_extra_each=args.n_extra, threads=args.threads, work_dir=args.work_dir,
                     out=args.out, checkpoint_every=args.checkpoint_every, resume=args.resume,
                     command=cmd, init_from=args.init_from, max_weight=args.max_weight,
                     init_note=args.init_note)
        print(json.dumps({k: prov[k] for k in ("steps", "train_seconds", "final_loss", "heldout",
                                                "ddim_samples")}, indent=2))
    else:
        unet = build_unet().eval() if args.random else load_unet(args.weights)
        print(json.dumps({"heldout": evaluate(unet), "ddim_samples": ddim_samples(unet)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
