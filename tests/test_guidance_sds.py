"""Zero-1-to-3 guidance on a tiny random checkpoint: embeddings, timesteps, SDS, CFG, refine."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from PIL import Image

from hash3d_dg.cache import CachedDenoiser, CacheKey, Hash3DCache, Hash3DConfig
from hash3d_dg.guidance.unet_split import UNetSplit
from hash3d_dg.guidance import Zero123Guidance, load_zero123, write_tiny_checkpoint

IMAGE_SIZE = 64  # latent 8 x 8


@pytest.fixture(scope="module")
def components(tmp_path_factory):
    ckpt = write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-stable-zero123-diffusers")
    return load_zero123(str(ckpt))


@pytest.fixture(scope="module")
def reference() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    image = torch.ones(1, 3, 80, 80)
    image[:, :, 20:60, 25:55] = torch.rand(1, 3, 40, 30, generator=g)
    return image


def make_guidance(components, reference, elevation=-10.0, **kwargs) -> Zero123Guidance:
    guidance = Zero123Guidance(components, image_size=IMAGE_SIZE, **kwargs)
    guidance.set_reference(reference, elevation)
    return guidance


def alpha_bar(t: int) -> float:
    """DDIM scaled_linear schedule 0.00085 -> 0.012 over 1000 steps, computed by hand."""
    betas = np.linspace(math.sqrt(0.00085), math.sqrt(0.012), 1000, dtype=np.float64) ** 2
    return float(np.prod(1.0 - betas[: t + 1]))


def reference_eps(components, guidance, noisy, t, d_el, d_az, d_r, scale, cond_only=False):
    """CFG noise prediction computed directly with the UNet, independent of the guidance code."""
    batch = noisy.shape[0]
    stable = components.family == "stable"
    rows = []
    for el, az, r in zip(d_el, d_az, d_r):
        last = math.radians(90.0 + guidance.input_elevation) if stable else r
        rows.append([math.radians(el), math.sin(math.radians(az)), math.cos(math.radians(az)), last])
    cam = torch.tensor(rows, dtype=torch.float32)[:, None, :]
    emb = torch.cat([guidance.ref_embeddings.expand(batch, 1, -1), cam], dim=-1)
    with torch.no_grad():
        cond_ctx = components.camera_projection.proj(emb)
        ref_lat = guidance.ref_latents.expand(batch, -1, -1, -1)
        cond_in = torch.cat([noisy, ref_lat], dim=1)
        eps_cond = components.unet(cond_in, t, encoder_hidden_states=cond_ctx).sample
        if cond_only:
            return eps_cond
        uncond_in = torch.cat([noisy, torch.zeros_like(ref_lat)], dim=1)
        eps_uncond = components.unet(uncond_in, t, encoder_hidden_states=torch.zeros_like(cond_ctx)).sample
    return eps_uncond + scale * (eps_cond - eps_uncond)


def test_reference_conditioning(components, reference):
    guidance = make_guidance(components, reference, elevation=-10.0)
    assert guidance.input_elevation == -10.0
    resized = torch.nn.functional.interpolate(reference, (IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    with torch.no_grad():
        # The VAE latent is taken unscaled (no scaling factor), from the posterior mode.
        expected_lat = components.vae.encode(resized * 2 - 1).latent_dist.mode()
        # DreamGaussian's to_pil_image: mul(255) then truncation to 8 bits (not rounding).
        pixels = np.floor(resized[0].permute(1, 2, 0).numpy() * np.float32(255)).astype(np.uint8)
        clip_in = components.feature_extractor(images=Image.fromarray(pixels), return_tensors="pt")["pixel_values"]
        expected_emb = components.image_encoder(pixel_values=clip_in).image_embeds
    assert guidance.ref_latents.shape == (1, 4, IMAGE_SIZE // 8, IMAGE_SIZE // 8)
    torch.testing.assert_close(guidance.ref_latents, expected_lat)
    assert guidance.ref_embeddings.shape == (1, 1, expected_emb.shape[-1])
    torch.testing.assert_close(guidance.ref_embeddings[:, 0], expected_emb)


def test_reference_quantisation_truncates(components):
    # 0.999 * 255 = 254.7: DreamGaussian's conversion gives 254, rounding would give 255.
    flat = torch.full((1, 3, IMAGE_SIZE, IMAGE_SIZE), 0.999)
    captured = []
    extractor = components.feature_extractor

    class Recorder:
        def __call__(self, images, **kwargs):
            captured.append(np.asarray(images[0]))
            return extractor(images=images, **kwargs)

    guidance = make_guidance(dataclasses.replace(components, feature_extractor=Recorder()), flat)
    assert guidance.ref_embeddings is not None
    assert captured and int(captured[0].max()) == 254 and int(captured[0].min()) == 254


def test_camera_embedding_both_families(components, reference):
    stable = make_guidance(components, reference, elevation=-10.0)
    xl = make_guidance(dataclasses.replace(components, family="xl"), reference, elevation=-10.0)
    d_el, d_az, d_r = [-30.0, 15.0], [90.0, -45.0], [0.0, 0.3]
    h = math.sqrt(0.5)
    expected_stable = torch.tensor(
        [[-math.pi / 6, 1.0, 0.0, math.radians(80.0)], [math.pi / 12, -h, h, math.radians(80.0)]]
    )
    expected_xl = torch.tensor([[-math.pi / 6, 1.0, 0.0, 0.0], [math.pi / 12, -h, h, 0.3]])
    torch.testing.assert_close(stable.camera_embedding(d_el, d_az, d_r), expected_stable, atol=1e-6, rtol=0)
    torch.testing.assert_close(xl.camera_embedding(d_el, d_az, d_r), expected_xl, atol=1e-6, rtol=0)
    with pytest.raises(ValueError):
        stable.camera_embedding([0.0, 1.0], [0.0], [0.0, 0.0])


def test_timestep_annealing(components, reference):
    guidance = make_guidance(components, reference)
    assert (guidance.min_step, guidance.max_step) == (20, 980)
    assert guidance.timestep_for(0.0) == 980
    assert guidance.timestep_for(1.0) == 20
    assert guidance.timestep_for(0.5) == 500
    assert guidance.timestep_for(0.25) == 750
    assert guidance.timestep_for(0.99) == 20  # round(10) clipped up
    draws = [guidance.timestep_for(None) for _ in range(300)]
    assert min(draws) >= 20 and max(draws) <= 980 and len(set(draws)) > 100
    again = make_guidance(components, reference)
    assert [again.timestep_for(None) for _ in range(300)] == draws  # seeded


def test_cfg_batch_order(components, reference):
    guidance = make_guidance(components, reference)
    d_el, d_az, d_r = [10.0, -20.0], [30.0, 150.0], [0.0, 0.0]
    context, image_latents = guidance.conditioning(d_el, d_az, d_r)
    assert context.shape == (4, 1, guidance.ref_embeddings.shape[-1])
    assert image_latents.shape == (4, 4, IMAGE_SIZE // 8, IMAGE_SIZE // 8)
    cam = guidance.camera_embedding(d_el, d_az, d_r)[:, None, :]
    expected_cond = components.camera_projection.proj(torch.cat([guidance.ref_embeddings.expand(2, 1, -1), cam], -1))
    torch.testing.assert_close(context[:2], expected_cond)
    assert torch.count_nonzero(context[2:]) == 0
    torch.testing.assert_close(image_latents[:2], guidance.ref_latents.expand(2, -1, -1, -1))
    assert torch.count_nonzero(image_latents[2:]) == 0

    # Zeroing the reference embedding changes only the cond rows of the UNet output.
    noisy = torch.randn(2, 4, IMAGE_SIZE // 8, IMAGE_SIZE // 8, generator=torch.Generator().manual_seed(0))
    sample = torch.cat([torch.cat([noisy, noisy]), image_latents], dim=1)
    t = torch.full((4,), 500, dtype=torch.long)
    with torch.no_grad():
        out = guidance.denoiser(sample, t, context)
        guidance.ref_embeddings = torch.zeros_like(guidance.ref_embeddings)
        context_zero, _ = guidance.conditioning(d_el, d_az, d_r)
        out_zero = guidance.denoiser(sample, t, context_zero)
    assert not torch.allclose(context_zero[:2], context[:2])
    torch.testing.assert_close(context_zero[2:], context[2:])
    assert (out_zero[:2] - out[:2]).abs().max() > 1e-4
    torch.testing.assert_close(out_zero[2:], out[2:])


def test_sds_loss_and_gradients(components, reference):
    guidance = make_guidance(components, reference)
    images = torch.rand(2, 3, 48, 40, generator=torch.Generator().manual_seed(2)).requires_grad_(True)
    loss = guidance.sds(images, [0.0, 20.0], [45.0, -120.0], [0.0, 0.0], step_ratio=0.4)
    assert loss.ndim == 0 and loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert images.grad is not None and torch.isfinite(images.grad).all()
    assert images.grad.abs().sum() > 0
    modules = (components.unet, components.vae, components.image_encoder, components.camera_projection)
    for module in modules:
        for p in module.parameters():
            assert not p.requires_grad and p.grad is None
    assert guidance.stats()["unet"] == {"full_calls": 2, "shallow_calls": 0}


@pytest.mark.parametrize("scale", [5.0, 1.0])
def test_sds_gradient_is_weighted_noise_residual(components, reference, scale):
    guidance = make_guidance(components, reference, guidance_scale=scale)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        latents0 = guidance.encode_images(torch.rand(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=gen))
    latents = latents0.clone().requires_grad_(True)
    noise = torch.randn(latents.shape, generator=gen)
    d_el, d_az, d_r = [5.0, -25.0], [60.0, 170.0], [0.0, 0.0]
    step_ratio, t = 0.3, 700
    loss = guidance.sds_latents(latents, d_el, d_az, d_r, step_ratio=step_ratio, noise=noise)
    loss.backward()

    ab = alpha_bar(t)
    noisy = math.sqrt(ab) * latents0 + math.sqrt(1.0 - ab) * noise
    # With scale 1, CFG must reduce to the conditional prediction alone (uncond has no effect).
    eps = reference_eps(components, guidance, noisy, t, d_el, d_az, d_r, scale, cond_only=scale == 1.0)
    expected_grad = (1.0 - ab) * (eps - noise)
    torch.testing.assert_close(latents.grad, expected_grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(loss, 0.5 * (expected_grad**2).sum(), atol=1e-4, rtol=1e-4)


def test_sds_reproducible(components, reference):
    images = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    losses = []
    for seed in (0, 0, 1):
        guidance = make_guidance(components, reference, seed=seed)
        losses.append(guidance.sds(images, [10.0], [90.0], [0.0], step_ratio=None).item())
    assert losses[0] == losses[1] and losses[0] != losses[2]


def test_refine(components, reference):
    guidance = make_guidance(components, reference)
    images = torch.rand(2, 3, 40, 40, generator=torch.Generator().manual_seed(5))
    before = guidance.stats()["unet"]["full_calls"]
    out = guidance.refine(images, [0.0, 10.0], [30.0, -60.0], [0.0, 0.0], strength=0.8, steps=50)
    assert out.shape == (2, 3, IMAGE_SIZE, IMAGE_SIZE) and out.dtype == torch.float32
    assert torch.isfinite(out).all() and out.min() >= 0.0 and out.max() <= 1.0
    assert guidance.stats()["unet"]["full_calls"] - before == 10 * 2  # 10 DDIM steps per view
    guidance.refine(images[:1], [0.0], [30.0], [0.0], strength=0.95, steps=50)
    assert guidance.stats()["unet"]["full_calls"] - before == 10 * 2 + 3
    # The SDS scheduler is untouched by refine.
    assert guidance.scheduler.num_inference_steps is None


class RecordingDenoiser(CachedDenoiser):
    """A real (uncached) denoiser that also records the timesteps it is called with."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.timesteps: list[float] = []

    def __call__(self, sample, timestep, context, keys=None, query=None):
        self.timesteps.extend(k.timestep for k in keys)
        return super().__call__(sample, timestep, context, keys=keys, query=query)


