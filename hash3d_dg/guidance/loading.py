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

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, AutoencoderTiny, DDIMScheduler, UNet2DConditionModel
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
#: Files of a tiny autoencoder repo (``madebyollin/taesd``: config and weights at the root).
_TINY_VAE_PATTERNS = ["config.json", "*.safetensors", "vae/config.json", "vae/*.safetensors"]
DEFAULT_TINY_VAE = "madebyollin/taesd"
VAE_KINDS = ("auto", "full", "tiny")
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


def _tiny_vae_error(model: str, reason: str) -> ModelLoadError:
    return ModelLoadError(
        f"Cannot load tiny autoencoder '{model}': {_one_line(reason)}. "
        f"Download it and pass its local directory, e.g. guidance.tiny_vae=/path/to/taesd "
        f"(or use guidance.vae=full)"
    )


#: a cached snapshot holding these is complete enough to load without asking the hub
_COMPLETE_FILES = ("model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors")


def _resolve_local_dir(model: str, patterns: list[str] | None = None, error=None,
                       complete: tuple[str, ...] = _COMPLETE_FILES) -> Path:
    """A local directory holding the checkpoint: ``model`` itself, or a hub snapshot of it
    (files matching ``patterns``); failures are raised through ``error(model, reason)``."""
    patterns = _HUB_PATTERNS if patterns is None else patterns
    fail = error or _error
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise fail(model, f"'{path}' is not a directory")
    if not _REPO_ID.match(model) or model.startswith((".", "~", "/")):
        raise fail(model, f"no such directory '{path}'")

    from huggingface_hub import model_info, snapshot_download

    def cached() -> Path | None:
        try:
            return Path(snapshot_download(model, allow_patterns=patterns, local_files_only=True))
        except Exception:  # noqa: BLE001 - not cached (or cache unusable)
            return None

    if _hub_offline():
        local = cached()
        if local is None:
            raise fail(model, "not a local directory, and not in the Hugging Face cache (HF_HUB_OFFLINE is set)")
        return local
    # Local cache first: a complete snapshot already there loads without any hub round trip
    # (the probe and the snapshot check cost seconds at every start, more on a slow network).
    local = cached()
    if local is not None and all((local / name).is_file() for name in complete):
        return local
    try:
        model_info(model, timeout=_PROBE_TIMEOUT_S)
    except Exception as exc:  # noqa: BLE001 - unreachable hub, unknown repo, auth, ...
        local = cached()
        if local is not None:
            logger.warning("Hugging Face hub not usable (%s); using the cached snapshot %s", _one_line(exc, 120), local)
            return local
        raise fail(model, f"not a local directory, and the Hugging Face hub lookup failed ({type(exc).__name__}: {exc})") from exc
    try:
        return Path(snapshot_download(model, allow_patterns=patterns))
    except Exception as exc:  # noqa: BLE001
        raise fail(model, f"download from the Hugging Face hub failed ({type(exc).__name__}: {exc})") from exc


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


def resolve_vae_kind(vae: str, hash3d_mode: str) -> str:
    """``guidance.vae`` -> ``"full"`` or ``"tiny"``: ``auto`` is ``tiny`` for the ``fast`` Hash3D
    preset and ``full`` otherwise."""
    if vae not in VAE_KINDS:
        raise ValueError(f"guidance.vae must be one of {', '.join(VAE_KINDS)}, got {vae!r}")
    if vae == "auto":
        return "tiny" if hash3d_mode == "fast" else "full"
    return vae


