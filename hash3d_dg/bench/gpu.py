"""Prove and time the CUDA path in one command (CUDA only; on a CPU machine it exits 2).

    python -m hash3d_dg.bench gpu --json --out DIR [--budget-s 480]

Parts, each in its own Python process under its own time limit (so a hung build or a crash is
reported and the next part still runs), inside one overall budget:

1. build-gsplat (the JIT build of gsplat's CUDA op, minutes the first time; it runs while the
   checkpoint part writes the model), build-inria (``diff_gaussian_rasterization``), build-
   nvdiffrast: a backend that is missing or fails to build is reported and skipped afterwards.
2. checkpoint: random weights of the full-size stable-zero123 architecture (UNet ~860 M, SD VAE,
   CLIP ViT-L/14) written as fp16 safetensors in the real checkpoint layout.
3. tests: ``pytest -m cuda`` (tests of a backend that failed to build are deselected).
4. compare: every built CUDA backend against its torch twin on the GPU: image, alpha, depth,
   means2d and its gradient, radii / visibility counts, the alpha cap (3DGS 0.99; gsplat 0.999, documented) (Gaussians, at mid
   and near-1 opacities); tri_id, rgb, depth and the texture gradient (mesh).
5. timing: milliseconds per render, forward and forward+backward, and host syncs per call (CUDA
   sync debug mode), per backend: Gaussians torch / gsplat / inria, mesh torch / nvdiffrast.
6. e2e-off, e2e-paper, e2e-fast: the product end to end (``run_image``) in fp16 on the random
   full-size checkpoint (and a random full-size TAESD for ``fast``) at the product's default
   iterations (``--iters``/``--iters-refine`` to change, ``--set KEY=VALUE`` for any override;
   ``mesh.clean=basic`` without pymeshlab): seconds per phase (stage 1, mesh, UV, bake, stage 2,
   export), iterations per second, GPU busy % per phase (nvidia-smi), the load time split into
   imports / CUDA start / weights / graph capture, UNet calls, peak GPU memory.
7. launches (CPU, overlapping the build): ``bench launches`` per mode; graphs: one CFG UNet call
   eager against replayed from its CUDA graph at each cache point; concurrency: ``--concurrency``
   end-to-end runs at once on the GPU (images per minute, as ``--ray-gpus-per-worker``).
8. checkpoint-text (written beside the checkpoint part) and e2e-text-<mode> (``--text-modes``,
   default paper): text to 3D end to end, a prompt through configs/text.yaml on a random
   full-size Stable Diffusion 2.1 checkpoint (fp16, 512-px guidance), the same figures.

Writes DIR/gpu_bench.json (everything, with versions and device name), DIR/gpu_bench.txt (a short
summary) and DIR/logs/<part>.log; prints the JSON (``--json``) or the summary. Exit status: 0
when every check passed, 1 when a test or comparison failed or a part crashed, 2 without CUDA.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

MODES = ("off", "paper", "fast")
GAUSSIAN_CUDA = ("gsplat", "inria")
REPO_ROOT = Path(__file__).resolve().parents[2]

# Caps in seconds for each part (each also stops at the overall deadline).
CAPS = {"build-gsplat": 330, "checkpoint": 240, "checkpoint-text": 240, "build-inria": 60,
        "build-nvdiffrast": 180, "tests": 150, "compare": 90, "timing": 120, "e2e": 120,
        "graphs": 60, "launches": 240, "concurrency": 120}
TEXT_MODES = ("paper",)
MIN_START = 20  # a part is skipped when less than this is left


# ====================================================================== parent: orchestration
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="benchmarks/results/gpu",
                   help="folder for gpu_bench.json, gpu_bench.txt, logs/ and parts/ (default: "
                        "benchmarks/results/gpu); the random checkpoint and the end-to-end "
                        "outputs go to $HASH3D_DG_BENCH_SCRATCH (default <tmp>/hash3d-dg-bench)")
    p.add_argument("--budget-s", type=float, default=480.0,
                   help="overall wall-clock budget in seconds (default 480, i.e. 8 minutes); "
                        "parts that do not fit are skipped and reported")
    p.add_argument("--modes", nargs="+", default=list(MODES),
                   help="hash3d modes of the end-to-end runs (default: off paper fast)")
    p.add_argument("--text-modes", nargs="*", default=list(TEXT_MODES),
                   help="hash3d modes of the text end-to-end runs (a prompt, configs/text.yaml, a random "
                        "full-size SD 2.1 checkpoint; default: paper; none: no text runs)")
    p.add_argument("--iters", type=int, default=0,
                   help="stage-1 iterations of each end-to-end run (default 0: the product's, 500)")
    p.add_argument("--iters-refine", type=int, default=0,
                   help="stage-2 iterations of each end-to-end run (default 0: the product's, 50)")
    p.add_argument("--decimate-target", type=int, default=0,
                   help="mesh.decimate_target of the end-to-end runs (default 0: the product's)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="config overrides for every end-to-end run (e.g. guidance.cuda_graphs=off)")
    p.add_argument("--concurrency", type=int, default=2,
                   help="end-to-end runs (mode off) at once on the GPU for the throughput part "
                        "(as --ray-gpus-per-worker 1/N; 0 skips it)")
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"],
                   help="guidance.dtype of the end-to-end runs (default float16, the product's "
                        "CUDA default)")
    p.add_argument("--checkpoint",
                   help="use this stable-zero123 checkpoint directory instead of writing random "
                        "full-size weights")
    p.add_argument("--skip", nargs="*", default=[],
                   help="parts to skip: build-gsplat build-inria build-nvdiffrast launches graphs "
                        "e2e concurrency tests compare timing")


def _child_env() -> dict:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.setdefault("MAX_JOBS", str(os.cpu_count() or 8))  # gsplat's JIT build (default 10)
    try:
        import torch

        major, minor = torch.cuda.get_device_capability()
        env.setdefault("TORCH_CUDA_ARCH_LIST", f"{major}.{minor}")  # build for this GPU only
    except Exception:  # noqa: BLE001 - the env is only a speed-up
        pass
    return env


class Part:
    """One child process: a command, its log file and its time limit."""

    def __init__(self, name: str, cmd: list[str], log: Path, timeout: float, env: dict):
        self.name, self.cmd, self.log, self.timeout = name, cmd, log, timeout
        self.start = time.monotonic()
        log.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(log, "w")
        self.proc = subprocess.Popen(cmd, stdout=self._fh, stderr=subprocess.STDOUT, env=env,
                                     cwd=REPO_ROOT, start_new_session=True)

    def wait(self) -> dict:
        """Wait up to the limit; a part that overruns is killed with its whole process group."""
        left = max(0.0, self.timeout - (time.monotonic() - self.start))
        status = None
        try:
            rc = self.proc.wait(timeout=left)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()
            rc, status = None, "timeout"
        self._fh.close()
        seconds = round(time.monotonic() - self.start, 1)
        return {"returncode": rc, "status": status or ("ok" if rc == 0 else "failed"),
                "wall_s": seconds, "limit_s": round(self.timeout, 1)}


def run_command_part(name: str, cmd: list[str], log: Path, timeout: float, env: dict) -> dict:
    return Part(name, cmd, log, timeout, env).wait()


def scratch_dir() -> Path:
    """Where the ~2.5 GB random checkpoint and the end-to-end outputs go (never the repo):
    ``$HASH3D_DG_BENCH_SCRATCH`` or ``<tmp>/hash3d-dg-bench``."""
    import tempfile

    return Path(os.environ.get("HASH3D_DG_BENCH_SCRATCH",
                               Path(tempfile.gettempdir()) / "hash3d-dg-bench"))


def _part_cmd(part: str, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "hash3d_dg.bench.gpu_parts", "--part", part, "--out", str(out), *extra]


def _read_part(out: Path, name: str) -> dict:
    path = out / "parts" / f"{name}.json"
    if path.is_file():
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError:
            return {"error": f"unreadable {path.name}"}
    return {}


def _log_tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def run_from_args(args) -> int:
    import torch

    if not torch.cuda.is_available():
        print("bench gpu needs a CUDA GPU: torch.cuda.is_available() is False on this machine",
              file=sys.stderr)
        return 2
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    (out / "parts").mkdir(exist_ok=True)
    for old in (out / "parts").glob("*.json"):
        old.unlink()
    env = _child_env()
    t0 = time.monotonic()
    deadline = t0 + float(args.budget_s)
    results: dict = {"command": " ".join(sys.argv), "budget_s": args.budget_s,
                     "machine": machine_info(), "parts": {}}
    skip = set(args.skip)

    def cap_of(name: str) -> float:
        return CAPS["e2e" if name.startswith("e2e") else name]

    def limit(name: str) -> float:
        return min(cap_of(name), deadline - time.monotonic())

    def finish(name: str, run: dict) -> dict:
        entry = {**run, **_read_part(out, name)}
        cap = cap_of(name)
        if entry.get("skipped"):
            entry["status"] = "skipped"
        elif entry["status"] == "timeout" and entry["limit_s"] < cap - 1:
            entry["status"] = "out of budget"  # stopped by the overall deadline, not its cap
        elif entry["status"] != "ok":
            entry.setdefault("log_tail", _log_tail(out / "logs" / f"{name}.log"))
        results["parts"][name] = entry
        return entry

    def skipped(name: str, why: str) -> None:
        results["parts"][name] = {"status": "skipped", "reason": why}

    # 1-2. gsplat's JIT build (CPU-bound) overlaps the checkpoint writing (GPU + disk).
    ckpt = Path(args.checkpoint).resolve() if args.checkpoint else scratch_dir() / "random-stable-zero123-diffusers"
    running = []
    if "build-gsplat" not in skip:
        running.append(Part("build-gsplat", _part_cmd("build", out, "--backend", "gsplat"),
                            out / "logs" / "build-gsplat.log", limit("build-gsplat"), env))
    else:
        skipped("build-gsplat", "--skip")
    want_e2e = "e2e" not in skip
    if want_e2e and not args.checkpoint:
        running.append(Part("checkpoint", _part_cmd("checkpoint", out, "--checkpoint", str(ckpt)),
                            out / "logs" / "checkpoint.log", limit("checkpoint"), env))
    launches = None
    if "launches" not in skip:  # CPU only: overlaps the build and the checkpoint
        cpu_env = dict(env, CUDA_VISIBLE_DEVICES="")
        launches = Part("launches", _part_cmd("launches", out), out / "logs" / "launches.log",
                        limit("launches"), cpu_env)
    else:
        skipped("launches", "--skip")
    text_ckpt = scratch_dir() / "random-stable-diffusion-2-1-base"
    if want_e2e and args.text_modes:
        running.append(Part("checkpoint-text", _part_cmd("checkpoint-text", out, "--checkpoint", str(text_ckpt)),
                            out / "logs" / "checkpoint-text.log", limit("checkpoint-text"), env))
    for part in running:
        finish(part.name, part.wait())
    for backend in ("inria", "nvdiffrast"):
        name = f"build-{backend}"
        if name in skip:
            skipped(name, "--skip")
        elif limit(name) < MIN_START:
            skipped(name, "no time left in the budget")
        else:
            finish(name, run_command_part(name, _part_cmd("build", out, "--backend", backend),
                                          out / "logs" / f"{name}.log", limit(name), env))
    built = [b for b in ("gsplat", "inria", "nvdiffrast")
             if results["parts"].get(f"build-{b}", {}).get("available") is True]
    results["backends_built"] = built
    backends_arg = ["--backends", *built] if built else ["--backends"]

    ckpt_ok = args.checkpoint or results["parts"].get("checkpoint", {}).get("status") == "ok"
    # graph against eager per UNet call, at each cache point
    if "graphs" in skip or not want_e2e:
        skipped("graphs", "--skip")
    elif not ckpt_ok:
        skipped("graphs", "no checkpoint (the checkpoint part failed)")
    elif limit("graphs") < MIN_START:
        skipped("graphs", "no time left in the budget")
    else:
        finish("graphs", run_command_part("graphs", _part_cmd("graphs", out, "--checkpoint", str(ckpt),
                                                              "--dtype", args.dtype),
                                          out / "logs" / "graphs.log", limit("graphs"), env))

    # end to end, fp16, full-size random checkpoint, per mode; then several at once
    for mode in args.modes:
        name = f"e2e-{mode}"
        if not want_e2e:
            skipped(name, "--skip")
        elif not ckpt_ok:
            skipped(name, "no checkpoint (the checkpoint part failed)")
        elif limit(name) < MIN_START:
            skipped(name, "no time left in the budget")
        else:
            cmd = _part_cmd("e2e", out, "--mode", mode, "--checkpoint", str(ckpt),
                            "--iters", str(args.iters), "--iters-refine", str(args.iters_refine),
                            "--decimate-target", str(args.decimate_target),
                            "--dtype", args.dtype, *backends_arg, "--set", *args.set)
            finish(name, run_command_part(name, cmd, out / "logs" / f"{name}.log", limit(name), env))
    if "concurrency" in skip or not want_e2e or args.concurrency < 1:
        skipped("concurrency", "--skip")
    elif not ckpt_ok:
        skipped("concurrency", "no checkpoint (the checkpoint part failed)")
    elif limit("concurrency") < MIN_START:
        skipped("concurrency", "no time left in the budget")
    else:
        cmd = _part_cmd("concurrency", out, "--checkpoint", str(ckpt), "--workers",
                        str(args.concurrency), "--dtype", args.dtype, *backends_arg, "--set", *args.set)
        finish("concurrency", run_command_part("concurrency", cmd, out / "logs" / "concurrency.log",
                                               limit("concurrency"), env))

    # pytest -m cuda
    if "tests" in skip:
        skipped("tests", "--skip")
    elif limit("tests") < MIN_START:
        skipped("tests", "no time left in the budget")
    else:
        budget = limit("tests")  # pytest gets 10 s less, so its partial output is kept
        finish("tests", run_command_part(
            "tests", _part_cmd("tests", out, "--timeout-s", str(max(10, int(budget) - 10)),
                               *backends_arg), out / "logs" / "tests.log", budget, env))

    # 4-5. comparisons and timings
    for name in ("compare", "timing"):
        if name in skip:
            skipped(name, "--skip")
        elif limit(name) < MIN_START:
            skipped(name, "no time left in the budget")
        else:
            finish(name, run_command_part(name, _part_cmd(name, out, *backends_arg),
                                          out / "logs" / f"{name}.log", limit(name), env))

    if launches is not None:
        finish("launches", launches.wait())

    # 7. text to 3D end to end, fp16, a random full-size SD 2.1 checkpoint
    text_ok = results["parts"].get("checkpoint-text", {}).get("status") == "ok"
    for mode in args.text_modes:
        name = f"e2e-text-{mode}"
        if not want_e2e:
            skipped(name, "--skip")
        elif not text_ok:
            skipped(name, "no SD checkpoint (the checkpoint-text part failed)")
        elif limit(name) < MIN_START:
            skipped(name, "no time left in the budget")
        else:
            cmd = _part_cmd("e2e", out, "--task", "text", "--mode", mode, "--checkpoint", str(text_ckpt),
                            "--iters", str(args.iters), "--iters-refine", str(args.iters_refine),
                            "--decimate-target", str(args.decimate_target),
                            "--dtype", args.dtype, *backends_arg)
            finish(name, run_command_part(name, cmd, out / "logs" / f"{name}.log", limit(name), env))

    results["wall_s"] = round(time.monotonic() - t0, 1)
    results["failures"] = failures(results)
    text = summarize(results)
    (out / "gpu_bench.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "gpu_bench.txt").write_text(text + "\n")
    print(json.dumps(results, indent=2) if args.json else text)
    return 1 if results["failures"] else 0


def failures(results: dict) -> list[str]:
    """Names of the checks that failed (a build that is missing or fails is not a failure)."""
    bad = []
    for name, part in results["parts"].items():
        if name.startswith("build-") or part.get("status") in ("skipped", "out of budget"):
            continue
        if part.get("status") != "ok":
            bad.append(f"{name}: {part.get('status')}")
        elif name == "tests" and (part.get("failed", 0) or part.get("errors", 0)
                                  or part.get("timed_out") or part.get("returncode") not in (0, 5)):
            bad.append(f"tests: {part.get('failed', 0)} failed, {part.get('errors', 0)} errors, "
                       f"pytest exit status {part.get('returncode')}")
        elif name == "compare":
            bad += [f"compare {k}" for k, v in part.get("checks", {}).items() if not v]
        elif name.startswith("e2e") and part.get("finite") is False:
            bad.append(f"{name}: non-finite losses")
    return bad


def _fmt(value, digits: int = 3) -> str:
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def summarize(results: dict) -> str:
    """The short text summary of a result dict (robust to missing or skipped parts)."""
    m = results.get("machine", {})
    v = m.get("versions", {})
    lines = [f"bench gpu on {m.get('gpu', '?')} ({m.get('capability', '?')}, "
             f"{m.get('gpu_memory_gib', '?')} GiB, driver {m.get('driver', '?')}), torch "
             f"{v.get('torch', '?')} CUDA {v.get('cuda', '?')}, gsplat {v.get('gsplat', '-')}, "
             f"diffusers {v.get('diffusers', '?')}, transformers {v.get('transformers', '?')}: "
             f"{results.get('wall_s', '?')} s of {results.get('budget_s', '?')}"]
    parts = results.get("parts", {})
    builds = []
    for b in ("gsplat", "inria", "nvdiffrast"):
        p = parts.get(f"build-{b}", {})
        state = "ok" if p.get("available") else (p.get("reason") or p.get("status", "?"))
        builds.append(f"{b} {state}" + (f" ({p['seconds']:.0f} s)" if p.get("seconds") else ""))
    lines.append("backends: " + "; ".join(builds))
    t = parts.get("tests", {})
    if t.get("status") == "ok":
        lines.append(f"tests (pytest -m cuda): {t.get('passed', 0)} passed, {t.get('failed', 0)} "
                     f"failed, {t.get('errors', 0)} errors, {t.get('skipped', 0)} skipped, "
                     f"{t.get('deselected', 0)} deselected ({t.get('wall_s')} s)")
    else:
        lines.append(f"tests: {t.get('status', 'not run')} {t.get('reason', '')}".rstrip())
    c = parts.get("compare", {})
    for name, row in c.get("gaussian", {}).items():
        if "error" in row:
            lines.append(f"compare {name}: error {row['error']}")
            continue
        lines.append(f"compare {name} vs torch: image max {_fmt(row['image_max'])} mean "
                     f"{_fmt(row['image_mean'])}, alpha max {_fmt(row['alpha_max'])}, depth max "
                     f"{_fmt(row['depth_max'])}, grad cos {_fmt(row['grad_cos'], 4)}, visible "
                     f"{row['visible']}/{row['visible_torch']} (differ {row['visible_differ']}), "
                     f"peak alpha {_fmt(row['peak_alpha'], 5)}")
    for name, row in c.get("mesh", {}).items():
        if "error" in row:
            lines.append(f"compare mesh {name}: error {row['error']}")
            continue
        lines.append(f"compare mesh {name} vs torch: tri_id agree {_fmt(row['tri_agree'], 5)} "
                     f"({_fmt(row.get('tri_agree_snapped'), 5)} against the 1/16-px snapped mesh), rgb "
                     f"max {_fmt(row['rgb_max'])}, depth max {_fmt(row['depth_max'])}, texture "
                     f"grad cos {_fmt(row['grad_cos'], 4)}")
    if c.get("checks"):
        bad = [k for k, ok in c["checks"].items() if not ok]
        lines.append("compare checks: " + ("all passed" if not bad else "FAILED " + ", ".join(bad)))
    tm = parts.get("timing", {})
    for kind in ("gaussian", "mesh"):
        for case, row in tm.get(kind, {}).items():
            cells = []
            for backend, r in row.items():
                if "error" in r:
                    cells.append(f"{backend} error")
                else:
                    cells.append(f"{backend} {_fmt(r['fwd_ms'])}/{_fmt(r['fwd_bwd_ms'])} ms"
                                 + (f" ({r['host_syncs']} syncs)" if r.get("host_syncs") is not None else ""))
            lines.append(f"timing {kind} {case} (fwd/fwd+bwd): " + ", ".join(cells))
    for name, p in parts.items():
        if not name.startswith("e2e"):
            continue
        if p.get("status") != "ok":
            lines.append(f"{name}: {p.get('status')} {p.get('reason', '')}".rstrip())
            continue
        ph = p.get("phases_s", {})
        lines.append(
            f"{name}: stage1 {_fmt(ph.get('stage1'))} s ({_fmt(p.get('stage1_it_per_s'))} it/s, "
            f"{p.get('stage1_hits', 0)} hits), mesh {_fmt(ph.get('mesh'))}, uv {_fmt(ph.get('uv'))}, "
            f"bake {_fmt(ph.get('bake'))}, stage2 {_fmt(ph.get('stage2'))} s "
            f"({_fmt(p.get('stage2_it_per_s'))} it/s), export {_fmt(ph.get('export'))} s; total "
            f"{_fmt(p.get('total_s'))} s, peak {_fmt(p.get('peak_gpu_mem_gib'))} GiB, backends "
            f"{p.get('backends')}")
    for mode, per in (parts.get("launches", {}).get("graphs") or {}).items():
        cells = [f"{stage} {row.get('kernels_per_iter')} launches / {row.get('syncs_per_iter')} syncs / "
                 f"{row.get('uploads_per_iter')} blocking uploads" for stage, row in per.items()]
        lines.append(f"launches {mode} (per steady iteration, CPU count, graphs on): " + ", ".join(cells))
    for point, row in (parts.get("graphs", {}).get("points") or {}).items():
        lines.append(f"graphs {point}: full {row['full_eager_ms']} -> {row['full_graph_ms']} ms, shallow "
                     f"{row['shallow_eager_ms']} -> {row['shallow_graph_ms']} ms (eager -> graph; max diff "
                     f"{_fmt(row['full_max_abs_diff'])}, capture {row['capture_s']} s)")
    step = parts.get("graphs", {}).get("sds_step")
    if step:
        lines.append(f"graphs sds step (after the encode): {step.get('eager_ms')} -> {step.get('graph_ms')} ms, "
                     f"grad max rel diff {_fmt(step.get('grad_max_rel_diff'))}")
    for name, p in parts.items():
        if name.startswith("e2e") and p.get("status") == "ok":
            lines.append(f"{name} load {p.get('load_s')}, GPU busy % {p.get('gpu_busy_pct')}, "
                         f"graphs {p.get('cuda_graphs')}")
    cc = parts.get("concurrency", {})
    if cc.get("status") == "ok":
        lines.append(f"concurrency: {cc.get('workers')} runs at once in {cc.get('wall_s')} s = "
                     f"{cc.get('images_per_min')} images/min (each {cc.get('per_run_total_s')} s)")
    fails = results.get("failures") or []
    lines.append("result: " + ("all checks passed" if not fails else "FAILED: " + "; ".join(fails)))
    return "\n".join(lines)


def _version(dist: str, module: str | None = None) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        pass
    try:
        mod = __import__(module or dist)
        return getattr(mod, "__version__", "unknown")
    except Exception:  # noqa: BLE001
        return None


def machine_info() -> dict:
    import platform

    import torch

    info: dict = {"python": platform.python_version(), "platform": platform.platform(),
                  "cpu_count": os.cpu_count()}
    versions = {"torch": torch.__version__, "cuda": torch.version.cuda}
    for dist, module in (("diffusers", None), ("transformers", None), ("gsplat", None),
                         ("nvdiffrast", None), ("diff_gaussian_rasterization", None),
                         ("trimesh", None), ("xatlas", None), ("safetensors", None),
                         ("huggingface_hub", None)):
        # find_spec only: importing gsplat here would not build it, but stay light
        import importlib.util

        if importlib.util.find_spec(module or dist) is not None:
            versions[dist] = _version(dist, module)
    info["versions"] = versions
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = props.name
        info["capability"] = "sm_%d%d" % (props.major, props.minor)
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        info["multiprocessors"] = props.multi_processor_count
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version",
                                  "--format=csv,noheader"], capture_output=True, text=True,
                                 timeout=20)
            info["driver"] = smi.stdout.strip().splitlines()[0] if smi.returncode == 0 else None
        except (OSError, subprocess.SubprocessError, IndexError):
            info["driver"] = None
    return info


# ====================================================================== children: the parts
