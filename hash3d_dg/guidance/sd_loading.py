"""Loading a Stable Diffusion 1.x / 2.x checkpoint (diffusers layout) for text-to-3D, without remote code.

As for Zero-1-to-3 (``hash3d_dg.guidance.loading``): each component is loaded with its own class's
``from_pretrained(directory, subfolder=...)`` and an explicit dtype; a hub id is first resolved to
a local snapshot (one reachability probe; the local cache when offline); every failure is one
``ModelLoadError`` line that says how to pass a local directory.

Components: ``unet`` (UNet2DConditionModel), ``vae`` (AutoencoderKL), ``text_encoder``
(CLIPTextModel), ``tokenizer`` (CLIPTokenizer: vocab.json + merges.txt), ``scheduler`` (loaded as
DDIM whatever its class, as DreamGaussian does). Weights are safetensors: the hub's fp16 files
(``*.fp16.safetensors``) when present, else plain-named ones; never ``.bin``.

A Zero-1-to-3 checkpoint (``Zero123Pipeline``, an ``image_encoder``) is refused with a line that
says it is an image model; so is a checkpoint without a tokenizer or text encoder.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from hash3d_dg.guidance.loading import (ModelLoadError, _frozen, _one_line, _REPO_ID, _resolve_local_dir,
                                        builtin_checkpoint_dir)

logger = logging.getLogger(__name__)

DEFAULT_SD_MODEL = "stabilityai/stable-diffusion-2-1-base"
SD_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
#: Hub files: configs, tokenizer files and the fp16 safetensors (plain-named ones as a fall-back).
_HUB_FP16 = ["model_index.json", "*/*.json", "tokenizer/*.txt", "*/*.fp16.safetensors"]
_HUB_PLAIN = ["model_index.json", "*/*.json", "tokenizer/*.txt", "*/*.safetensors"]


@dataclass
class SDComponents:
    """The loaded, frozen (eval, no grad) parts of a Stable Diffusion checkpoint."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: Any  # CLIPTokenizer
    scheduler: DDIMScheduler
    family: str  # "sd1" | "sd2" (linear projections in the UNet's transformers)
    model_id: str
    device: torch.device
    dtype: torch.dtype

    @property
    def prediction_type(self) -> str:
        return str(self.scheduler.config.get("prediction_type", "epsilon"))


def _dirname_hint(model: str) -> str:
    name = Path(str(model).rstrip("/")).name
    return name if name and _REPO_ID.match(str(model)) else "stable-diffusion-2-1-base"


def _error(model: str, reason: str) -> ModelLoadError:
    return ModelLoadError(
        f"Cannot load Stable Diffusion model '{model}': {_one_line(reason)}. "
        f"Download it and pass its local directory, e.g. --model /path/to/{_dirname_hint(model)}"
    )


def _not_text_model(model: str, root: Path) -> str | None:
    """Why ``root`` is not a Stable Diffusion checkpoint we can use, or None."""
    index = root / "model_index.json"
    class_name = None
    if index.is_file():
        try:
            class_name = json.loads(index.read_text()).get("_class_name")
        except (OSError, ValueError, AttributeError):
            class_name = None
    if class_name == "Zero123Pipeline" or (root / "image_encoder").is_dir() or (root / "clip_camera_projection").is_dir():
        return (f"Cannot use '{model}' for a prompt: it is a Zero-1-to-3 checkpoint (image to 3D, no text encoder). "
                f"Text to 3D needs a Stable Diffusion 1.x/2.x checkpoint (unet, vae, text_encoder, tokenizer, "
                f"scheduler), e.g. --model {DEFAULT_SD_MODEL} or its local directory; to use this model pass --image")
    for sub in SD_COMPONENTS:
        if not (root / sub).is_dir():
            return str(_error(model, f"the checkpoint directory '{root}' has no '{sub}' subfolder "
                                     f"(a Stable Diffusion checkpoint has {', '.join(SD_COMPONENTS)})"))
    tok = root / "tokenizer"
    if not (tok / "tokenizer.json").is_file() and not ((tok / "vocab.json").is_file() and (tok / "merges.txt").is_file()):
        return str(_error(model, f"'{tok}' holds no CLIP tokenizer (vocab.json and merges.txt, or tokenizer.json)"))
    return None


def _weights_variant(folder: Path) -> str | None | bool:
    """None: plain-named safetensors; "fp16": only the hub's fp16 variant; False: none."""
    files = [p.name for p in folder.glob("*.safetensors")]
    if any(not name.endswith(".fp16.safetensors") for name in files):
        return None
    if files:
        return "fp16"
    return False


