"""Nearest-neighbour distances used to size freshly initialised Gaussians."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def _dist_cuda2():
    """simple_knn's ``distCUDA2`` (the 3DGS CUDA helper) when importable, else None.

    Note: the PyPI package named ``simple-knn`` is an unrelated project; the 3DGS helper is
    built from source (``simple_knn._C``).
    """
    try:
        from simple_knn._C import distCUDA2  # type: ignore[import-not-found]
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        return None
    return distCUDA2


def mean_sq_dist_to_neighbours(points: Tensor, k: int = 3) -> Tensor:
    """Mean squared distance [N] from each point of ``points`` [N, 3] to its ``k`` nearest others.

    Uses simple_knn's ``distCUDA2`` (k = 3, approximate) for CUDA tensors when it is importable,
    otherwise an exact scipy ``cKDTree`` query on the CPU. Returns a tensor on ``points.device``
    with ``points.dtype``.
    """
    if points.ndim != 2 or points.shape[1] != 3:
        raise ValueError(f"points must be [N, 3], got {tuple(points.shape)}")
    n = points.shape[0]
    if n == 0:
        return points.new_zeros(0)
    if points.is_cuda and k == 3:
        dist_cuda2 = _dist_cuda2()
        if dist_cuda2 is not None:
            return dist_cuda2(points.detach().float().contiguous()).to(points.dtype)
    from scipy.spatial import cKDTree

    xyz = points.detach().cpu().double().numpy()
    kk = min(k, n - 1)
    if kk == 0:
        return points.new_zeros(n)
    dist, _ = cKDTree(xyz).query(xyz, k=kk + 1)
    mean_sq = (np.asarray(dist)[:, 1:] ** 2).mean(axis=1)
    return torch.as_tensor(mean_sq, dtype=points.dtype, device=points.device)
