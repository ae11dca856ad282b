"""UNetSplit: the shallow path from the exact cached feature reproduces the UNet's own forward."""

import pytest
import torch
from diffusers import UNet2DConditionModel
from torch.utils.flop_counter import FlopCounterMode

from hash3d_dg.guidance.unet_split import UNetSplit, UnsupportedUNetError

CROSS_LAST = dict(down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
PLAIN_LAST = dict(down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))


def tiny_unet(layers_per_block=1, blocks=CROSS_LAST, block_out_channels=(32, 64), seed=0, **extra):
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(sample_size=8, in_channels=8, out_channels=4,
                                block_out_channels=block_out_channels, layers_per_block=layers_per_block,
                                cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
                                **blocks, **extra)
    return unet.eval().requires_grad_(False)


CONFIGS = {
    "cross_last_lpb1": dict(layers_per_block=1),
    "cross_last_lpb2": dict(layers_per_block=2),
    "plain_last_lpb1": dict(layers_per_block=1, blocks=PLAIN_LAST),
    "three_levels_lpb2": dict(layers_per_block=2, block_out_channels=(16, 32, 32),
                              blocks=dict(down_block_types=("CrossAttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
                                          up_block_types=("UpBlock2D", "UpBlock2D", "CrossAttnUpBlock2D"))),
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def unet(request):
    return tiny_unet(**CONFIGS[request.param])


def _inputs(n=2, hw=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 8, hw, hw, generator=g), torch.randn(n, 5, 32, generator=g)


TIMESTEPS = {
    "int": 500,
    "float": 321.5,
    "scalar_tensor": torch.tensor(42),
    "vector": torch.tensor([10, 900]),
}
POINTS = ["paper", "last_subblock", "last_block", (0, 0), (0, -1), (-1, 0), [-1, 1]]


@pytest.mark.parametrize("tname", list(TIMESTEPS))
def test_full_and_shallow_match_unet(unet, tname):
    """CFG-like batch of 2 rows, every cache point: the feature of the same input makes
    shallow == full == unet."""
    t = TIMESTEPS[tname]
    x, c = _inputs()
    ref = unet(x, t, c).sample
    for point in POINTS:
        split = UNetSplit(unet, point)
        out, feature = split.full(x, t, c)
        assert (out - ref).abs().max().item() < 1e-5, point
        shallow = split.shallow(x, t, c, feature)
        assert shallow.shape == ref.shape
        assert (shallow - ref).abs().max().item() < 1e-5, point
    assert torch.allclose(split(x, t, c), ref, atol=1e-5, rtol=0)


def test_feature_shapes_and_skips():
    unet = tiny_unet(layers_per_block=2)
    x, c = _inputs()
    sub = UNetSplit(unet, "last_subblock")
    blk = UNetSplit(unet, "last_block")
    # last_subblock: only conv_in's output is needed as a skip; last_block: conv_in + the first
    # down block's two pairs.
    assert sub.n_skips == 1 and blk.n_skips == 3
    _, f_sub = sub.full(x, 7, c)
    _, f_blk = blk.full(x, 7, c)
    # Both live at full resolution; the last_block feature is the up-sampled deeper state (64 ch),
    # the last_subblock one the output of the last block's previous pair (32 ch).
    assert f_sub.shape == (2, 32, 8, 8)
    assert f_blk.shape == (2, 64, 8, 8)


def test_named_points_are_their_pairs():
    unet = tiny_unet(layers_per_block=2)  # up blocks of 3 pairs
    last = len(unet.up_blocks) - 1
    assert UNetSplit(unet, "paper").cache_point == (last, 1)
    assert UNetSplit(unet, "last_subblock").cache_point == (last, 2)
    assert UNetSplit(unet, "last_block").cache_point == (last, 0)
    assert UNetSplit(unet, [-1, 1]).cache_point == (last, 1)
    # the paper point's shallow path needs conv_in + the first down pair (2 skips)
    assert UNetSplit(unet, "paper").n_skips == 2
    with pytest.raises(ValueError, match="unknown cache point"):
        UNetSplit(unet, "middle")


@pytest.mark.parametrize("point", ["paper", "last_subblock", "last_block"])
def test_shallow_depends_on_feature(point):
    """The shallow path really consumes the feature (a different feature changes the output)."""
    unet = tiny_unet()
    x, c = _inputs()
    split = UNetSplit(unet, point)
    out, feature = split.full(x, 100, c)
    other = split.shallow(x, 100, c, feature + 0.5 * torch.randn_like(feature))
    assert (other - out).abs().max().item() > 1e-3


def test_non_multiple_sample_size_forwards_upsample_size():
    """A 6x6 input on a 3-level UNet (overall factor 4) needs the up-sample sizes forwarded."""
    unet = tiny_unet(**CONFIGS["three_levels_lpb2"])
    x, c = _inputs(hw=6)
    ref = unet(x, 3, c).sample
    for point in ["last_subblock", "last_block", (0, 1), (1, 0)]:
        split = UNetSplit(unet, point)
        out, feature = split.full(x, 3, c)
        assert out.shape == ref.shape
        assert (out - ref).abs().max().item() < 1e-5
        assert (split.shallow(x, 3, c, feature) - ref).abs().max().item() < 1e-5


def test_gradients_flow_to_sample():
    unet = tiny_unet()
    x, c = _inputs()
    split = UNetSplit(unet, "last_subblock")
    xa = x.clone().requires_grad_(True)
    (unet(xa, 50, c).sample ** 2).sum().backward()
    xb = x.clone().requires_grad_(True)
    out, feature = split.full(xb, 50, c)
    (out ** 2).sum().backward()
    assert torch.allclose(xa.grad, xb.grad, atol=1e-5)
    # The shallow path from a detached feature still reaches the sample through conv_in's skip.
    xc = x.clone().requires_grad_(True)
    (split.shallow(xc, 50, c, feature.detach()) ** 2).sum().backward()
    assert xc.grad is not None and torch.isfinite(xc.grad).all() and xc.grad.abs().sum() > 0


def test_unsupported_configs_raise_clearly():
    with pytest.raises(UnsupportedUNetError, match="class embeddings"):
        UNetSplit(tiny_unet(num_class_embeds=4))
    attn_blocks = dict(down_block_types=("AttnDownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "AttnUpBlock2D"))
    with pytest.raises(UnsupportedUNetError, match="AttnUpBlock2D"):
        UNetSplit(tiny_unet(blocks=attn_blocks))
    unet = tiny_unet()
    with pytest.raises(ValueError, match="cache point"):
        UNetSplit(unet, "middle")
    with pytest.raises(ValueError, match="out of range"):
        UNetSplit(unet, (5, 0))
    with pytest.raises(ValueError, match="out of range"):
        UNetSplit(unet, (1, 7))
    split = UNetSplit(unet)
    unet.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)
    try:
        with pytest.raises(UnsupportedUNetError, match="FreeU"):
            split.full(*_inputs()[:1], 1, _inputs()[1])
    finally:
        unet.disable_freeu()


def _flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def test_shallow_flops_on_meta_device():
    """Both paths run on the meta device; shallow < full, and last_subblock < paper < last_block."""
    with torch.device("meta"):
        unet = tiny_unet(layers_per_block=2)
    x = torch.empty(2, 8, 8, 8, device="meta")
    c = torch.empty(2, 5, 32, device="meta")
    t = torch.empty(2, device="meta")
    full_unet = _flops(lambda: unet(x, t, c))
    counts = {}
    for point in ["last_subblock", "paper", "last_block"]:
        split = UNetSplit(unet, point)
        out, feature = split.full(x, t, c)
        assert out.device.type == "meta" and out.shape == (2, 4, 8, 8)
        full = _flops(lambda: split.full(x, t, c))
        shallow = _flops(lambda: split.shallow(x, t, c, feature))
        assert full == full_unet
        assert 0 < shallow < full
        counts[point] = shallow
    assert counts["last_subblock"] < counts["paper"] < counts["last_block"]
