"""Errors the command line reports as one clear message, without a traceback."""

from __future__ import annotations

__all__ = ["UserError", "TrainingDiverged"]


class UserError(Exception):
    """A mistake in what the user gave us (flags, files, checkpoints).

    ``se3t`` prints ``error: <message>`` and exits with status 2; it never shows a traceback for these.
    """

    exit_code = 2


class TrainingDiverged(UserError):
    """The loss or the gradients became NaN/inf; the last good checkpoint on disk was left untouched."""

    exit_code = 3
