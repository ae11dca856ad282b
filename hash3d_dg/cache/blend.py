"""Feature blending (Hash3D Eq. 6) and the feature similarity of the adaptive grid (Eq. 7-8).

All arithmetic is float32 (or float64 when the inputs are float64), whatever the stored dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _work_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def query_distances(query: torch.Tensor, stored: torch.Tensor, distance: str = "squared") -> torch.Tensor:
    """Distances between one query and K stored queries.

    Args:
        query: ``[*S]``.
        stored: ``[K, *S]``.
        distance: ``"squared"`` (``||x - x_i||^2``) or ``"l2"`` (``||x - x_i||``).

    Returns:
        ``[K]`` non-negative distances.
    """
    if stored.shape[1:] != query.shape:
        raise ValueError(f"stored queries {tuple(stored.shape)} do not match query {tuple(query.shape)}")
    dt = _work_dtype(stored)
    diff = stored.to(dt) - query.to(device=stored.device, dtype=dt).unsqueeze(0)
    d2 = diff.reshape(diff.shape[0], -1).pow(2).sum(dim=1)
    if distance == "squared":
        return d2
    if distance == "l2":
        return d2.sqrt()
    raise ValueError(f"unknown distance {distance!r}: expected 'squared' or 'l2'")


def blend_weights(query: torch.Tensor, stored: torch.Tensor, distance: str = "squared") -> torch.Tensor:
    """Eq. 6 weights ``W_i = softmax_i(-d(x, x_i))``; ``[K]``, summing to one.

    ``torch.softmax`` subtracts the maximum before exponentiating, so huge distances (noisy
    latents differ by thousands in squared norm) give a one-hot on the nearest entry, never NaN.
    """
    return torch.softmax(-query_distances(query, stored, distance), dim=0)


def blend_features(query: torch.Tensor, stored_queries: torch.Tensor, stored_features: torch.Tensor,
                   distance: str = "squared") -> torch.Tensor:
    """Eq. 6: ``v = sum_i W_i v_i``.

    Args:
        query: ``[*S]``.
        stored_queries: ``[K, *S]``.
        stored_features: ``[K, *F]``.
        distance: see :func:`query_distances`.

    Returns:
        ``[*F]`` in float32 (float64 for float64 features).
    """
    w = blend_weights(query, stored_queries, distance)
    feats = stored_features.to(_work_dtype(stored_features))
    w = w.to(feats.dtype).reshape(-1, *([1] * (feats.dim() - 1)))
    return (w * feats).sum(dim=0)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine similarity of two tensors flattened to vectors (0 for a zero vector)."""
    return float(cosine_tensor(a, b))


def cosine_tensor(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``cosine`` as a 0-d tensor on ``a``'s device (no host read)."""
    dt = _work_dtype(a)
    return F.cosine_similarity(a.reshape(-1).to(dt), b.reshape(-1).to(device=a.device, dtype=dt),
                               dim=0, eps=1e-12)
