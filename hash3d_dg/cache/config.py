"""Hash3D settings: one plain dataclass (nestable in a YAML run config) with named presets.

Modes:

- ``off``: no feature cache at all.
- ``paper``: Yang & Wang, "Hash3D" as the paper defines it: three candidate grids
  (10/20/30 deg, 0.1/0.15/0.2 radius, 10/20/30 steps) chosen adaptively per bucket (Eq. 7-8),
  retrieval probability 0.1, weights ``softmax(-||x - x_i||^2)`` (Eq. 6), and in stage 2 the same
  grid cache keyed by camera and denoising timestep.
- ``official``: what the public reference code does (with its hashing bugs fixed): one grid
  (20 deg, 20 deg, 0.1, 20 steps), retrieval probability 0.5, weights ``softmax(-||x - x_i||)``,
  no adaptivity, and in stage 2 DeepCache-style reuse along each denoising trajectory every
  ``trajectory_interval`` steps.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

MODES = ("off", "paper", "official")
DISTANCES = ("squared", "l2")
CACHE_POINTS = ("last_subblock", "last_block")
STAGE2_MODES = ("cache", "trajectory")
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
        cache_point: where the UNet is split: ``"last_subblock"`` (before the last up block's
            final (resnet, attention) pair) or ``"last_block"`` (input of the last up block).
        stage2: ``"cache"`` (grid cache keyed by camera + denoising timestep) or
            ``"trajectory"`` (official: reuse along each denoising trajectory).
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
    cache_point: str = "last_subblock"
    stage2: str = "cache"
    trajectory_interval: int = 20
    store_dtype: str = "auto"

    def __post_init__(self) -> None:
        self.validate()

    @property
    def enabled(self) -> bool:
        """True unless ``mode == "off"``."""
        return self.mode != "off"

    @classmethod
    def preset(cls, mode: str, **overrides) -> "Hash3DConfig":
        """The named preset (``off`` | ``paper`` | ``official``) with ``overrides`` applied.

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
                        distance="l2", stage2="trajectory")
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
        if self.cache_point not in CACHE_POINTS:
            bad(f"cache_point must be one of {', '.join(CACHE_POINTS)}, got {self.cache_point!r}")
        if self.stage2 not in STAGE2_MODES:
            bad(f"stage2 must be one of {', '.join(STAGE2_MODES)}, got {self.stage2!r}")
        if not isinstance(self.trajectory_interval, int) or self.trajectory_interval < 1:
            bad(f"trajectory_interval must be an integer >= 1, got {self.trajectory_interval!r}")
        if self.store_dtype not in STORE_DTYPES:
            bad(f"store_dtype must be one of {', '.join(STORE_DTYPES)}, got {self.store_dtype!r}")

    def active_grids(self) -> list[list[float]]:
        """The grids the cache builds: all of them when adaptive, else only the first."""
        return [list(map(float, g)) for g in (self.grids if self.adaptive else self.grids[:1])]
