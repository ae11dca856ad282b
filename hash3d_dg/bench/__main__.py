"""Measurements: ``python -m hash3d_dg.bench COMMAND [--json]``.

One registry (``COMMANDS``) names every sub-command, the module that implements it and its help
line. A module provides ``add_arguments(parser)`` and ``run_from_args(args)``, which returns the
result (a dict, printed as JSON with ``--json``, else as ``key: value`` lines) or an exit status.
Cost and speed live in ``hash3d_dg.bench`` (what a run costs: MACs, seconds, memory, GPU);
quality and correctness in ``hash3d_dg.eval`` (what a run is worth: the oracle, its Pareto front,
staleness, exactness of the cache, backend conventions). A new benchmark is one module and one
line here.
"""

from __future__ import annotations

import argparse
import json
import sys
from importlib import import_module

#: name -> (module, help). Order = the order ``--help`` lists them.
COMMANDS: dict[str, tuple[str, str]] = {
    "flops": ("hash3d_dg.bench.flops", "GMACs of the real stable-zero123 (or, --task text, SD 2.1) UNet / VAE (meta device)"),
    "macs": ("hash3d_dg.bench.macs", "TMACs of a whole run per hash3d mode (call counts from the real stage loops)"),
    "breakdown": ("hash3d_dg.bench.breakdown", "whole-run cost per phase and mode: TMACs and CPU seconds side by side"),
    "speed": ("hash3d_dg.bench.speed", "seconds per stage iteration, hash3d off vs each mode, side by side"),
    "mesh-phase": ("hash3d_dg.bench.mesh_phase", "mesh phase seconds per step and texture fidelity, today's settings vs the faster ones"),
    "launches": ("hash3d_dg.bench.launches", "kernels, host syncs and uploads per steady-state stage "
                 "iteration, counted on the CPU on the accelerator's code path (per Hash3D mode)"),
    "batch-rss": ("hash3d_dg.bench.batch_rss", "resident memory after each image of a long smoke-config folder run"),
    "gpu": ("hash3d_dg.bench.gpu", "CUDA only: prove and time the CUDA path in one command (tests, "
            "backend parity, render timings, fp16 end-to-end runs)"),
    "oracle": ("hash3d_dg.eval.oracle", "quality without weights: an oracle denoiser stands in for Zero-1-to-3"),
    "pareto": ("hash3d_dg.eval.pareto", "oracle quality against UNet calls served shallow, per cache policy"),
    "staleness": ("hash3d_dg.eval.staleness", "error of a reused deep feature per cache point (stable-zero123 architecture, random weights)"),
    "cache-exactness": ("hash3d_dg.eval.exactness", "shallow cached path vs full forward on tiny UNets (--task text: SD 2.x)"),
    "alpha-clamp": ("hash3d_dg.eval.alpha_clamp", "gsplat's 0.999 alpha cap against the reference 0.99 (CPU)"),
    "radii-visibility": ("hash3d_dg.eval.radii_visibility", "how gsplat's radii rule would change densification statistics (CPU)"),
}

#: ``--task text`` of a cost command: the text path's module and function (it builds on the
#: image task's counters, so the image modules do not import it).
TEXT_TASK: dict[str, tuple[str, str]] = {
    "flops": ("hash3d_dg.bench.text_costs", "run_flops_from_args"),
    "macs": ("hash3d_dg.bench.text_costs", "run_macs_from_args"),
}

#: Commands that print their own report (``--json`` is theirs to honour).
OWN_OUTPUT = {"gpu"}


def _print(result: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(result, indent=2))
        return

    def walk(obj, prefix=""):
        if isinstance(obj, dict):
            for key, value in obj.items():
                walk(value, f"{prefix}{key}.")
        else:
            print(f"{prefix[:-1]}: {obj}")
    walk(result)


def build_parser() -> tuple[argparse.ArgumentParser, dict]:
    parser = argparse.ArgumentParser(prog="python -m hash3d_dg.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    modules = {}
    for name, (module_name, help_line) in COMMANDS.items():
        module = import_module(module_name)
        modules[name] = module
        kwargs = {}
        if name in OWN_OUTPUT:
            kwargs = {"description": module.__doc__, "formatter_class": argparse.RawDescriptionHelpFormatter}
        p = sub.add_parser(name, help=help_line, **kwargs)
        module.add_arguments(p)
        if name in OWN_OUTPUT:
            p.add_argument("--json", action="store_true", help="print the JSON instead of the summary")
        else:
            p.add_argument("--json", action="store_true", help="print the result as JSON")
    return parser, modules


def main(argv: list[str] | None = None) -> int:
    parser, modules = build_parser()
    args = parser.parse_args(argv)
    module = modules[args.command]
    if args.command in OWN_OUTPUT:
        return module.run_from_args(args)
    run = module.run_from_args
    if getattr(args, "task", None) == "text" and args.command in TEXT_TASK:
        module_name, function = TEXT_TASK[args.command]
        run = getattr(import_module(module_name), function)
    from hash3d_dg.apps.common import configure_logging
    from hash3d_dg.errors import UserError

    configure_logging(debug=False, stream=sys.stderr)  # stdout carries the result
    try:
        result = run(args)
    except UserError as exc:  # a bad option or input file: one line
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    _print(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
