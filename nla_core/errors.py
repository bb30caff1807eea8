"""Errors with a message that names the problem and the fix.

Every error a user (or an auditing agent) can trigger through bad input derives from
`NLAError`, so the CLI and the tool layer can turn it into a readable message instead of
a traceback.
"""

from __future__ import annotations

__all__ = [
    "NLAError",
    "ModelNotFoundError",
    "LayerOutOfRangeError",
    "PositionOutOfRangeError",
    "BadVectorError",
    "EmptyInputError",
    "BadArgumentError",
    "InputTooLongError",
    "CheckpointError",
    "SidecarDriftError",
]


class NLAError(Exception):
    """Base class: `problem` says what is wrong, `fix` says what to do about it."""

    def __init__(self, problem: str, fix: str | None = None):
        self.problem = problem
        self.fix = fix
        super().__init__(problem if fix is None else f"{problem} Fix: {fix}")


class ModelNotFoundError(NLAError):
    pass


class LayerOutOfRangeError(NLAError):
    pass


class PositionOutOfRangeError(NLAError):
    pass


class BadVectorError(NLAError):
    pass


class EmptyInputError(NLAError):
    pass


class BadArgumentError(NLAError):
    """An argument of the wrong type or out of its range (n_samples=0, max_new_tokens=-1, ...)."""


class InputTooLongError(NLAError):
    """A text or prompt longer than the stated maximum (characters, or the model's context)."""


class CheckpointError(NLAError):
    pass


class SidecarDriftError(CheckpointError):
    """The checkpoint's nla_meta.yaml disagrees with the live tokenizer or model."""
