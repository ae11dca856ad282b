"""How a latent guidance runs on its device: CUDA graphs and memory format (``guidance.cuda_graphs``,
``guidance.channels_last``).

``accelerate`` applies a run's settings to a freshly built guidance; ``attach_graphs`` routes its
calls through the graphed pieces (``graphed``: the UNet's paths and the autoencoder calls;
``step_graph``: the fused SDS and refine steps) and ``detach_graphs`` undoes it (``bench
launches`` counts both ways on the CPU).
"""

from __future__ import annotations

import torch

from hash3d_dg.guidance.graphed import (GraphedAutograd, GraphedCalls, GraphedSplit,
                                        use_cuda_graphs)
from hash3d_dg.guidance.step_graph import RefineStepGraph, SDSStepGraph


def attach_graphs(guidance, capture: bool) -> GraphedSplit:
    """Route a latent guidance's calls through CUDA graphs: the UNet's full and shallow paths
    (``GraphedSplit``, stage 2's refine steps), stage 2's autoencoder calls (``GraphedCalls``),
    stage 1's differentiable encode (``GraphedAutograd``) and stage 1's SDS step after the encode
    (``step_graph.SDSStepGraph``) and stage 2's DDIM refine steps (``step_graph.RefineStepGraph``).
    ``capture`` False: the same buffers and ops run eagerly (the
    CPU path of the tests and of ``bench launches``). Returns the graphed split."""
    denoiser = guidance.denoiser
    split = denoiser.model
    if not isinstance(split, GraphedSplit):
        split = denoiser.model = GraphedSplit(split, capture=capture)
    guidance.graph_calls = split.calls = GraphedCalls(capture=capture)
    guidance.grad_graph_calls = split.grad_calls = GraphedAutograd(capture=capture)
    guidance.sds_step = split.step_graph = SDSStepGraph(capture=capture)
    guidance.refine_step = split.refine_graph = RefineStepGraph(capture=capture)
    return split


def detach_graphs(guidance) -> None:
    """Every call of the guidance eager again (``attach_graphs`` undone)."""
    denoiser = guidance.denoiser
    if isinstance(denoiser.model, GraphedSplit):
        denoiser.model = denoiser.model.split
    guidance.graph_calls = guidance.grad_graph_calls = guidance.sds_step = guidance.refine_step = None


def accelerate(guidance, guidance_cfg, device) -> bool:
    """``guidance.channels_last`` and ``guidance.cuda_graphs`` applied to a latent guidance built
    on ``device`` (before its first call: graphs are captured lazily). Returns whether CUDA
    graphs are on."""
    from hash3d_dg.accel import resolve_switch

    if resolve_switch(guidance_cfg.channels_last, device, "guidance.channels_last"):
        # cuDNN's NCHW->NHWC conversions were 19 % of the H200's GPU time
        for module in (guidance.components.unet, guidance.components.vae, guidance.latent_vae):
            if module is not None:
                module.to(memory_format=torch.channels_last)
    graphs = use_cuda_graphs(guidance_cfg.cuda_graphs, device)
    if graphs:
        attach_graphs(guidance, capture=True)
    return graphs
