"""The parts of ``python -m hash3d_dg.bench gpu``, each run as its own process:

    python -m hash3d_dg.bench.gpu_parts --part {build,checkpoint,checkpoint-text,tests,compare,timing,
        e2e,graphs,launches,concurrency} --out DIR

Each writes ``DIR/parts/<name>.json``. ``timing`` and ``e2e`` also run on a CPU (``--device cpu``,
small settings), which is how their code is tested without a GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from hash3d_dg.bench.gpu import GAUSSIAN_CUDA, REPO_ROOT, _version, scratch_dir


def _write_part(out: Path, name: str, data: dict) -> None:
    path = out / "parts" / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def _sync(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _peak_gib() -> float | None:
    import torch

    return round(torch.cuda.max_memory_allocated() / 2**30, 3) if torch.cuda.is_available() else None


def part_build(backend: str) -> dict:
    """Make ``backend`` usable (gsplat: its JIT build) and render once with it."""
    import importlib.util

    import torch

    from hash3d_dg.camera import Camera

    module = {"gsplat": "gsplat", "inria": "diff_gaussian_rasterization",
              "nvdiffrast": "nvdiffrast"}[backend]
    if importlib.util.find_spec(module) is None:
        return {"available": False, "reason": f"{module} is not installed"}
    start = time.perf_counter()
    try:
        if backend == "gsplat":
            from gsplat.cuda._backend import _C

            if _C is None:
                return {"available": False, "reason": "gsplat's CUDA op did not build",
                        "seconds": round(time.perf_counter() - start, 1)}
        cam = Camera.orbit(0, 0, 2.0, 64)
        if backend == "nvdiffrast":
            from hash3d_dg.bench.harness import standin_mesh
            from hash3d_dg.mesh import rasterize_mesh

            out = rasterize_mesh(standin_mesh(device="cuda"), cam, backend="nvdiffrast")
            ok = bool(out.alpha.sum() > 0)
        else:
            from hash3d_dg.gaussians import rasterize_gaussians

            g = torch.Generator().manual_seed(0)
            scene = [torch.rand(50, 3, generator=g) - 0.5, torch.randn(50, 4, generator=g),
                     torch.full((50, 3), 0.05), torch.full((50,), 0.5), torch.rand(50, 3, generator=g)]
            out = rasterize_gaussians(*(t.cuda() for t in scene), camera=cam,
                                      background=torch.ones(3, device="cuda"), backend=backend)
            ok = bool(out.alpha.sum() > 0)
        torch.cuda.synchronize()
    except Exception as exc:  # noqa: BLE001 - a failed build is a result, not a crash
        return {"available": False, "reason": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300],
                "seconds": round(time.perf_counter() - start, 1)}
    return {"available": ok, "seconds": round(time.perf_counter() - start, 1),
            "version": _version(module)}


def part_checkpoint(path: str) -> dict:
    import torch

    from hash3d_dg.bench.gpu_checkpoint import write_random_checkpoint

    start = time.perf_counter()
    root = write_random_checkpoint(path, arch="full", device="cuda" if torch.cuda.is_available() else "cpu")
    size = sum(f.stat().st_size for f in root.rglob("*") if f.is_file())
    taesd = write_random_taesd(taesd_dir(path))
    return {"path": str(root), "bytes": size, "taesd": str(taesd),
            "seconds": round(time.perf_counter() - start, 1), "peak_gpu_mem_gib": _peak_gib()}


def taesd_dir(checkpoint: str | Path) -> Path:
    """Where the random full-size TAESD of ``fast`` goes, next to the random checkpoint."""
    return Path(checkpoint).parent / "random-taesd"


def write_random_taesd(path: str | Path, seed: int = 0) -> Path:
    """A random ``AutoencoderTiny`` of TAESD's full-size architecture in the
    ``madebyollin/taesd`` layout (``fast`` needs one; no downloads on the GPU machine)."""
    import torch
    from diffusers import AutoencoderTiny

    from hash3d_dg.guidance.tiny import taesd_config

    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderTiny(**taesd_config())
    vae.half().save_pretrained(root, safe_serialization=True)
    return root


_PYTEST_COUNT = re.compile(r"(\d+) (passed|failed|skipped|deselected|errors?|xfailed|xpassed)")


def parse_pytest_summary(text: str) -> dict:
    """Counts from pytest's final line, e.g. ``3 passed, 1 skipped, 2 deselected in 4.1s``."""
    counts = {"passed": 0, "failed": 0, "skipped": 0, "deselected": 0, "errors": 0}
    lines = [ln for ln in text.splitlines() if re.search(r"\d+ (passed|failed|skipped|deselected|error)", ln)]
    if not lines:
        return counts
    for n, word in _PYTEST_COUNT.findall(lines[-1]):
        key = "errors" if word.startswith("error") else word
        counts[key] = counts.get(key, 0) + int(n)
    return counts