def _resolve(model: str) -> Path:
    """A local directory for ``model`` (the fp16 snapshot; plain weights when it has none)."""
    root = _resolve_local_dir(model, _HUB_FP16, _error)
    if Path(model).expanduser().is_dir():
        return root
    if any(_weights_variant(root / sub) is False for sub in ("unet", "vae", "text_encoder") if (root / sub).is_dir()):
        root = _resolve_local_dir(model, _HUB_PLAIN, _error)
    return root


def sd_family(unet_config) -> str:
    """"sd2" for a UNet with SD 2.x's linear projections in its transformers, else "sd1"."""
    return "sd2" if unet_config.get("use_linear_projection", False) else "sd1"


def load_stable_diffusion(model: str, device: str | torch.device = "cpu",
                          dtype: torch.dtype | None = None) -> SDComponents:
    """Load a Stable Diffusion checkpoint from a local directory or a Hugging Face hub id.

    Args:
        model: local directory in the diffusers layout, or a hub id
            (``stabilityai/stable-diffusion-2-1-base``, ``runwayml/stable-diffusion-v1-5``, ...).
        device: where the modules go.
        dtype: module dtype; None -> fp16 on CUDA, fp32 otherwise.

    Raises:
        ModelLoadError: any failure, as one line (an unreachable hub, a missing component, a
            Zero-1-to-3 checkpoint, no tokenizer, inconsistent sizes).
    """
    model = str(model)
    device = torch.device(device)
    if dtype is None:
        dtype = torch.float16 if device.type == "cuda" else torch.float32
    root = _resolve(model)
    problem = _not_text_model(model, root)
    if problem:
        raise ModelLoadError(problem)
    src = str(root)
    part = "unet"
    try:
        variants = {}
        for sub in ("unet", "vae", "text_encoder"):
            variant = _weights_variant(root / sub)
            if variant is False:
                raise FileNotFoundError(f"'{root / sub}' has no safetensors weights")
            variants[sub] = variant
        unet = UNet2DConditionModel.from_pretrained(src, subfolder="unet", torch_dtype=dtype,
                                                    use_safetensors=True, variant=variants["unet"])
        part = "vae"
        vae = AutoencoderKL.from_pretrained(src, subfolder="vae", torch_dtype=dtype, use_safetensors=True,
                                            variant=variants["vae"])
        part = "text_encoder"
        text_encoder = CLIPTextModel.from_pretrained(src, subfolder="text_encoder", dtype=dtype,
                                                     use_safetensors=True, variant=variants["text_encoder"])
        part = "tokenizer"
        tokenizer = CLIPTokenizer.from_pretrained(src, subfolder="tokenizer")
        part = "scheduler"
        scheduler = DDIMScheduler.from_pretrained(src, subfolder="scheduler")
    except Exception as exc:  # noqa: BLE001 - corrupt / incomplete files, wrong formats, ...
        raise _error(model, f"failed to load '{part}' from '{root}' ({type(exc).__name__}: {exc})") from exc

    width = int(text_encoder.config.hidden_size)
    if unet.config.cross_attention_dim != width:
        raise _error(model, f"inconsistent sizes: text encoder width {width}, unet cross-attention "
                            f"{unet.config.cross_attention_dim}")
    if unet.config.in_channels != vae.config.latent_channels or unet.config.out_channels != vae.config.latent_channels:
        raise _error(model, f"unet in/out channels {unet.config.in_channels}/{unet.config.out_channels} "
                            f"!= vae latent channels {vae.config.latent_channels} (an inpainting or image model?)")
    prediction = scheduler.config.get("prediction_type", "epsilon")
    if prediction not in ("epsilon", "v_prediction"):
        raise _error(model, f"scheduler prediction_type {prediction!r} is not supported (epsilon or v_prediction)")
    for module in (unet, vae, text_encoder):
        _frozen(module, device)
    logger.info("loaded Stable Diffusion (%s) from %s on %s as %s", sd_family(unet.config), root, device, dtype)
    return SDComponents(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                        scheduler=scheduler, family=sd_family(unet.config), model_id=model, device=device,
                        dtype=dtype)


def tiny_sd_model_dir(seed: int = 0) -> Path:
    """The built-in tiny random SD checkpoint (``guidance.model=builtin:tiny`` with
    ``guidance.type=sd``), written on first use into the hash3d-dg cache folder."""
    from hash3d_dg.guidance.tiny_sd import write_tiny_sd_checkpoint

    return builtin_checkpoint_dir(f"tiny-stable-diffusion-{seed}",
                                  lambda folder: write_tiny_sd_checkpoint(folder, seed=seed))
