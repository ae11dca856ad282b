"""CUDA-graph replay of the guidance's UNet calls (``guidance.cuda_graphs``): on the CPU the same
static buffers and ops run eagerly and must equal the eager path bitwise; on CUDA (``cuda``-marked)
the replayed graphs must equal the eager calls within fp16 tolerance."""

import numpy as np
import pytest
import torch

from hash3d_dg.guidance.unet_split import UNetSplit
from hash3d_dg.config import TINY_MODEL, ConfigError, build_config
from hash3d_dg.guidance.acceleration import attach_graphs
from hash3d_dg.guidance.graphed import GraphedSplit, use_cuda_graphs
from hash3d_dg.pipeline import build_guidance
from hash3d_dg.eval.samples import render_sample
from hash3d_dg.stages import ReferenceView


def _cfg(mode="paper", **guidance):
    return build_config({"device": "cpu", "seed": 0,
                         "guidance": {"model": TINY_MODEL, "image_size": 32, **guidance},
                         "stage1": {"ref_size": 32}, "hash3d": {"mode": mode, "eta": 1.0}})


def _guidance(cfg, graphed: bool, dtype=torch.float32):
    g = build_guidance(cfg, torch.device("cpu"), dtype)
    if graphed:
        attach_graphs(g, capture=False)
    ref = ReferenceView.from_rgba(render_sample("ball", 32), 0.0, 2.0, 49.1, 32)
    g.set_reference(ref.image_nchw(), 0.0)
    return g


def _sds_run(g, steps=6):
    gen = torch.Generator().manual_seed(3)
    out = []
    for i in range(steps):
        images = torch.rand(1, 3, 24, 24, generator=gen).requires_grad_()
        el, az = [float(5 * (i % 2))], [float(10 + 3 * (i % 3))]
        loss = g.sds(images, el, az, [0.0], step_ratio=0.5 + 0.01 * (i % 2))
        loss.backward()
        out.append((loss.detach(), images.grad))
    return out


@pytest.mark.parametrize("mode", ["off", "paper", "official", "fast"])
def test_static_buffer_path_is_bitwise_the_eager_path_on_cpu(mode):
    cfg = _cfg(mode)
    eager, graphed = _guidance(cfg, False), _guidance(cfg, True)
    a, b = _sds_run(eager), _sds_run(graphed)
    for (la, ga), (lb, gb) in zip(a, b):
        assert torch.equal(la, lb) and torch.equal(ga, gb)
    assert eager.stats() == graphed.stats()
    eager_shallow_after_sds = eager.stats()["unet"]["shallow_calls"]
    if mode == "paper":
        assert graphed.stats()["unet"]["shallow_calls"] > 0  # both paths replayed
    stats = graphed.denoiser.model.stats()
    # stage 1's SDS steps: one fused graph per path and batch shape (full; shallow when a hit)
    assert graphed.sds_step.stats()["graphs"] == (1 if mode == "off" else 2), stats
    assert stats["sds_step_replays"] == 6 and stats["encoder_autograd_replays"] == 6
    assert stats["replays"] == 0  # the UNet's own graphs only serve the refine below
    # stage 2's refine through the same buffers
    img = torch.rand(1, 3, 24, 24, generator=torch.Generator().manual_seed(5))
    for _ in range(2):  # the second call meets the first call's table entries
        ra = eager.refine(img, [10.0], [40.0], [0.0], strength=0.4, steps=10)
        rb = graphed.refine(img, [10.0], [40.0], [0.0], strength=0.4, steps=10)
        assert torch.equal(ra, rb)
        assert eager.stats() == graphed.stats()
    assert graphed.graph_calls.stats()["graphs"] == 2  # the refine's encode and its decode
    # every DDIM step replayed the fused refine graph: 6 steps per call
    assert graphed.refine_step.stats()["replays"] == 12
    if mode in ("paper", "fast"):  # the table (paper) or the trajectory (fast) served steps
        assert graphed.stats()["unet"]["shallow_calls"] > eager_shallow_after_sds
        assert graphed.refine_step.stats()["graphs"] == 2


