"""Hash3D: a model-agnostic feature cache keyed by (camera, timestep) grid cells, and a UNet
wrapper that splits the denoiser into a cached deep part and a recomputed shallow part."""

from hash3d_dg.cache.config import Hash3DConfig
from hash3d_dg.cache.denoiser import CachedDenoiser, SplitDenoiser, UNetCallStats
from hash3d_dg.cache.grid import CacheKey, GridSpec, bucket_index
from hash3d_dg.cache.table import CacheStats, Hash3DCache, make_cache
from hash3d_dg.cache.unet_split import UNetSplit, UnsupportedUNetError

__all__ = [
    "CacheKey",
    "CacheStats",
    "CachedDenoiser",
    "GridSpec",
    "Hash3DCache",
    "Hash3DConfig",
    "SplitDenoiser",
    "UNetCallStats",
    "UNetSplit",
    "UnsupportedUNetError",
    "bucket_index",
    "make_cache",
]
