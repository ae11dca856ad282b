"""What every entry point shares: exit codes, the one-line argument parser, config overrides from
flags, logging set-up and the one-line summary of a finished run."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import warnings

from hash3d_dg.errors import ConfigError

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
    return pairs + list(args.overrides)


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
    for key in ("stage1", "mesh", "stage2"):
        if key in report:
            parts.append(f"{key} {report[key]['seconds']:.1f}s")
    unet = report.get("unet_total", {})
    if unet.get("full_calls", 0) + unet.get("shallow_calls", 0):
        parts.append(f"UNet full {unet['full_calls']} / shallow {unet['shallow_calls']} "
                     f"(cache hit rate {unet['hit_rate']:.1%})")
    if "stage1" in report:
        parts.append(f"ref PSNR {report['stage1']['ref_psnr']:.2f} dB")
    return " | ".join(parts)
