"""Errors raised by organism specs, builders and targets (all `NLAError`s: problem + fix)."""

from __future__ import annotations

from nla_core.errors import NLAError

__all__ = [
    "OrganismError",
    "SpecError",
    "UnknownOrganismError",
    "UnknownMethodError",
    "AdapterMismatchError",
    "TriggerError",
    "WeightsMissingError",
    "TargetError",
    "UnknownConversationError",
]


class OrganismError(NLAError):
    """Base class for everything in `environments`."""


class SpecError(OrganismError):
    """A spec file is missing fields, has wrong types, or contradicts itself."""


class UnknownOrganismError(OrganismError):
    pass


class UnknownMethodError(SpecError):
    """The construction method names no registered builder."""


class AdapterMismatchError(OrganismError):
    """A LoRA adapter was trained on another base model (or its shapes do not fit)."""


class TriggerError(OrganismError):
    """A conditional organism's trigger cannot fire (e.g. no eval prompt contains it)."""


class WeightsMissingError(OrganismError):
    """A catalog organism whose weights are not present locally."""


class TargetError(OrganismError):
    """An auditor-side call to a `Target` failed (the message never names hidden state)."""


class UnknownConversationError(TargetError):
    pass
