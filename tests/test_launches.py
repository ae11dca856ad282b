"""The launch counter (``bench launches``: kernels, host syncs and uploads counted on the CPU on
the accelerator's code path) and the sync-free pieces it checks, each bitwise equal to the CPU
path it replaces."""

import random

import numpy as np
import pytest
import torch

from hash3d_dg import accel
from hash3d_dg.bench.launches import LaunchCounter
from hash3d_dg.cache import CacheKey, Hash3DCache, Hash3DConfig
from hash3d_dg.camera import Camera

DEV = torch.device("cpu")  # a torch.device names the run's device; the string "cpu" the host


# -- the counter --------------------------------------------------------------------------------

def test_counter_tells_device_reads_from_host_reads():
    x = torch.randn(4, device=DEV)  # made before counting: a device tensor
    with LaunchCounter() as c:
        host = torch.tensor([1.0, 2.0])  # host data, no device
        y = x * 2 + 1
        float(y.sum())  # a device read: sync
        host.tolist(), float(host[0])  # host values: no sync
        y.cpu().numpy()  # a download (sync), then a host read
        y.to("cpu")  # a download: sync
        y.to(DEV)  # stays on the device
    counts = c.take()
    assert counts.syncs == 3, counts.sites
    assert counts.kernels == 3  # mul, add, sum
    assert counts.uploads == 0


def test_counter_counts_shape_syncs_and_uploads():
    x = torch.randn(6, device=DEV)
    with LaunchCounter() as c:
        x[x > 0]  # boolean mask: the output shape is a device value
        torch.nonzero(x)
        torch.where(x > 0, x, torch.zeros_like(x))  # no sync
        torch.tensor([1.0, 2.0], device=DEV)  # blocking upload
        torch.as_tensor(np.ones(3), device=DEV)  # blocking upload
        torch.tensor([1.0, 2.0]).to(DEV)  # blocking upload
        accel.upload([1.0, 2.0], DEV)  # pinned, non-blocking
        torch.zeros(3, device=DEV)  # a fill kernel, no upload
    counts = c.take()
    assert counts.syncs == 2, counts.sites
    assert counts.uploads == 3, counts.sites
    assert counts.async_uploads == 1, counts.sites


def test_virtual_device_is_an_accelerator_only_inside():
    assert not accel.is_accelerator("cpu") and accel.is_accelerator("cuda")
    with accel.virtual():
        assert accel.is_accelerator("cpu") and accel.is_accelerator(DEV)
    assert not accel.is_accelerator(DEV)


# -- sync-free pieces, bitwise equal to the CPU path -----------------------------------------------

def test_upload_is_bitwise_as_tensor_on_cpu():
    a = np.random.default_rng(0).normal(size=(4, 4))
    assert torch.equal(accel.upload(a, DEV), torch.as_tensor(a, dtype=torch.float32))
    cam = Camera.orbit(-20.0, 35.0, 2.1, width=40)
    for virtual in (False, True):
        with accel.virtual() if virtual else torch.no_grad():
            view, K = cam.viewmat_and_K(DEV)
        assert torch.equal(view, torch.as_tensor(cam.viewmat_np, dtype=torch.float32))
        assert torch.equal(K, torch.as_tensor(cam.K_np, dtype=torch.float32))


def test_densification_statistics_with_where_equal_masked_updates():
    from hash3d_dg.gaussians import Densifier, GaussianModel
    from hash3d_dg.gaussians.render_result import GaussianRender

    model = GaussianModel.random_init(50, seed=1)
    dens = Densifier()
    dens.reset_stats(model)
    gen = torch.Generator().manual_seed(0)
    ref_accum, ref_denom, ref_radii = (torch.zeros(50) for _ in range(3))
    for _ in range(4):
        means2d = torch.randn(50, 2, generator=gen, requires_grad=True)
        (means2d * torch.randn(50, 2, generator=gen)).sum().backward()
        radii = (torch.rand(50, generator=gen) * 6 - 2).round().clamp_min(0).to(torch.int32)
        render = GaussianRender(image=torch.zeros(8, 12, 3), alpha=torch.zeros(8, 12, 1),
                                depth=torch.zeros(8, 12, 1), radii=radii, means2d=means2d,
                                backend="torch")
        dens.accumulate(model, render)
        # the masked updates this replaces
        visible = radii > 0
        norms = (means2d.grad[visible] * torch.tensor([6.0, 4.0])).norm(dim=-1)
        ref_accum[visible] += norms
        ref_denom[visible] += 1
        ref_radii[visible] = torch.maximum(ref_radii[visible], radii[visible].float())
    assert torch.equal(dens.grad_accum, ref_accum)
    assert torch.equal(dens.denom, ref_denom)
    assert torch.equal(dens.max_radii, ref_radii)