def part_tests(backends: list[str], timeout: float = 140.0) -> dict:
    import importlib.util

    cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-rfEs", "-p", "no:cacheprovider",
           str(REPO_ROOT / "tests")]
    missing = [b for b in GAUSSIAN_CUDA + ("nvdiffrast",) if b not in backends]
    if missing:  # their tests would retry a failed build (minutes) or skip anyway
        cmd += ["-k", " and ".join(f"not {b}" for b in missing)]
    if importlib.util.find_spec("pytest_timeout") is not None:
        cmd += ["--timeout", "120"]
    start = time.perf_counter()
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT)
        output, rc = done.stdout + done.stderr, done.returncode
    except subprocess.TimeoutExpired as exc:  # run() collected what pytest printed so far
        parts = [exc.stdout, exc.stderr]
        output = "".join(p.decode(errors="replace") if isinstance(p, bytes) else (p or "")
                         for p in parts) + f"\n[pytest stopped after {timeout:.0f} s]"
        rc = None
    print(output)
    counts = parse_pytest_summary(output)
    return {"command": " ".join(cmd), "returncode": rc, "timed_out": rc is None, **counts,
            "seconds": round(time.perf_counter() - start, 1),
            "output_tail": "\n".join(output.splitlines()[-40:])}


def _gaussian_scene(n: int, opacity_range: tuple[float, float], seed: int, device):
    import torch

    g = torch.Generator().manual_seed(seed)
    means = (torch.rand(n, 3, generator=g) * 2 - 1) * 0.5
    quats = torch.randn(n, 4, generator=g)
    scales = 0.005 + torch.rand(n, 3, generator=g) * 0.04
    lo, hi = opacity_range
    opac = lo + (hi - lo) * torch.rand(n, generator=g)
    colors = torch.rand(n, 3, generator=g)
    return [t.to(device) for t in (means, quats, scales, opac, colors)]


PEAK_ALPHA = {"gsplat": 0.999, "inria": 0.99}  # alpha caps: gsplat's kernels, 3DGS (reference)


def _compare_gaussians(backend: str, opacity_range, device) -> dict:
    import torch

    from hash3d_dg.camera import Camera
    from hash3d_dg.gaussians import rasterize_gaussians

    scene = _gaussian_scene(3000, opacity_range, 11, device)
    cam = Camera.orbit(-20, 45, 2.0, 256)
    bg = torch.ones(3, device=device)
    outs, grads = {}, {}
    for be in (backend, "torch"):
        means = scene[0].clone().requires_grad_()
        o = rasterize_gaussians(means, *scene[1:], camera=cam, background=bg, backend=be)
        weights = torch.linspace(0, 1, 3, device=device)
        ((o.image * weights).sum() + o.alpha.sum()).backward()
        outs[be], grads[be] = o, o.means2d.grad
    a, b = outs[backend], outs["torch"]
    vis_a, vis_b = a.radii > 0, b.radii > 0
    both = vis_a & vis_b
    inside = both & (b.means2d[:, 0] > 0) & (b.means2d[:, 0] < cam.width) \
        & (b.means2d[:, 1] > 0) & (b.means2d[:, 1] < cam.height)
    ga, gb = grads[backend][both], grads["torch"][both]
    row = {}
    for name in ("image", "alpha", "depth"):
        diff = (getattr(a, name) - getattr(b, name)).detach().abs()
        row[f"{name}_max"], row[f"{name}_mean"] = float(diff.max()), float(diff.mean())
    row["means2d_max"] = float((a.means2d[inside] - b.means2d[inside]).detach().abs().max())
    row["grad_cos"] = float(torch.nn.functional.cosine_similarity(ga.flatten(), gb.flatten(), dim=0))
    row["grad_rel"] = float((ga - gb).norm() / gb.norm().clamp_min(1e-30))
    row["visible"], row["visible_torch"] = int(vis_a.sum()), int(vis_b.sum())
    row["visible_differ"] = int((vis_a ^ vis_b).sum())
    row["radii_equal"] = float((a.radii == b.radii).float().mean())
    # the alpha cap: one opaque Gaussian on a pixel centre peaks at the backend's cap
    one = [torch.zeros(1, 3), torch.tensor([[1.0, 0, 0, 0]]), torch.full((1, 3), 0.1),
           torch.ones(1), torch.tensor([[0.2, 0.4, 0.6]])]
    with torch.no_grad():
        peak = rasterize_gaussians(*(t.to(device) for t in one), camera=Camera.orbit(0, 0, 2.0, 33),
                                   background=torch.zeros(3, device=device), backend=backend)
    row["peak_alpha"] = float(peak.alpha.max())
    return row


