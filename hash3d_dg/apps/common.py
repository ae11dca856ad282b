"""What every entry point shares: exit codes, the one-line argument parser, config overrides from
flags, logging set-up and the one-line summary of a finished run."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import warnings

from hash3d_dg.errors import ConfigError

DEFAULT_CONFIG = "image.yaml"
DEFAULT_TEXT_CONFIG = "text.yaml"
EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 128 + signal.SIGINT  # 130, as a shell reports Ctrl-C

#: Libraries whose warnings a run does not show (unless --debug): deprecations and hints of
#: model code, not the user's business. Our own warnings and anything else stay visible.
QUIET_LIBRARIES = r"(diffusers|transformers|huggingface_hub|accelerate|torch|gsplat|xatlas|trimesh|pymeshlab)(\.|$)"


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not usage + message
        self.exit(EXIT_USER_ERROR, f"error: {message} (see --help)\n")


def overrides_from_args(args: argparse.Namespace) -> list[str]:
    """Flags as config overrides, applied before the explicit key=value words."""
    pairs = []
    simple = {"elevation": "elevation", "seed": "seed", "device": "device", "model": "guidance.model",
              "iters": "stage1.iters", "iters_refine": "stage2.iters", "eta": "hash3d.eta",
              "backend_gaussian": "stage1.backend", "backend_mesh": "stage2.backend"}
    for attr, key in simple.items():
        value = getattr(args, attr)
        if value is not None:
            pairs.append(f"{key}={value}")
    if args.hash3d is False:
        if args.hash3d_mode or args.eta is not None:
            raise ConfigError("--no-hash3d cannot be combined with --hash3d-mode or --eta")
        pairs.append("hash3d.mode=off")
    elif args.hash3d or args.hash3d_mode:
        pairs.append(f"hash3d.mode={args.hash3d_mode or 'paper'}")
    if getattr(args, "negative_prompt", None) is not None:
        pairs.append(f"guidance.negative_prompt={json.dumps(' '.join(args.negative_prompt.split()))}")
    return pairs + list(args.overrides)


def text_mode(args: argparse.Namespace) -> bool:
    """Whether the command runs prompts (``--prompt`` / ``--prompts``); one line when the
    inputs are missing or mixed. Sets ``args.config`` to the mode's default config when unset."""
    prompts = [flag for flag, value in (("--prompt", args.prompt), ("--prompts", args.prompts)) if value is not None]
    if args.image is not None and prompts:
        raise ConfigError(f"pass either --image (a photo to 3D) or {prompts[0]} (text to 3D), not both")
    if len(prompts) == 2:
        raise ConfigError("pass either --prompt TEXT or --prompts FILE, not both")
    if args.image is not None and not args.image:
        raise ConfigError("--image needs at least one image or folder")
    if args.image is None and not prompts:
        raise ConfigError("pass --image PATH (a photo to 3D) or --prompt TEXT (text to 3D)")
    if args.negative_prompt is not None and not prompts:
        raise ConfigError("--negative-prompt goes with --prompt or --prompts, not with --image")
    if args.config is None:
        args.config = DEFAULT_TEXT_CONFIG if prompts else DEFAULT_CONFIG
    return bool(prompts)


def collect_inputs(args: argparse.Namespace, resolve: bool = False) -> list:
    """The inputs of the command: image paths (files of ``--image`` and its folders; absolute
    when ``resolve``) or ``TextPrompt`` s; one line for a bad prompt, prompts file or image."""
    from hash3d_dg.prompts import TextPrompt, read_prompts

    if args.prompt is not None:
        return [TextPrompt(args.prompt)]
    if args.prompts is not None:
        return read_prompts(args.prompts)
    from pathlib import Path

    from hash3d_dg.preprocess import find_images

    images: list[Path] = []
    for item in args.image:
        images += [p.resolve() if resolve else p for p in find_images(item)]
    return images


def configure_logging(debug: bool, stream=None) -> None:
    """Our INFO lines to ``stream`` (stdout by default); the model libraries' chatter and warnings off.

    Imports no model library (``--help`` and config errors must stay fast): diffusers and
    transformers are quietened by :func:`quiet_model_libraries` once a run really starts.
    """
    handler = logging.StreamHandler(stream or sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    root = logging.getLogger("hash3d_dg")
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    root.propagate = False
    if not debug:
        warnings.filterwarnings("ignore", module=QUIET_LIBRARIES)
        for name in ("diffusers", "transformers", "huggingface_hub"):
            logging.getLogger(name).setLevel(logging.ERROR)


def quiet_model_libraries(debug: bool) -> None:
    """diffusers' and transformers' own verbosity and progress bars off (unless ``debug``)."""
    if debug:
        return
    try:
        import diffusers
        import transformers

        diffusers.utils.logging.set_verbosity_error()
        transformers.utils.logging.set_verbosity_error()
        diffusers.utils.logging.disable_progress_bar()
        transformers.utils.logging.disable_progress_bar()
    except ImportError:
        pass


def summary_line(name: str, report: dict) -> str:
    parts = [f"{name}: {report['total_seconds']:.1f}s"]
    if "prompt" in report:
        parts.append(f"prompt '{report['prompt']}'")
    for key in ("stage1", "mesh", "stage2"):
        if key in report:
            parts.append(f"{key} {report[key]['seconds']:.1f}s")
    unet = report.get("unet_total", {})
    if unet.get("full_calls", 0) + unet.get("shallow_calls", 0):
        parts.append(f"UNet full {unet['full_calls']} / shallow {unet['shallow_calls']} "
                     f"(cache hit rate {unet['hit_rate']:.1%})")
    if "ref_psnr" in report.get("stage1", {}):  # none without a reference view (a prompt)
        parts.append(f"ref PSNR {report['stage1']['ref_psnr']:.2f} dB")
    return " | ".join(parts)
