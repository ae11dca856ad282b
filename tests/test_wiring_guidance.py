"""``Zero123Guidance``'s contract at its edges: constructor defaults (stable-zero123's CFG scale
5, 256-pixel images, seed 0), the timestep range checks, the uniform timestep draw including
both ends, camera inputs as lists, arrays or tensors with their batch checks, the input-shape
and reference checks, and SDS with a caller's float64 noise still giving a float32 loss."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

from hash3d_dg.guidance import Zero123Guidance, load_zero123, write_tiny_checkpoint

@pytest.fixture(scope="module")
def components(tmp_path_factory):
    ckpt = write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-stable-zero123-diffusers")
    return load_zero123(str(ckpt))

@pytest.fixture(scope="module")
def guidance(components):
    g = Zero123Guidance(components, image_size=32)
    g.set_reference(torch.rand(1, 3, 40, 40, generator=torch.Generator().manual_seed(0)), -10.0)
    return g

def test_constructor_defaults(components):
    g = Zero123Guidance(components)
    assert g.guidance_scale == 5.0 and g.image_size == 256 and g.seed == 0
    assert g.device == components.device and g.dtype == components.dtype
    assert g.input_elevation == 0.0 and g.ref_embeddings is None and g.ref_latents is None
    assert g.latent_vae is None
    assert (g.min_step, g.max_step) == (20, 980)  # DreamGaussian: 0.02 and 0.98 of 1000
    # the generator starts from seed 0
    assert torch.equal(torch.randn(5, generator=g.generator),
                       torch.randn(5, generator=torch.Generator().manual_seed(0)))
    assert g.alphas_cumprod.dtype == torch.float32
    with pytest.raises(RuntimeError, match="call set_reference"):
        g.conditioning([0.0], [0.0], [0.0])

def test_timestep_range_checks(components):
    assert Zero123Guidance(components, min_step_ratio=0.0).min_step == 0
    same = Zero123Guidance(components, min_step_ratio=0.5, max_step_ratio=0.5)
    assert same.min_step == same.max_step == 500
    assert same.timestep_for(None) == 500 and same.timestep_for(0.9) == 500
    with pytest.raises(ValueError, match=r"^bad timestep range \[20, 1000\]$"):
        Zero123Guidance(components, max_step_ratio=1.0)
    with pytest.raises(ValueError, match=r"^bad timestep range \[600, 500\]$"):
        Zero123Guidance(components, min_step_ratio=0.6, max_step_ratio=0.5)

def test_random_timesteps_cover_the_closed_range(components):
    g = Zero123Guidance(components, min_step_ratio=0.5, max_step_ratio=0.502)
    draws = {g.timestep_for(None) for _ in range(300)}
    assert draws == {500, 501, 502}
    # annealed: round((1 - ratio) * 1000), clipped
    assert [g.timestep_for(r) for r in (0.0, 0.4985, 0.499, 1.0)] == [502, 502, 501, 500]

def test_camera_inputs_as_lists_arrays_and_tensors(guidance):
    want = guidance.camera_embedding([10.0, -20.0], [30.0, 200.0], [0.0, 0.1])
    assert want.shape == (2, 4) and want.dtype == torch.float32
    rows = [[math.radians(10.0), math.sin(math.radians(30.0)), math.cos(math.radians(30.0)),
             math.radians(80.0)],
            [math.radians(-20.0), math.sin(math.radians(200.0)), math.cos(math.radians(200.0)),
             math.radians(80.0)]]
    torch.testing.assert_close(want, torch.tensor(rows, dtype=torch.float32))
    for kind in (np.asarray, torch.tensor):
        got = guidance.camera_embedding(kind([[10.0], [-20.0]]), kind([[30.0], [200.0]]),
                                        kind([[0.0], [0.1]]))
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    tensor_in = torch.tensor([10.0, -20.0], dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(guidance.camera_embedding(tensor_in, [30.0, 200.0], [0.0, 0.1]), want)

def test_camera_batch_checks_name_the_argument(guidance):
    with pytest.raises(ValueError, match=r"^d_azimuth has 3 values for a batch of 2 views$"):
        guidance.camera_embedding([0.0, 1.0], [0.0, 1.0, 2.0], [0.0, 0.0])
    with pytest.raises(ValueError, match=r"^d_radius has 1 values for a batch of 2 views$"):
        guidance.camera_embedding([0.0, 1.0], [0.0, 1.0], [0.0])
    with pytest.raises(ValueError, match=r"^d_radius has 3 values for a batch of 2 views$"):
        guidance.camera_embedding(torch.zeros(2), torch.zeros(2), torch.zeros(3))

def test_image_shape_checks(guidance):
    for bad in (torch.rand(3, 32, 32), torch.rand(1, 4, 32, 32), torch.rand(2, 1, 32, 32)):
        with pytest.raises(ValueError, match=r"^expected images \[B, 3, H, W\], got "
                                             + re.escape(str(tuple(bad.shape))) + "$"):
            guidance.encode_images(bad)

def test_sds_camera_count_must_match_the_batch(guidance):
    latents = torch.zeros(2, 4, 4, 4)
    with pytest.raises(ValueError, match=r"^3 cameras for 2 images$"):
        guidance.sds_latents(latents, [0.0, 1.0, 2.0], [0.0, 1.0, 2.0], [0.0] * 3, step_ratio=0.5)

def test_sds_loss_is_float32_with_float64_noise(guidance):
    latents = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(1)).requires_grad_()
    noise = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    loss = guidance.sds_latents(latents, [0.0], [30.0], [0.0], step_ratio=0.5, noise=noise)
    assert loss.dtype == torch.float32 and loss.ndim == 0
    loss.backward()
    assert latents.grad.dtype == torch.float32


def test_camera_inputs_of_other_dtypes_are_read_in_float64(guidance):
    want = guidance.camera_embedding([10.5, -20.25], [30.0, 200.0], [0.0, 0.0])
    half = guidance.camera_embedding(torch.tensor([10.5, -20.25], dtype=torch.float16),
                                     torch.tensor([30.0, 200.0], dtype=torch.float16),
                                     torch.zeros(2, dtype=torch.float16))
    torch.testing.assert_close(half, want, rtol=0, atol=0)
    ints = guidance.camera_embedding([10, -20], [30, 200], [0, 0])
    torch.testing.assert_close(ints, guidance.camera_embedding([10.0, -20.0], [30.0, 200.0], [0.0, 0.0]),
                               rtol=0, atol=0)


def test_a_tiny_autoencoders_latents_are_scaled_by_its_own_factor(components):
    """Latents of renders through a tiny autoencoder: ``encode(x).latents * scaling_factor``
    and back (TAESD's factor is 1; another factor must be applied, not divided)."""
    from diffusers import AutoencoderTiny

    from hash3d_dg.guidance.tiny import tiny_taesd_config

    torch.manual_seed(0)
    cfg = {k: v for k, v in tiny_taesd_config().items() if not k.startswith("_")}
    vae = AutoencoderTiny(**dict(cfg, scaling_factor=0.5)).eval()
    g = Zero123Guidance(components, image_size=32, latent_vae=vae)
    images = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = vae.encode(images * 2 - 1).latents * 0.5
        got = g.encode_images(images)
        torch.testing.assert_close(got, want)
        back = g.decode_latents(got)
        ref = ((vae.decode(want / 0.5).sample + 1) / 2).clamp(0, 1)
    torch.testing.assert_close(back, ref)