def load_tiny_vae(source: str = DEFAULT_TINY_VAE, device: str | torch.device = "cpu",
                  dtype: torch.dtype = torch.float32) -> AutoencoderTiny:
    """Load a tiny autoencoder (diffusers ``AutoencoderTiny``, the ``madebyollin/taesd`` layout:
    ``config.json`` + safetensors at the root, or in a ``vae`` subfolder) from a local directory
    or a hub id; frozen, on ``device`` in ``dtype``, gradient checkpointing off (diffusers'
    ``EncoderTiny`` skips its input rescale when it is on).

    Raises:
        ModelLoadError: on any failure, one line naming the source and how to pass a directory.
    """
    source = str(source)
    root = _resolve_local_dir(source, _TINY_VAE_PATTERNS, _tiny_vae_error,
                              complete=("config.json", "diffusion_pytorch_model.safetensors"))
    sub = None if (root / "config.json").is_file() else "vae" if (root / "vae" / "config.json").is_file() else ""
    if sub == "":
        raise _tiny_vae_error(source, f"'{root}' has no config.json (nor vae/config.json)")
    folder = root / sub if sub else root
    try:
        class_name = json.loads((folder / "config.json").read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError) as exc:
        raise _tiny_vae_error(source, f"'{folder / 'config.json'}' is not a readable JSON config ({exc})") from exc
    if class_name != "AutoencoderTiny":
        raise _tiny_vae_error(source, f"'{folder}' holds a {class_name}, not an AutoencoderTiny")
    try:
        vae, info = AutoencoderTiny.from_pretrained(str(root), subfolder=sub, torch_dtype=dtype,
                                                    use_safetensors=True, output_loading_info=True)
    except Exception as exc:  # noqa: BLE001 - missing or corrupt weights, ...
        raise _tiny_vae_error(source, f"failed to load from '{root}' ({type(exc).__name__}: {exc})") from exc
    if info.get("missing_keys"):
        raise _tiny_vae_error(source, f"the weights in '{folder}' lack {len(info['missing_keys'])} tensors "
                                      f"(e.g. {sorted(info['missing_keys'])[0]})")
    if vae.is_gradient_checkpointing:
        vae.disable_gradient_checkpointing()
    logger.info("loaded tiny autoencoder from %s on %s as %s", root, device, dtype)
    return _frozen(vae, torch.device(device))


BUILTIN_TINY = "builtin:tiny"


def builtin_checkpoint_dir(name: str, write, marker: str = "model_index.json") -> Path:
    """The built-in tiny random checkpoint ``name`` in the hash3d-dg cache folder
    (``HASH3D_DG_CACHE``, else ``$XDG_CACHE_HOME/hash3d-dg``), written on first use (when
    ``marker`` is missing) by ``write(folder)`` into a staging folder that is then renamed into
    place: processes racing for it each write their own copy and the losers drop theirs; a write
    that fails or is interrupted leaves nothing half-written and raises."""
    import shutil

    cache = Path(os.environ.get("HASH3D_DG_CACHE", Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "hash3d-dg"))
    target = cache / name
    if not (target / marker).is_file():
        staging = cache / f".{target.name}.tmp-{os.getpid()}"
        try:
            write(staging)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        try:
            os.replace(staging, target)
        except OSError:  # another process won the race
            shutil.rmtree(staging, ignore_errors=True)
    return target


def builtin_tiny_vae_dir(seed: int = 0) -> Path:
    """The built-in tiny random ``AutoencoderTiny`` (smoke runs with the built-in tiny model)."""
    from hash3d_dg.guidance.tiny import write_tiny_taesd

    return builtin_checkpoint_dir(f"tiny-taesd-{seed}", lambda folder: write_tiny_taesd(folder, seed=seed),
                                  marker="config.json")


def load_latent_vae(guidance, hash3d_mode: str, device, dtype) -> AutoencoderTiny | None:
    """The autoencoder the guidance encodes renders with (and stage 2 decodes with), for a
    ``GuidanceConfig``: None for the checkpoint's own VAE (``vae`` resolving to ``full``), else the
    tiny one from ``tiny_vae``. ``builtin:tiny`` (also taken when the Zero-1-to-3 model is the
    built-in tiny one and ``tiny_vae`` is left at its default) is a tiny random one."""
    if resolve_vae_kind(guidance.vae, hash3d_mode) == "full":
        return None
    source = str(guidance.tiny_vae)
    if source == BUILTIN_TINY or (guidance.model == BUILTIN_TINY and source == DEFAULT_TINY_VAE):
        source = str(builtin_tiny_vae_dir())
    return load_tiny_vae(source, device, dtype)
