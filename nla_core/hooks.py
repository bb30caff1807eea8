"""Forward hooks on the residual stream, as context managers that always remove themselves.

Sites are named like TransformerLens: `blocks.{L}.resid_post` is the output of decoder block L,
i.e. HF `hidden_states[L + 1]`. Decoder blocks return a tensor in transformers 5 and a tuple in
4.x for some architectures; every hook here accepts both and returns the same container.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .errors import NLAError

__all__ = [
    "StopForward",
    "Capture",
    "resid_site",
    "capture_resid",
    "add_to_resid",
    "inject_at_marker",
    "InjectionError",
    "count_hooks",
]


class StopForward(Exception):
    """Raised by a capture hook to end the forward pass once the wanted block has run."""


class InjectionError(NLAError):
    pass


def resid_site(layer: int) -> str:
    return f"blocks.{layer}.resid_post"


def _hidden(output: torch.Tensor | tuple) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def _with_hidden(output: torch.Tensor | tuple, hidden: torch.Tensor) -> torch.Tensor | tuple:
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


@dataclass
class Capture:
    site: str
    value: torch.Tensor | None = None  # [batch, seq, d_model]


@contextlib.contextmanager
def capture_resid(layers: nn.ModuleList, layer: int, *, stop: bool = True) -> Iterator[Capture]:
    """Record `blocks.{layer}.resid_post`; with `stop`, end the forward pass right after it
    (the caller catches `StopForward`). The captured tensor keeps its graph (the AR trains
    through it); detach it if you only read."""
    cap = Capture(site=resid_site(layer))

    def hook(module: nn.Module, args: tuple, output: torch.Tensor | tuple) -> None:
        cap.value = _hidden(output)
        if stop:
            raise StopForward
        return None  # read-only: returning a value would replace the block's output

    handle = layers[layer].register_forward_hook(hook)
    try:
        yield cap
    finally:
        handle.remove()


@contextlib.contextmanager
def add_to_resid(
    layers: nn.ModuleList,
    layer: int,
    vector: torch.Tensor,
    *,
    positions: Sequence[int] | None = None,
) -> Iterator[None]:
    """Add `vector` ([d] or [batch, d]) to `blocks.{layer}.resid_post`.

    `positions` are absolute token positions (as in `position_ids`, which count from the first
    real token of each row under left padding); `None` means every position, generated tokens
    included. Keying on `position_ids` rather than on the chunk index makes generation with and
    without the KV cache agree.
    """
    wanted = None if positions is None else torch.as_tensor(list(positions), dtype=torch.long)

    def hook(module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor | tuple):
        hidden = _hidden(output)  # [batch, seq, d]
        v = vector.to(hidden.device, hidden.dtype)
        v = v[:, None, :] if v.dim() == 2 else v[None, None, :]  # [batch|1, 1, d]
        if wanted is None:
            return _with_hidden(output, hidden + v)
        pos = kwargs.get("position_ids")
        if pos is None:
            pos = torch.arange(hidden.shape[1], device=hidden.device)[None, :]
        mask = torch.isin(pos, wanted.to(pos.device)).to(hidden.dtype)[..., None]  # [b|1, seq, 1]
        return _with_hidden(output, hidden + mask * v)

    handle = layers[layer].register_forward_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def inject_at_marker(
    embed: nn.Module,
    vectors: torch.Tensor,
    *,
    marker_id: int,
    left_id: int,
    right_id: int,
    rows: Sequence[int] | None = None,
) -> Iterator[None]:
    """Replace the input embedding at the one marker token of each row by `vectors[row]`
    ([batch, d], already rescaled). With `rows`, `vectors` [len(rows), d] go to those rows of
    the batch only (the others, e.g. another call's rows in a shared batch, are left alone).
    A marker counts only with the expected neighbours on both sides, so the marker character
    inside ordinary text is left alone. Decode steps (one new token) pass through untouched:
    the prompt's injected state lives on in the KV cache."""

    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        ids = args[0] if args else None
        if ids is None or ids.shape[-1] < 3:
            return None
        wanted = torch.arange(ids.shape[0]) if rows is None else torch.as_tensor(list(rows), dtype=torch.long)
        if vectors.shape[0] != wanted.numel():
            raise InjectionError(
                f"{vectors.shape[0]} vectors for {wanted.numel()} prompts.",
                "pass one activation per prompt row.",
            )
        sub = ids[wanted.to(ids.device)]  # [k, seq]
        hit = (sub[:, 1:-1] == marker_id) & (sub[:, :-2] == left_id) & (sub[:, 2:] == right_id)
        at, cols = hit.nonzero(as_tuple=True)
        if at.numel() != sub.shape[0] or torch.unique(at).numel() != sub.shape[0]:
            raise InjectionError(
                f"Expected exactly one marker (with its neighbours) per row, found {at.numel()} "
                f"in {sub.shape[0]} rows.",
                "the prompt template or tokenizer drifted from the checkpoint's nla_meta.yaml.",
            )
        out = output.clone()
        out[wanted.to(out.device)[at], cols + 1] = vectors.to(out.device, out.dtype)[at]
        return out

    handle = embed.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def count_hooks(module: nn.Module) -> int:
    """Number of forward hooks installed anywhere under `module` (tests check cleanup)."""
    return sum(len(m._forward_hooks) for m in module.modules())