def _compare_mesh(device) -> dict:
    import torch

    from hash3d_dg.bench.harness import standin_mesh
    from hash3d_dg.camera import Camera
    from hash3d_dg.mesh import rasterize_mesh

    mesh = standin_mesh(texture_size=256, subdivisions=4, device=device)
    g = torch.Generator().manual_seed(3)
    texture0 = torch.rand(256, 256, 3, generator=g).to(device)
    cam = Camera.orbit(-15, 30, 2.0, 256)
    outs, grads = {}, {}
    for be in ("nvdiffrast", "torch"):
        tex = texture0.clone().requires_grad_()
        o = rasterize_mesh(mesh, cam, torch.ones(3, device=device), backend=be, albedo=tex)
        o.rgb.sum().backward()
        outs[be], grads[be] = o, tex.grad
    a, b = outs["nvdiffrast"], outs["torch"]
    covered = (a.tri_id >= 0) | (b.tri_id >= 0)
    same = (a.tri_id == b.tri_id) & covered
    both = (a.tri_id >= 0) & (b.tri_id >= 0)
    # nvdiffrast snaps projected vertices to 1/16 pixel (mesh/rasterize_nvdiffrast.py): the torch
    # raster of the snapped mesh must cover the same pixels with the same triangles
    from hash3d_dg.mesh import Mesh
    from hash3d_dg.mesh.rasterize_nvdiffrast import snap_to_subpixels

    snapped = Mesh(v=snap_to_subpixels(mesh.v, cam), f=mesh.f, vn=mesh.vn, vt=mesh.vt,
                   ft=mesh.ft, albedo=mesh.albedo)
    with torch.no_grad():
        c = rasterize_mesh(snapped, cam, torch.ones(3, device=device), backend="torch",
                           albedo=texture0)
    covered_s = (a.tri_id >= 0) | (c.tri_id >= 0)
    return {"tri_agree": float(same.sum() / covered.sum().clamp_min(1)),
            "tri_agree_snapped": float(((a.tri_id == c.tri_id) & covered_s).sum()
                                       / covered_s.sum().clamp_min(1)),
            "rgb_max": float((a.rgb - b.rgb).detach().abs().max()),
            "rgb_mean": float((a.rgb - b.rgb).detach().abs().mean()),
            "depth_max": float((a.depth - b.depth)[both].abs().max()),
            "grad_cos": float(torch.nn.functional.cosine_similarity(
                grads["nvdiffrast"].flatten(), grads["torch"].flatten(), dim=0))}


_PROBE = """
import sys
from hash3d_dg.gaussians import resolve_gaussian_backend
assert resolve_gaussian_backend("torch", "cuda") == "torch"
try:
    resolve_gaussian_backend("inria", "cuda")
except ValueError:
    pass
print(sorted(m for m in sys.modules if m == "gsplat" or m.startswith("gsplat.")))
"""


def probe_isolation() -> dict:
    """Resolving ``torch`` or ``inria`` on CUDA must not import gsplat (whose op load may start
    its JIT build): checked in a fresh interpreter."""
    done = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True,
                          timeout=120, cwd=REPO_ROOT)
    loaded = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr[-300:]
    return {"ok": done.returncode == 0 and loaded == "[]", "gsplat_modules_loaded": loaded}


