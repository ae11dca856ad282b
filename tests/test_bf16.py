"""Reduced precision on CPU with the tiny checkpoint: bfloat16 (and float16, whose CPU kernels
exist in torch 2.13) through the guidance, the UNet split and the Hash3D table.

What each boundary should carry: renders (the guidance's image inputs) float32; VAE, CLIP,
camera projection and UNet in the model dtype; noise predictions, the SDS gradient and the
loss float32; cache distances and blends float32; stored features in ``store_dtype``.
"""

from __future__ import annotations

import pytest
import torch

from hash3d_dg.cache import CachedDenoiser, CacheKey, Hash3DCache, Hash3DConfig
from hash3d_dg.guidance.unet_split import UNetSplit
from hash3d_dg.cache.blend import blend_features, query_distances
from hash3d_dg.config import build_config
from hash3d_dg.errors import ConfigError
from hash3d_dg.guidance import Zero123Guidance, load_zero123, write_tiny_checkpoint
from hash3d_dg.pipeline import resolve_dtype

IMAGE_SIZE = 64  # latent 8 x 8
REDUCED = [torch.bfloat16, torch.float16]
VIEWS = ([0.0, 10.0], [30.0, -90.0], [0.0, 0.0])  # d_elevation, d_azimuth, d_radius


def _tol(dtype: torch.dtype) -> float:
    """Relative tolerance fit for a dtype: a few dozen roundings of its unit (bf16 8 bits of
    mantissa: eps 7.8e-3; fp16 11 bits: 9.8e-4) through a small network."""
    return {torch.bfloat16: 6e-2, torch.float16: 1e-2, torch.float32: 1e-5}[dtype]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-stable-zero123-diffusers")


@pytest.fixture(scope="module")
def reference() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    image = torch.ones(1, 3, 80, 80)
    image[:, :, 20:60, 25:55] = torch.rand(1, 3, 40, 30, generator=g)
    return image


def _guidance(ckpt, reference, dtype) -> Zero123Guidance:
    guidance = Zero123Guidance(load_zero123(str(ckpt), dtype=dtype), image_size=IMAGE_SIZE)
    guidance.set_reference(reference, -10.0)
    return guidance


# ---------------------------------------------------------------- the setting
def test_guidance_dtype_bfloat16_is_a_setting():
    cfg = build_config(overrides=["guidance.dtype=bfloat16"])
    assert cfg.guidance.dtype == "bfloat16"
    assert resolve_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
    assert resolve_dtype("bfloat16", torch.device("cuda")) == torch.bfloat16
    with pytest.raises(ConfigError, match="bfloat16"):
        build_config(overrides=["guidance.dtype=float8"])


