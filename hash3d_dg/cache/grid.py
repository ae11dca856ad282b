"""Grid hashing of (camera, timestep) keys: Hash3D Eq. 5.

A key ``(azimuth, elevation, radius, timestep)`` falls in the grid cell
``(i, j, k, l) = (floor(az/d_az), floor(el/d_el), floor(r/d_r), floor(t/d_t))`` with the azimuth
first wrapped to ``[0, 360)`` (so 359.9 and -0.1 share a cell), and the cell in the hash bucket
``(i + N1*j + N2*k + N3*l) mod n``. Each delta applies to its own coordinate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

Cell = tuple[int, int, int, int]

# Snap values within this relative distance of a cell boundary onto the boundary, so that exact
# multiples (radius 2.0 with d_r 0.1 gives 19.999999999999996) start their own cell.
_SNAP = 1e-9


@dataclass(frozen=True)
class CacheKey:
    """Where a feature was computed: camera (relative to the reference view) and timestep.

    Attributes:
        azimuth: degrees; wraps at 360.
        elevation: degrees.
        radius: camera distance.
        timestep: diffusion timestep (0..1000 scale).
    """

    azimuth: float
    elevation: float
    radius: float
    timestep: float


def _floor_div(value: float, delta: float) -> int:
    return math.floor(value / delta + _SNAP)


@dataclass(frozen=True)
class GridSpec:
    """One grid: the cell size along each key coordinate.

    Attributes:
        d_azimuth: degrees; cells of the last column are shorter when it does not divide 360.
        d_elevation: degrees.
        d_radius: radius units.
        d_timestep: timestep units.
    """

    d_azimuth: float
    d_elevation: float
    d_radius: float
    d_timestep: float

    def __post_init__(self) -> None:
        for name in ("d_azimuth", "d_elevation", "d_radius", "d_timestep"):
            if not getattr(self, name) > 0:
                raise ValueError(f"grid {name} must be > 0, got {getattr(self, name)!r}")

    @classmethod
    def from_list(cls, deltas: list[float] | tuple[float, ...]) -> "GridSpec":
        """``[d_az, d_el, d_r, d_t]`` -> ``GridSpec``."""
        if len(deltas) != 4:
            raise ValueError(f"a grid needs 4 deltas [d_az, d_el, d_r, d_t], got {deltas!r}")
        return cls(*(float(d) for d in deltas))

    @property
    def n_azimuth_cells(self) -> int:
        """Cells around the full circle (azimuth indices are taken modulo this)."""
        return max(1, math.ceil(360.0 / self.d_azimuth - _SNAP))

    def cell(self, key: CacheKey) -> Cell:
        """The integer cell ``(i, j, k, l)`` holding ``key``."""
        az = math.fmod(float(key.azimuth), 360.0)
        if az < 0:
            az += 360.0
        i = _floor_div(az, self.d_azimuth) % self.n_azimuth_cells
        j = _floor_div(float(key.elevation), self.d_elevation)
        k = _floor_div(float(key.radius), self.d_radius)
        l = _floor_div(float(key.timestep), self.d_timestep)
        return (i, j, k, l)


def bucket_index(cell: Cell, primes: list[int] | tuple[int, ...], table_size: int) -> int:
    """Eq. 5: ``(i + N1*j + N2*k + N3*l) mod n``, always in ``[0, n)`` (Python's modulo)."""
    i, j, k, l = cell
    n1, n2, n3 = primes
    return (i + n1 * j + n2 * k + n3 * l) % table_size
