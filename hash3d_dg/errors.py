"""Errors meant for the user, not for a traceback.

The command-line entry points catch :class:`UserError` and print ``str(error)`` as one line on
stderr, then exit with status 2. So the message of every such error is a single line that says
what is wrong and what to do about it.
"""

from __future__ import annotations


class UserError(Exception):
    """Base of every error the CLI reports as one line on stderr (exit status 2).

    Line breaks in the message are folded into spaces, so ``str(error)`` is always one line.
    """

    def __init__(self, message: object = "") -> None:
        super().__init__(" ".join(str(message).split()))

    def __str__(self) -> str:
        return " ".join(super().__str__().split())


class InputError(UserError):
    """The input image or path cannot be used (missing, unreadable, truncated, empty, ...)."""


class ConfigError(UserError):
    """A setting or configuration value is invalid."""


class OutputError(UserError):
    """A result cannot be written to, or committed in, its output folder (an OS error there)."""


class DivergenceError(UserError):
    """The optimisation produced a non-finite loss, render or gradient (the run stops there)."""

    def __init__(self, stage: str, iteration: int, quantity: str) -> None:
        self.stage, self.iteration, self.quantity = stage, int(iteration), quantity
        super().__init__(
            f"{stage} diverged at iteration {iteration}: the {quantity} is not finite (NaN or inf); "
            "nothing was exported: lower the learning rates or loss weights and rerun")


class RunInterrupted(BaseException):
    """The run was stopped by a signal (SIGINT, SIGTERM). A ``BaseException``, like
    ``KeyboardInterrupt``, so that no ``except Exception`` swallows it; every ``with`` block and
    ``finally`` on the way out still runs (staging folders removed, child processes killed)."""

    def __init__(self, signum: int) -> None:
        import signal

        self.signum = int(signum)
        self.signal_name = signal.Signals(self.signum).name
        super().__init__(self.signal_name)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum
