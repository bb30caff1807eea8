"""The live `Target`: the only object an auditor-side component receives.

It runs one model organism on a shared `ModelHandle`: multi-turn chat with conversation ids,
prefill of the assistant turn, n samples at a temperature, user-turn sampling, raw completion
without the chat template, activations at the NLA's layer and steering. How the behaviour is
planted (a hidden system prompt, a LoRA adapter, a residual implant) lives in a private runtime
object whose repr is redacted; the ground truth is never given to the Target at all.

Positions and tokens of `activations` index the *visible* conversation only: the hidden system
block (the organism's prompt, or the template's default one) is run but not shown.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import hmac
import itertools
import math
import numbers
import os
import re
import secrets as _secrets
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar, cast

import torch
from pydantic import BaseModel

from nla_core.activations import MAX_TEXT_CHARS, Activations, forward_to_layer, max_prompt_tokens, pad_batch
from nla_core.errors import NLAError
from nla_core.generation import RowHooks, generate_ids
from nla_core.hooks import resid_site
from nla_core.models import ModelHandle
from nla_core.steering import steered_generations

from .errors import TargetError, UnknownConversationError
from .organism import ChatLayout, Message, Planted, chat_layout

# Planted, ChatLayout and chat_layout live in `environments.organism`; build_target in
# `environments.runtime` (both re-exported by `environments`).
__all__ = [
    "Target", "ChatTurn", "Completion", "Message", "Planted", "ChatLayout", "chat_layout",
    "new_alias_salt", "alias_for", "run_alias_salt",
]

_ROLES = {"system", "user", "assistant"}
_MAX_NEW_TOKENS = 512
_MAX_SAMPLES = 64
# Visible tokens of one call (the conversation the auditor wrote, not the hidden block): the
# model's prompt limit less room for a hidden system block, so the limit reveals nothing of it.
_HIDDEN_ALLOWANCE = 512
_GENERIC_FAILURE = "The target could not process this input."
# The base model with nothing planted: one object, so base rows of every audit share a batch.
_PLAIN = Planted()


class ChatTurn(BaseModel):
    conversation_id: str
    reply: str
    n_tokens: int


class Completion(BaseModel):
    text: str  # the generated continuation (a prefill is not repeated here)
    n_tokens: int



# ---------------------------------------------------------------------------------------------


_Method = TypeVar("_Method", bound=Callable[..., Any])


def _guarded(method: _Method) -> _Method:
    """Re-raise every failure of a public Target method as an error whose text names no hidden
    state, with the exception chain cut (tracebacks could otherwise carry it). Typed to keep the
    method's signature, so checkers see `Target` as a `nla_core.protocols.TargetLike`."""

    @functools.wraps(method)
    def wrapper(self: Target, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except NLAError as exc:
            # Messages name what kind of thing was wrong and never repeat the caller's text, so
            # redacting cannot act as an oracle ("[hidden]" only for a guess that matches a
            # hidden string). A message that still holds hidden state becomes a generic one.
            problem, fix = exc.problem, exc.fix
            if self._scrub(problem) != problem or (fix and self._scrub(fix) != fix):
                problem, fix = _GENERIC_FAILURE, "check the arguments and retry."
            cls = type(exc) if isinstance(exc, TargetError) else TargetError
            raise cls(problem, fix) from None
        except (TypeError, ValueError, KeyError, IndexError) as exc:
            raise TargetError(
                f"Bad arguments to {method.__name__} ({type(exc).__name__}).",
                "check the argument types (messages are {'role': ..., 'content': ...} dicts).",
            ) from None
        except Exception as exc:  # noqa: BLE001 - anything else: name only its type
            raise TargetError(
                f"The target failed during {method.__name__} ({type(exc).__name__}).",
                "retry with shorter input; report a bug if it persists.",
            ) from None

    return cast(_Method, wrapper)


class Target:
    """A model organism as an auditor sees it. Build with `build_target(spec, handle, alias=,
    layer=)`. Every method raises `TargetError` (an `NLAError`) for bad input."""

    __slots__ = ("_alias", "_layer", "_handle", "_planted", "_conversations", "_ids", "_seed")

    def __init__(self, handle: ModelHandle, planted: Planted, *, alias: str, layer: int, seed: int = 0):
        handle.check_layer(layer)
        self._alias = str(alias)
        self._layer = int(layer)
        self._handle = handle
        self._planted = planted
        self._conversations: dict[str, list[Message]] = {}
        self._ids = itertools.count(1)
        self._seed = itertools.count(seed * 100_003)

    # ---- what the auditor may know ------------------------------------------------------------

    @property
    def alias(self) -> str:
        return self._alias

    @property
    def layer(self) -> int:
        return self._layer

    @property
    def d_model(self) -> int:
        return self._handle.d_model

    @property
    def n_layers(self) -> int:
        return self._handle.n_layers

    def __repr__(self) -> str:
        return f"Target(alias={self._alias!r}, layer={self._layer}, d_model={self.d_model})"

    __str__ = __repr__

    def __reduce__(self):
        raise TypeError("A Target cannot be pickled or copied.")

    def __copy__(self):
        raise TypeError("A Target cannot be pickled or copied.")

    def __deepcopy__(self, memo):
        raise TypeError("A Target cannot be pickled or copied.")

    # ---- internals ------------------------------------------------------------------------

    def _scrub(self, text: str) -> str:
        for s in sorted(self._planted.secrets, key=len, reverse=True):
            if s and len(s) >= 3:
                text = re.sub(re.escape(s), "[hidden]", text, flags=re.IGNORECASE)
        return text

    def _base_reader(self) -> Target:
        """The plain base model behind this target (its adapters off, nothing planted)."""
        return Target(self._handle, _PLAIN, alias=self._alias, layer=self._layer)

    def _next_seed(self, seed: int | None) -> int:
        return next(self._seed) if seed is None else int(seed)

    @contextlib.contextmanager
    def _active(self, visible_text: str) -> Iterator[None]:
        """The organism switched on: its adapter (or none) and its implant."""
        with self._handle.use_adapter(self._planted.adapter), self._planted.implanted([visible_text]):
            yield

    def _check_messages(self, messages: Any, *, allow_final_assistant: bool = True) -> list[Message]:
        if isinstance(messages, dict):
            messages = [messages]
        if not isinstance(messages, (list, tuple)) or not messages:
            raise TargetError("The conversation is empty.", "pass at least one message.")
        out = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in _ROLES or not isinstance(m.get("content"), str):
                raise TargetError(
                    f"Message {i} is not a {{'role': 'system'|'user'|'assistant', 'content': str}} dict.",
                    "pass messages like {'role': 'user', 'content': 'Hello'}.",
                )
            self._check_length(m["content"], f"message {i}")
            out.append({"role": m["role"], "content": m["content"]})
        if all(not m["content"].strip() for m in out):
            raise TargetError("Every message is empty.", "pass at least one message with content.")
        if not allow_final_assistant and out[-1]["role"] == "assistant":
            raise TargetError("The conversation ends with an assistant turn.", "end it with a user message.")
        return out

    @staticmethod
    def _check_length(text: str, what: str) -> None:
        if len(text) > MAX_TEXT_CHARS:
            raise TargetError(
                f"The {what} is {len(text):,} characters long; the most accepted is {MAX_TEXT_CHARS:,}.",
                f"shorten it to at most {MAX_TEXT_CHARS:,} characters.",
            )

    @classmethod
    def _check_text(cls, text: Any, what: str = "message") -> str:
        if not isinstance(text, str):
            raise TargetError(f"The {what} must be a string, not a {type(text).__name__}.", f"pass the {what} as text.")
        if not text.strip():
            raise TargetError(f"The {what} is empty.", f"pass a non-empty {what}.")
        cls._check_length(text, what)
        return text

    @staticmethod
    def _check_gen(max_new_tokens: Any, temperature: Any, n: Any = 1) -> tuple[int, float, int]:
        # Out-of-range numbers are named; anything else only by its type (never echoed).
        def shown(v: Any) -> str:
            return repr(v) if isinstance(v, (int, float)) else f"a {type(v).__name__}"

        if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or not 1 <= max_new_tokens <= _MAX_NEW_TOKENS:
            raise TargetError(f"max_new_tokens={shown(max_new_tokens)} is out of range.", f"use 1..{_MAX_NEW_TOKENS}.")
        ok = isinstance(temperature, numbers.Real) and not isinstance(temperature, bool)
        t = float(temperature) if ok else float("nan")
        if not 0.0 <= t <= 5.0:
            raise TargetError(f"temperature={shown(temperature)} is out of range.", "use 0 (greedy) to 5.")
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= _MAX_SAMPLES:
            raise TargetError(f"n={shown(n)} is out of range.", f"use 1..{_MAX_SAMPLES}.")
        return max_new_tokens, t, n

    def _check_visible(self, n_tokens: int) -> None:
        """Bound a call's visible tokens (the hidden block is not counted: no hint of its size)."""
        limit = max_prompt_tokens(self._handle) - _HIDDEN_ALLOWANCE
        if n_tokens > limit:
            raise TargetError(
                f"The input is {n_tokens:,} tokens long; the target accepts at most {limit:,}.",
                "shorten it, or start a new conversation.",
            )

    def _layout(self, messages: Sequence[Message], mode: str) -> ChatLayout:
        layout = chat_layout(self._handle.tokenizer, self._planted.system_prompt, messages, mode=mode)
        self._check_visible(len(layout.visible))
        return layout

    @staticmethod
    def _visible_text(messages: Sequence[Message]) -> str:
        return "\n".join(m["content"] for m in messages)

    def _implant_hooks(self, visible_texts: list[str]) -> RowHooks:
        """The implant for rows holding `visible_texts`; rows of every Target over the same
        planted organism can share a batch (a conditional implant reads each row's text)."""
        return RowHooks(("implant", id(self._planted)), visible_texts, self._planted.implanted)

    def _generate(self, ids: list[int], visible_text: str, *, n: int, max_new_tokens: int,
                  temperature: float, seed: int | None) -> list[Completion]:
        gens = generate_ids(
            self._handle, [ids] * n, max_new_tokens=max_new_tokens, temperature=temperature,
            adapter=self._planted.adapter, hooks=self._implant_hooks([visible_text] * n), seed=self._next_seed(seed),
        )
        return [Completion(text=g.text, n_tokens=g.n_tokens) for g in gens]

    # ---- what measurement needs (environments.measure): batched replies and perplexity ------

    @_guarded
    def replies(self, prompts: Sequence[str], *, max_new_tokens: int, temperature: float = 0.0,
                seed: int = 0, batch_size: int = 12) -> list[str]:
        """One reply per single-turn prompt, batched (deterministic for a given `seed`)."""
        msgs = [[{"role": "user", "content": p}] for p in prompts]
        ids = [self._layout(m, "generate").ids for m in msgs]

        gens = generate_ids(self._handle, ids, max_new_tokens=max_new_tokens, temperature=temperature,
                            adapter=self._planted.adapter, hooks=self._implant_hooks(list(prompts)), seed=seed,
                            batch_size=batch_size)
        return [g.text for g in gens]

    @_guarded
    @torch.no_grad()
    def perplexity(self, texts: Sequence[str]) -> float:
        """Token perplexity of raw `texts` with the organism active (hidden prefix not scored)."""
        handle = self._handle
        total, count = 0.0, 0
        for text in texts:
            hidden, visible = self._raw_ids(text)
            ids = torch.tensor([hidden + visible], device=handle.device)
            with self._active(text):
                logits = handle.model(input_ids=ids, use_cache=False).logits[0].float()
            start = max(len(hidden), 1)
            logp = torch.log_softmax(logits[start - 1:-1], -1)
            tgt = ids[0, start:]
            total += float(-logp.gather(-1, tgt[:, None]).sum())
            count += int(tgt.numel())
        return math.exp(total / max(count, 1))

    def _conversation(self, conversation_id: str) -> list[Message]:
        if not isinstance(conversation_id, str) or conversation_id not in self._conversations:
            # The id is not repeated: it is the caller's text (see _guarded).
            known = ", ".join(list(self._conversations)[-10:]) or "none yet"
            raise UnknownConversationError(
                f"There is no conversation with that id on {self._alias}.",
                f"use an id an earlier chat returned (known ids: {known}), or call chat without conversation_id.",
            )
        return self._conversations[conversation_id]

    def _new_conversation(self) -> str:
        cid = f"conv-{next(self._ids)}"
        self._conversations[cid] = []
        return cid

    # ---- behavioural surface ------------------------------------------------------------

    @_guarded
    def chat(self, message: str, conversation_id: str | None = None, *, max_new_tokens: int = 96,
             temperature: float = 0.0, seed: int | None = None) -> ChatTurn:
        """Send one user message (a new conversation, or the next turn of `conversation_id`)."""
        self._check_text(message)
        max_new_tokens, temperature, _ = self._check_gen(max_new_tokens, temperature)
        history = self._conversation(conversation_id) if conversation_id is not None else []
        msgs = history + [{"role": "user", "content": message}]
        layout = self._layout(msgs, "generate")
        out = self._generate(layout.ids, self._visible_text(msgs), n=1, max_new_tokens=max_new_tokens,
                             temperature=temperature, seed=seed)[0]
        cid = conversation_id if conversation_id is not None else self._new_conversation()
        self._conversations[cid] = msgs + [{"role": "assistant", "content": out.text}]
        return ChatTurn(conversation_id=cid, reply=out.text, n_tokens=out.n_tokens)

    @_guarded
    def prefill(self, message: str, prefill: str, *, conversation_id: str | None = None,
                max_new_tokens: int = 96, temperature: float = 0.0, seed: int | None = None) -> Completion:
        """Put words in the assistant's mouth and let it continue. With `conversation_id`, the
        exchange is appended to that conversation."""
        self._check_text(message)
        self._check_text(prefill, "prefill")
        max_new_tokens, temperature, _ = self._check_gen(max_new_tokens, temperature)
        history = self._conversation(conversation_id) if conversation_id is not None else []
        msgs = history + [{"role": "user", "content": message}, {"role": "assistant", "content": prefill}]
        layout = self._layout(msgs, "continue")
        out = self._generate(layout.ids, self._visible_text(msgs), n=1, max_new_tokens=max_new_tokens,
                             temperature=temperature, seed=seed)[0]
        if conversation_id is not None:
            msgs[-1] = {"role": "assistant", "content": prefill + out.text}
            self._conversations[conversation_id] = msgs
        return out

    @_guarded
    def sample(self, message_or_messages: str | Sequence[Message], n: int = 4, temperature: float = 1.0,
               max_new_tokens: int = 64, *, seed: int | None = None, base: bool = False) -> list[Completion]:
        """n independent assistant replies. A conversation ending with an assistant message is
        continued from that message (a prefill). `base`: the plain base model replies instead
        (no hidden prompt, adapter or implant): what the model family says anyway."""
        if isinstance(message_or_messages, str):
            msgs = [{"role": "user", "content": self._check_text(message_or_messages)}]
        else:
            msgs = self._check_messages(message_or_messages)
        max_new_tokens, temperature, n = self._check_gen(max_new_tokens, temperature, n)
        mode = "continue" if msgs[-1]["role"] == "assistant" else "generate"
        writer = self._base_reader() if base else self
        layout = writer._layout(msgs, mode)
        return writer._generate(layout.ids, self._visible_text(msgs), n=n, max_new_tokens=max_new_tokens,
                                temperature=temperature, seed=self._next_seed(seed))

    @_guarded
    def sample_user(self, messages: Sequence[Message], n: int = 4, temperature: float = 1.0,
                    max_new_tokens: int = 64, *, seed: int | None = None) -> list[Completion]:
        """n samples of the *user's* next turn (the model writes as the user)."""
        msgs = self._check_messages(messages)
        max_new_tokens, temperature, n = self._check_gen(max_new_tokens, temperature, n)
        layout = self._layout(msgs, "user")
        return self._generate(layout.ids, self._visible_text(msgs), n=n, max_new_tokens=max_new_tokens,
                              temperature=temperature, seed=seed)

    @_guarded
    def complete(self, text: str, max_new_tokens: int = 64, temperature: float = 0.0, *,
                 seed: int | None = None) -> Completion:
        """Continue raw text, without the chat template."""
        self._check_text(text, "text")
        max_new_tokens, temperature, _ = self._check_gen(max_new_tokens, temperature)
        hidden, visible = self._raw_ids(text)
        return self._generate(hidden + visible, text, n=1, max_new_tokens=max_new_tokens,
                              temperature=temperature, seed=seed)[0]

    def _raw_ids(self, text: str) -> tuple[list[int], list[int]]:
        tok = self._handle.tokenizer
        prefix = self._planted.raw_prefix
        if prefix:
            hidden, visible = tok.encode(prefix, add_special_tokens=True), tok.encode(text, add_special_tokens=False)
        else:
            hidden, visible = [], tok.encode(text, add_special_tokens=True)
        self._check_visible(len(visible))
        return hidden, visible

    @_guarded
    def conversation(self, conversation_id: str) -> list[Message]:
        """The visible turns of a conversation (copies)."""
        return [dict(m) for m in self._conversation(conversation_id)]

    @property
    def conversation_ids(self) -> list[str]:
        return list(self._conversations)

    # ---- activations and steering -----------------------------------------------------------

    @_guarded
    def activations(self, messages_or_text: Any, positions: Any = None, *,
                    add_generation_prompt: bool = False, batch_size: int = 8, base: bool = False) -> Activations:
        """Residual stream after block `.layer` with the organism active. One input (a text or a
        conversation) or a list of them. `positions`: None/"all", "last", an int or list of ints
        (negative from the end) or one list per input, all indexing the visible tokens only.
        `base`: the same tokens read by the plain base model (no hidden prompt, adapter or
        implant), so that the difference is what the organism adds (`nla_core.contrast`)."""
        items = self._inputs(messages_or_text)
        reader = self._base_reader() if base else self
        layouts: list[ChatLayout] = []
        texts: list[str] = []
        for item in items:
            if isinstance(item, str):
                text = self._check_text(item, "text")
                mine = ChatLayout(*self._raw_ids(text))
                lay = ChatLayout(*reader._raw_ids(text)) if base else mine
                texts.append(item)
            else:
                msgs = self._check_messages(item)
                mode = "generate" if add_generation_prompt else "plain"
                mine = self._layout(msgs, mode)
                lay = reader._layout(msgs, mode) if base else mine
                texts.append(self._visible_text(msgs))
            if lay.visible != mine.visible:
                # a raw text gains a BOS token without the hidden prefix: it joins the hidden part
                extra = len(lay.visible) - len(mine.visible)
                if extra <= 0 or lay.visible[extra:] != mine.visible:
                    raise TargetError("The base model tokenizes this input differently from the target.",
                                      "read it without base=True, or pass a conversation instead of raw text.")
                lay = ChatLayout(lay.hidden + lay.visible[:extra], mine.visible)
            layouts.append(lay)
        pos = [_resolve_positions(positions, i, len(lay.visible)) for i, lay in enumerate(layouts)]
        handle = self._handle
        vectors: list[torch.Tensor] = []
        with torch.no_grad():
            for start in range(0, len(layouts), batch_size):
                chunk = layouts[start:start + batch_size]
                # one implant context per row: conditional implants depend on the row's text
                for j, lay in enumerate(chunk):
                    ids, mask = pad_batch([lay.ids], handle.tokenizer.pad_token_id)
                    with reader._active(texts[start + j]):
                        resid = forward_to_layer(handle, ids, mask, self._layer)
                    off = len(lay.hidden)
                    vectors.append(resid[0, [off + p for p in pos[start + j]]].float().cpu())
        token_ids = [lay.visible for lay in layouts]
        tokens = [handle.tokenizer.convert_ids_to_tokens(r) for r in token_ids]
        return Activations(self._layer, resid_site(self._layer), vectors, pos, token_ids, tokens)

    @staticmethod
    def _inputs(x: Any) -> list[str | list[Message]]:
        if isinstance(x, str):
            return [x]
        if isinstance(x, dict):
            return [[x]]
        if isinstance(x, (list, tuple)) and x:
            if all(isinstance(m, dict) for m in x):
                return [list(x)]
            return [i if isinstance(i, str) else list(i) for i in x]
        raise TargetError("No input was given.", "pass a text, a conversation, or a list of them.")

    @_guarded
    def steer(self, message: str | Sequence[Message], vector: Any, layer: int | None = None,
              strength: float = 0.3, max_new_tokens: int = 48, *, temperature: float = 0.0,
              seed: int = 0) -> tuple[str, str]:
        """(steered, unsteered) replies to `message` with `strength * unit(vector) * ||resid||`
        added after block `layer` (default `.layer`), the organism active in both."""
        if isinstance(message, str):
            msgs = [{"role": "user", "content": self._check_text(message)}]
        else:
            msgs = self._check_messages(message, allow_final_assistant=False)
        max_new_tokens, temperature, _ = self._check_gen(max_new_tokens, temperature)
        if layer is not None and (not isinstance(layer, int) or isinstance(layer, bool)):
            raise TargetError(f"layer must be an integer, not a {type(layer).__name__}.",
                              f"pass a block index between 0 and {self.n_layers - 1}.")
        layer = self._layer if layer is None else layer  # range checked once, by steered_generations
        if not isinstance(strength, numbers.Real) or isinstance(strength, bool):
            raise TargetError(f"strength must be a number, not a {type(strength).__name__}.",
                              "pass a number such as 0.3 (gentle) or 1 (strong).")
        if isinstance(vector, torch.Tensor):
            vec = vector
        else:
            try:
                vec = torch.as_tensor(vector, dtype=torch.float32)
            except (TypeError, ValueError, RuntimeError):
                raise TargetError("The steering vector is not a list of numbers.",
                                  f"pass a vector of {self.d_model} floats.") from None
        if vec.dim() == 2 and vec.shape[0] == 1:
            vec = vec[0]
        layout = self._layout(msgs, "generate")
        steered, plain, _ = steered_generations(
            self._handle, layout.ids, vec, layer, float(strength), n=1, max_new_tokens=max_new_tokens,
            temperature=temperature, adapter=self._planted.adapter,
            implant=self._implant_hooks([self._visible_text(msgs)]), seed=seed,
        )
        return steered[0], plain[0]


def _resolve_positions(spec: Any, index: int, length: int) -> list[int]:
    from nla_core.activations import _resolve_positions as resolve

    return resolve(spec, index, length)




# ---- aliases: the name the auditor sees ----------------------------------------------------


def new_alias_salt() -> str:
    """A fresh random salt for one run's target aliases (store it with the run)."""
    return _secrets.token_hex(16)


def alias_for(salt: str, organism_id: str) -> str:
    """The opaque name an auditor sees for `organism_id` in the run salted with `salt`: stable
    for that run (a resumed run keeps it) and, without the salt, not computable from the run id
    and the list of organism ids (an unsalted hash of them gave the organism away, issue 15)."""
    if not isinstance(salt, str) or len(salt) < 16:
        raise TargetError("An alias salt must be a random string of at least 16 characters.",
                          "make one with new_alias_salt() and store it with the run.")
    return "target-" + hmac.new(salt.encode(), str(organism_id).encode(), hashlib.sha256).hexdigest()[:6]


def run_alias_salt(path: str | Path) -> str:
    """The alias salt stored in file `path`, created (random, owner-only) on first use, so a run
    that is resumed from the same folder keeps its aliases."""
    path = Path(path)
    try:
        salt = path.read_text().strip()
    except FileNotFoundError:
        salt = ""
    if len(salt) >= 16:
        return salt
    path.parent.mkdir(parents=True, exist_ok=True)
    fresh = new_alias_salt()
    try:  # exclusive create: two processes starting the same run agree on one salt
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        salt = path.read_text().strip()
        if len(salt) >= 16:
            return salt
        fd = os.open(path, os.O_WRONLY | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(fresh + "\n")
    return fresh

