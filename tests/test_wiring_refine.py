"""``Zero123Guidance.refine`` against diffusers' own DDIM img2img loop.

The reference is ``StableDiffusionImg2ImgPipeline``'s recipe, with the pipeline's own
``get_timesteps`` and ``retrieve_latents``: encode (posterior sample x scaling factor), noise to
the first kept timestep with ``scheduler.add_noise``, then ``scheduler.step`` on the
classifier-free-guided noise of the UNet called directly (Zero-1-to-3's conditioning written
out by hand), decode. DreamGaussian's ``strength`` counts the *skipped* steps, so it is
diffusers' ``1 - strength`` (values below are exact in binary so both round the same way).
The randomness is one generator seeded like the guidance's: the posterior sample first, then
the start noise.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, StableDiffusionImg2ImgPipeline
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img import retrieve_latents

from hash3d_dg.guidance import Zero123Guidance, load_zero123, write_tiny_checkpoint

IMAGE_SIZE = 32
SEED = 11


@pytest.fixture(scope="module")
def components(tmp_path_factory):
    ckpt = write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-stable-zero123-diffusers")
    return load_zero123(str(ckpt))


@pytest.fixture(scope="module")
def reference_image():
    g = torch.Generator().manual_seed(1)
    image = torch.ones(1, 3, 40, 40)
    image[:, :, 10:30, 12:28] = torch.rand(1, 3, 20, 16, generator=g)
    return image


def cfg_eps(components, guidance, latents, t, d_el, d_az, scale):
    """eps_uncond + s (eps_cond - eps_uncond) with the UNet called directly (stable family:
    T = [rad(d_el), sin(rad(d_az)), cos(rad(d_az)), rad(90 + input elevation)])."""
    rows = [[math.radians(el), math.sin(math.radians(az)), math.cos(math.radians(az)),
             math.radians(90.0 + guidance.input_elevation)] for el, az in zip(d_el, d_az)]
    batch = latents.shape[0]
    cam = torch.tensor(rows, dtype=torch.float32)[:, None, :]
    ctx = components.camera_projection(torch.cat([guidance.ref_embeddings.expand(batch, 1, -1), cam], -1))
    ref_lat = guidance.ref_latents.expand(batch, -1, -1, -1)
    cond = components.unet(torch.cat([latents, ref_lat], 1), t, encoder_hidden_states=ctx).sample
    uncond = components.unet(torch.cat([latents, torch.zeros_like(ref_lat)], 1), t,
                             encoder_hidden_states=torch.zeros_like(ctx)).sample
    return uncond + scale * (cond - uncond)


@torch.no_grad()
def diffusers_img2img(components, guidance, images, d_el, d_az, dg_strength, steps, seed):
    sched = DDIMScheduler.from_config(components.scheduler.config)
    sched.set_timesteps(steps)
    pipe = SimpleNamespace(scheduler=sched)
    timesteps, n = StableDiffusionImg2ImgPipeline.get_timesteps(pipe, steps, 1.0 - dg_strength, "cpu")
    g = torch.Generator().manual_seed(seed)
    x = F.interpolate(images, (IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False) * 2 - 1
    vae = components.vae
    latents = retrieve_latents(vae.encode(x), generator=g) * vae.config.scaling_factor
    noise = torch.randn(latents.shape, generator=g)
    latents = sched.add_noise(latents, noise, timesteps[:1].repeat(latents.shape[0]))
    for t in timesteps:
        eps = cfg_eps(components, guidance, latents, t, d_el, d_az, guidance.guidance_scale)
        latents = sched.step(eps, t, latents, eta=0.0).prev_sample
    out = vae.decode(latents / vae.config.scaling_factor).sample
    return ((out + 1) / 2).clamp(0, 1), n


@pytest.mark.parametrize("strength,steps", [(0.75, 8), (0.5, 6)])
def test_refine_is_diffusers_ddim_img2img(components, reference_image, strength, steps):
    guidance = Zero123Guidance(components, image_size=IMAGE_SIZE, seed=SEED, guidance_scale=3.0)
    guidance.set_reference(reference_image, -15.0)
    images = torch.rand(2, 3, 24, 24, generator=torch.Generator().manual_seed(5))
    d_el, d_az = [10.0, -20.0], [45.0, 200.0]
    want, n = diffusers_img2img(components, guidance, images, d_el, d_az, strength, steps, SEED)
    before = guidance.stats()["unet"]["full_calls"]
    got = guidance.refine(images, d_el, d_az, [0.0, 0.0], strength=strength, steps=steps)
    assert guidance.stats()["unet"]["full_calls"] - before == n * 2  # one CFG call per step and view
    assert n == steps - int(steps * strength)
    torch.testing.assert_close(got, want, rtol=0, atol=2e-5)


def test_refine_starts_from_the_noised_render(components, reference_image):
    """The start noise matters: without it (or with the wrong timestep) the result moves."""
    guidance = Zero123Guidance(components, image_size=IMAGE_SIZE, seed=SEED)
    guidance.set_reference(reference_image, 0.0)
    images = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    want, _ = diffusers_img2img(components, guidance, images, [0.0], [90.0], 0.75, 8, SEED)
    got = guidance.refine(images, [0.0], [90.0], [0.0], strength=0.75, steps=8)
    torch.testing.assert_close(got, want, rtol=0, atol=2e-5)
    # a second call draws fresh noise from the guidance's generator: a different sample
    again = guidance.refine(images, [0.0], [90.0], [0.0], strength=0.75, steps=8)
    assert float((again - got).abs().max()) > 1e-3
