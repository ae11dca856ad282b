"""One entry point for rendering Gaussians, whatever rasterizer is available.

Backends:
* ``torch``: pure PyTorch, any device (``rasterize_torch``), the reference on CPU.
* ``gsplat``: gsplat's CUDA kernels (CUDA devices only; its op is JIT-built on first use).
* ``inria``: the 3DGS ``diff_gaussian_rasterization`` extension (CUDA only, when installed).
* ``auto``: ``gsplat`` on a CUDA device when gsplat imports and its CUDA op loads, else ``torch``.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
import sys

import torch
from torch import Tensor

from hash3d_dg.gaussians.rasterize_torch import rasterize_torch
from hash3d_dg.gaussians.render_result import GaussianRender

BACKENDS = ("torch", "gsplat", "inria")

log = logging.getLogger(__name__)


def gsplat_op_path() -> str | None:
    """Where gsplat's JIT build puts its CUDA op (``torch_extensions/<py>_<cu>/gsplat_cuda/
    gsplat_cuda.so``, as ``torch.utils.cpp_extension`` names it), whether built or not; None
    without a CUDA build of torch. Nothing is created."""
    if torch.version.cuda is None:
        return None
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root is None:
        from torch.utils.cpp_extension import get_default_build_root

        py = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}"
        root = os.path.join(get_default_build_root(), f"{py}_cu{torch.version.cuda.replace('.', '')}")
    return os.path.join(root, "gsplat_cuda", "gsplat_cuda.so")


def gsplat_op_state() -> str:
    """``prebuilt`` (a wheel with ``gsplat.csrc``), ``built`` (the JIT build exists) or
    ``not built`` (the first use compiles it: a minute or two)."""
    if importlib.util.find_spec("gsplat.csrc") is not None:
        return "prebuilt"
    path = gsplat_op_path()
    return "built" if path is not None and os.path.exists(path) else "not built"


def _load_built_gsplat_op() -> None:
    """Load gsplat's JIT-built op directly as ``gsplat.csrc`` before gsplat's backend imports:
    gsplat would otherwise re-hash every source file of the build at each start (seconds)."""
    if "gsplat.csrc" in sys.modules or "gsplat.cuda._backend" in sys.modules:
        return
    if gsplat_op_state() != "built":
        return
    try:
        spec = importlib.util.spec_from_file_location("gsplat_cuda", gsplat_op_path())
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules["gsplat.csrc"] = module
    except Exception as exc:  # noqa: BLE001 - gsplat's own loader decides then
        log.debug("gsplat's built op did not load directly (%s); gsplat's loader will", exc)


@functools.lru_cache(maxsize=None)
def _gsplat_status() -> bool | str:
    """True when gsplat's CUDA op loads; otherwise the reason (string). Only probed with CUDA."""
    if importlib.util.find_spec("gsplat") is None:
        return "gsplat is not installed"
    if not torch.cuda.is_available():
        return "needs CUDA"
    _load_built_gsplat_op()
    if gsplat_op_state() == "not built":
        log.warning("gsplat's CUDA op is not built yet: compiling it now takes a minute or two "
                    "(once per machine)")
    try:
        from gsplat.cuda._backend import _C  # may JIT-compile the op (minutes, first time)
    except Exception as exc:  # noqa: BLE001 - any failure means unusable
        return f"gsplat CUDA op failed to load: {type(exc).__name__}: {exc}".splitlines()[0]
    if _C is None:
        return "gsplat CUDA op unavailable (no CUDA toolkit to build it)"
    return True


@functools.lru_cache(maxsize=None)
def _inria_status() -> bool | str:
    if importlib.util.find_spec("diff_gaussian_rasterization") is None:
        return "diff_gaussian_rasterization is not installed"
    if not torch.cuda.is_available():
        return "needs CUDA"
    try:
        import diff_gaussian_rasterization  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        return f"diff_gaussian_rasterization failed to import: {type(exc).__name__}: {exc}" \
            .splitlines()[0]
    return True


_MODULES = {"gsplat": "gsplat", "inria": "diff_gaussian_rasterization"}
_PROBES = {"gsplat": _gsplat_status, "inria": _inria_status}


