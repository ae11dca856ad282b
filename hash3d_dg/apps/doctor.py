"""What this machine can use: ``python -m hash3d_dg.apps.doctor [--json]``.

One line per item: Python, torch and CUDA, each Gaussian and mesh rasterizer backend, the CUDA
simple-knn, the default Zero-1-to-3 model in the local Hugging Face cache, ffmpeg, node, rembg and
onnxruntime. Nothing touches the network, and rembg is never imported (its import is slow): it is
only looked up. Every check is guarded, so the command always finishes and exits 0.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import importlib.util
import json
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

Check = tuple[str, bool, str]  # (name, ok, detail)

DEFAULT_MODEL = "ashawkey/stable-zero123-diffusers"
MODEL_FILES = ("model_index.json", "unet/diffusion_pytorch_model.safetensors")


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _import_error(error: BaseException) -> str:
    first_line = (str(error).strip().splitlines() or [""])[0]
    return f"{type(error).__name__}: {first_line}"[:200]


def _cuda_available() -> bool:
    try:
        import torch  # noqa: PLC0415

        return bool(torch.cuda.is_available())
    except Exception:  # noqa: BLE001 - the doctor reports, never fails
        return False


def check_nvcc() -> list[Check]:
    """The CUDA compiler: gsplat builds its op with it on first use (and nvdiffrast, simple-knn)."""
    import os  # noqa: PLC0415

    path = shutil.which("nvcc")
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if path is None and home and os.path.isfile(os.path.join(home, "bin", "nvcc")):
        path = os.path.join(home, "bin", "nvcc")
    if path is None and os.path.isfile("/usr/local/cuda/bin/nvcc"):
        path = "/usr/local/cuda/bin/nvcc"
    if path is None:
        return [("nvcc", False, "not found: gsplat cannot build its CUDA op (install the CUDA toolkit, "
                                "or set CUDA_HOME)")]
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=20).stdout
        release = next((line.strip() for line in out.splitlines() if "release" in line), "version unknown")
    except (OSError, subprocess.SubprocessError) as error:
        release = f"not runnable ({_import_error(error)})"
    return [("nvcc", True, f"{path}: {release}")]


def check_python() -> list[Check]:
    return [("python", True, f"{sys.version.split()[0]} ({sys.executable})")]


def check_torch() -> list[Check]:
    try:
        import torch  # noqa: PLC0415
    except Exception as error:  # noqa: BLE001
        return [("torch", False, f"not importable ({_import_error(error)}): pip install torch")]
    checks: list[Check] = [("torch", True, f"{torch.__version__} (CUDA build: {torch.version.cuda or 'none'})")]
    if torch.cuda.is_available():
        index = torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        name = torch.cuda.get_device_name(index)
        checks.append(("cuda", True, f"{name}, compute capability {major}.{minor}, {torch.cuda.device_count()} device(s)"))
    else:
        checks.append(("cuda", False, "not available: the CPU (pure-PyTorch) backends will be used"))
    return checks


def check_gaussian_backends(cuda: bool) -> list[Check]:
    checks: list[Check] = [("gaussian rasterizer: torch", True, "pure PyTorch, always available (CPU or GPU)")]
    if importlib.util.find_spec("gsplat") is None:
        checks.append(("gaussian rasterizer: gsplat", False, "not installed (pip install gsplat; needs CUDA)"))
    else:
        try:
            import gsplat  # noqa: PLC0415

            version = getattr(gsplat, "__version__", None) or _version("gsplat") or "?"
            if cuda:
                from hash3d_dg.gaussians.backends import gsplat_op_path, gsplat_op_state  # noqa: PLC0415

                state = gsplat_op_state()
                detail = {"prebuilt": "its CUDA op comes prebuilt",
                          "built": f"its CUDA op is built ({gsplat_op_path()})",
                          "not built": "its CUDA op is not built: the first run compiles it "
                                       "(a minute or two, needs nvcc)"}[state]
                checks.append(("gaussian rasterizer: gsplat", True, f"{version}, CUDA available, {detail}"))
            else:
                checks.append(("gaussian rasterizer: gsplat", False, f"{version} importable, but needs CUDA (not available)"))
        except Exception as error:  # noqa: BLE001
            checks.append(("gaussian rasterizer: gsplat", False, f"installed but not importable ({_import_error(error)})"))
    checks.append(_import_check("gaussian rasterizer: diff_gaussian_rasterization", "diff_gaussian_rasterization", cuda))
    return checks


def _import_check(name: str, module: str, cuda: bool, attribute: str | None = None) -> Check:
    """Import ``module`` (and optionally get ``attribute``); CUDA extensions also need CUDA."""
    top = module.split(".")[0]
    if importlib.util.find_spec(top) is None:
        return (name, False, "not installed (CUDA extension: build it from source on a CUDA machine)")
    try:
        imported = importlib.import_module(module)
        if attribute is not None:
            getattr(imported, attribute)
    except Exception as error:  # noqa: BLE001
        return (name, False, f"installed but not importable ({_import_error(error)})")
    if not cuda:
        return (name, False, "importable, but needs CUDA (not available)")
    return (name, True, "importable, CUDA available")


def check_mesh_backends(cuda: bool) -> list[Check]:
    return [
        ("mesh rasterizer: torch", True, "pure PyTorch, always available (CPU or GPU)"),
        _import_check("mesh rasterizer: nvdiffrast", "nvdiffrast.torch", cuda),
    ]


def check_simple_knn(cuda: bool) -> list[Check]:
    name = "simple_knn (CUDA distCUDA2)"
    if importlib.util.find_spec("simple_knn") is None:
        return [(name, False, "not installed (optional; the CPU nearest-neighbour code is used)")]
    try:
        from simple_knn._C import distCUDA2  # noqa: F401, PLC0415
    except Exception as error:  # noqa: BLE001
        return [
            (
                name,
                False,
                f"a 'simple_knn' is installed but has no CUDA distCUDA2 ({_import_error(error)}); "
                "the PyPI package named simple-knn is unrelated: uninstall it",
            )
        ]
    if not cuda:
        return [(name, False, "importable, but needs CUDA (not available)")]
    return [(name, True, "importable, CUDA available")]


def check_model(repo_id: str = DEFAULT_MODEL, cache_dir: str | None = None) -> list[Check]:
    """Is ``repo_id`` (its model_index.json and UNet weights) in the local Hugging Face cache?

    Looks only at the cache (``cache_dir``, default the hub cache); never uses the network.
    """
    name = f"model {repo_id}"
    try:
        from huggingface_hub import constants, try_to_load_from_cache  # noqa: PLC0415
    except Exception as error:  # noqa: BLE001
        return [(name, False, f"huggingface_hub not importable ({_import_error(error)})")]
    found = {filename: try_to_load_from_cache(repo_id, filename, cache_dir=cache_dir) for filename in MODEL_FILES}
    missing = [filename for filename, where in found.items() if not isinstance(where, str)]
    if not missing:
        snapshot = Path(str(found["model_index.json"])).parent
        return [(name, True, f"in the local Hugging Face cache ({snapshot})")]
    return [
        (
            name,
            False,
            f"not in the local Hugging Face cache ({cache_dir or constants.HF_HUB_CACHE}; missing {', '.join(missing)}): "
            f"run `hf download {repo_id}` or pass a local model folder",
        )
    ]


def check_ffmpeg() -> list[Check]:
    try:
        import imageio_ffmpeg  # noqa: PLC0415

        return [("ffmpeg", True, imageio_ffmpeg.get_ffmpeg_exe())]
    except Exception as error:  # noqa: BLE001
        return [("ffmpeg", False, f"not available ({_import_error(error)}): pip install imageio-ffmpeg (videos are skipped)")]


def check_node() -> list[Check]:
    node = shutil.which("node")
    if node is None:
        return [("node", False, "not on PATH (optional)")]
    try:
        result = subprocess.run([node, "--version"], capture_output=True, text=True, timeout=10, check=False)
        version = result.stdout.strip() or result.stderr.strip() or f"exit status {result.returncode}"
    except (OSError, subprocess.SubprocessError) as error:
        return [("node", False, f"{node} does not run ({_import_error(error)})")]
    return [("node", result.returncode == 0, f"{version} ({node})")]


def check_rembg() -> list[Check]:
    checks: list[Check] = []
    onnx = importlib.util.find_spec("onnxruntime") is not None
    if importlib.util.find_spec("rembg") is None:
        checks.append(("rembg", False, "not installed: images without alpha need --matting border (pip install 'rembg[cpu]')"))
    elif not onnx:
        checks.append(("rembg", False, f"{_version('rembg') or '?'} installed, but onnxruntime is missing (pip install 'rembg[cpu]')"))
    else:
        checks.append(("rembg", True, f"{_version('rembg') or '?'} installed (not imported here; downloads its model on first use)"))
    if onnx:
        version = _version("onnxruntime") or _version("onnxruntime-gpu") or "?"
        checks.append(("onnxruntime", True, version))
    else:
        checks.append(("onnxruntime", False, "not installed"))
    return checks


def check_packages() -> list[Check]:
    checks: list[Check] = []
    for distribution in ("diffusers", "transformers", "trimesh", "xatlas"):
        version = _version(distribution)
        checks.append((distribution, version is not None, version or "not installed"))
    return checks


def _guarded(function: Callable[[], list[Check]], name: str) -> list[Check]:
    try:
        return function()
    except Exception as error:  # noqa: BLE001 - the doctor reports, never fails
        return [(name, False, f"check failed ({_import_error(error)})")]


def collect() -> list[Check]:
    """Run every check; returns ``(name, ok, detail)`` per item, in display order."""
    checks: list[Check] = []
    checks += _guarded(check_python, "python")
    checks += _guarded(check_torch, "torch")
    cuda = _cuda_available()
    checks += _guarded(check_nvcc, "nvcc")
    checks += _guarded(lambda: check_gaussian_backends(cuda), "gaussian rasterizers")
    checks += _guarded(lambda: check_mesh_backends(cuda), "mesh rasterizers")
    checks += _guarded(lambda: check_simple_knn(cuda), "simple_knn")
    checks += _guarded(check_model, f"model {DEFAULT_MODEL}")
    checks += _guarded(check_packages, "packages")
    checks += _guarded(check_ffmpeg, "ffmpeg")
    checks += _guarded(check_node, "node")
    checks += _guarded(check_rembg, "rembg")
    return checks


def main(argv: Sequence[str] | None = None) -> int:
    """Print the checks (``--json``: as a JSON list of {name, ok, detail}); exit status 0."""
    parser = argparse.ArgumentParser(prog="python -m hash3d_dg.apps.doctor", description="What this machine can use.")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text lines")
    args = parser.parse_args(argv)
    checks = collect()
    if args.json:
        print(json.dumps([{"name": name, "ok": ok, "detail": detail} for name, ok, detail in checks], indent=2))
    else:
        width = max(len(name) for name, _, _ in checks)
        for name, ok, detail in checks:
            print(f"{'ok' if ok else '--'}  {name:<{width}}  {detail}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
