"""The optimisation loop both stages run: one place for what every iteration does around a stage's
own forward pass.

A stage supplies ``forward(step, step_ratio) -> loss`` (its renders, losses and guidance calls;
renders reported to the guard it is given) and, optionally, ``after_step(step)`` (work that
follows the optimiser step, such as stage 1's densification). The loop owns the rest, in this
order per iteration: forward, guard on the loss, backward, guard on the gradients, the guard
check on its interval (before the optimiser step, so a non-finite update never reaches the
parameters), optimiser step, zero grad, ``after_step``, and on the same interval one read of the
loss for the progress bar and the progress callback. Metering of the guidance (UNet calls, cache
hits) and the stage's wall time are here too.

A graph-captured step goes here as another way to run ``forward`` + backward + step with the same
guard, interval and metering.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from hash3d_dg.stages.views import DivergenceGuard, GuidanceMeter, check_interval


@dataclass
class LoopResult:
    """What the loop measured: the loss at the last check, the seconds spent, the guidance's
    activity during the loop (``{"unet": ..., "cache": ...}``)."""

    final_loss: float
    seconds: float
    guidance: dict


@dataclass
class StageLoop:
    """One stage's optimisation loop.

    Args:
        stage: the stage's name in progress events (``"stage1"``, ``"stage2"``).
        title: its name in messages (``"stage 1"``).
        label: the progress bar's description.
        iters: iterations (steps 1..iters).
        optimizer: the stage's optimiser (its parameter list may change between steps).
        params: what the gradient check reads, called once per step (the parameters may be
            replaced by densification).
        device: where the parameters live (sets the check interval).
        guidance: the guidance whose activity is metered, or None.
        progress: show a progress bar.
        progress_callback: called at every check with ``{"stage", "step", "total", "loss",
            "hit_rate"}``.
        postfix: extra progress-bar fields at a check (e.g. the number of Gaussians).
    """

    stage: str
    title: str
    label: str
    iters: int
    optimizer: torch.optim.Optimizer
    params: Callable[[], Iterable[torch.Tensor]]
    device: torch.device | str
    guidance: object = None
    progress: bool = True
    progress_callback: Callable[[dict], None] | None = None
    postfix: Callable[[], dict] | None = None

    def __post_init__(self) -> None:
        self.guard = DivergenceGuard(self.title, self.device)
        self.every = check_interval(self.device)

    def run(self, forward: Callable[[int, float], torch.Tensor],
            after_step: Callable[[int], None] | None = None) -> LoopResult:
        meter = GuidanceMeter(self.guidance)
        start = time.perf_counter()
        bar = tqdm(range(1, self.iters + 1), desc=self.label, disable=not self.progress,
                   dynamic_ncols=True)
        loss_value = float("nan")
        guard = self.guard
        for step in bar:
            step_ratio = min(1.0, step / max(self.iters, 1))
            loss = forward(step, step_ratio)
            guard.observe_loss(step, loss)
            loss.backward()
            guard.observe_gradients(step, self.params())
            due = step % self.every == 0 or step == self.iters
            if due:
                guard.check()  # before the step: a non-finite update never reaches the parameters
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            if after_step is not None:
                after_step(step)
            if due:  # one read of the loss per check, not a host sync every step
                loss_value = float(loss.detach())
                if self.progress:
                    bar.set_postfix(meter.postfix(loss_value, **(self.postfix() if self.postfix else {})))
                if self.progress_callback is not None:
                    self.progress_callback({"stage": self.stage, "step": step, "total": self.iters,
                                            "loss": loss_value, "hit_rate": meter.hit_rate()})
        bar.close()
        return LoopResult(final_loss=loss_value, seconds=time.perf_counter() - start,
                          guidance=meter.report())
