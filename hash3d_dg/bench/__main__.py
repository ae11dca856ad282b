"""Benchmarks: ``python -m hash3d_dg.bench {flops,cache-exactness,staleness,macs,breakdown,speed,mesh-phase,oracle,pareto,gpu} [--json]``."""

from __future__ import annotations

import argparse
import json
import sys


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hash3d_dg.bench", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("flops", help="GMACs of the real stable-zero123 (or, --task text, SD 2.1) UNet / VAE (meta device)")
    p.add_argument("--task", default="image", choices=["image", "text"],
                   help="image: stable-zero123 at 256 px; text: Stable Diffusion 2.1-base at 512 px")
    p.add_argument("--image-size", type=int, default=None, help="default: 256 (image), 512 (text)")
    p.add_argument("--cache-point", default="paper", choices=["paper", "last_subblock", "last_block"])
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("cache-exactness", help="shallow cached path vs full forward on tiny UNets")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--task", default="image", choices=["image", "text"],
                   help="text: the SD 2.x UNets (tiny; --sd21-full adds the full-size SD 2.1 one)")
    p.add_argument("--sd21-full", action="store_true",
                   help="with --task text: also the full-size SD 2.1 UNet, random weights (~4 GB, minutes on CPU)")
    p.add_argument("--latent-size", type=int, default=8)
    p.add_argument("--json", action="store_true")

    from hash3d_dg.bench import macs, speed

    p = sub.add_parser("macs", help="TMACs of a whole run per hash3d mode (call counts from the real stage loops)")
    macs.add_arguments(p)
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("speed", help="seconds per stage iteration, hash3d off vs each mode, side by side")
    speed.add_arguments(p)
    p.add_argument("--json", action="store_true")

    from hash3d_dg.bench import mesh_phase

    p = sub.add_parser("mesh-phase", help="mesh phase seconds per step and texture fidelity, today's settings vs the faster ones")
    mesh_phase.add_arguments(p)
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("oracle", help="quality without weights: an oracle denoiser stands in for Zero-1-to-3")
    try:
        from hash3d_dg.bench import oracle
    except ImportError:  # pragma: no cover - the harness module is part of the package
        oracle = None
    if oracle is not None:
        oracle.add_arguments(p)
    p.add_argument("--json", action="store_true")

    from hash3d_dg.bench import gpu

    p = sub.add_parser("gpu", help="CUDA only: prove and time the CUDA path in one command (tests, "
                       "backend parity, render timings, fp16 end-to-end runs)",
                       description=gpu.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    gpu.add_arguments(p)
    p.add_argument("--json", action="store_true", help="print the JSON instead of the summary")

    from hash3d_dg.bench import breakdown, pareto, staleness

    p = sub.add_parser("staleness", help="error of a reused deep feature per cache point (stable-zero123 architecture, random weights)")
    staleness.add_arguments(p)
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("breakdown", help="whole-run cost per phase and mode: TMACs and CPU seconds side by side")
    breakdown.add_arguments(p)
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("pareto", help="oracle quality against UNet calls served shallow, per cache policy")
    pareto.add_arguments(p)
    p.add_argument("--json", action="store_true")

    args = parser.parse_args(argv)
    if args.command == "gpu":
        return gpu.run_bench(args)
    from hash3d_dg.cli import configure_logging

    configure_logging(debug=False, stream=sys.stderr)  # stdout carries the JSON
    if args.command == "flops":
        if args.task == "text":
            from hash3d_dg.bench.text_costs import text_flops_report

            result = text_flops_report(args.image_size or 512, args.cache_point)
        else:
            from hash3d_dg.bench.flops import flops_report

            result = flops_report(args.image_size or 256, args.cache_point)
    elif args.command == "cache-exactness":
        from hash3d_dg.bench.exactness import exactness_report

        result = exactness_report(args.seed, latent_size=args.latent_size, text=args.task == "text",
                                  sd21_full=args.sd21_full)
    elif args.command == "macs":
        result = macs.run_from_args(args)
    elif args.command == "speed":
        result = speed.run_from_args(args)
    elif args.command == "mesh-phase":
        from hash3d_dg.errors import UserError

        try:
            result = mesh_phase.run_from_args(args)
        except (UserError, ValueError, OSError) as exc:  # a bad --ply / --source: one line
            print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
            return 2
    elif args.command == "staleness":
        result = staleness.run_from_args(args)
    elif args.command == "breakdown":
        result = breakdown.run_from_args(args)
    elif args.command == "pareto":
        result = pareto.run_from_args(args)
    else:
        result = oracle.run_from_args(args)
    _print(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
