"""Reading what a target adds to its base model: the NLA explains the *difference* of activations.

A fine-tune, an implant or a hidden system prompt changes the residual stream by a small
amount (at block 24 of the embedded model, 3-20% of its norm on ordinary conversations) that a
verbalizer reading the whole activation drowns in what the text is about. Read both models on
the same tokens, take the difference (target - base) and move the base activation along it by
a fixed share of its norm: the NLA then explains an activation whose content is the base
model's plus the organism's change, made as large as the text's own. This is model diffing
(activation differences on unrelated text reveal what a narrow fine-tune taught) read by the
NLA instead of a logit lens.

The size is fixed (`CONTRAST_GAIN` x the base activation's norm), so what is explained does not
depend on how strongly an organism was planted, and the same construction on two unrelated
base-model activations (`null_directions`) is the null: the NLA's reference explanations of
contrasts (`reference.py`) and the placebo arm's contrast use it. Positions where the two
models agree (relative difference under `MIN_DIFFERENCE`, e.g. a conditional implant that is
off) have nothing to explain.
"""

from __future__ import annotations

import hashlib

import torch

__all__ = ["CONTRAST_GAIN", "MIN_DIFFERENCE", "relative_difference", "along", "null_directions"]

CONTRAST_GAIN = 1.0      # the change is made this share of the base activation's norm
MIN_DIFFERENCE = 0.01    # relative difference under which two readings agree (rounding, an idle implant)


def relative_difference(target: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """[n] |target - base| / |base| for activations [n, d] read at the same tokens."""
    return (target.float() - base.float()).norm(dim=-1) / base.float().norm(dim=-1).clamp_min(1e-6)


def along(base: torch.Tensor, direction: torch.Tensor, gain: float = CONTRAST_GAIN) -> torch.Tensor:
    """[n, d] each base activation moved along its `direction` [n, d] (any length) by `gain` x
    its own norm: base + gain |base| direction / |direction|."""
    b = base.float()
    unit = direction.float() / direction.float().norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return b + gain * b.norm(dim=-1, keepdim=True) * unit


def null_directions(reference: torch.Tensor, n: int, key: str) -> torch.Tensor:
    """[n, d] differences of two distinct rows of `reference` (base-model activations): changes
    that carry no organism, drawn deterministically from `key`."""
    size = reference.shape[0]
    if size < 2:
        raise ValueError("null_directions needs a reference of at least two activations.")
    g = torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(f"nla-contrast:{key}".encode()).digest()[:7], "little"))
    a = torch.randint(0, size, (n,), generator=g)
    b = (a + torch.randint(1, size, (n,), generator=g)) % size  # never a itself
    return reference[a].float() - reference[b].float()
