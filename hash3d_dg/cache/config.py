"""Hash3D settings: one plain dataclass (nestable in a YAML run config) with named presets.

Modes:

- ``off``: no feature cache at all.
- ``paper``: Yang & Wang, "Hash3D" as the paper defines it: three candidate grids
  (10/20/30 deg, 0.1/0.15/0.2 radius, 10/20/30 steps) chosen adaptively per bucket (Eq. 7-8),
  retrieval probability 0.1, weights ``softmax(-||x - x_i||^2)`` (Eq. 6), and in stage 2 the same
  grid cache keyed by camera and denoising timestep.
- ``official``: what the public reference code computes, with its key bugs fixed: one grid
  (20 deg, 20 deg, 0.1, 20 steps), retrieval probability 0.5, weights ``softmax(-||x - x_i||)``,
  no adaptivity, DeepCache's (layer 0, block 0) cache point (= ``paper``), and in stage 2 no
  reuse at all (the public ``refine(..., cache_interval=20)`` passes no cache layer, so every one
  of its refine steps is a full UNet call). Its hashing bugs (blending of colliding cells, swapped
  deltas) are not reproduced.
- ``fast``: this project's preset beyond the paper (chosen on the oracle's Pareto front, see
  ``benchmarks/results/``): the cheaper ``last_subblock`` cache point, the paper's adaptive grids
  with retrieval probability ``FAST_ETA``,
  the timestep fall-back policy (a query whose own cell is empty takes the nearest non-empty
  timestep cell, at most ``FAST_TIMESTEP_FALLBACK`` cells away, of the same camera cell), the
  camera gate (only entries within ``FAST_CAMERA_GATE_DEG`` of the query's view are blended), and
  DeepCache-style trajectory reuse in stage 2. Meant with the tiny autoencoder
  (``guidance.vae=auto`` picks it for this mode).

Cache points (``cache_point``): ``paper`` = the hidden state entering the last up block's second
(resnet, attention) pair, i.e. ``[-1, 1]`` (DeepCache's (0, 0); shallow path 32.6 of 176.3 GMACs
on stable-zero123), ``last_subblock`` = before the last pair (11.7 GMACs), ``last_block`` = the
input of the last up block (55.7 GMACs), or any ``[up_block, pair]`` list (negative indices count
from the end).

Stage-2 reuse (``stage2``): ``cache`` (the grid cache keyed by camera + denoising timestep),
``trajectory`` (DeepCache-style reuse along each refine trajectory: a full step every
``trajectory_interval`` steps, shallow ones between) or ``none`` (every refine step full).

Retrieval policies beyond the paper:

- ``timestep_fallback`` (int, cells): when the query's own cell is empty in every grid, look in
  the cells of the same camera cell whose timestep index is at most this many cells away,
  nearest first (ties: the later, less noisy cell first), and serve from the first non-empty one.
  0 is the paper's behaviour.
- ``camera_gate_deg`` (float or None): only entries whose camera lies within this angle of the
  query's camera take part in the blend (the angle between the two view directions on the sphere
  of (elevation, azimuth)); a cell with none left counts as empty. None is the paper's behaviour
  (every entry of the cell, however far across it). It lets coarse cells serve without their
  worst, far-corner neighbours.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

MODES = ("off", "paper", "official", "fast")
DISTANCES = ("squared", "l2")
#: Named cache points and their ``(up_block, pair)`` (negative indices count from the end).
NAMED_CACHE_POINTS: dict[str, tuple[int, int]] = {"paper": (-1, 1), "last_subblock": (-1, -1), "last_block": (-1, 0)}
CACHE_POINTS = tuple(NAMED_CACHE_POINTS)
STAGE2_MODES = ("cache", "trajectory", "none")
#: Settings of the ``fast`` preset (see the module docstring and benchmarks/results/pareto_*.json).
#: First pick (eta 0.7, fall-back 3, gate 15, paper point) measured 27.50 dB against off's 28.19 on
#: the oracle (benchmarks/results/oracle_fast_v1_cpu.json): too many blends of views up to 15 deg
#: away. The gate was tightened and the cheaper point taken to keep the 3x at fewer reuses.
FAST_ETA = 1.0
FAST_TIMESTEP_FALLBACK = 5
FAST_CAMERA_GATE_DEG = 6.0
FAST_CACHE_POINT = "last_subblock"
STORE_DTYPES = ("auto", "float32", "float16", "bfloat16")

PAPER_GRIDS: list[list[float]] = [[10.0, 10.0, 0.1, 10.0], [20.0, 20.0, 0.15, 20.0], [30.0, 30.0, 0.2, 30.0]]
OFFICIAL_GRIDS: list[list[float]] = [[20.0, 20.0, 0.1, 20.0]]
# Large primes of Teschner et al.'s spatial hash ("Optimized Spatial Hashing", 2003).
DEFAULT_PRIMES: list[int] = [73856093, 19349663, 83492791]


@dataclass
class Hash3DConfig:
    """Hash3D feature-cache settings (plain fields only so a YAML config can nest it).

    Attributes:
        mode: ``"off"`` | ``"paper"`` | ``"official"``; see the module docstring.
        eta: probability of attempting a retrieval instead of a full UNet pass.
        grids: candidate grids, each ``[d_azimuth_deg, d_elevation_deg, d_radius, d_timestep]``.
        adaptive: choose among ``grids`` per query by running feature similarity (Eq. 7-8);
            when False only the first grid is used.
        distance: ``"squared"`` (paper: softmax(-||x-x_i||^2)) or ``"l2"`` (official code).
        queue_size: at most this many entries per grid cell (Q), oldest evicted first.
        table_size: number of hash buckets per grid (n in Eq. 5).
        primes: the three large primes N1, N2, N3 of Eq. 5.
        gamma: momentum of the running similarity ``s <- gamma*s + (1-gamma)*mean cos``. 0.9
            averages over roughly the last ten inserts of a cell, smoothing single noisy
            comparisons while still following the optimisation as the 3D object changes.
        memory_budget_bytes: cap on the bytes of all stored tensors (queries + features, each
            entry counted once however many grids reference it); oldest entries are evicted
            globally past it.
        cache_point: where the UNet is split: ``"paper"`` (``[-1, 1]``, the default),
            ``"last_subblock"``, ``"last_block"``, or an ``[up_block, pair]`` list.
        stage2: ``"cache"`` (grid cache keyed by camera + denoising timestep),
            ``"trajectory"`` (reuse along each denoising trajectory) or ``"none"`` (no reuse).
        timestep_fallback: timestep cells searched around an empty query cell (0 = off).
        camera_gate_deg: largest angle (degrees) between the query's and an entry's view
            direction for the entry to be used (None = no gate).
        trajectory_interval: full pass every this many steps in trajectory mode.
        store_dtype: dtype of stored tensors: ``"auto"`` (the feature's own) or a float dtype.
    """

    mode: str = "paper"
    eta: float = 0.1
    grids: list[list[float]] = field(default_factory=lambda: [list(g) for g in PAPER_GRIDS])
    adaptive: bool = True
    distance: str = "squared"
    queue_size: int = 3
    table_size: int = 1024
    primes: list[int] = field(default_factory=lambda: list(DEFAULT_PRIMES))
    gamma: float = 0.9
    memory_budget_bytes: int = 2 * 1024**3
    cache_point: str | list = "paper"
    stage2: str = "cache"
    trajectory_interval: int = 20
    store_dtype: str = "auto"
    timestep_fallback: int = 0
    camera_gate_deg: float | None = None

    def __post_init__(self) -> None:
        self.validate()

    @property
    def enabled(self) -> bool:
        """True unless ``mode == "off"``."""
        return self.mode != "off"

    @classmethod
    def preset(cls, mode: str, **overrides) -> "Hash3DConfig":
        """The named preset (``off`` | ``paper`` | ``official`` | ``fast``) with ``overrides`` applied.

        Raises:
            ValueError: unknown mode, unknown override name or an invalid value.
        """
        if mode not in MODES:
            raise ValueError(f"unknown Hash3D mode {mode!r}: expected one of {', '.join(MODES)}")
        names = {f.name for f in dataclasses.fields(cls)} - {"mode"}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise ValueError(f"unknown Hash3D setting(s): {', '.join(unknown)}")
        base: dict = {"mode": mode}
        if mode == "official":
            base.update(grids=[list(g) for g in OFFICIAL_GRIDS], adaptive=False, eta=0.5,
                        distance="l2", stage2="none")
        elif mode == "fast":
            base.update(eta=FAST_ETA, timestep_fallback=FAST_TIMESTEP_FALLBACK,
                        camera_gate_deg=FAST_CAMERA_GATE_DEG, cache_point=FAST_CACHE_POINT,
                        stage2="trajectory")
        base.update(overrides)
        return cls(**base)

    def validate(self) -> None:
        """Raise ``ValueError`` with a one-line message for any out-of-range value."""
        def bad(msg: str) -> None:
            raise ValueError(f"hash3d.{msg}")

        if self.mode not in MODES:
            bad(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if not isinstance(self.eta, (int, float)) or not 0.0 <= float(self.eta) <= 1.0:
            bad(f"eta must lie in [0, 1], got {self.eta!r}")
        if not isinstance(self.grids, (list, tuple)) or len(self.grids) == 0:
            bad("grids must be a non-empty list of [d_azimuth, d_elevation, d_radius, d_timestep]")
        for g in self.grids:
            if (not isinstance(g, (list, tuple)) or len(g) != 4
                    or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in g)):
                bad(f"grids entries must be 4 positive numbers [d_az, d_el, d_r, d_t], got {g!r}")
        if self.distance not in DISTANCES:
            bad(f"distance must be one of {', '.join(DISTANCES)}, got {self.distance!r}")
        if not isinstance(self.queue_size, int) or self.queue_size < 1:
            bad(f"queue_size must be an integer >= 1, got {self.queue_size!r}")
        if not isinstance(self.table_size, int) or self.table_size < 1:
            bad(f"table_size must be an integer >= 1, got {self.table_size!r}")
        if (not isinstance(self.primes, (list, tuple)) or len(self.primes) != 3
                or not all(isinstance(p, int) and not isinstance(p, bool) and p > 0 for p in self.primes)):
            bad(f"primes must be 3 positive integers, got {self.primes!r}")
        if not isinstance(self.gamma, (int, float)) or not 0.0 <= float(self.gamma) < 1.0:
            bad(f"gamma must lie in [0, 1), got {self.gamma!r}")
        if not isinstance(self.memory_budget_bytes, int) or self.memory_budget_bytes <= 0:
            bad(f"memory_budget_bytes must be a positive integer, got {self.memory_budget_bytes!r}")
        try:
            point = resolve_cache_point(self.cache_point)
        except ValueError:
            bad(f"cache_point must be one of {', '.join(CACHE_POINTS)} or [up_block, pair] (two integers), "
                f"got {self.cache_point!r}")
        if not isinstance(self.cache_point, str):
            self.cache_point = list(point)
        if self.stage2 not in STAGE2_MODES:
            bad(f"stage2 must be one of {', '.join(STAGE2_MODES)}, got {self.stage2!r}")
        if not isinstance(self.trajectory_interval, int) or self.trajectory_interval < 1:
            bad(f"trajectory_interval must be an integer >= 1, got {self.trajectory_interval!r}")
        if self.store_dtype not in STORE_DTYPES:
            bad(f"store_dtype must be one of {', '.join(STORE_DTYPES)}, got {self.store_dtype!r}")
        if (not isinstance(self.timestep_fallback, int) or isinstance(self.timestep_fallback, bool)
                or self.timestep_fallback < 0):
            bad(f"timestep_fallback must be an integer >= 0, got {self.timestep_fallback!r}")
        if self.camera_gate_deg is not None and (
                isinstance(self.camera_gate_deg, bool) or not isinstance(self.camera_gate_deg, (int, float))
                or not 0 < float(self.camera_gate_deg) <= 180):
            bad(f"camera_gate_deg must be a number in (0, 180] or null, got {self.camera_gate_deg!r}")

    def split_point(self) -> tuple[int, int]:
        """``cache_point`` as ``(up_block, pair)`` (negative indices count from the end)."""
        return resolve_cache_point(self.cache_point)

    def active_grids(self) -> list[list[float]]:
        """The grids the cache builds: all of them when adaptive, else only the first."""
        return [list(map(float, g)) for g in (self.grids if self.adaptive else self.grids[:1])]


def resolve_cache_point(point) -> tuple[int, int]:
    """A named cache point or an ``[up_block, pair]`` pair -> ``(up_block, pair)``.

    Raises:
        ValueError: an unknown name or not two integers.
    """
    if isinstance(point, str):
        if point not in NAMED_CACHE_POINTS:
            raise ValueError(f"unknown cache point {point!r}: expected one of {', '.join(CACHE_POINTS)} "
                             "or (up_block, pair)")
        return NAMED_CACHE_POINTS[point]
    if (not isinstance(point, (list, tuple)) or len(point) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in point)):
        raise ValueError(f"a cache point is a name or (up_block, pair) integers, got {point!r}")
    return int(point[0]), int(point[1])
