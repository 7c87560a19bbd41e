"""What can stop a stage before or while it works, each naming its cause in one line."""

from __future__ import annotations


class StageError(RuntimeError):
    """A stage cannot run as asked; the message names the cause and what to do."""


class StageInputError(StageError):
    """An input (upstream output, checkpoint, data file) is missing, damaged or does not fit."""


class ResourceError(StageError):
    """The machine or cluster cannot provide what the config asks for."""


class StageLockedError(StageError):
    """Another run of the same stage (same output directory) is in progress."""
