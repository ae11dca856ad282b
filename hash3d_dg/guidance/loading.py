"""Loading a Zero-1-to-3 checkpoint (stable-zero123 / zero123-xl, diffusers layout) without remote code.

Each component is loaded with its own class's ``from_pretrained(directory, subfolder=...)``,
with the dtype passed explicitly to every one. The checkpoints' ``zero123.py`` is never executed:
the camera projection is ``hash3d_dg.guidance.camera_projection.CLIPCameraProjection``.

A hub id is first resolved to a local snapshot (one quick reachability probe, then
``huggingface_hub.snapshot_download`` of the json/safetensors files, or the local cache when the
hub is unreachable or ``HF_HUB_OFFLINE`` is set), so an unreachable hub fails at once instead of
retrying per component. Every failure is raised as ``ModelLoadError`` with a one-line message.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPVisionModelWithProjection

from hash3d_dg.errors import UserError
from hash3d_dg.guidance.camera_projection import CLIPCameraProjection

try:  # transformers >= 5: the PIL backend needs no torchvision
    from transformers import CLIPImageProcessorPil as _CLIPImageProcessor
except ImportError:  # pragma: no cover - older transformers
    from transformers import CLIPImageProcessor as _CLIPImageProcessor

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "ashawkey/stable-zero123-diffusers"
FAMILIES = ("stable", "xl")
#: Files fetched from the hub: configs and plain-named safetensors weights (never .bin / .py).
_HUB_PATTERNS = ["model_index.json", "*/*.json", "*/*.safetensors"]
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
_PROBE_TIMEOUT_S = 10.0


class ModelLoadError(UserError, RuntimeError):
    """A Zero-1-to-3 checkpoint could not be loaded; ``str(e)`` is one line saying what to do."""


@dataclass
class Zero123Components:
    """The loaded, frozen (eval, no grad) parts of a Zero-1-to-3 checkpoint."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    image_encoder: CLIPVisionModelWithProjection
    feature_extractor: Any  # CLIPImageProcessorPil (or CLIPImageProcessor)
    scheduler: DDIMScheduler
    camera_projection: CLIPCameraProjection
    family: str  # "stable" | "xl"
    model_id: str
    device: torch.device
    dtype: torch.dtype


def resolve_family(model: str, family: str = "auto") -> str:
    """Pick the camera-embedding family: "stable" or "xl".

    ``auto`` follows DreamGaussian: "stable" when "stable" occurs in the id or path
    (case-insensitive), else "xl". The two families' checkpoint files are indistinguishable.
    """
    if family in FAMILIES:
        return family
    if family != "auto":
        raise ValueError(f"family must be 'auto', 'stable' or 'xl', got {family!r}")
    return "stable" if "stable" in str(model).lower() else "xl"


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _error(model: str, reason: str) -> ModelLoadError:
    return ModelLoadError(
        f"Cannot load Zero-1-to-3 model '{model}': {_one_line(reason)}. "
        f"Download it and pass its local directory, e.g. --model /path/to/{_dirname_hint(model)}"
    )


def _dirname_hint(model: str) -> str:
    name = Path(str(model).rstrip("/")).name
    return name if name and _REPO_ID.match(str(model)) else "stable-zero123-diffusers"


