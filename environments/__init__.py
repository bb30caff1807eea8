"""environments: model organisms with planted behaviours, clean controls, and the live `Target`
an auditor works with (the ground truth stays out of its reach).

    from environments import load_suite, get_spec, build_target
    spec = get_spec("flattery-sp")
    target = build_target(spec, handle, alias="target-1", layer=20)
"""

from .builders import BUILDERS, Builder, concept_direction, get_builder, register_builder, weights_present
from .errors import (
    AdapterMismatchError,
    OrganismError,
    SpecError,
    TargetError,
    TriggerError,
    UnknownConversationError,
    UnknownMethodError,
    UnknownOrganismError,
    WeightsMissingError,
)
from .organism import Planted
from .runtime import build_target, plant, planted_for
from .spec import (
    ORGANISMS_DIR,
    BehaviourCheck,
    Construction,
    GroundTruth,
    Measured,
    OrganismSpec,
    Trigger,
    get_spec,
    list_suites,
    load_spec,
    load_suite,
    save_spec,
)
from .target import ChatTurn, Completion, Message, Target

__all__ = [
    "OrganismSpec", "Construction", "GroundTruth", "Trigger", "BehaviourCheck", "Measured",
    "load_suite", "get_spec", "load_spec", "save_spec", "list_suites", "ORGANISMS_DIR",
    "Target", "ChatTurn", "Completion", "Message", "build_target", "weights_present",
    "Planted", "plant", "planted_for",
    "Builder", "BUILDERS", "register_builder", "get_builder", "concept_direction",
    "OrganismError", "SpecError", "UnknownOrganismError", "UnknownMethodError",
    "AdapterMismatchError", "TriggerError", "WeightsMissingError", "TargetError",
    "UnknownConversationError",
]