# ---------------------------------------------------------------- guidance
@pytest.mark.parametrize("dtype", REDUCED, ids=["bf16", "fp16"])
def test_guidance_boundaries_and_sds_in_reduced_precision(ckpt, reference, dtype):
    guidance = _guidance(ckpt, reference, dtype)
    comp = guidance.components
    for name in ("unet", "vae", "image_encoder", "camera_projection"):
        assert {p.dtype for p in getattr(comp, name).parameters()} == {dtype}, name
    assert guidance.ref_embeddings.dtype == dtype and guidance.ref_latents.dtype == dtype

    seen: dict[str, torch.dtype] = {}
    hooks = [comp.vae.encoder.register_forward_pre_hook(
                 lambda m, args: seen.__setitem__("vae_in", args[0].dtype)),
             comp.unet.conv_in.register_forward_pre_hook(
                 lambda m, args: seen.__setitem__("unet_in", args[0].dtype))]
    try:
        renders = torch.rand(2, 3, 48, 48, generator=torch.Generator().manual_seed(2),
                             requires_grad=True)  # fp32, as the rasterizers return
        loss = guidance.sds(renders, *VIEWS, step_ratio=0.5)
    finally:
        for h in hooks:
            h.remove()
    assert seen == {"vae_in": dtype, "unet_in": dtype}
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert renders.grad.dtype == torch.float32
    assert torch.isfinite(renders.grad).all() and renders.grad.abs().sum() > 0

    context, image_latents = guidance.conditioning(*VIEWS)
    assert context.dtype == dtype and image_latents.dtype == dtype
    latents = guidance.encode_images(renders.detach())
    assert latents.dtype == dtype and torch.isfinite(latents).all()

    out = guidance.refine(renders.detach(), *VIEWS, strength=0.8, steps=50)
    assert out.dtype == torch.float32 and out.shape == (2, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert torch.isfinite(out).all() and out.min() >= 0 and out.max() <= 1


@pytest.mark.parametrize("dtype", REDUCED, ids=["bf16", "fp16"])
def test_sds_gradient_is_float32_and_close_to_the_float32_model(ckpt, reference, dtype):
    """Same latents, timestep and noise: the SDS latent gradient is the fp32 w(t)(eps - noise)
    of the model's own prediction, and close to the fp32 model's within the dtype's tolerance."""
    g = torch.Generator().manual_seed(3)
    latents0 = torch.randn(2, 4, IMAGE_SIZE // 8, IMAGE_SIZE // 8, generator=g)
    noise = torch.randn(latents0.shape, generator=g)
    grads, eps_all = {}, {}
    for dt in (dtype, torch.float32):
        guidance = _guidance(ckpt, reference, dt)
        latents = latents0.clone().requires_grad_()
        loss = guidance.sds_latents(latents, *VIEWS, step_ratio=0.4, noise=noise)
        loss.backward()
        t = guidance.timestep_for(0.4)
        noisy = guidance.scheduler.add_noise(latents0, noise, torch.full((2,), t))
        eps = guidance.predict_noise(noisy, t, guidance.conditioning(*VIEWS), *VIEWS)
        assert eps.dtype == torch.float32 and latents.grad.dtype == torch.float32
        w = 1.0 - guidance.alphas_cumprod[t]
        torch.testing.assert_close(latents.grad, w * (eps - noise), rtol=1e-5, atol=1e-6)
        grads[dt], eps_all[dt] = latents.grad, eps
    rel = (eps_all[dtype] - eps_all[torch.float32]).norm() / eps_all[torch.float32].norm()
    assert rel < _tol(dtype), float(rel)
    cos = torch.nn.functional.cosine_similarity(grads[dtype].flatten(),
                                                grads[torch.float32].flatten(), dim=0)
    assert cos > 0.99


# ---------------------------------------------------------------- UNet split
@pytest.mark.parametrize("dtype", REDUCED, ids=["bf16", "fp16"])
@pytest.mark.parametrize("point", ["last_subblock", "last_block"])
def test_unet_split_shallow_equals_full_in_reduced_precision(ckpt, dtype, point):
    unet32 = load_zero123(str(ckpt), dtype=torch.float32).unet
    unet = load_zero123(str(ckpt), dtype=dtype).unet
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 8, 8, 8, generator=g)
    ctx = torch.randn(2, 1, unet.config.cross_attention_dim, generator=g)
    t = torch.tensor([500, 500])
    split = UNetSplit(unet, point)
    with torch.no_grad():
        out, feature = split.full(x.to(dtype), t, ctx.to(dtype))
        shallow = split.shallow(x.to(dtype), t, ctx.to(dtype), feature)
        ref32 = unet32(x, t, encoder_hidden_states=ctx).sample
    assert out.dtype == dtype and feature.dtype == dtype and shallow.dtype == dtype
    assert torch.isfinite(out).all() and torch.isfinite(shallow).all()
    # the same ops on the same input: equal up to the dtype's rounding (here: bitwise)
    scale = out.float().abs().max()
    assert (shallow.float() - out.float()).abs().max() <= 2 * torch.finfo(dtype).eps * scale
    rel = (out.float() - ref32).norm() / ref32.norm()
    assert rel < _tol(dtype), float(rel)
    # a feature stored in another dtype is cast back to the model's (store_dtype float32)
    shallow_from32 = split.shallow(x.to(dtype), t, ctx.to(dtype), feature.float())
    assert torch.equal(shallow_from32, shallow)


# ---------------------------------------------------------------- Hash3D table
@pytest.mark.parametrize("store", ["auto", "float32", "float16", "bfloat16"])
def test_hash3d_table_with_bf16_features(store):
    cfg = Hash3DConfig.preset("paper", eta=1.0, store_dtype=store)
    cache = Hash3DCache(cfg, seed=0)
    g = torch.Generator().manual_seed(5)
    key = CacheKey(azimuth=30.0, elevation=5.0, radius=0.0, timestep=700.0)
    feats = [torch.randn(2, 16, 4, 4, generator=g).to(torch.bfloat16) for _ in range(3)]
    queries = [torch.randn(4, 8, 8, generator=g).to(torch.bfloat16) for _ in range(3)]
    for q, f in zip(queries, feats):
        cache.insert(key, q, f)
    expected = {"auto": torch.bfloat16, "float32": torch.float32, "float16": torch.float16,
                "bfloat16": torch.bfloat16}[store]
    entries = [e for _, _, qu in cache.tables[0].cells() for e in qu.entries]
    assert len(entries) == 3 and {e.feature.dtype for e in entries} == {expected}
    assert {e.query.dtype for e in entries} == {torch.bfloat16}
    assert all(s is None or isinstance(s, float) for s in cache.similarity(key))

    probe = (queries[1].float() + 0.01).to(torch.bfloat16)
    stored_q = torch.stack([e.query for e in entries])
    d = query_distances(probe, stored_q)
    assert d.dtype == torch.float32 and torch.isfinite(d).all()
    # distances as float32 arithmetic on the bf16 values (not bf16 arithmetic)
    manual = ((stored_q.float() - probe.float()) ** 2).reshape(3, -1).sum(1)
    torch.testing.assert_close(d, manual)
    blended = blend_features(probe, stored_q, torch.stack([e.feature for e in entries]))
    assert blended.dtype == torch.float32
    found, _ = cache.retrieve(key, probe)
    assert found.dtype == expected and torch.isfinite(found.float()).all()
    # the nearest query dominates the softmax: the blend is entry 1's feature
    torch.testing.assert_close(found.float(), feats[1].float(), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("dtype", REDUCED, ids=["bf16", "fp16"])
def test_cached_denoiser_hit_reproduces_the_full_output_in_reduced_precision(ckpt, dtype):
    unet = load_zero123(str(ckpt), dtype=dtype).unet
    cache = Hash3DCache(Hash3DConfig.preset("paper", eta=1.0), seed=0)
    denoiser = CachedDenoiser(UNetSplit(unet, "last_subblock"), cache)
    g = torch.Generator().manual_seed(6)
    x = torch.randn(1, 4, 8, 8, generator=g).to(dtype)
    sample = torch.cat([torch.cat([x, x]), torch.randn(2, 4, 8, 8, generator=g).to(dtype)], 1)
    ctx = torch.randn(2, 1, unet.config.cross_attention_dim, generator=g).to(dtype)
    t = torch.tensor([600, 600])
    keys = [CacheKey(azimuth=40.0, elevation=5.0, radius=0.0, timestep=600.0)]
    with torch.no_grad():
        first = denoiser(sample, t, ctx, keys=keys, query=x)
        second = denoiser(sample, t, ctx, keys=keys, query=x)
    assert denoiser.stats.full_calls == 1 and denoiser.stats.shallow_calls == 1
    entry = next(e for _, _, q in cache.tables[0].cells() for e in q.entries)
    assert entry.feature.dtype == dtype  # store_dtype auto: the feature's own
    assert first.dtype == dtype and second.dtype == dtype
    scale = first.float().abs().max()
    assert (second.float() - first.float()).abs().max() <= 2 * torch.finfo(dtype).eps * scale
