"""The learned oracle in the oracle harness and in the staleness benchmark.

``LearnedDenoiser`` implements the cache's ``SplitDenoiser`` protocol over the trained denoiser
of ``learned.py`` through the product's own ``UNetSplit`` (and so at the product's cache points),
with the face ``OracleGuidance`` expects of its model (``image_size``, ``reference_elevation``,
``renders``). In the harness (``bench oracle --judge learned``) it replaces the analytic
``OracleDenoiser``: the guidance works on 32 px pixels (renders are resized to 32), the model is
conditioned on the oracle object's reference view (elevation 0, azimuth 0, radius 2, rendered
as in training) and on the relative camera, and the Hash3D table stores its features at the run's
``hash3d.cache_point``. ``--judge random`` is the same architecture at its random init.

``staleness_report`` measures how wrong a reused feature makes the prediction, as the cache
serves it in SDS: the target query is a held-out camera of the oracle object at timestep ``t``
with fresh noise; the source (the pass whose feature is reused) differs by azimuth, by timestep,
or only by its noise draw. For each cache point: the relative error of the shallow prediction
against the target's own full forward, and the PSNR of the clean image it implies.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from hash3d_dg.guidance.unet_split import UNetSplit
from hash3d_dg.eval import learned as L

JUDGES = ("analytic", "learned", "random")


class LearnedDenoiser:
    """A ``SplitDenoiser`` over the learned oracle (pixel space, 32 px, [-1, 1]).

    Args:
        unet: the learned oracle's ``UNet2DConditionModel`` (frozen).
        cache_point: where ``UNetSplit`` splits it (a named point or ``[up_block, pair]``).
        reference: ``[3, 32, 32]`` conditioning view in [-1, 1]; default: the oracle object's
            reference view rendered as in training.
        reference_elevation: the reference camera's elevation (cameras are relative to it; the
            model was trained with the reference at elevation 0).

    ``context``: ``[N, 3]`` rows ``(d_elevation, d_azimuth, d_radius)`` as the analytic oracle's.
    """

    def __init__(self, unet, cache_point: Any = "paper", reference: torch.Tensor | None = None,
                 reference_elevation: float = 0.0):
        self.unet = unet
        self.split = UNetSplit(unet, cache_point)
        self.image_size = L.IMAGE_SIZE
        self.reference_elevation = float(reference_elevation)
        if reference is None:
            reference = L.render_view(L.object_meshes(0)[0], *L.REFERENCE)
        self.reference = reference.float()
        self.renders = 0  # the analytic oracle's ground-truth render count (none here)

    def _inputs(self, sample: torch.Tensor, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return L.model_inputs(sample, context, self.reference)

    @torch.no_grad()
    def full(self, sample: torch.Tensor, timestep: Any, context: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor]:
        x, tokens = self._inputs(sample, context)
        return self.split.full(x, timestep, tokens)

    @torch.no_grad()
    def shallow(self, sample: torch.Tensor, timestep: Any, context: torch.Tensor,
                feature: torch.Tensor) -> torch.Tensor:
        x, tokens = self._inputs(sample, context)
        return self.split.shallow(x, timestep, tokens, feature)


def load_judge(judge: str):
    """The ``UNet2DConditionModel`` of ``judge`` (``learned``: the shipped weights; ``random``: the
    same architecture at its seed-0 random init)."""
    if judge == "learned":
        return L.load_unet()
    if judge == "random":
        return L.build_unet(L.model_config(), seed=0).eval().requires_grad_(False)
    raise ValueError(f"unknown learned judge {judge!r}: expected learned or random")


def make_denoiser(judge: str, cache_point: Any = "paper", reference_elevation: float = 0.0) -> LearnedDenoiser:
    return LearnedDenoiser(load_judge(judge), cache_point, reference_elevation=reference_elevation)


# ---------------------------------------------------------------------------------- staleness

#: Source-vs-target differences of the staleness table.
AZIMUTH_DELTAS = (10.0, 20.0, 40.0)
TIMESTEP_DELTAS = (20, 50, 100)
POINTS = ("paper", "last_subblock", "last_block")


@torch.no_grad()
def staleness_report(judges=("learned", "random"), n: int = 16, timesteps=(200, 500, 800),
                     seed: int = 0) -> dict:
    """Relative error (and implied clean-image PSNR) of the shallow prediction from a reused
    feature, per judge, scenario and cache point; fresh noise for every pass (as SDS draws it).

    Scenario ``azimuth +d``: the source camera is the target's turned by d degrees, same t;
    ``timestep +d``: same camera, source timestep t + d; ``fresh noise``: same camera and t, only
    the noise differs. ``full (fresh noise)`` is the target's own full prediction for reference
    (its PSNR is the model's one-step quality); ``stale output`` reuses the whole source output.
    """
    g = torch.Generator().manual_seed(seed)
    mesh = L.object_meshes(0)[0]
    cams = L.sample_cameras(n, g)
    ref = L.render_view(mesh, *L.REFERENCE)
    abar = L.alphas_cumprod().float()

    def images(cameras: torch.Tensor) -> torch.Tensor:
        return torch.stack([L.render_view(mesh, el, az, L.RADIUS + dr) for el, az, dr in cameras.tolist()])

    x0 = images(cams)
    scenarios: list[tuple[str, torch.Tensor, torch.Tensor, int]] = []
    for d in AZIMUTH_DELTAS:
        c = cams.clone()
        c[:, 1] += d
        scenarios.append((f"azimuth +{d:g} deg", c, images(c), 0))
    for d in TIMESTEP_DELTAS:
        scenarios.append((f"timestep +{d}", cams, x0, d))
    scenarios.append(("same camera and t, fresh noise", cams, x0, 0))

    start = time.perf_counter()
    out: dict = {"n": n, "timesteps": list(timesteps), "seed": seed, "judges": {}}
    for judge in judges:
        unet = load_judge(judge)
        splits = {p: LearnedDenoiser(unet, p, reference=ref) for p in POINTS}
        rows: dict[str, dict[str, list[float]]] = {}

        def add(name: str, key: str, value: float) -> None:
            rows.setdefault(name, {}).setdefault(key, []).append(value)

        for t in timesteps:
            ab = abar[t]
            tt = torch.full((n,), t, dtype=torch.long)
            noise_tgt = torch.randn(x0.shape, generator=g)
            x_tgt = ab.sqrt() * x0 + (1 - ab).sqrt() * noise_tgt
            base = splits["paper"]
            eps_tgt, _ = base.full(x_tgt, tt, cams)

            def x0_psnr(eps: torch.Tensor) -> float:
                x0_hat = (x_tgt - (1 - ab).sqrt() * eps) / ab.sqrt()
                return float(L.psnr_pm1(x0_hat, x0).mean())

            def rel(eps: torch.Tensor) -> float:
                return float(((eps - eps_tgt).flatten(1).norm(dim=1) / eps_tgt.flatten(1).norm(dim=1)).mean())

            add("full (fresh noise)", "x0_psnr", x0_psnr(eps_tgt))
            add("full (fresh noise)", "eps_mse", float(((eps_tgt - noise_tgt) ** 2).mean()))
            for name, src_cams, src_x0, dt in scenarios:
                ts = min(t + dt, 999)
                ab_s = abar[ts]
                x_src = ab_s.sqrt() * src_x0 + (1 - ab_s).sqrt() * torch.randn(x0.shape, generator=g)
                ts_t = torch.full((n,), ts, dtype=torch.long)
                stale, _ = base.full(x_src, ts_t, src_cams)
                add(name, "stale_output_rel_err", rel(stale))
                for p, split in splits.items():
                    _, feat = split.full(x_src, ts_t, src_cams)
                    eps = split.shallow(x_tgt, tt, cams, feat)
                    add(name, f"rel_err_{p}", rel(eps))
                    add(name, f"x0_psnr_{p}", x0_psnr(eps))
        out["judges"][judge] = {name: {k: round(sum(v) / len(v), 4) for k, v in cols.items()}
                                for name, cols in rows.items()}
    out["seconds"] = round(time.perf_counter() - start, 1)
    out["note"] = ("learned oracle (eval/learned.py, 1 layer per block: paper and last_subblock "
                   "coincide) vs the same architecture at random init; rel_err = ||shallow(target, "
                   "feature(source)) - full(target)|| / ||full(target)||, mean over views and t; "
                   "x0_psnr = PSNR of the clean image the prediction implies against the truth")
    return out


# ---------------------------------------------------------------------------------- policies

#: The learned judge's Pareto sweep (``bench pareto --judge learned --sweep learned``): the four
#: presets, then ``fast`` with one of its choices changed at a time (``label``, overrides of the
#: fast preset). With one layer per block ``paper`` and ``last_subblock`` are the same point.
LEARNED_SWEEP: tuple[tuple[str, dict], ...] = (
    ("fast, last_block point", {"cache_point": "last_block"}),
    ("fast, no timestep fall-back", {"timestep_fallback": 0}),
    ("fast, stage 2 no reuse", {"stage2": "none"}),
    ("fast, no gate (blend the cell)", {"camera_gate_deg": None}),
    ("fast, eta 0.5", {"eta": 0.5}),
    ("fast, last_block point, stage 2 no reuse", {"cache_point": "last_block", "stage2": "none"}),
)


def learned_sweep(policies: int | None = None) -> list[tuple[str, dict, Any, int]]:
    """``(label, meta, Hash3DConfig, seed offset)`` rows: the presets paper / official / fast and
    the first ``policies`` (default all) ``LEARNED_SWEEP`` variants of fast (``off`` is added by
    the caller)."""
    from hash3d_dg.cache import Hash3DConfig

    rows = [(mode, {"group": "preset", "mode": mode}, Hash3DConfig.preset(mode), 0)
            for mode in ("paper", "official", "fast")]
    for label, overrides in LEARNED_SWEEP[:policies]:
        rows.append((label, {"group": "policy", **{k: v for k, v in overrides.items()}},
                     Hash3DConfig.preset("fast", **overrides), 0))
    return rows
