"""Reading the residual stream after block K for a batch of texts or chat conversations."""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, TypeGuard

import torch

from .errors import BadArgumentError, EmptyInputError, InputTooLongError, PositionOutOfRangeError
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
    "MAX_TEXT_CHARS",
    "max_prompt_tokens",
    "check_text_length",
    "check_prompt_tokens",
]

# Inputs are bounded where they enter (issue 15): a 100,000-character chat message once ran for
# minutes on CPU. One text (a message, a prefill, an explanation, a raw text) holds at most
# MAX_TEXT_CHARS characters; a whole prompt at most `max_prompt_tokens(handle)` tokens.
MAX_TEXT_CHARS = 20_000
_PROMPT_TOKENS_CAP = 8192  # the embedded model's context, and about the most a CPU forward takes in seconds
_PROMPT_TOKENS_FLOOR = 2048  # rotary models run past their declared context (tiny test configs declare 512)

Message = dict  # {"role": "system"|"user"|"assistant", "content": str}
TextOrChat = str | Sequence[Message]


def check_text_length(text: str, what: str = "text") -> str:
    """`text` itself, or `InputTooLongError` when it has more than `MAX_TEXT_CHARS` characters.
    The message names only the length, never the text."""
    if len(text) > MAX_TEXT_CHARS:
        raise InputTooLongError(
            f"The {what} is {len(text):,} characters long; the most accepted is {MAX_TEXT_CHARS:,}.",
            f"shorten the {what} to at most {MAX_TEXT_CHARS:,} characters.",
        )
    return text


def max_prompt_tokens(handle: ModelHandle) -> int:
    """The longest prompt, in tokens, that any call runs on `handle`: the model's context
    (`max_position_embeddings`), capped at 8192 and never below 2048."""
    cfg = handle.hf_model.config
    cfg = getattr(cfg, "text_config", None) or cfg
    ctx = getattr(cfg, "max_position_embeddings", None)
    ctx = int(ctx) if isinstance(ctx, int) and ctx > 0 else _PROMPT_TOKENS_CAP
    return max(_PROMPT_TOKENS_FLOOR, min(ctx, _PROMPT_TOKENS_CAP))


def check_prompt_tokens(handle: ModelHandle, n_tokens: int, what: str = "input", *, limit: int | None = None) -> None:
    """`InputTooLongError` when a prompt of `n_tokens` exceeds `limit` (default: `max_prompt_tokens`)."""
    limit = max_prompt_tokens(handle) if limit is None else limit
    if n_tokens > limit:
        raise InputTooLongError(
            f"The {what} is {n_tokens:,} tokens long; the most accepted is {limit:,} tokens.",
            f"shorten the {what} (or start a new conversation).",
        )


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
        ids = tok.encode(check_text_length(item), add_special_tokens=True)
        check_prompt_tokens(handle, len(ids), "text")
        return ids
    if isinstance(item, dict):
        item = [item]
    if not isinstance(item, (list, tuple)):
        raise BadArgumentError(
            f"Expected a text or a conversation (a list of messages), got a {type(item).__name__}.",
            "pass a string, or dicts like {'role': 'user', 'content': '...'}.",
        )
    messages = list(item)
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise BadArgumentError(
                "A message is not a {'role': ..., 'content': str} dict.",
                "use dicts like {'role': 'user', 'content': '...'}.",
            )
        if m.get("role") not in {"system", "user", "assistant"}:
            raise EmptyInputError(  # the class this error always had (callers catch it)
                "A message's role is not one of system/user/assistant.",
                "use dicts like {'role': 'user', 'content': '...'}.",
            )
        check_text_length(m["content"], "message")
    if not messages or all(not m["content"].strip() for m in messages):
        raise EmptyInputError("The conversation is empty.", "pass at least one message with content.")
    ids = _chat_ids(tok, messages, add_generation_prompt)
    check_prompt_tokens(handle, len(ids), "conversation")
    return ids


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
    with handle.lock, capture_resid(handle.layers, layer, stop=True) as cap:
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


PositionSpec = None | str | int | Sequence[int] | Sequence[Sequence[int]]


_POSITIONS_FIX = "pass None/'all', 'last', an int, a list of ints, or one list of ints per input."


def _is_int(x: Any) -> TypeGuard[numbers.Integral]:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _int_list(items: Sequence[Any], what: str) -> list[int]:
    if not all(_is_int(p) for p in items):
        # names only the types: a Target must not echo text it was given (issue 15)
        kinds = sorted({type(p).__name__ for p in items if not _is_int(p)})
        raise BadArgumentError(f"{what} holds values that are not integers ({', '.join(kinds)}).", _POSITIONS_FIX)
    return [int(p) for p in items]


def _resolve_positions(spec: PositionSpec, index: int, length: int) -> list[int]:
    """Positions of input `index` (which has `length` tokens) from a position spec, as
    non-negative indices. Bad specs raise `BadArgumentError` / `PositionOutOfRangeError`."""
    if isinstance(spec, torch.Tensor):
        spec = spec.tolist()
    if spec is None or (isinstance(spec, str) and spec == "all"):
        return list(range(length))
    if isinstance(spec, str):
        if spec == "last":
            return [length - 1]
        raise BadArgumentError("Positions given as a string must be 'all' or 'last'.", _POSITIONS_FIX)
    if _is_int(spec):
        raw = [int(spec)]
    elif isinstance(spec, (list, tuple)):
        items = list(spec)
        if not items:
            raise EmptyInputError("The list of positions is empty.", _POSITIONS_FIX)
        if all(isinstance(i, (list, tuple)) for i in items):  # one list per input
            if index >= len(items):
                raise BadArgumentError(
                    f"{len(items)} position list(s) were given for more inputs (input {index} has none).",
                    "pass one list of positions per input, or one list for all inputs.",
                )
            raw = _int_list(list(items[index]), f"The position list for input {index}")
            if not raw:
                raise EmptyInputError(f"The position list for input {index} is empty.", _POSITIONS_FIX)
        else:
            raw = _int_list(items, "The list of positions")
    else:
        raise BadArgumentError(f"Positions cannot be a {type(spec).__name__}.", _POSITIONS_FIX)
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
    if isinstance(inputs, str) or (isinstance(inputs, (list, tuple)) and inputs and isinstance(inputs[0], dict)):
        inputs = [inputs]  # a single text or a single conversation
    if inputs is not None and not isinstance(inputs, (list, tuple)):
        raise BadArgumentError(f"Expected a text or a list of inputs, got a {type(inputs).__name__}.",
                               "pass a string, a conversation, or a list of them.")
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
