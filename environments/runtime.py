"""The organism runtime: plant a spec's behaviour on a model (once per model: the planting cache)
and wrap it in the `Target` an auditor receives.

    planted = planted_for(spec, handle)     # cached per model
    target = build_target(spec, handle, alias="target-1", layer=20)

Import order: organism <- builders <- runtime -> target -> organism (no loop).
"""

from __future__ import annotations

import weakref

import torch

from nla_core.models import ModelHandle

from .builders import plant
from .organism import Planted
from .target import Target

__all__ = ["plant", "planted_for", "build_target"]

# Planted organisms per model (keyed on the transformers model, whose identity survives PEFT
# wrapping), so a benchmark that audits one organism many times loads its adapter once.
_PLANTED: weakref.WeakKeyDictionary[torch.nn.Module, dict[str, Planted]] = weakref.WeakKeyDictionary()


def planted_for(spec, handle: ModelHandle) -> Planted:
    """`spec` planted on `handle`, once per model: later calls reuse it (re-planted when its
    adapter was removed from the model)."""
    planted = _PLANTED.setdefault(handle.hf_model, {})
    key = spec.model_dump_json()
    cached = planted.get(key)
    if cached is None or (cached.adapter is not None and cached.adapter not in handle.adapters):
        planted[key] = cached = plant(spec, handle)
    return cached


def build_target(spec, handle: ModelHandle, *, alias: str, layer: int, seed: int = 0) -> Target:
    """Plant `spec`'s behaviour on `handle` (sharing its weights) and wrap it in a `Target`
    that exposes only `alias`, `layer` and `d_model`. Each organism is planted once per model;
    later calls reuse it (a fresh `Target`, fresh conversations)."""
    handle.check_layer(layer)
    return Target(handle, planted_for(spec, handle), alias=alias, layer=layer, seed=seed)
