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


# ------------------------------------------------------------------ other layouts, against the UNet itself

def _check_against_unet(unet, x, c, t, points):
    ref = unet(x, t, c).sample
    for point in points:
        split = UNetSplit(unet, point)
        out, feature = split.full(x, t, c)
        assert (out - ref).abs().max().item() < 1e-5, point
        shallow = split.shallow(x, t, c, feature)
        assert (shallow - ref).abs().max().item() < 1e-5, point


def test_plain_mid_block_centred_input_and_activated_time_embedding():
    """UNetMidBlock2D (self-attention, no cross-attention), center_input_sample and a time
    embedding activation: the split still reproduces the UNet's own forward."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=8, out_channels=4, cross_attention_dim=32,
                                attention_head_dim=8, norm_num_groups=8, mid_block_type="UNetMidBlock2D",
                                center_input_sample=True, time_embedding_act_fn="silu", **TWO).eval()
    g = torch.Generator().manual_seed(3)
    x, c = torch.randn(2, 8, 8, 8, generator=g), torch.randn(2, 3, 32, generator=g)
    with torch.no_grad():
        _check_against_unet(unet, x, c, 321, [(0, 0), (1, 0), (1, 1)])


@pytest.mark.parametrize("hw", [5, 6])
def test_sizes_that_are_not_multiples_of_the_downsampling_in_the_shallow_path(hw):
    """3 levels (factor 4): 5 and 6 pixels need the skip's size forwarded to every up-sampler,
    in the shallow path too (5 % 4 == 1, 6 % 4 == 2)."""
    unet = tiny_unet(THREE)
    g = torch.Generator().manual_seed(4)
    x, c = torch.randn(1, 8, hw, hw, generator=g), torch.randn(1, 3, 32, generator=g)
    with torch.no_grad():
        _check_against_unet(unet, x, c, 7, [(0, 0), (0, 2), (1, 1), (2, 0), (2, 2)])


def test_shallow_casts_the_feature_and_checks_its_batch():
    unet = tiny_unet(TWO)
    g = torch.Generator().manual_seed(5)
    x, c = torch.randn(2, 8, 8, 8, generator=g), torch.randn(2, 3, 32, generator=g)
    split = UNetSplit(unet, "paper")
    with torch.no_grad():
        out, feature = split.full(x, 9, c)
        torch.testing.assert_close(split.shallow(x, 9, c, feature.double()), out, rtol=0, atol=1e-5)
        assert split.shallow(x, 9, c, feature.double()).dtype == torch.float32
        with pytest.raises(ValueError, match=r"^feature batch 1 does not match sample batch 2$"):
            split.shallow(x, 9, c, feature[:1])


def test_cache_point_range_and_name_errors():
    unet = tiny_unet(TWO)  # 2 up blocks of 2 pairs
    with pytest.raises(ValueError, match=r"^cache point up block 2 out of range for 2 up blocks$"):
        UNetSplit(unet, (2, 0))
    with pytest.raises(ValueError, match=r"^cache point up block -3 out of range for 2 up blocks$"):
        UNetSplit(unet, (-3, 0))
    with pytest.raises(ValueError, match=r"^cache point sub-block 2 out of range for 2 sub-blocks$"):
        UNetSplit(unet, (0, 2))
    with pytest.raises(ValueError, match=r"^unknown cache point 'middle': expected one of paper, "
                                         r"last_subblock, last_block or \(up_block, pair\)$"):
        UNetSplit(unet, "middle")


def test_unsupported_unets_are_named_in_one_message():
    from types import SimpleNamespace

    from torch import nn

    from hash3d_dg.guidance.unet_split import UnsupportedUNetError

    real = tiny_unet(TWO)
    fake = SimpleNamespace(config={"addition_embed_type": "text_time"}, class_embedding=nn.Identity(),
                           encoder_hid_proj=nn.Identity(), down_blocks=[real.down_blocks[0], nn.Identity()],
                           up_blocks=[nn.ReLU(), real.up_blocks[1]], mid_block=nn.Tanh())
    with pytest.raises(UnsupportedUNetError) as info:
        UNetSplit(fake)
    assert str(info.value) == (
        "UNetSplit does not support class embeddings; addition embeddings (text_time); "
        "an encoder hidden-state projection; down block Identity; up block ReLU; mid block Tanh "
        "(supported: SD-1.x style UNet2DConditionModel)")
    # no mid block at all is fine
    no_mid = tiny_unet(TWO)
    no_mid.mid_block = None
    UNetSplit(no_mid)
    # a stack the up blocks do not consume exactly
    short = tiny_unet(TWO)
    short.up_blocks[0].resnets = nn.ModuleList(list(short.up_blocks[0].resnets)[:-1])
    with pytest.raises(UnsupportedUNetError, match=r"^up blocks consume 3 skips but the down path makes 4$"):
        UNetSplit(short)


def test_freeu_is_refused_with_its_fix():
    from hash3d_dg.guidance.unet_split import UnsupportedUNetError

    unet = tiny_unet(TWO)
    split = UNetSplit(unet, "paper")
    unet.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)
    g = torch.Generator().manual_seed(6)
    x, c = torch.randn(1, 8, 8, 8, generator=g), torch.randn(1, 3, 32, generator=g)
    with pytest.raises(UnsupportedUNetError, match=r"^UNetSplit does not support FreeU: call unet.disable_freeu\(\)$"):
        split.full(x, 1, c)