@pytest.mark.parametrize("mode", ["off", "paper"])
def test_fused_step_takes_the_eager_path_for_several_views_with_a_table(mode):
    """Two views per call: with a table (some views may hit, others miss) the eager path, without
    one the fused full path; both bitwise the eager guidance."""
    cfg = _cfg(mode)
    eager, graphed = _guidance(cfg, False), _guidance(cfg, True)
    gen = torch.Generator().manual_seed(1)
    for i in range(4):
        images = torch.rand(2, 3, 24, 24, generator=gen)
        cams = ([0.0, 5.0], [10.0 + i, -20.0], [0.0, 0.0])
        results = []
        for g in (eager, graphed):
            x = images.clone().requires_grad_()
            loss = g.sds(x, *cams, step_ratio=0.4)
            loss.backward()
            results.append((loss.detach(), x.grad))
        assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    assert eager.stats() == graphed.stats()
    assert graphed.sds_step.stats()["replays"] == (4 if mode == "off" else 0)


def test_fused_step_is_bitwise_the_eager_step_for_the_text_guidance():
    from hash3d_dg.guidance.sd import build_sd_guidance

    cfg = build_config({"device": "cpu", "seed": 0, "guidance": {"type": "sd", "model": "builtin:tiny",
                        "image_size": 64}, "hash3d": {"mode": "paper", "eta": 1.0}})
    runs = []
    for graphed in (False, True):
        g = build_sd_guidance(cfg, torch.device("cpu"), torch.float32)
        if graphed:
            attach_graphs(g, capture=False)
        g.set_reference(None, 0.0)
        g.set_prompt("a red cube", "blurry")
        gen = torch.Generator().manual_seed(2)
        out = []
        for i in range(4):
            x = torch.rand(1, 3, 40, 40, generator=gen).requires_grad_()
            loss = g.sds(x, [0.0], [5.0 * (i % 2)], [0.0], step_ratio=0.3)
            loss.backward()
            out.append((loss.detach(), x.grad))
        img = torch.rand(1, 3, 40, 40, generator=gen)
        out.append((g.refine(img, [0.0], [5.0], [0.0], strength=0.6, steps=10), torch.zeros(1)))
        if graphed:
            assert g.refine_step.stats()["replays"] == 4
        runs.append((out, g.stats()))
    (a, sa), (b, sb) = runs
    for (la, ga), (lb, gb) in zip(a, b):
        assert torch.equal(la, lb) and torch.equal(ga, gb)
    assert sa == sb and sb["unet"]["shallow_calls"] > 0


def test_cuda_graphs_setting():
    assert use_cuda_graphs("auto", "cpu") is False and use_cuda_graphs("off", "cuda") is False
    assert use_cuda_graphs("auto", "cuda") is True
    with pytest.raises(ValueError, match="needs a CUDA device"):
        use_cuda_graphs("on", "cpu")
    with pytest.raises(ConfigError, match="cuda_graphs"):
        build_config({"guidance": {"cuda_graphs": "maybe"}})
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        GraphedSplit(_guidance(_cfg("off"), False).denoiser.model, capture=True)


