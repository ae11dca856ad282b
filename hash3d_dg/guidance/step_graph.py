"""The guidance's steps replayed as one CUDA graph per path (``guidance.cuda_graphs``): stage 1's
SDS step after the encode (``SDSStepGraph``) and each DDIM step of stage 2's refine
(``RefineStepGraph``: UNet, CFG and the DDIM update, see its docstring).

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
kernels, only when the table is consulted). A step applies when every view of the call takes
one path (``CachedDenoiser.uniform``: one view, a trajectory step, or no table); a batch of
several views with a table (where some views may hit and others miss) takes the eager path.

On the CPU (``capture=False``) the same object runs the same ops on the same static buffers: the
tests check that this is bitwise the eager step, and on CUDA (``@pytest.mark.cuda``) that the
replay matches the eager step within fp16 tolerance.

A guidance supplies ``step_tensors(d_el, d_az, d_r, batch)``, ``step_model_inputs(x, t,
*tensors) -> (sample, timestep, context)``, ``step_guide(out, x_t, t)``, ``cache_keys(d_el, d_az,
d_r, t, batch)``, ``add_noise_at`` and ``sds_weight_at`` (``LatentGuidance``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from hash3d_dg.accel import upload
from hash3d_dg.guidance.graphed import GraphedCalls

#: rows per view of a classifier-free-guided UNet call ([cond; uncond])
CFG_COPIES = 2


def _raw_split(model):
    """The split model itself (a ``GraphedSplit`` replays its own graphs: no graph in a graph)."""
    return getattr(model, "split", model)


class SDSStepGraph:
    """The SDS step after the encode as one graph per path and shapes (see the module docstring)."""

    def __init__(self, capture: bool) -> None:
        self.graphs = GraphedCalls(capture, label="SDS step")

    def applies(self, guidance, x: Tensor) -> bool:
        """Every view of the call takes one path (one view, or no table to consult)."""
        return guidance.denoiser.uniform(x.shape[0])

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

    def _replay(self, name: str, guidance, inputs: list[Tensor]):
        body = self._body(guidance, _raw_split(guidance.denoiser.model), name == "shallow")
        return self.graphs(name, body, *inputs)

    def __call__(self, guidance, x: Tensor, noise: Tensor, t: int, d_elevation, d_azimuth,
                 d_radius) -> Tensor:
        """The SDS gradient w.r.t. x [B, C, h, w] (float32) at host timestep t, as the eager step
        computes it; the table and the counters updated as the eager call updates them."""
        batch = x.shape[0]
        tensors = guidance.step_tensors(d_elevation, d_azimuth, d_radius, batch)
        keys = guidance.cache_keys(d_elevation, d_azimuth, d_radius, t, batch)
        t_dev = upload([int(t)] * batch, x.device, torch.long)
        query: list[Tensor] = []

        def view_query(i: int) -> Tensor:  # x_t, computed only when the table asks for it
            if not query:
                query.append(guidance.add_noise_at(x, noise, t_dev).to(guidance.dtype))
            return query[0][i]

        denoiser = guidance.denoiser
        shape = ("sds",) + tuple(x.shape)
        feature = denoiser.decide(keys, view_query, shape, CFG_COPIES)
        if feature is not None:
            inputs = [x, noise, t_dev, *tensors, feature.to(x.device)]
            grad, _ = self._replay("shallow", guidance, inputs)
            denoiser.done(keys, view_query, shape)
            return grad
        inputs = [x, noise, t_dev, *tensors]
        grad, x_q, feature = self._replay("full", guidance, inputs)
        denoiser.done(keys, lambda i: x_q[i], shape, feature)
        return grad

    def stats(self) -> dict:
        return self.graphs.stats()


def ddim_step(eps: Tensor, sample: Tensor, alpha_prod_t: Tensor, alpha_prod_t_prev: Tensor) -> Tensor:
    """One deterministic DDIM update x_t -> x_{t-1} (eta = 0) from the noise prediction, with
    ``diffusers.DDIMScheduler.step``'s operations in its order (epsilon prediction, no clipping or
    thresholding), so the values are the scheduler's to the bit: with eta = 0 its sigma_t is
    exactly 0 and ``1 - alpha_prev - sigma_t**2`` is ``1 - alpha_prev``. The alphas are device
    tensors (gathered from the timesteps on the device: no host number inside)."""
    beta_prod_t = 1 - alpha_prod_t
    pred_original_sample = (sample - beta_prod_t ** (0.5) * eps) / alpha_prod_t ** (0.5)
    pred_sample_direction = (1 - alpha_prod_t_prev) ** (0.5) * eps
    return alpha_prod_t_prev ** (0.5) * pred_original_sample + pred_sample_direction


class RefineStepGraph:
    """Stage 2's DDIM refine step (UNet full or shallow, CFG, the DDIM update) as one graph per
    path and batch shape (see the module docstring; ``ScoreDistillation.refine`` calls it).

    Static inputs: the sample x (float32), the pair (t, t_prev) as device indices into the
    scheduler's alphas with the final alpha appended (so the update gathers alpha_t and
    alpha_{t-1} on the device), the guidance's ``step_tensors`` and, on the shallow path, the
    feature. Outputs: x_{t-1} and, on the full path, the feature. The path is chosen on the host
    by the denoiser (``decide``: the trajectory schedule, the table, or full), as for an eager
    step; the indices of a whole refine call are uploaded at once.
    """

    def __init__(self, capture: bool) -> None:
        self.graphs = GraphedCalls(capture, label="refine step")
        self._alphas: dict[int, Tensor] = {}  # per scheduler: alphas_cumprod + [final alpha]

    @staticmethod
    def applies(guidance, scheduler, x: Tensor) -> bool:
        """A DDIM scheduler stepping eps without clipping or thresholding, and one path for
        every view (``CachedDenoiser.uniform``)."""
        from diffusers import DDIMScheduler

        config = scheduler.config
        return (isinstance(scheduler, DDIMScheduler) and config.prediction_type == "epsilon"
                and not config.clip_sample and not config.thresholding
                and guidance.denoiser.uniform(x.shape[0]))

    def alphas(self, scheduler, device) -> Tensor:
        """The scheduler's alphas_cumprod with its final alpha appended (index T), on the device,
        uploaded once per scheduler (the graphs read this tensor)."""
        key = id(scheduler)
        if key not in self._alphas:
            values = torch.cat([scheduler.alphas_cumprod.detach().to("cpu", torch.float32),
                                torch.as_tensor(scheduler.final_alpha_cumprod, dtype=torch.float32).reshape(1)])
            self._alphas[key] = upload(values, device, torch.float32)
        return self._alphas[key]

    @staticmethod
    def indices(scheduler, timesteps: list[int], device) -> Tensor:
        """[steps, 2] (t, t_prev or T for the final alpha) of a refine call, one upload."""
        jump = scheduler.config.num_train_timesteps // scheduler.num_inference_steps
        final = int(scheduler.config.num_train_timesteps)
        rows = [[t, t - jump if t - jump >= 0 else final] for t in timesteps]
        return upload(rows, device, torch.long)

    @staticmethod
    def _body(guidance, split, alphas: Tensor, shallow: bool):
        def body(x, index, *rest):
            tensors, feature = (rest[:-1], rest[-1]) if shallow else (rest, None)
            batch = x.shape[0]
            t = index[:1].expand(batch)
            sample, t_in, context = guidance.step_model_inputs(x.to(guidance.dtype), t, *tensors)
            if shallow:
                out = split.shallow(sample, t_in, context, feature)
            else:
                out, feature = split.full(sample, t_in, context)
            eps = guidance.step_guide(out, x, t)
            alpha = alphas[index]
            x_prev = ddim_step(eps, x, alpha[0], alpha[1]).float()
            return x_prev if shallow else (x_prev, feature)
        return body

    def _replay(self, name: str, guidance, alphas: Tensor, inputs: list[Tensor]):
        body = self._body(guidance, _raw_split(guidance.denoiser.model), alphas, name == "shallow")
        return self.graphs(name, body, *inputs, tag=alphas.data_ptr())  # the graph reads alphas

    def __call__(self, guidance, x: Tensor, t: int, index: Tensor, alphas: Tensor,
                 tensors: list[Tensor], keys) -> Tensor:
        """x_{t-1} from x_t [B, C, h, w] float32 at host timestep t (``index``: its row of
        ``indices``), the denoiser's bookkeeping as for an eager step."""
        denoiser = guidance.denoiser
        query: list[Tensor] = []

        def view_query(i: int) -> Tensor:
            if not query:
                query.append(x.to(guidance.dtype))
            return query[0][i]

        shape = ("refine",) + tuple(x.shape)
        feature = denoiser.decide(keys, view_query, shape, CFG_COPIES)
        if feature is not None:
            inputs = [x, index, *tensors, feature.to(x.device)]
            x_prev = self._replay("shallow", guidance, alphas, inputs)
            denoiser.done(keys, view_query, shape)
            return x_prev
        inputs = [x, index, *tensors]
        x_prev, feature = self._replay("full", guidance, alphas, inputs)
        denoiser.done(keys, view_query, shape, feature)
        return x_prev

    def stats(self) -> dict:
        return self.graphs.stats()
