"""Hash3D: a model-agnostic feature cache keyed by (camera, timestep) grid cells, and the
denoiser call that serves views from it (any ``SplitDenoiser``; the diffusers UNet adapter is
``hash3d_dg.guidance.unet_split``).

The names are imported on first use (PEP 562): ``hash3d_dg.cache.config`` needs only the standard
library, so reading a run config (``--help``, a config error) does not import torch.
"""

from importlib import import_module

_WHERE = {
    "Hash3DConfig": "config",
    "CachedDenoiser": "denoiser", "SplitDenoiser": "denoiser", "UNetCallStats": "denoiser",
    "CacheKey": "grid", "GridSpec": "grid", "bucket_index": "grid",
    "CacheStats": "table", "Hash3DCache": "table", "make_cache": "table",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f"{__name__}.{_WHERE[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