def _exercise(cache: Hash3DCache, seed: int = 0):
    """Inserts and retrievals at nearby keys; returns every retrieved feature."""
    rnd = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(60):
        key = CacheKey(rnd.uniform(0, 40), rnd.uniform(-10, 10), 2.0, rnd.choice([480, 500, 515]))
        query = torch.randn(4, 3, 3, generator=gen, device=DEV)
        found = cache.retrieve(key, query) if i % 2 else None
        if found is not None:
            out.append(found[0])
        else:
            cache.insert(key, query, torch.randn(2, 5, 4, 4, generator=gen, device=DEV))
    return out


def test_device_resident_table_equals_the_host_table():
    cfg = Hash3DConfig.preset("paper", eta=1.0)
    host = Hash3DCache(cfg, seed=0, device_resident=False)
    dev = Hash3DCache(cfg, seed=0, device_resident=True)
    a, b = _exercise(host), _exercise(dev)
    assert len(a) == len(b) > 10
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert host.stats.as_dict() == dev.stats.as_dict()  # grid hits read back once here
    assert sum(host.stats.hits_by_grid) == host.stats.hits
    for key in (CacheKey(5.0, 1.0, 2.0, 500), CacheKey(25.0, -5.0, 2.0, 480)):
        assert host.similarity(key) == dev.similarity(key)


def test_device_resident_table_reads_nothing_back():
    cfg = Hash3DConfig.preset("paper", eta=1.0)
    cache = Hash3DCache(cfg, seed=0, device_resident=True)
    _exercise(cache, seed=1)  # fill
    with LaunchCounter() as c:
        _exercise(cache, seed=2)
    counts = c.take()
    assert counts.syncs == 0, counts.sites
    assert counts.uploads == 0, counts.sites


def test_a_cached_denoiser_call_uploads_nothing_after_the_first():
    from hash3d_dg.cache import CachedDenoiser

    class Model:
        def full(self, sample, timestep, context):
            return sample * 2, sample + 1

        def shallow(self, sample, timestep, context, feature):
            return feature - 1 + sample

    cfg = Hash3DConfig.preset("paper", eta=1.0, adaptive=False, grids=[[10, 10, 0.1, 10]])
    den = CachedDenoiser(Model(), Hash3DCache(cfg, seed=0, device_resident=True))
    keys = [CacheKey(1.0, 1.0, 2.0, 500.0), CacheKey(50.0, 1.0, 2.0, 500.0)]
    x = torch.randn(4, 3, 2, 2)
    den(x, None, None, keys=keys)  # both full: stored
    keys2 = [CacheKey(1.0, 1.0, 2.0, 500.0), CacheKey(90.0, 1.0, 2.0, 500.0)]
    den(x, None, None, keys=keys2)  # one hit, one miss: the row pattern is uploaded once
    with LaunchCounter() as c:
        out = den(x, None, None, keys=keys2)
    counts = c.take()
    assert counts.uploads == 0 and counts.syncs == 0, counts.sites
    assert torch.equal(out[[0, 2]], x[[0, 2]] + 1 - 1 + x[[0, 2]])


# -- the stages ---------------------------------------------------------------------------------

@pytest.mark.parametrize("stage", ["stage1", "stage2"])
def test_steady_stage_iterations_have_no_host_sync_nor_blocking_upload(stage):
    """Every steady-state iteration (no check, no densify/prune) of the cached guidance path,
    retrieving at every call (eta 1), on the accelerator's code path: zero syncs and zero
    blocking uploads outside the rasteriser."""
    from hash3d_dg.bench.launches import count_stage, launch_config

    cfg = launch_config("paper", hash3d={"eta": 1.0},
                        stage1={"iters": 14}, stage2={"iters": 7})
    r = count_stage(stage, "paper", cfg=cfg)
    assert r["steady_iterations"] >= 4
    assert r["max_syncs_per_steady_iter"] == 0, r["sites_per_iter"]
    assert r["max_uploads_per_steady_iter"] == 0, r["sites_per_iter"]
    assert r["kernels_per_iter"] > 100  # the counter saw the iteration
