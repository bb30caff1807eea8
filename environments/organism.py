"""What a planted organism is at run time, shared by the builders that make it and the `Target`
that runs it: `Planted` (hidden system prompt, adapter, implant, secrets) and the chat layout that
keeps a hidden system block apart from the visible conversation.

Imports nothing else of `environments` but its errors, so builders, the LoRA trainer and the
Target all build on it without an import loop.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import TargetError

__all__ = ["Planted", "ChatLayout", "chat_layout", "Message"]

Message = dict  # {"role": "system"|"user"|"assistant", "content": str}
_SENTINEL = "\u2063\u2063NLA_SPLIT\u2063\u2063"


@dataclass(repr=False, eq=False)
class Planted:
    """What a builder plants, as the Target needs it at run time (the Target keeps it private).

    system_prompt: hidden system message (None: the chat template's default one, if any).
    adapter: name of a LoRA adapter already loaded on the handle (None: adapters off).
    implant: `implant(visible_texts) -> context manager` installed around every forward pass of
      a batch whose rows hold those visible conversations (for example a vector added to the
      residual stream; a conditional implant inspects each row's text). A None text is a row of
      another call sharing the batch, which the implant must leave alone.
    raw_prefix: hidden text put before raw completions (a system-prompted organism's block).
    secrets: strings scrubbed from any error message that reaches the auditor.
    """

    system_prompt: str | None = None
    adapter: str | None = None
    implant: Callable[[Sequence[str | None]], contextlib.AbstractContextManager] | None = None
    raw_prefix: str | None = None
    secrets: list[str] = field(default_factory=list)

    def __repr__(self) -> str:
        return "Planted(<hidden>)"

    __str__ = __repr__

    def implanted(self, visible_texts: Sequence[str | None]) -> contextlib.AbstractContextManager:
        """The implant's context for a batch whose rows hold `visible_texts` (a no-op without
        an implant)."""
        if self.implant is None:
            return contextlib.nullcontext()
        return self.implant(list(visible_texts))


# ---------------------------------------------------------------------------------------------
# chat rendering: hidden system block + visible conversation


def _default_system(tokenizer: Any) -> str | None:
    """The system prompt a chat template inserts when none is given (SmolLM2 has one), or None."""
    try:
        plain = tokenizer.apply_chat_template([{"role": "user", "content": _SENTINEL}], tokenize=False)
        marked = tokenizer.apply_chat_template(
            [{"role": "system", "content": "\x00SYS\x00"}, {"role": "user", "content": _SENTINEL}], tokenize=False
        )
    except Exception:  # templates without a system role
        return None
    before, _, after = marked.partition("\x00SYS\x00")
    after = after.split(_SENTINEL)[0]
    if not plain.startswith(before):
        return None
    rest = plain[len(before):]
    end = rest.find(after)
    if end <= 0:
        return None
    default = rest[:end]
    again = tokenizer.apply_chat_template(
        [{"role": "system", "content": default}, {"role": "user", "content": _SENTINEL}], tokenize=False
    )
    return default if again == plain else None


@dataclass
class ChatLayout:
    """Token ids of one rendered conversation split into the hidden prefix and the visible part."""

    hidden: list[int]
    visible: list[int]

    @property
    def ids(self) -> list[int]:
        return self.hidden + self.visible


def chat_layout(
    tokenizer: Any,
    system_prompt: str | None,
    messages: Sequence[Message],
    *,
    mode: str = "generate",
) -> ChatLayout:
    """Render `messages` after a hidden system block. `mode`: "generate" (assistant prompt
    appended), "continue" (the last assistant message is left open), "user" (a user turn is
    opened for the model to write), "plain" (nothing appended)."""
    msgs = [dict(role=m["role"], content=m["content"]) for m in messages]
    if mode == "continue":
        msgs[-1]["content"] = msgs[-1]["content"] + _SENTINEL
    elif mode == "user":
        msgs.append({"role": "user", "content": _SENTINEL})
    system = system_prompt if system_prompt is not None else _default_system(tokenizer)
    if system is not None:
        head = [{"role": "system", "content": system}]
        prefix = tokenizer.apply_chat_template(head, tokenize=False)
        full = tokenizer.apply_chat_template(head + msgs, tokenize=False, add_generation_prompt=mode == "generate")
        if not full.startswith(prefix):
            raise TargetError(
                "This model's chat template cannot keep a system block separate from the conversation.",
                "use an organism without a hidden system prompt on this model.",
            )
    else:
        prefix = ""
        full = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=mode == "generate")
    rest = full[len(prefix):]
    if mode in ("continue", "user"):
        rest = rest.split(_SENTINEL)[0]
    enc = functools.partial(tokenizer.encode, add_special_tokens=False)
    return ChatLayout(enc(prefix) if prefix else [], enc(rest))