def test_graphed_split_passes_autograd_calls_to_the_eager_split():
    g = _guidance(_cfg("off"), False)
    split = g.denoiser.model
    graphed = GraphedSplit(split, capture=False)
    x = torch.randn(2, 8, 4, 4, requires_grad=True)
    ctx = torch.randn(2, 1, split.unet.config.cross_attention_dim)
    out, _ = graphed.full(x, torch.tensor([500, 500]), ctx)
    out.sum().backward()
    assert x.grad is not None and graphed.stats()["graphs"] == 0


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_replayed_graphs_equal_eager_calls_on_cuda(dtype):
    from hash3d_dg.guidance.loading import load_zero123
    from hash3d_dg.pipeline import tiny_model_dir

    comp = load_zero123(str(tiny_model_dir("stable")), device=torch.device("cuda"), dtype=dtype,
                        family="stable")
    split = UNetSplit(comp.unet, "paper")
    graphed = GraphedSplit(split)
    assert graphed.capture
    gen = torch.Generator(device="cuda").manual_seed(0)
    dim = comp.unet.config.cross_attention_dim
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.float16 else dict(rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        for i in range(3):  # new inputs each time: the graph reads its static buffers
            x = torch.randn(2, 8, 4, 4, generator=gen, device="cuda", dtype=dtype)
            t = torch.full((2,), 100 + 300 * i, device="cuda", dtype=torch.long)
            ctx = torch.randn(2, 1, dim, generator=gen, device="cuda", dtype=dtype)
            ref_out, ref_feat = split.full(x, t, ctx)
            out, feat = graphed.full(x, t, ctx)
            torch.testing.assert_close(out, ref_out, **tol)
            torch.testing.assert_close(feat, ref_feat, **tol)
            sh = graphed.shallow(x, t, ctx, ref_feat)
            torch.testing.assert_close(sh, split.shallow(x, t, ctx, ref_feat), **tol)
            assert torch.isfinite(out).all()
    assert graphed.stats()["graphs"] == 2 and graphed.stats()["replays"] == 6


@pytest.mark.cuda
def test_graphed_guidance_equals_eager_guidance_on_cuda():
    """A whole SDS call and a refine call, graphs against eager, fp16 on the GPU."""
    cfg = build_config({"device": "cuda", "seed": 0,
                        "guidance": {"model": TINY_MODEL, "image_size": 32, "cuda_graphs": "on"},
                        "stage1": {"ref_size": 32}, "hash3d": {"mode": "paper", "eta": 1.0}})
    ref = ReferenceView.from_rgba(render_sample("ball", 32), 0.0, 2.0, 49.1, 32)
    runs = []
    for graphs in ("on", "off"):
        cfg.guidance.cuda_graphs = graphs
        g = build_guidance(cfg, torch.device("cuda"), torch.float16)
        g.set_reference(ref.image_nchw().cuda(), 0.0)
        assert isinstance(g.denoiser.model, GraphedSplit) == (graphs == "on")
        gen = torch.Generator().manual_seed(3)
        losses = []
        for i in range(4):
            img = torch.rand(1, 3, 24, 24, generator=gen).cuda().requires_grad_()
            loss = g.sds(img, [0.0], [float(10 + i)], [0.0], step_ratio=0.5)
            loss.backward()
            losses.append((float(loss), img.grad.detach().cpu()))
        refined = g.refine(torch.rand(1, 3, 24, 24, generator=gen).cuda(), [5.0], [30.0], [0.0],
                           strength=0.8, steps=10).cpu()
        if graphs == "on":
            assert g.sds_step.stats()["replays"] == 4  # every SDS step replayed the fused graph
            assert g.refine_step.stats()["replays"] == 2  # the refine's 2 DDIM steps
        runs.append((losses, refined, g.stats()))
    (la, ra, sa), (lb, rb, sb) = runs
    assert sa == sb  # the same hits and misses
    for (xa, ga), (xb, gb) in zip(la, lb):
        assert np.isclose(xa, xb, rtol=2e-2)
        torch.testing.assert_close(ga, gb, rtol=5e-2, atol=5e-2 * float(gb.abs().max()))
    torch.testing.assert_close(ra, rb, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("steps_offset", [0, 1])
@pytest.mark.parametrize("set_alpha_to_one", [False, True])
@pytest.mark.parametrize("steps", [10, 30, 50])
def test_fused_ddim_update_is_diffusers_step_to_the_bit(set_alpha_to_one, steps, steps_offset):
    """``step_graph.ddim_step`` on the alphas gathered by ``RefineStepGraph`` (the scheduler's
    alphas with its final alpha appended, indexed by (t, t_prev)) equals ``DDIMScheduler.step``
    at every timestep of a schedule, the last one (t_prev < 0: the final alpha) included."""
    from diffusers import DDIMScheduler

    from hash3d_dg.guidance.step_graph import RefineStepGraph, ddim_step

    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=set_alpha_to_one,
                              steps_offset=steps_offset)
    scheduler.set_timesteps(steps)
    timesteps = [int(t) for t in scheduler.timesteps.tolist()]
    graph = RefineStepGraph(capture=False)
    alphas = graph.alphas(scheduler, torch.device("cpu"))
    indices = graph.indices(scheduler, timesteps, torch.device("cpu"))
    assert int(indices[-1, 1]) == scheduler.config.num_train_timesteps  # the final alpha's slot
    gen = torch.Generator().manual_seed(steps)
    for i, t in enumerate(timesteps):
        x = torch.randn(2, 4, 8, 8, generator=gen)
        eps = torch.randn(2, 4, 8, 8, generator=gen)
        a = alphas[indices[i]]
        assert torch.equal(ddim_step(eps, x, a[0], a[1]), scheduler.step(eps, t, x).prev_sample), t


def test_fused_steps_in_bfloat16_without_a_graphed_split_are_bitwise_the_eager_steps(monkeypatch):
    """The fused steps on their own (the UNet split not wrapped by ``GraphedSplit``), in bfloat16,
    with a table: bitwise the eager steps; each path's graph built once, not per call."""
    from hash3d_dg.guidance import graphed
    from hash3d_dg.guidance.step_graph import RefineStepGraph, SDSStepGraph

    built = []

    class Counting(graphed.CapturedCall):
        def __init__(self, *args, **kwargs):
            built.append(1)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(graphed, "CapturedCall", Counting)
    cfg = _cfg("paper")  # the table blends several entries by their queries, in both stages
    eager = _guidance(cfg, False, torch.bfloat16)
    fused = _guidance(cfg, False, torch.bfloat16)
    fused.sds_step, fused.refine_step = SDSStepGraph(capture=False), RefineStepGraph(capture=False)
    a, b = _sds_run(eager), _sds_run(fused)
    for (la, ga), (lb, gb) in zip(a, b):
        assert torch.equal(la, lb) and torch.equal(ga, gb)
    img = torch.rand(1, 3, 24, 24, generator=torch.Generator().manual_seed(5))
    for _ in range(2):
        assert torch.equal(eager.refine(img, [10.0], [40.0], [0.0], strength=0.4, steps=10),
                           fused.refine(img, [10.0], [40.0], [0.0], strength=0.4, steps=10))
    assert eager.stats() == fused.stats() and fused.stats()["unet"]["shallow_calls"] > 0
    graphs = fused.sds_step.stats()["graphs"] + fused.refine_step.stats()["graphs"]
    assert graphs == 4 and len(built) == graphs  # full + shallow per step kind, built once


def test_fused_refine_applies_to_a_plain_ddim_epsilon_schedule_only():
    from diffusers import DDIMScheduler, DDPMScheduler

    from hash3d_dg.guidance.step_graph import RefineStepGraph

    g = _guidance(_cfg("paper"), True)
    base = g.refine_scheduler.config
    x1, x2 = torch.zeros(1, 4, 4, 4), torch.zeros(2, 4, 4, 4)
    assert RefineStepGraph.applies(g, DDIMScheduler.from_config(base), x1)
    for other in (DDIMScheduler.from_config(base, clip_sample=True),
                  DDIMScheduler.from_config(base, thresholding=True),
                  DDIMScheduler.from_config(base, prediction_type="v_prediction"),
                  DDPMScheduler.from_config(base)):
        assert not RefineStepGraph.applies(g, other, x1), other.config
    assert not RefineStepGraph.applies(g, DDIMScheduler.from_config(base), x2)  # 2 views, a table
    with g.denoiser.trajectory():  # one path for every view of a trajectory step
        assert RefineStepGraph.applies(g, DDIMScheduler.from_config(base), x2)


def test_fused_refine_keeps_the_alphas_of_each_scheduler_apart():
    from diffusers import DDIMScheduler

    from hash3d_dg.guidance.step_graph import RefineStepGraph

    graph = RefineStepGraph(capture=False)
    a = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    b = DDIMScheduler(beta_schedule="linear")
    alphas_a, alphas_b = graph.alphas(a, torch.device("cpu")), graph.alphas(b, torch.device("cpu"))
    assert torch.equal(alphas_a[:-1], a.alphas_cumprod) and torch.equal(alphas_b[:-1], b.alphas_cumprod)
    assert graph.alphas(a, torch.device("cpu")) is alphas_a  # uploaded once per scheduler
