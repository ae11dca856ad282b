"""Stage 1's SDS step after the encode, replayed as one CUDA graph per path (``guidance.cuda_graphs``).

With the UNet alone in a graph (``graphed.GraphedSplit``) a stage-1 iteration still launches
~35 small kernels around it: the conditioning (camera projection, the CFG contexts), the forward
process, the UNet's input assembly, classifier-free guidance, w(t) and the SDS gradient.
``SDSStepGraph`` captures all of it, from the encoded latents to the gradient, once per path and
batch shape, and replays it:

    x_t  = sqrt(abar_t) x + sqrt(1 - abar_t) noise      (abar gathered on the device from t)
    UNet input, timestep and context from x_t, t and the guidance's per-call tensors
    UNet: full -> (prediction, deep feature) | shallow(feature) -> prediction
    eps  = CFG (+ v -> eps for a v-prediction model)
    grad = nan_to_num((1 - abar_t) (eps - noise))

Static inputs, copied in before each replay: the latents x (detached, float32), the noise, the
timestep as a device tensor [B] (uploaded pinned and non-blocking; nothing in the graph reads a
device value on the host), the guidance's ``step_tensors`` (Zero-1-to-3: the camera embedding and
the reference's CLIP embedding and latent; Stable Diffusion: the prompt's and the negative's
embeddings) and, on the shallow path, the blended feature. Outputs: the gradient, x_t in the
model dtype (the table's query) and, on the full path, the deep feature (what the table stores).

What stays on the host, in the same order as the eager path: the timestep draw and the noise draw
(the guidance's generator, outside the graph, so the same numbers), the Hash3D decisions (the
table's Bernoulli(eta) draw, the cell, the queue), the table's insert and the counters. Before a
retrieval the query x_t is computed eagerly with the same ops the graph repeats (a handful of
kernels, only when the table is consulted). The step applies to one view per call or to an
uncached guidance; a batch of several views with a table (where some views may hit and others
miss) takes the eager path.

On the CPU (``capture=False``) the same object runs the same ops on the same static buffers: the
tests check that this is bitwise the eager step, and on CUDA (``@pytest.mark.cuda``) that the
replay matches the eager step within fp16 tolerance.

A guidance supplies ``step_tensors(d_el, d_az, d_r, batch)``, ``step_model_inputs(x, t,
*tensors) -> (sample, timestep, context)``, ``step_guide(out, x_t, t)``, ``cache_keys(d_el, d_az,
d_r, t, batch)``, ``add_noise_at`` and ``sds_weight_at`` (``LatentGuidance``).
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from hash3d_dg.accel import upload
from hash3d_dg.guidance.graphed import _Captured

log = logging.getLogger(__name__)

#: rows per view of a classifier-free-guided UNet call ([cond; uncond])
CFG_COPIES = 2


def _raw_split(model):
    """The split model itself (a ``GraphedSplit`` replays its own graphs: no graph in a graph)."""
    return getattr(model, "split", model)


class SDSStepGraph:
    """The SDS step after the encode as one graph per path and shapes (see the module docstring)."""

    def __init__(self, capture: bool) -> None:
        self.capture = bool(capture)
        self._paths: dict[tuple, _Captured] = {}
        self._pool = torch.cuda.graph_pool_handle() if self.capture else None
        self.capture_seconds = 0.0
        self.replays = 0

    def applies(self, guidance, x: Tensor) -> bool:
        """One view per call, or no table to consult (then every view takes the full path)."""
        return x.shape[0] == 1 or guidance.denoiser.cache is None

    @staticmethod
    def _body(guidance, split, shallow: bool):
        def body(x, noise, t, *rest):
            tensors, feature = (rest[:-1], rest[-1]) if shallow else (rest, None)
            x_t = guidance.add_noise_at(x, noise, t)
            x_q = x_t.to(guidance.dtype)
            sample, t_in, context = guidance.step_model_inputs(x_q, t, *tensors)
            if shallow:
                out = split.shallow(sample, t_in, context, feature)
            else:
                out, feature = split.full(sample, t_in, context)
            eps = guidance.step_guide(out, x_t, t)
            grad = torch.nan_to_num(guidance.sds_weight_at(t) * (eps - noise))
            return (grad, x_q) if shallow else (grad, x_q, feature)
        return body

    def _path(self, name: str, guidance, inputs: list[Tensor]) -> _Captured:
        key = (name,) + tuple((tuple(t.shape), t.dtype, t.stride()) for t in inputs)
        path = self._paths.get(key)
        if path is None:
            split = _raw_split(guidance.denoiser.model)
            path = _Captured(self._body(guidance, split, name == "shallow"), inputs, self.capture,
                             self._pool)
            self._paths[key] = path
            self.capture_seconds += path.capture_seconds
            if self.capture:
                log.info("captured the SDS step's %s path as a CUDA graph in %.2f s", name,
                         path.capture_seconds)
        return path

    def __call__(self, guidance, x: Tensor, noise: Tensor, t: int, d_elevation, d_azimuth,
                 d_radius) -> Tensor:
        """The SDS gradient w.r.t. x [B, C, h, w] (float32) at host timestep t, as the eager step
        computes it; the table and the counters updated as the eager call updates them."""
        batch = x.shape[0]
        tensors = guidance.step_tensors(d_elevation, d_azimuth, d_radius, batch)
        keys = guidance.cache_keys(d_elevation, d_azimuth, d_radius, t, batch)
        t_dev = upload([int(t)] * batch, x.device, torch.long)
        denoiser = guidance.denoiser
        hits: dict[int, Tensor] = {}
        if denoiser.consults_table(keys):
            query: list[Tensor] = []

            def view_query(i: int) -> Tensor:  # x_t, computed only when the table asks for it
                if not query:
                    query.append(guidance.add_noise_at(x, noise, t_dev).to(guidance.dtype))
                return query[0][i]
            hits = denoiser.lookup(keys, view_query)
        self.replays += 1
        if hits:  # one view per call here (applies): every view is a hit
            feature = denoiser.hit_rows(hits, list(range(batch)), CFG_COPIES).to(x.device)
            inputs = [x, noise, t_dev, *tensors, feature]
            grad, _ = self._path("shallow", guidance, inputs)(inputs)
            denoiser.record_shallow(batch)
            return grad
        inputs = [x, noise, t_dev, *tensors]
        grad, x_q, feature = self._path("full", guidance, inputs)(inputs)
        denoiser.record_full(keys, lambda i: x_q[i], feature)
        return grad

    def stats(self) -> dict:
        return {"graphs": len(self._paths), "replays": self.replays,
                "capture_seconds": round(self.capture_seconds, 3)}
