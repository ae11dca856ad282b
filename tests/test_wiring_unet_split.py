"""The shallow path runs only what the skip stack says it needs (DeepCache's split), checked by
recording which of the UNet's own submodules execute.

Reference, from the UNet's structure alone (diffusers' ``UNet2DConditionModel.forward``): the
down path pushes ``conv_in``'s output, then one entry per (resnet[, attention]) pair and one per
downsampler; up block ``j`` pops ``len(resnets)`` entries from the top, its pair ``p`` taking
the entry ``end_j - 1 - p``. A cache point ``(u, s)`` therefore needs the bottom
``end_u - s`` entries only: the shallow path must run exactly the down sub-blocks that produce
them, no mid block, no up block before ``u``, pairs ``s..`` of block ``u`` and every later up
block. A version that recomputes the whole down path and slices gives the same numbers (the
existing value tests pass) but runs the deep modules: these tests see it.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel

from hash3d_dg.guidance.unet_split import UNetSplit

THREE = dict(down_block_types=("CrossAttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
             up_block_types=("UpBlock2D", "UpBlock2D", "CrossAttnUpBlock2D"),
             block_out_channels=(16, 32, 32), layers_per_block=2)
TWO = dict(down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
           up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
           block_out_channels=(32, 64), layers_per_block=1)


def tiny_unet(arch):
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=8, out_channels=4,
                                cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
                                **arch)
    return unet.eval().requires_grad_(False)


def named_units(unet):
    """name -> module for every unit whose execution we track."""
    units = {"conv_in": unet.conv_in, "conv_out": unet.conv_out, "mid": unet.mid_block}
    for b, block in enumerate(unet.down_blocks):
        for p, r in enumerate(block.resnets):
            units[f"down{b}.pair{p}"] = r
        for d in block.downsamplers or []:
            units[f"down{b}.downsample"] = d
    for b, block in enumerate(unet.up_blocks):
        for p, r in enumerate(block.resnets):
            units[f"up{b}.pair{p}"] = r
        for d in block.upsamplers or []:
            units[f"up{b}.upsample"] = d
    return units


def expected_units(unet, u, s):
    """What the shallow path from cache point (u, s) must run, from the stack layout."""
    entries = ["conv_in"]  # the skip stack, bottom first, named by the unit that produced it
    for b, block in enumerate(unet.down_blocks):
        entries += [f"down{b}.pair{p}" for p in range(len(block.resnets))]
        if block.downsamplers is not None:
            entries.append(f"down{b}.downsample")
    end = len(entries)
    for j in range(u):
        end -= len(unet.up_blocks[j].resnets)
    needed = entries[:end - s]
    run = set(needed) | {"conv_out"}
    for j in range(u, len(unet.up_blocks)):
        block = unet.up_blocks[j]
        first = s if j == u else 0
        run |= {f"up{j}.pair{p}" for p in range(first, len(block.resnets))}
        if block.upsamplers is not None:
            run.add(f"up{j}.upsample")
    return run


def units_run(unet, fn):
    ran = []
    handles = [m.register_forward_hook(lambda mod, a, o, name=name: ran.append(name))
               for name, m in named_units(unet).items()]
    try:
        fn()
    finally:
        for h in handles:
            h.remove()
    return ran


ARCHS = {"two_levels": TWO, "three_levels": THREE}


@pytest.mark.parametrize("arch", list(ARCHS))
def test_shallow_path_runs_only_the_needed_units(arch):
    unet = tiny_unet(ARCHS[arch])
    g = torch.Generator().manual_seed(1)
    x, c = torch.randn(2, 8, 8, 8, generator=g), torch.randn(2, 3, 32, generator=g)
    n_up = len(unet.up_blocks)
    points = [(u, s) for u in range(n_up) for s in range(len(unet.up_blocks[u].resnets))]
    for u, s in points:
        split = UNetSplit(unet, (u, s))
        full_ran = units_run(unet, lambda: split.full(x, 50, c))
        assert set(full_ran) == set(named_units(unet)), (u, s)  # the full path runs everything
        _, feature = split.full(x, 50, c)
        ran = units_run(unet, lambda: split.shallow(x, 50, c, feature))
        want = expected_units(unet, u, s)
        assert set(ran) == want, ((u, s), sorted(set(ran) ^ want))
        assert len(ran) == len(set(ran)), ((u, s), ran)  # nothing runs twice
        assert "mid" not in ran


def test_named_points_shallow_units_on_the_stable_zero123_layout_in_small():
    """The paper point (DeepCache's (0, 0)): conv_in + the first down pair + pairs 1.. of the
    last up block + the head; last_subblock: conv_in + the last pair + the head."""
    unet = tiny_unet(THREE)  # up blocks of 3 pairs
    g = torch.Generator().manual_seed(2)
    x, c = torch.randn(1, 8, 8, 8, generator=g), torch.randn(1, 3, 32, generator=g)
    for point, want in [("paper", {"conv_in", "down0.pair0", "up2.pair1", "up2.pair2", "conv_out"}),
                        ("last_subblock", {"conv_in", "up2.pair2", "conv_out"}),
                        ("last_block", {"conv_in", "down0.pair0", "down0.pair1", "up2.pair0",
                                        "up2.pair1", "up2.pair2", "conv_out"})]:
        split = UNetSplit(unet, point)
        _, feature = split.full(x, 7, c)
        assert set(units_run(unet, lambda: split.shallow(x, 7, c, feature))) == want, point