def test_refine_schedule_and_keys(components, reference):
    denoiser = RecordingDenoiser(UNetSplit(components.unet), cache=None)
    guidance = make_guidance(components, reference, denoiser=denoiser)
    images = torch.rand(1, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(6))
    guidance.refine(images, [0.0], [30.0], [0.0], strength=0.8, steps=50)
    # DDIM 50 of 1000 steps, "leading" spacing + offset 1: 981, 961, ..., 1; index 40 on.
    assert denoiser.timesteps == [float(t) for t in range(181, 0, -20)]


def test_keys_and_queries_reach_the_cache(components, reference):
    cache = Hash3DCache(Hash3DConfig.preset("paper", eta=1.0))
    guidance = make_guidance(components, reference, denoiser=CachedDenoiser(UNetSplit(components.unet), cache=cache))
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    views = ([5.0, -20.0], [40.0, 200.0], [0.0, 0.1])
    guidance.sds(images, *views, step_ratio=0.3)  # empty cache: both views run fully, inserted
    assert guidance.stats()["unet"] == {"full_calls": 2, "shallow_calls": 0}
    entries = [e for _, _, q in cache.tables[0].cells() for e in q.entries]
    assert {e.key for e in entries} == {CacheKey(40.0, 5.0, 0.0, 700.0), CacheKey(200.0, -20.0, 0.1, 700.0)}
    assert all(e.query.shape == (4, IMAGE_SIZE // 8, IMAGE_SIZE // 8) for e in entries)  # noisy latents
    loss = guidance.sds(images, *views, step_ratio=0.3)  # same cells: served from the cache
    assert guidance.stats()["unet"] == {"full_calls": 2, "shallow_calls": 2}
    assert torch.isfinite(loss)


@pytest.mark.cuda
def test_sds_and_refine_fp16_cuda(tmp_path, reference):
    ckpt = write_tiny_checkpoint(tmp_path / "tiny-stable-zero123-diffusers")
    comp = load_zero123(str(ckpt), device="cuda")
    assert comp.dtype == torch.float16
    guidance = make_guidance(comp, reference.cuda())
    images = torch.rand(2, 3, 48, 48, device="cuda", requires_grad=True)
    loss = guidance.sds(images, [0.0, 10.0], [30.0, -90.0], [0.0, 0.0], step_ratio=0.5)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0
    out = guidance.refine(images.detach(), [0.0, 10.0], [30.0, -90.0], [0.0, 0.0])
    assert out.dtype == torch.float32 and out.shape == (2, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert torch.isfinite(out).all()


def test_guidance_interface_and_reset_equal_a_fresh_guidance(components, reference):
    """Zero123Guidance implements the guidance interface; ``reset(seed)`` empties the table,
    zeroes the counters, reseeds the generator and drops the reference, so the next SDS and
    refine equal those of a freshly built guidance of that seed."""
    from hash3d_dg.guidance.base import Guidance

    cfg = Hash3DConfig.preset("paper", eta=1.0)

    def fresh(seed):
        g = Zero123Guidance(components, denoiser=CachedDenoiser(UNetSplit(components.unet), Hash3DCache(cfg, seed=seed)),
                            image_size=IMAGE_SIZE, seed=seed, hash3d=cfg)
        g.set_reference(reference, -10.0)
        return g

    def work(g):
        images = torch.rand(2, 3, 48, 48, generator=torch.Generator().manual_seed(5))
        loss = g.sds(images, [5.0, -5.0], [30.0, 90.0], [0.0, 0.0], step_ratio=None)
        refined = g.refine(images[:1], [5.0], [30.0], [0.0], strength=0.8, steps=20)
        return loss.detach(), refined

    used = fresh(3)
    assert isinstance(used, Guidance)
    work(used)
    work(used)  # the table now holds entries, the generator has moved on
    assert used.stats()["cache"]["entries"] > 0
    used.reset(7)
    assert used.ref_latents is None and used.stats()["cache"]["entries"] == 0
    assert used.stats()["unet"] == {"full_calls": 0, "shallow_calls": 0}
    used.set_reference(reference, -10.0)
    a, b = work(used), work(fresh(7))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("stage2, interval, full, shallow", [
    ("trajectory", 4, 3, 7),   # 10 DDIM steps: full at steps 0, 4, 8 of the trajectory
    ("none", 4, 10, 0),        # every step full, the table untouched
    ("cache", 4, None, None),  # through the table (counts depend on retrieval)
])
def test_refine_runs_under_the_stage2_reuse_policy(components, reference, stage2, interval, full, shallow):
    """The stage-2 reuse policy (``hash3d.stage2``) is applied inside ``refine``: the stages
    call ``refine`` alone and get DeepCache-style trajectory reuse, no reuse, or the table."""
    cfg = Hash3DConfig.preset("paper", eta=1.0, stage2=stage2, trajectory_interval=interval)
    g = Zero123Guidance(components, denoiser=CachedDenoiser(UNetSplit(components.unet), Hash3DCache(cfg, seed=0)),
                        image_size=IMAGE_SIZE, hash3d=cfg)
    g.set_reference(reference, -10.0)
    images = torch.rand(1, 3, 48, 48, generator=torch.Generator().manual_seed(2))
    g.refine(images, [5.0], [30.0], [0.0], strength=0.8, steps=50)  # 10 DDIM steps
    unet, cache = g.stats()["unet"], g.stats()["cache"]
    if full is None:
        assert cache["attempts"] == 10 and unet["full_calls"] + unet["shallow_calls"] == 10
    else:
        assert (unet["full_calls"], unet["shallow_calls"]) == (full, shallow)
        assert cache["attempts"] == 0 and cache["inserts"] == 0
