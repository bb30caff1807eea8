"""What `verbalize` explains: a registry of activation sources keyed by name.

- `target` (the `nla` strategy): the target's own activations at the chosen tokens.
- `placebo` (the `nla-placebo` strategy): an activation of the *base* model (adapters off, no
  implant, no hidden system prompt) read at the NLA's layer inside its own replies to the
  shipped everyday prompts (`nla_core/reference.py`), drawn deterministically from the audit's
  seed and the call's place in the audit. It never depends on the organism, so whatever a placebo auditor
  finds through verbalize is what explanations of the wrong activation give (the control arm
  for "the NLA read the target").

With `contrast` (what the target adds to its base model, `nla_core.contrast`) a source also
says which change is explained: `target` moves the base model's activation along the target's
difference from it, where the two differ; `placebo` moves it along the difference of two
unrelated reference activations, at every position (whether the target differs from its base
model is itself something only reading the target tells).

The tool itself is unchanged (same name, arguments, docstring, output layout, cost): the
target is still read, for the tokens and positions the output lists, and only the vectors
handed to the verbalizer are swapped. A new source is one `register_verbalize_source` call.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from nla_core.contrast import MIN_DIFFERENCE, along, null_directions, relative_difference
from nla_core.reference import reference_activations
from nla_core.registry import Registry

from .base import ToolboxError

__all__ = [
    "VerbalizeSource", "VERBALIZE_SOURCES", "register_verbalize_source", "get_verbalize_source",
    "reference_activations", "placebo_indices",
]

Contrast = Callable[[Any, torch.Tensor, torch.Tensor], tuple[torch.Tensor, list[int]]]


@dataclass(frozen=True)
class VerbalizeSource:
    """`explain(toolbox, vectors [n, d]) -> [n, d]`: the vectors verbalize hands to the NLA in
    place of the target's `vectors`. `contrast(toolbox, target [n, d], base [n, d]) -> (vectors
    [m, d], rows)`: for a contrast reading, the vectors to explain and which of the n rows they
    are (the others have nothing to explain). `check(toolbox)` raises `ToolboxError` when a
    toolbox cannot use this source (called once, when the toolbox is built)."""

    name: str
    explain: Callable[[Any, torch.Tensor], torch.Tensor]
    contrast: Contrast
    check: Callable[[Any], None] = lambda toolbox: None
    description: str = ""


VERBALIZE_SOURCES: Registry[VerbalizeSource] = Registry("verbalize source")


def register_verbalize_source(source: VerbalizeSource) -> VerbalizeSource:
    return VERBALIZE_SOURCES.register(source.name, source)


def get_verbalize_source(name: str) -> VerbalizeSource:
    if name not in VERBALIZE_SOURCES:
        raise ToolboxError(f"Unknown verbalize source {name!r}.", f"choose one of: {', '.join(sorted(VERBALIZE_SOURCES))}.")
    return VERBALIZE_SOURCES[name]


# ---- target -------------------------------------------------------------------------------

def _contrast_target(toolbox: Any, target: torch.Tensor, base: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    rows = (relative_difference(target, base) >= MIN_DIFFERENCE).nonzero().flatten().tolist()
    return along(base[rows], (target - base)[rows]), rows


register_verbalize_source(VerbalizeSource(
    "target", lambda toolbox, vectors: vectors, _contrast_target, description="the target's own activations"))


# ---- placebo ------------------------------------------------------------------------------

# The reference set (base-model activations inside its replies to the everyday prompts) lives in nla_core,
# beside the shipped checkpoint's reference explanations of the same activations.


def placebo_indices(n: int, size: int, seed: int, call_index: int) -> list[int]:
    """`n` rows of a reference set of `size`, fixed by the audit's seed and the call's index
    (a resumed run draws what an uninterrupted one drew); distinct while n <= size."""
    digest = hashlib.sha256(f"nla-placebo:{seed}:{call_index}".encode()).digest()
    g = torch.Generator().manual_seed(int.from_bytes(digest[:7], "little"))
    perm = torch.randperm(size, generator=g)
    return perm.repeat(-(-n // size))[:n].tolist()


def _placebo_handle(toolbox: Any) -> Any:
    return getattr(toolbox.nla, "target", None) if toolbox.nla is not None else None


def _check_placebo(toolbox: Any) -> None:
    if toolbox.nla is not None and _placebo_handle(toolbox) is None:
        raise ToolboxError(
            "The placebo verbalize source needs the base model the NLA reads, and this NLA has none.",
            "load the NLA with the target's model handle: NLA.load(path, handle).",
        )


def _explain_placebo(toolbox: Any, vectors: torch.Tensor) -> torch.Tensor:
    ref = reference_activations(_placebo_handle(toolbox), toolbox.nla.layer)
    idx = placebo_indices(vectors.shape[0], ref.shape[0], toolbox.seed, len(toolbox.log))
    return ref[idx].to(dtype=vectors.dtype)


def _contrast_placebo(toolbox: Any, target: torch.Tensor, base: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    ref = reference_activations(_placebo_handle(toolbox), toolbox.nla.layer)
    dirs = null_directions(ref, base.shape[0], f"placebo:{toolbox.seed}:{len(toolbox.log)}")
    return along(base, dirs), list(range(base.shape[0]))


register_verbalize_source(VerbalizeSource(
    "placebo", _explain_placebo, _contrast_placebo, check=_check_placebo,
    description="base-model activations inside its replies to everyday prompts (never the target's)"))
