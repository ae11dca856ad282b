"""Seconds per step of the mesh phase: wall clock and CPU time (this process + its children).

CPU time is the steadier figure on a shared machine (other processes stretch the wall clock of
a single-threaded step, not its CPU time); xatlas runs in a child process, whose CPU time counts
once it has exited.
"""

from __future__ import annotations

import contextlib
import os
import time


def cpu_seconds() -> float:
    """CPU seconds used so far by this process and its waited-for children."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class StepClock:
    """``with clock.step("name"): ...`` adds the step's wall and CPU seconds to ``wall`` / ``cpu``."""

    def __init__(self) -> None:
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}

    @contextlib.contextmanager
    def step(self, name: str):
        w0, c0 = time.perf_counter(), cpu_seconds()
        try:
            yield
        finally:
            self.wall[name] = self.wall.get(name, 0.0) + time.perf_counter() - w0
            self.cpu[name] = self.cpu.get(name, 0.0) + cpu_seconds() - c0

    def report(self) -> dict:
        return {"step_seconds": {k: round(v, 3) for k, v in self.wall.items()},
                "step_cpu_seconds": {k: round(v, 3) for k, v in self.cpu.items()},
                "cpu_seconds": round(sum(self.cpu.values()), 3)}