def part_compare(backends: list[str]) -> dict:
    import torch

    device = torch.device("cuda")
    result: dict = {"gaussian": {}, "mesh": {}, "checks": {}}
    result["probe_isolation"] = probe_isolation()
    result["checks"]["probe-isolation"] = result["probe_isolation"]["ok"]
    for backend in (b for b in GAUSSIAN_CUDA if b in backends):
        for label, rng in (("mid", (0.05, 0.95)), ("near1", (0.95, 1.0))):
            name = f"{backend}-{label}"
            try:
                row = _compare_gaussians(backend, rng, device)
            except Exception as exc:  # noqa: BLE001
                result["gaussian"][name] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
                result["checks"][name] = False
                continue
            result["gaussian"][name] = row
            result["checks"][name] = bool(
                row["image_mean"] < 2e-3 and row["image_max"] < 5e-2 and row["alpha_mean"] < 2e-3
                and row["grad_cos"] > 0.95 and abs(row["peak_alpha"] - PEAK_ALPHA[backend]) < 1e-4
                and row["visible_differ"] <= max(4, row["visible_torch"] // 200))
    if "nvdiffrast" in backends:
        try:
            row = _compare_mesh(device)
            result["mesh"]["nvdiffrast"] = row
            # the coverage check against the snapped torch raster (the unsnapped one differs on
            # ~1.2 % of pixels by design: sub-pixel snapping, see snap_to_subpixels)
            result["checks"]["mesh-nvdiffrast"] = bool(row["tri_agree_snapped"] > 0.995
                                                       and row["grad_cos"] > 0.95)
        except Exception as exc:  # noqa: BLE001
            result["mesh"]["nvdiffrast"] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
            result["checks"]["mesh-nvdiffrast"] = False
    return result


def _time_call(fn, device, repeats: int, warmup: int = 2) -> float:
    """Median milliseconds of ``fn()`` (synchronised)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


def count_host_syncs(fn) -> int | None:
    """Synchronising CUDA calls made by one ``fn()`` (torch's sync debug mode), None off CUDA."""
    import warnings

    import torch

    if not torch.cuda.is_available():
        return None
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    return sum(1 for w in caught if "synchroniz" in str(w.message).lower())


def part_timing(backends: list[str], device: str = "cuda", quick: bool = False) -> dict:
    import torch

    from hash3d_dg.bench.harness import standin_mesh
    from hash3d_dg.camera import Camera
    from hash3d_dg.gaussians import rasterize_gaussians
    from hash3d_dg.mesh import rasterize_mesh

    dev = torch.device(device)
    repeats = 3 if quick else 10
    result: dict = {"gaussian": {}, "mesh": {}, "repeats": repeats}
    cases = [(500, 64)] if quick else [(5000, 256), (20000, 512), (100000, 512)]
    for n, size in cases:
        case = f"{n}g@{size}"
        result["gaussian"][case] = {}
        scene = _gaussian_scene(n, (0.05, 0.95), 5, dev)
        cam = Camera.orbit(-10, 30, 2.0, size)
        bg = torch.ones(3, device=dev)
        for backend in ("torch", *(b for b in GAUSSIAN_CUDA if b in backends)):
            means = scene[0].clone().requires_grad_()

            def fwd():
                with torch.no_grad():
                    rasterize_gaussians(means, *scene[1:], camera=cam, background=bg, backend=backend)

            def fwd_bwd():
                o = rasterize_gaussians(means, *scene[1:], camera=cam, background=bg, backend=backend)
                (o.image.sum() + o.alpha.sum()).backward()

            try:
                result["gaussian"][case][backend] = {
                    "fwd_ms": round(_time_call(fwd, dev, repeats), 3),
                    "fwd_bwd_ms": round(_time_call(fwd_bwd, dev, repeats), 3),
                    "host_syncs": count_host_syncs(fwd_bwd)}
            except Exception as exc:  # noqa: BLE001
                result["gaussian"][case][backend] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
    mesh_cases = [(2, 64, False)] if quick else [(5, 512, False), (5, 512, True)]
    for subdiv, size, aa in mesh_cases:
        mesh = standin_mesh(texture_size=1024 if not quick else 64, subdivisions=subdiv, device=dev)
        case = f"{mesh.f.shape[0]}f@{size}" + ("-aa" if aa else "")
        result["mesh"][case] = {}
        cam = Camera.orbit(-10, 30, 2.0, size)
        bg = torch.ones(3, device=dev)
        tex = mesh.albedo.clone().requires_grad_()
        for backend in ("torch", "nvdiffrast"):
            if backend == "nvdiffrast" and "nvdiffrast" not in backends:
                continue

            def fwd():
                with torch.no_grad():
                    rasterize_mesh(mesh, cam, bg, backend=backend, albedo=tex, antialias=aa)

            def fwd_bwd():
                rasterize_mesh(mesh, cam, bg, backend=backend, albedo=tex, antialias=aa).rgb.sum().backward()

            try:
                result["mesh"][case][backend] = {
                    "fwd_ms": round(_time_call(fwd, dev, repeats), 3),
                    "fwd_bwd_ms": round(_time_call(fwd_bwd, dev, repeats), 3),
                    "host_syncs": count_host_syncs(fwd_bwd)}
            except Exception as exc:  # noqa: BLE001
                result["mesh"][case][backend] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
    result["peak_gpu_mem_gib"] = _peak_gib()
    return result


class PhaseTimers:
    """Adds up the seconds spent in the mesh phase's three steps of a real run.

    Wraps (and restores) ``extract_mesh`` and ``bake_texture`` as ``stages.meshing`` calls them
    and ``Mesh.unwrap_uv``; the functions themselves run unchanged. Synchronises CUDA around
    each call so the seconds are the step's own.
    """

    TARGETS = (("mesh", "hash3d_dg.stages.meshing", "extract_mesh"),
               ("uv", "hash3d_dg.mesh.mesh", "Mesh.unwrap_uv"),
               ("bake", "hash3d_dg.stages.meshing", "bake_texture"),
               ("stage1_wall", "hash3d_dg.pipeline", "run_stage1"),
               ("stage2_wall", "hash3d_dg.pipeline", "run_stage2"))

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.spans: dict[str, list[tuple[float, float]]] = {}  # phase -> (start, end) monotonic
        self._restore: list = []

    def _wrap(self, phase: str, fn):
        def timed(*args, **kwargs):
            import torch

            if torch.cuda.is_available():
                torch.cuda.synchronize()
            start = time.perf_counter()
            mono = time.monotonic()
            try:
                return fn(*args, **kwargs)
            finally:
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start
                self.spans.setdefault(phase, []).append((mono, time.monotonic()))
        return timed

    def __enter__(self) -> "PhaseTimers":
        import importlib

        for phase, module_name, attr in self.TARGETS:
            owner = importlib.import_module(module_name)
            *path, name = attr.split(".")
            for part in path:
                owner = getattr(owner, part)
            original = getattr(owner, name, None)
            if original is None:
                continue  # the code moved: that phase is reported as missing
            setattr(owner, name, self._wrap(phase, original))
            self._restore.append((owner, name, original))
        return self

    def __exit__(self, *exc) -> None:
        for owner, name, original in reversed(self._restore):
            setattr(owner, name, original)
        self._restore.clear()


class GpuBusy:
    """GPU utilisation (nvidia-smi, every 200 ms) while the context is open; ``by_phase``
    averages the samples inside each phase's spans (``PhaseTimers.spans``)."""

    def __init__(self, interval_ms: int = 200) -> None:
        self.interval_ms = interval_ms
        self.samples: list[tuple[float, float]] = []
        self._proc = None
        self._thread = None

    def __enter__(self) -> "GpuBusy":
        import threading

        try:
            self._proc = subprocess.Popen(
                ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                 f"-lms={self.interval_ms}", "-i", "0"], stdout=subprocess.PIPE, text=True,
                stderr=subprocess.DEVNULL)
        except OSError:
            return self

        def read():
            for line in self._proc.stdout:
                try:
                    self.samples.append((time.monotonic(), float(line.strip())))
                except ValueError:
                    pass
        self._thread = threading.Thread(target=read, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait()

    def by_phase(self, spans: dict) -> dict:
        out = {"run": round(sum(v for _, v in self.samples) / len(self.samples), 1)
               if self.samples else None}
        for phase, ranges in spans.items():
            vals = [v for t, v in self.samples if any(a <= t <= b for a, b in ranges)]
            out[phase.replace("_wall", "")] = round(sum(vals) / len(vals), 1) if vals else None
        return out


def part_graphs(checkpoint: str, dtype: str = "float16", repeats: int = 20) -> dict:
    """One classifier-free-guided UNet call (CFG batch 2, 32x32 latents) eager against replayed
    from its CUDA graph (``GraphedSplit``), full and shallow at each named cache point, CUDA
    events, median of ``repeats``; and the largest difference between the two."""
    import torch

    from hash3d_dg.guidance.unet_split import UNetSplit
    from hash3d_dg.cache.config import NAMED_CACHE_POINTS
    from hash3d_dg.guidance.graphed import GraphedSplit
    from hash3d_dg.guidance.loading import load_zero123

    dt = getattr(torch, dtype)
    comp = load_zero123(checkpoint, device=torch.device("cuda"), dtype=dt, family="stable")
    dim = comp.unet.config.cross_attention_dim
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(2, 8, 32, 32, generator=gen, device="cuda", dtype=dt)
    t = torch.full((2,), 500, device="cuda", dtype=torch.long)
    ctx = torch.randn(2, 1, dim, generator=gen, device="cuda", dtype=dt)

    def median_ms(fn) -> float:
        with torch.no_grad():
            for _ in range(3):
                fn()
            times = []
            for _ in range(repeats):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                b.synchronize()
                times.append(a.elapsed_time(b))
        return round(sorted(times)[len(times) // 2], 3)

    rows = {}
    for point in NAMED_CACHE_POINTS:
        split = UNetSplit(comp.unet, point)
        graphed = GraphedSplit(split)
        with torch.no_grad():
            ref, feat = split.full(x, t, ctx)
            out, gfeat = graphed.full(x, t, ctx)
            sh = graphed.shallow(x, t, ctx, feat)
        rows[point] = {
            "full_eager_ms": median_ms(lambda: split.full(x, t, ctx)),
            "full_graph_ms": median_ms(lambda: graphed.full(x, t, ctx)),
            "shallow_eager_ms": median_ms(lambda: split.shallow(x, t, ctx, feat)),
            "shallow_graph_ms": median_ms(lambda: graphed.shallow(x, t, ctx, feat)),
            "full_max_abs_diff": float((out.float() - ref.float()).abs().max()),
            "feature_max_abs_diff": float((gfeat.float() - feat.float()).abs().max()),
            "shallow_max_abs_diff": float((sh.float() - ref.float()).abs().max()),
            "capture_s": graphed.stats()["capture_seconds"]}
    return {"dtype": dtype, "repeats": repeats, "points": rows,
            "sds_step": _sds_step_graph_vs_eager(comp, median_ms), "peak_gpu_mem_gib": _peak_gib()}


def _sds_step_graph_vs_eager(comp, median_ms) -> dict:
    """Stage 1's whole SDS step after the encode (``sds_x``: conditioning, forward process, UNet,
    CFG, gradient, loss) eager against the fused graph (``step_graph.SDSStepGraph``), no table;
    the same timestep and noise for both, so the gradients should agree to fp16 rounding."""
    import torch

    from hash3d_dg.guidance import Zero123Guidance
    from hash3d_dg.guidance.acceleration import attach_graphs

    g = Zero123Guidance(comp, image_size=256, seed=0)
    gen = torch.Generator(device="cuda").manual_seed(1)
    g.set_reference(torch.rand(1, 3, 256, 256, generator=gen, device="cuda"), 0.0)
    latents = torch.randn(1, 4, 32, 32, generator=gen, device="cuda", dtype=g.dtype)
    noise = torch.randn(1, 4, 32, 32, generator=gen, device="cuda")

    def step():
        with torch.enable_grad():  # median_ms times under no_grad
            x = latents.clone().float().requires_grad_()
            g.sds_x(x, [10.0], [30.0], [0.0], step_ratio=0.5, noise=noise).backward()
        return x.grad

    eager_grad = step()
    eager_ms = median_ms(step)
    attach_graphs(g, capture=True)
    graph_grad = step()
    scale = float(eager_grad.abs().max()) or 1.0
    return {"eager_ms": eager_ms, "graph_ms": median_ms(step),
            "grad_max_rel_diff": float((graph_grad - eager_grad).abs().max()) / scale,
            "capture_s": g.sds_step.stats()["capture_seconds"]}


def part_launches() -> dict:
    """``bench launches`` (CPU, the accelerator's code path): kernels, syncs and uploads per
    steady-state iteration of each stage and mode, graphs on and off; the mesh phase's totals."""
    from hash3d_dg.bench.launches import launches_report

    def brief(result):
        return {mode: {stage: {k: v for k, v in row.items()
                               if k.endswith("_per_iter") or k.startswith("max_")}
                       for stage, row in per.items()}
                for mode, per in result["modes"].items()}
    graphs = launches_report(("off", "paper", "fast"))
    mesh = {k: graphs["mesh"][k] for k in ("kernels", "syncs", "uploads", "sync_sites")}
    return {"graphs": brief(graphs), "mesh": mesh,
            "eager": brief(launches_report(("off",), ("stage1", "stage2"), graphs=False))}


def part_concurrency(checkpoint: str, workers: int, out: Path, backends: list[str],
                     extra: list[str] | None = None, dtype: str = "float16") -> dict:
    """``workers`` end-to-end runs (mode off, product iterations) at once on one GPU, as Ray
    puts them with ``--ray-gpus-per-worker 1/workers``: wall seconds and images per minute."""
    env = dict(os.environ)
    procs = []
    start = time.monotonic()
    for i in range(workers):
        cmd = [sys.executable, "-m", "hash3d_dg.bench.gpu_parts", "--part", "e2e", "--mode", "off",
               "--checkpoint", checkpoint, "--out", str(out / "concurrency" / f"w{i}"),
               "--iters", "0", "--iters-refine", "0", "--decimate-target", "0", "--dtype", dtype,
               "--backends", *backends, "--set", *(extra or [])]
        log = open(out / "logs" / f"concurrency-w{i}.log", "w")
        procs.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), log))
    codes = []
    for proc, log in procs:
        codes.append(proc.wait())
        log.close()
    wall = time.monotonic() - start
    runs = [_read_part(out / "concurrency" / f"w{i}", "e2e-off") for i in range(workers)]
    return {"workers": workers, "wall_s": round(wall, 1), "returncodes": codes,
            "images_per_min": round(60.0 * workers / wall, 2),
            "per_run_total_s": [r.get("total_s") for r in runs]}


def _read_part(out: Path, name: str) -> dict:
    path = out / "parts" / f"{name}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def build_config_ok(overrides: list[str], mode: str) -> bool:
    """Whether the same overrides with ``hash3d.mode=off`` are valid (so a failure with ``mode``
    is the mode's own)."""
    from hash3d_dg.config import build_config
    from hash3d_dg.errors import ConfigError

    try:
        build_config(overrides=[o if o != f"hash3d.mode={mode}" else "hash3d.mode=off"
                                for o in overrides])
    except ConfigError:
        return False
    return True


def part_checkpoint_text(path: str, arch: str = "full") -> dict:
    """The random full-size Stable Diffusion 2.1 checkpoint of the text end-to-end runs."""
    import torch

    from hash3d_dg.bench.gpu_checkpoint import write_random_sd_checkpoint

    start = time.perf_counter()
    root = write_random_sd_checkpoint(path, arch=arch, device="cuda" if torch.cuda.is_available() else "cpu")
    size = sum(f.stat().st_size for f in Path(root).rglob("*") if f.is_file())
    return {"path": str(root), "arch": arch, "gib": round(size / 2**30, 2),
            "seconds": round(time.perf_counter() - start, 1)}


def part_e2e(mode: str, checkpoint: str, out: Path, iters: int, iters_refine: int,
             decimate_target: int, backends: list[str], device: str = "cuda",
             extra: list[str] | None = None, dtype: str = "float16", task: str = "image",
             prompt: str = "a ceramic mug with a blue glaze") -> dict:
    """One end-to-end run of the product in ``mode`` (fp16 on CUDA); ``task="text"``: a prompt
    through configs/text.yaml with a Stable Diffusion checkpoint."""
    import math

    start = time.perf_counter()
    import torch  # the imports a run pays before anything else (part of the load time)

    import hash3d_dg.pipeline  # noqa: F401
    IMPORT_SECONDS = time.perf_counter() - start

    from hash3d_dg.output.atomic import save_image_atomic
    from hash3d_dg.config import build_config
    from hash3d_dg.errors import ConfigError
    from hash3d_dg.pipeline import RunContext, run_image
    from hash3d_dg.eval.samples import render_sample

    import importlib.util

    on_cuda = torch.device(device).type == "cuda"
    overrides = [f"device={device}", f"guidance.model={checkpoint}", f"hash3d.mode={mode}",
                 f"guidance.dtype={dtype if on_cuda else 'float32'}",
                 *([f"stage1.iters={iters}"] if iters else []),
                 *([f"stage2.iters={iters_refine}"] if iters_refine else []),
                 *([f"mesh.decimate_target={decimate_target}"] if decimate_target else []),
                 "output.save_video=false",
                 f"stage1.backend={'gsplat' if 'gsplat' in backends else 'torch'}",
                 f"stage2.backend={'nvdiffrast' if 'nvdiffrast' in backends else 'torch'}"]
    if importlib.util.find_spec("pymeshlab") is None:
        overrides.append("mesh.clean=basic")  # pymeshlab's wheel is too big to carry
    taesd = taesd_dir(checkpoint)
    if (taesd / "config.json").is_file():
        overrides.append(f"guidance.tiny_vae={taesd}")  # fast's autoencoder, random full-size
    overrides += list(extra or [])
    try:
        if task == "text":
            from hash3d_dg.config import load_config

            cfg = load_config("text.yaml", overrides)
        else:
            cfg = build_config(overrides=overrides)
    except ConfigError as exc:
        if not build_config_ok(overrides, mode):  # the failure is not the mode's own
            raise
        return {"skipped": True, "reason": f"hash3d mode {mode!r} is not offered by this "
                                           f"version: {str(exc).splitlines()[0]}"}
    scratch = scratch_dir()
    image = REPO_ROOT / "data" / "ball.png"  # the product's own sample (RGBA)
    if not image.is_file():
        image = save_image_atomic(scratch / "input" / "ball.png", render_sample("ball", 256))
    load = {"imports": round(IMPORT_SECONDS, 2)} if IMPORT_SECONDS is not None else {}
    start = time.perf_counter()
    if on_cuda:
        torch.cuda.init()
        torch.zeros(1, device=device).sum().item()  # the context and the first kernel
        torch.cuda.reset_peak_memory_stats()
        load["cuda_start"] = round(time.perf_counter() - start, 2)
    start = time.perf_counter()
    ctx = RunContext.create(cfg, progress=False)
    guidance = ctx.guidance()  # load the model outside the stage timings
    if on_cuda:
        torch.cuda.synchronize()
    load_s = time.perf_counter() - start
    load["weights"] = round(load_s, 2)
    busy = GpuBusy() if on_cuda else None
    with PhaseTimers() as timers, (busy or contextlib.nullcontext()):
        if task == "text":
            from hash3d_dg.prompts import TextPrompt

            report = run_image(TextPrompt(prompt), ctx, output_root=scratch / "e2e", name=f"text_{mode}")
        else:
            report = run_image(image, ctx, output_root=scratch / "e2e", name=f"ball_{mode}")
    graphs = getattr(getattr(guidance, "denoiser", None), "model", None)
    graph_stats = graphs.stats() if hasattr(graphs, "stats") else None
    if graph_stats:
        load["graph_capture"] = graph_stats["capture_seconds"]
    s1, s2 = report.get("stage1", {}), report.get("stage2", {})
    phases = {"load_model": round(load_s, 2), "stage1": s1.get("seconds"),
              **{k: round(v, 2) for k, v in timers.seconds.items()},
              "mesh_total": report.get("mesh", {}).get("seconds"),
              "stage2": s2.get("seconds"), "export": report.get("export", {}).get("seconds")}
    losses = [s1.get("final_loss"), s2.get("final_loss")]
    finite = all(isinstance(x, (int, float)) and math.isfinite(x) for x in losses if x is not None)
    unet = report.get("unet_total", {})
    return {"mode": mode, "task": task, **({"prompt": prompt} if task == "text" else {}),
            "overrides": overrides, "phases_s": phases,
            "total_s": report.get("total_seconds"),
            "stage1_it_per_s": round(iters / s1["seconds"], 2) if s1.get("seconds") else None,
            "stage2_it_per_s": round(iters_refine / s2["seconds"], 2) if s2.get("seconds") else None,
            "stage1_hits": (s1.get("unet") or {}).get("shallow_calls", 0),
            "unet_total": unet, "final_losses": losses, "finite": finite,
            "backends": report.get("backends"), "dtype": report.get("dtype"),
            "mesh": {k: report.get("mesh", {}).get(k) for k in ("vertices", "faces")},
            "peak_gpu_mem_gib": _peak_gib(), "load_s": load, "cuda_graphs": graph_stats,
            "gpu_busy_pct": busy.by_phase(timers.spans) if busy else None,
            "outputs": sorted(Path(p).name for p in report.get("outputs", {}).values())}


def _part_main(args) -> int:
    out = Path(args.out).resolve()
    (out / "logs").mkdir(parents=True, exist_ok=True)
    name = args.part if args.part not in ("build", "e2e") else (
        f"build-{args.backend}" if args.part == "build"
        else f"e2e-text-{args.mode}" if args.task == "text" else f"e2e-{args.mode}")
    start = time.perf_counter()
    try:
        if args.part == "build":
            data = part_build(args.backend)
        elif args.part == "checkpoint":
            data = part_checkpoint(args.checkpoint)
        elif args.part == "checkpoint-text":
            data = part_checkpoint_text(args.checkpoint, args.arch)
        elif args.part == "tests":
            data = part_tests(args.backends, timeout=args.timeout_s)
        elif args.part == "compare":
            data = part_compare(args.backends)
        elif args.part == "timing":
            data = part_timing(args.backends, device=args.device, quick=args.quick)
        elif args.part == "graphs":
            data = part_graphs(args.checkpoint, dtype=args.dtype)
        elif args.part == "launches":
            data = part_launches()
        elif args.part == "concurrency":
            data = part_concurrency(args.checkpoint, args.workers, out, args.backends,
                                    extra=args.set, dtype=args.dtype)
        else:
            data = part_e2e(args.mode, args.checkpoint, out, args.iters, args.iters_refine,
                            args.decimate_target, args.backends, device=args.device,
                            extra=args.set, dtype=args.dtype, task=args.task)
    except Exception as exc:  # noqa: BLE001 - recorded, and the process fails
        import traceback

        traceback.print_exc()
        _write_part(out, name, {"error": f"{type(exc).__name__}: {exc}"[:500],
                                "seconds": round(time.perf_counter() - start, 1)})
        return 1
    data.setdefault("seconds", round(time.perf_counter() - start, 1))
    _write_part(out, name, data)
    print(json.dumps(data, indent=2, default=str))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of one part; the whole benchmark is ``python -m hash3d_dg.bench gpu``."""
    p = argparse.ArgumentParser(prog="python -m hash3d_dg.bench.gpu_parts",
                                description="one part of `python -m hash3d_dg.bench gpu`")
    p.add_argument("--part", required=True,
                   choices=["build", "checkpoint", "checkpoint-text", "tests", "compare", "timing", "e2e",
                            "graphs", "launches", "concurrency"])
    p.add_argument("--workers", type=int, default=2, help="concurrency: runs at once")
    p.add_argument("--out", required=True)
    p.add_argument("--backend", choices=["gsplat", "inria", "nvdiffrast"])
    p.add_argument("--backends", nargs="*", default=[])
    p.add_argument("--checkpoint")
    p.add_argument("--timeout-s", type=float, default=140.0, help="tests: pytest's time limit")
    p.add_argument("--mode", default="off")
    p.add_argument("--iters", type=int, default=0, help="e2e: stage-1 iterations (0: the product's)")
    p.add_argument("--iters-refine", type=int, default=0, help="e2e: stage-2 iterations (0: the product's)")
    p.add_argument("--decimate-target", type=int, default=0, help="e2e: mesh.decimate_target (0: the product's)")
    p.add_argument("--dtype", default="float16", help="e2e: guidance.dtype on CUDA")
    p.add_argument("--device", default="cuda", help="timing / e2e only: cpu runs them small")
    p.add_argument("--quick", action="store_true", help="timing: one small case")
    p.add_argument("--set", nargs="*", default=[], help="e2e: extra config overrides key=value")
    p.add_argument("--task", default="image", choices=["image", "text"],
                   help="e2e: image (ball.png, Zero-1-to-3) or text (a prompt, Stable Diffusion)")
    p.add_argument("--arch", default="full", choices=["full", "tiny"], help="checkpoint-text: sizes")
    args = p.parse_args(argv)
    return _part_main(args)


if __name__ == "__main__":
    sys.exit(main())
