"""nla_core: one model and its Natural Language Autoencoder.

Load a model, read and write its residual stream, verbalize activations into text, reconstruct
text into activations, steer the model, and load / save / train NLA checkpoints.
"""

from .activations import Activations, encode, read_activations
from .defaults import default_checkpoint, load_nla_for
from .checkpoint import NLAMeta, extract_explanation, read_meta, write_meta
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
from .nla import NLA, RoundTrip, SteerResult, Verbalization, default_layer, steered_generations

__all__ = [
    "Activations", "encode", "read_activations",
    "NLAMeta", "extract_explanation", "read_meta", "write_meta",
    "NLAError", "BadVectorError", "CheckpointError", "EmptyInputError", "LayerOutOfRangeError",
    "ModelNotFoundError", "PositionOutOfRangeError", "SidecarDriftError",
    "Generation", "generate_ids",
    "add_to_resid", "capture_resid", "count_hooks", "inject_at_marker", "resid_site",
    "fve", "mean_baseline", "normalize", "normalized_mse",
    "EMBEDDED_MODEL", "ModelHandle", "embedded_model_dir", "handle_from", "load_model",
    "NLA", "RoundTrip", "SteerResult", "Verbalization", "default_layer", "steered_generations",
    "default_checkpoint",
    "load_nla_for",
]