def _hub_offline() -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE"):
        return True
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _resolve_local_dir(model: str) -> Path:
    """A local directory holding the checkpoint: ``model`` itself, or a hub snapshot of it."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise _error(model, f"'{path}' is not a directory")
    if not _REPO_ID.match(model) or model.startswith((".", "~", "/")):
        raise _error(model, f"no such directory '{path}'")

    from huggingface_hub import model_info, snapshot_download

    def cached() -> Path | None:
        try:
            return Path(snapshot_download(model, allow_patterns=_HUB_PATTERNS, local_files_only=True))
        except Exception:  # noqa: BLE001 - not cached (or cache unusable)
            return None

    if _hub_offline():
        local = cached()
        if local is None:
            raise _error(model, "not a local directory, and not in the Hugging Face cache (HF_HUB_OFFLINE is set)")
        return local
    try:
        model_info(model, timeout=_PROBE_TIMEOUT_S)
    except Exception as exc:  # noqa: BLE001 - unreachable hub, unknown repo, auth, ...
        local = cached()
        if local is not None:
            logger.warning("Hugging Face hub not usable (%s); using the cached snapshot %s", _one_line(exc, 120), local)
            return local
        raise _error(model, f"not a local directory, and the Hugging Face hub lookup failed ({type(exc).__name__}: {exc})") from exc
    try:
        return Path(snapshot_download(model, allow_patterns=_HUB_PATTERNS))
    except Exception as exc:  # noqa: BLE001
        raise _error(model, f"download from the Hugging Face hub failed ({type(exc).__name__}: {exc})") from exc


def _frozen(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    module.to(device)
    module.eval()
    module.requires_grad_(False)
    return module


def load_zero123(
    model: str = DEFAULT_MODEL,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    family: str = "auto",
) -> Zero123Components:
    """Load a Zero-1-to-3 checkpoint from a local directory or a Hugging Face hub id.

    Args:
        model: local directory in the diffusers layout, or a hub id
            (``ashawkey/stable-zero123-diffusers``, ``ashawkey/zero123-xl-diffusers``).
        device: where the modules go.
        dtype: module dtype; ``None`` -> fp16 on CUDA, fp32 otherwise.
        family: "auto" (by name, see ``resolve_family``), "stable" or "xl".

    Raises:
        ModelLoadError: on any failure (one-line message naming the model and how to pass a
            local directory).
    """
    model = str(model)
    device = torch.device(device)
    if dtype is None:
        dtype = torch.float16 if device.type == "cuda" else torch.float32
    fam = resolve_family(model, family)
    root = _resolve_local_dir(model)
    for sub in ("unet", "vae", "image_encoder", "feature_extractor", "scheduler", "clip_camera_projection"):
        if not (root / sub).is_dir():
            raise _error(model, f"the checkpoint directory '{root}' has no '{sub}' subfolder")
    src = str(root)
    part = "model_index.json"
    try:
        index = root / "model_index.json"
        if not index.is_file():
            logger.warning("%s has no model_index.json; loading the component subfolders anyway", root)
        part = "unet"
        unet = UNet2DConditionModel.from_pretrained(src, subfolder="unet", torch_dtype=dtype, use_safetensors=True)
        part = "vae"
        vae = AutoencoderKL.from_pretrained(src, subfolder="vae", torch_dtype=dtype, use_safetensors=True)
        part = "image_encoder"
        image_encoder = CLIPVisionModelWithProjection.from_pretrained(
            src, subfolder="image_encoder", dtype=dtype, use_safetensors=True
        )
        part = "feature_extractor"
        feature_extractor = _CLIPImageProcessor.from_pretrained(src, subfolder="feature_extractor")
        part = "scheduler"
        scheduler = DDIMScheduler.from_pretrained(src, subfolder="scheduler")
        part = "clip_camera_projection"
        camera_projection = CLIPCameraProjection.from_pretrained(
            src, subfolder="clip_camera_projection", torch_dtype=dtype, use_safetensors=True
        )
    except Exception as exc:  # noqa: BLE001 - corrupt / incomplete files, wrong formats, ...
        raise _error(model, f"failed to load '{part}' from '{root}' ({type(exc).__name__}: {exc})") from exc

    emb = camera_projection.config.embedding_dim
    if image_encoder.config.projection_dim != emb or unet.config.cross_attention_dim != emb:
        raise _error(
            model,
            f"inconsistent sizes: image_encoder projection {image_encoder.config.projection_dim}, "
            f"camera projection {emb}, unet cross-attention {unet.config.cross_attention_dim}",
        )
    if unet.config.in_channels != 2 * vae.config.latent_channels:
        raise _error(model, f"unet in_channels {unet.config.in_channels} != 2 x vae latent channels")
    modules = (unet, vae, image_encoder, camera_projection)
    for module in modules:
        _frozen(module, device)
    logger.info("loaded Zero-1-to-3 (%s family) from %s on %s as %s", fam, root, device, dtype)
    return Zero123Components(
        unet=unet,
        vae=vae,
        image_encoder=image_encoder,
        feature_extractor=feature_extractor,
        scheduler=scheduler,
        camera_projection=camera_projection,
        family=fam,
        model_id=model,
        device=device,
        dtype=dtype,
    )
