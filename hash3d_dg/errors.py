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