def gaussian_backend_status(name: str, device: torch.device | str = "cpu",
                            probe_cuda: bool = True) -> bool | str:
    """Whether the one backend ``name`` can render on ``device``: True, or a one-line reason.

    Only that backend is looked at: asking about ``inria`` never imports gsplat (whose op load
    can trigger a multi-minute JIT build). With ``probe_cuda`` False a CUDA backend is only
    checked for being installed.
    """
    if name == "torch":
        return True
    if name not in _MODULES:
        raise ValueError(f"unknown Gaussian rasterizer backend {name!r}; "
                         f"choose one of auto, {', '.join(BACKENDS)}")
    module = _MODULES[name]
    installed = importlib.util.find_spec(module) is not None
    if torch.device(device).type != "cuda":
        return "needs a CUDA device" if installed else f"{module} is not installed"
    if not probe_cuda:
        return installed or f"{module} is not installed"
    return _PROBES[name]()


def available_gaussian_backends(device: torch.device | str = "cpu",
                                probe_cuda: bool = True) -> dict[str, bool | str]:
    """Which backends can render on ``device``: True, or a one-line reason why not.

    With ``probe_cuda`` False the CUDA backends are only checked for being installed (no
    import of gsplat's op, which can trigger a JIT build).
    """
    return {name: gaussian_backend_status(name, device, probe_cuda) for name in BACKENDS}


@functools.lru_cache(maxsize=None)
def _warn_torch_fallback(reason: str) -> None:
    """One line per reason and process: a CUDA run on the torch rasteriser is ~70x slower."""
    log.warning("CUDA run on the torch Gaussian rasteriser (%s): each render is ~70x slower than "
                "gsplat's (pip install gsplat, with nvcc to build its op)", reason)


def resolve_gaussian_backend(name: str, device: torch.device | str) -> str:
    """Map a requested backend (``auto``, ``torch``, ``gsplat``, ``inria``) to a usable one.

    ``auto`` picks ``gsplat`` on CUDA when usable, else ``torch``. An explicit backend that is
    not usable raises ``ValueError`` with one line saying why; only that backend is probed.
    """
    device = torch.device(device)
    if name == "auto":
        if device.type != "cuda":
            return "torch"
        status = gaussian_backend_status("gsplat", device)
        if status is True:
            return "gsplat"
        _warn_torch_fallback(str(status))
        return "torch"
    status = gaussian_backend_status(name, device)  # raises for an unknown name
    if status is not True:
        raise ValueError(f"Gaussian rasterizer backend {name!r} is unavailable on {device}: "
                         f"{status}")
    return name


def rasterize_gaussians(means: Tensor, quats: Tensor, scales: Tensor, opacities: Tensor,
                        colors: Tensor, camera, background: Tensor, backend: str = "auto",
                        tile_size: int | None = None) -> GaussianRender:
    """Render 3D Gaussians from ``camera`` (``hash3d_dg.camera.Camera``).

    Args:
        means: [N, 3] world positions.
        quats: [N, 4] rotations (w, x, y, z), normalised or not.
        scales: [N, 3] activated standard deviations.
        opacities: [N] activated opacities in [0, 1].
        colors: [N, 3] RGB.
        camera: provides ``viewmat()`` (OpenCV world-to-camera), ``K()``, ``width``,
            ``height``, ``near``, ``far``.
        background: [3] RGB added with the final transmittance.
        backend: ``auto``, ``torch``, ``gsplat`` or ``inria``.
        tile_size: tile edge in pixels (None: 8 for torch, which measured fastest on CPU across
            footprint sizes; 16 for gsplat). The torch result does not depend on it.

    Returns:
        GaussianRender with HWC image/alpha/depth, per-Gaussian radii and means2d
        (pixel centres at +0.5; ``means2d.grad`` after backward is the pixel-space gradient).
    """
    device, dtype = means.device, means.dtype
    chosen = resolve_gaussian_backend(backend, device)
    viewmat, K = camera.viewmat_and_K(device=device, dtype=dtype)  # one upload
    background = background.to(device=device, dtype=dtype)
    width, height = int(camera.width), int(camera.height)
    near, far = float(camera.near), float(camera.far)
    if chosen == "torch":
        return rasterize_torch(means, quats, scales, opacities, colors, viewmat, K, width,
                               height, background, near=near, far=far,
                               tile_size=tile_size or 8)
    from hash3d_dg.gaussians import rasterize_cuda

    if chosen == "gsplat":
        return rasterize_cuda.rasterize_gsplat(means, quats, scales, opacities, colors, viewmat,
                                               K, width, height, background, near=near,
                                               far=far, tile_size=tile_size or 16)
    return rasterize_cuda.rasterize_inria(means, quats, scales, opacities, colors, viewmat, K,
                                          width, height, background, near=near, far=far)
