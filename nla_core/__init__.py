"""nla_core: one model and its Natural Language Autoencoder.

Load a model, read and write its residual stream, verbalize activations into text, reconstruct
text into activations, steer the model, and load / save / train NLA checkpoints.

Names are imported on first use (PEP 562): `from nla_core.errors import NLAError` must not load
torch, so that the `nla` CLI answers `--help` and usage errors at once.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "activations": ["Activations", "encode", "read_activations"],
    "defaults": ["default_checkpoint", "load_nla_for"],
    "checkpoint": ["NLAMeta", "extract_explanation", "read_meta", "write_meta"],
    "errors": ["BadVectorError", "CheckpointError", "EmptyInputError", "LayerOutOfRangeError",
               "ModelNotFoundError", "NLAError", "PositionOutOfRangeError", "SidecarDriftError"],
    "generation": ["Generation", "generate_ids"],
    "hooks": ["add_to_resid", "capture_resid", "count_hooks", "inject_at_marker", "resid_site"],
    "metrics": ["fve", "mean_baseline", "normalize", "normalized_mse"],
    "models": ["EMBEDDED_MODEL", "ModelHandle", "embedded_model_dir", "handle_from", "load_model"],
    "nla": ["NLA", "RoundTrip", "SteerResult", "Verbalization", "default_layer"],
    "protocols": ["NLALike", "TargetLike", "ToolboxLike"],
    "registry": ["Registry"],
    "steering": ["MAX_STEER_STRENGTH", "read_vector_file", "steered_generations"],
}
_WHERE = {name: mod for mod, names in _EXPORTS.items() for name in names}

__all__ = [name for names in _EXPORTS.values() for name in names]


def __getattr__(name: str) -> Any:
    mod = _WHERE.get(name)
    if mod is not None:
        value = getattr(import_module(f"{__name__}.{mod}"), name)
        globals()[name] = value
        return value
    if name.startswith("__"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:  # `import nla_core; nla_core.models.X` worked when everything was imported eagerly
        return import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as exc:
        if exc.name != f"{__name__}.{name}":
            raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # static analysers and IDEs see the eager imports
    from .activations import Activations, encode, read_activations
    from .checkpoint import NLAMeta, extract_explanation, read_meta, write_meta
    from .defaults import default_checkpoint, load_nla_for
    from .errors import (
        BadVectorError,
        CheckpointError,
        EmptyInputError,
        LayerOutOfRangeError,
        ModelNotFoundError,
        NLAError,
        PositionOutOfRangeError,
        SidecarDriftError,
    )
    from .generation import Generation, generate_ids
    from .hooks import add_to_resid, capture_resid, count_hooks, inject_at_marker, resid_site
    from .metrics import fve, mean_baseline, normalize, normalized_mse
    from .models import EMBEDDED_MODEL, ModelHandle, embedded_model_dir, handle_from, load_model
    from .nla import NLA, RoundTrip, SteerResult, Verbalization, default_layer
    from .protocols import NLALike, TargetLike, ToolboxLike
    from .registry import Registry
    from .steering import MAX_STEER_STRENGTH, read_vector_file, steered_generations
