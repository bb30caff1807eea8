"""Reading the residual stream after block K for a batch of texts or chat conversations."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Union

import torch

from .errors import EmptyInputError, PositionOutOfRangeError
from .hooks import StopForward, capture_resid, resid_site
from .models import ModelHandle

__all__ = [
    "Message",
    "TextOrChat",
    "Activations",
    "encode",
    "forward_to_layer",
    "read_activations",
    "pad_batch",
]

Message = dict  # {"role": "system"|"user"|"assistant", "content": str}
TextOrChat = Union[str, Sequence[Message]]


def _chat_ids(tokenizer, messages: Sequence[Message], add_generation_prompt: bool) -> list[int]:
    # Render to text, then encode without special tokens: the template already carries them,
    # and apply_chat_template(tokenize=True) returns different containers across versions.
    text = tokenizer.apply_chat_template(
        list(messages), tokenize=False, add_generation_prompt=add_generation_prompt
    )
    return tokenizer.encode(text, add_special_tokens=False)


def encode(handle: ModelHandle, item: TextOrChat, *, add_generation_prompt: bool = False) -> list[int]:
    """Token ids for raw text (with the tokenizer's special tokens) or a chat conversation."""
    tok = handle.tokenizer
    if isinstance(item, str):
        if not item.strip():
            raise EmptyInputError("The text is empty.", "pass at least one non-blank character.")
        return tok.encode(item, add_special_tokens=True)
    messages = list(item)
    if not messages or all(not str(m.get("content", "")).strip() for m in messages):
        raise EmptyInputError("The conversation is empty.", "pass at least one message with content.")
    for m in messages:
        if m.get("role") not in {"system", "user", "assistant"}:
            raise EmptyInputError(
                f"Message role {m.get('role')!r} is not one of system/user/assistant.",
                "use dicts like {'role': 'user', 'content': '...'}.",
            )
    return _chat_ids(tok, messages, add_generation_prompt)


def pad_batch(
    rows: Sequence[Sequence[int]], pad_id: int, *, side: str = "right"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad id lists into `input_ids` [batch, seq] and `attention_mask` [batch, seq]."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if side == "right":
            ids[i, : len(r)] = torch.as_tensor(r)
            mask[i, : len(r)] = 1
        else:
            ids[i, width - len(r) :] = torch.as_tensor(r)
            mask[i, width - len(r) :] = 1
    return ids, mask


def forward_to_layer(
    handle: ModelHandle, input_ids: torch.Tensor, attention_mask: torch.Tensor, layer: int
) -> torch.Tensor:
    """`blocks.{layer}.resid_post` [batch, seq, d] for right-padded ids, skipping later blocks
    and the LM head. Runs under whatever adapter is active; keeps the autograd graph."""
    handle.check_layer(layer)
    dev = handle.device
    with capture_resid(handle.layers, layer, stop=True) as cap:
        try:
            handle.model(input_ids=input_ids.to(dev), attention_mask=attention_mask.to(dev), use_cache=False)
        except StopForward:
            pass
    assert cap.value is not None, "the capture hook did not fire"
    return cap.value


@dataclass
class Activations:
    """Residual-stream vectors at `site` for each input: `vectors[i]` is [len(positions[i]), d]."""

    layer: int
    site: str
    vectors: list[torch.Tensor]
    positions: list[list[int]]
    token_ids: list[list[int]]
    tokens: list[list[str]] = field(default_factory=list)

    def stacked(self) -> torch.Tensor:
        """All selected vectors as one [n_total, d] tensor."""
        return torch.cat(self.vectors, dim=0)


PositionSpec = Union[None, str, int, Sequence[int], Sequence[Sequence[int]]]


def _resolve_positions(spec: PositionSpec, index: int, length: int) -> list[int]:
    if spec is None or spec == "all":
        return list(range(length))
    if spec == "last":
        return [length - 1]
    if isinstance(spec, int):
        raw = [spec]
    else:
        items = list(spec)
        raw = list(items[index]) if items and not isinstance(items[0], int) else items
    out = []
    for p in raw:
        q = p + length if p < 0 else p
        if not 0 <= q < length:
            raise PositionOutOfRangeError(
                f"Position {p} is out of range for input {index}, which has {length} tokens.",
                f"use 0..{length - 1}, or negative indices from the end (-1 is the last token).",
            )
        out.append(q)
    return out


@torch.no_grad()
def read_activations(
    handle: ModelHandle,
    inputs: Sequence[TextOrChat],
    layer: int,
    *,
    positions: PositionSpec = None,
    batch_size: int = 8,
    add_generation_prompt: bool = False,
) -> Activations:
    """Residual stream after block `layer` at `positions` for each text or conversation.

    `positions`: None/"all" (every token), "last", an int or a list of ints applied to every
    input (negative counts from the end), or one list per input.
    """
    if isinstance(inputs, str) or (inputs and isinstance(inputs[0], dict)):
        inputs = [inputs]  # a single text or a single conversation
    if not inputs:
        raise EmptyInputError("No inputs were given.", "pass at least one text or conversation.")
    handle.check_layer(layer)
    ids = [encode(handle, x, add_generation_prompt=add_generation_prompt) for x in inputs]
    pos = [_resolve_positions(positions, i, len(r)) for i, r in enumerate(ids)]
    pad = handle.tokenizer.pad_token_id
    vectors: list[torch.Tensor] = []
    for start in range(0, len(ids), batch_size):
        chunk = ids[start : start + batch_size]
        input_ids, mask = pad_batch(chunk, pad)
        resid = forward_to_layer(handle, input_ids, mask, layer)  # [b, seq, d]
        for j in range(len(chunk)):
            vectors.append(resid[j, pos[start + j]].float().cpu())
    tokens = [handle.tokenizer.convert_ids_to_tokens(r) for r in ids]
    return Activations(layer, resid_site(layer), vectors, pos, ids, tokens)
