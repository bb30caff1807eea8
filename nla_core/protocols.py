"""Typed protocols for the seams between the packages: what auditor-side code (`tools`, `agents`,
`evals`) relies on of a target, an NLA and a toolbox, so those packages can name the interface
instead of `Any` without importing each other (`tools` never imports `environments`).

- `TargetLike`: `environments.Target` (the live model organism an auditor talks to).
- `NLALike`: `nla_core.NLA` (verbalize, reconstruct, round-trip, steer).
- `ToolboxLike`: `tools.Toolbox` (tool calls under a budget, with a call log and a snapshot).

They are structural (`typing.Protocol`): anything with these members fits, and the
`runtime_checkable` ones can be checked with `isinstance` (members present; signatures are
checked statically only). Return types are the read-only views the callers use, so a test
double may return its own objects with the same fields.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch
    from pydantic import BaseModel

    from .activations import Activations, Message, PositionSpec, TextOrChat
    from .nla import RoundTrip, SteerResult, Verbalization

__all__ = [
    "ChatTurnLike", "CompletionLike", "TargetLike", "NLALike",
    "ToolResultLike", "ToolDefLike", "BudgetLike", "CallRecordLike", "ToolboxLike",
]


# ---- the target --------------------------------------------------------------------------------


class ChatTurnLike(Protocol):
    """One chat turn (`environments.ChatTurn`)."""

    @property
    def conversation_id(self) -> str: ...
    @property
    def reply(self) -> str: ...
    @property
    def n_tokens(self) -> int: ...


class CompletionLike(Protocol):
    """One generated continuation (`environments.Completion`)."""

    @property
    def text(self) -> str: ...
    @property
    def n_tokens(self) -> int: ...


@runtime_checkable
class TargetLike(Protocol):
    """A model organism as an auditor sees it (`environments.Target`): chat, samples, prefill,
    raw completion, activations at `layer`, and steering. Bad input raises an `NLAError`."""

    @property
    def alias(self) -> str: ...
    @property
    def layer(self) -> int: ...
    @property
    def d_model(self) -> int: ...
    @property
    def n_layers(self) -> int: ...

    def chat(self, message: str, conversation_id: str | None = None, *, max_new_tokens: int = 96,
             temperature: float = 0.0, seed: int | None = None) -> ChatTurnLike: ...

    def prefill(self, message: str, prefill: str, *, conversation_id: str | None = None,
                max_new_tokens: int = 96, temperature: float = 0.0, seed: int | None = None) -> CompletionLike: ...

    def sample(self, message_or_messages: str | Sequence[Message], n: int = 4, temperature: float = 1.0,
               max_new_tokens: int = 64, *, seed: int | None = None, base: bool = False) -> Sequence[CompletionLike]: ...

    def sample_user(self, messages: Sequence[Message], n: int = 4, temperature: float = 1.0,
                    max_new_tokens: int = 64, *, seed: int | None = None) -> Sequence[CompletionLike]: ...

    def complete(self, text: str, max_new_tokens: int = 64, temperature: float = 0.0, *,
                 seed: int | None = None) -> CompletionLike: ...

    def conversation(self, conversation_id: str) -> list[Message]: ...

    def activations(self, messages_or_text: TextOrChat | Message | Sequence[TextOrChat], positions: PositionSpec = None,
                    *, add_generation_prompt: bool = False, batch_size: int = 8, base: bool = False) -> Activations: ...

    def steer(self, message: str | Sequence[Message], vector: torch.Tensor | Sequence[float], layer: int | None = None,
              strength: float = 0.3, max_new_tokens: int = 48, *, temperature: float = 0.0,
              seed: int = 0) -> tuple[str, str]: ...


# ---- the NLA -----------------------------------------------------------------------------------


@runtime_checkable
class NLALike(Protocol):
    """A Natural Language Autoencoder at block `layer` (`nla_core.NLA`). Check `trained` before
    trusting an explanation; `reference_explanations` and `reference_contrast_explanations` may
    be empty (none shipped)."""

    @property
    def layer(self) -> int: ...
    @property
    def d_model(self) -> int: ...
    @property
    def trained(self) -> bool: ...
    @property
    def reference_explanations(self) -> Sequence[str]: ...
    @property
    def reference_contrast_explanations(self) -> Sequence[str]: ...

    def verbalize(self, activations: torch.Tensor | Sequence[float], *, n_samples: int = 1, max_new_tokens: int = 96,
                  temperature: float | None = None, batch_size: int = 16,
                  seed: int | None = None, best_of: int = 1) -> Sequence[Verbalization]: ...

    def reconstruct(self, texts: str | Sequence[str], *, batch_size: int = 16) -> torch.Tensor: ...

    def round_trip(self, activations: torch.Tensor, *, n_samples: int = 1, **gen: Any) -> RoundTrip: ...

    def steer(self, prompt: TextOrChat, vector_or_text: str | torch.Tensor, *, layer: int | None = None,
              strength: float = 0.3, max_new_tokens: int = 48, n: int = 1, temperature: float = 0.0,
              target_adapter: str | None = None, seed: int = 0) -> SteerResult: ...


# ---- the toolbox -------------------------------------------------------------------------------


class ToolResultLike(Protocol):
    """What a tool call returns (`tools.ToolResult`)."""

    @property
    def text(self) -> str: ...
    @property
    def is_error(self) -> bool: ...
    @property
    def data(self) -> Any: ...
    @property
    def tokens_generated(self) -> int: ...
    @property
    def nla_tokens(self) -> int: ...
    @property
    def call_id(self) -> str | None: ...


class ToolDefLike(Protocol):
    """A tool's definition (`tools.ToolDef`), as far as callers validate arguments with it."""

    @property
    def args_model(self) -> type[BaseModel]: ...


class BudgetLike(Protocol):
    """The counters of a toolbox's budget (`tools.Budget`)."""

    @property
    def tool_calls(self) -> int: ...
    @property
    def generated_tokens(self) -> int: ...
    @property
    def seconds(self) -> float: ...


class CallRecordLike(Protocol):
    """One logged tool call (`tools.CallRecord`)."""

    @property
    def call_id(self) -> str: ...
    @property
    def name(self) -> str: ...
    @property
    def text(self) -> str: ...
    @property
    def is_error(self) -> bool: ...
    @property
    def data(self) -> Any: ...


@runtime_checkable
class ToolboxLike(Protocol):
    """Tools over one target under a budget (`tools.Toolbox`). `call` never raises for anything
    the calling model can get wrong (it returns an error result); `snapshot` / `restore` carry
    the toolbox's state (notes, stored vectors, budget counters) across a restart."""

    @property
    def names(self) -> list[str]: ...
    @property
    def budget(self) -> BudgetLike: ...
    @property
    def log(self) -> Sequence[CallRecordLike]: ...

    def call(self, name: str, args: dict[str, Any] | None = None, *, call_id: str | None = None) -> ToolResultLike: ...

    def tool(self, name: str) -> ToolDefLike: ...

    def anthropic_schemas(self) -> list[dict[str, Any]]: ...

    def snapshot(self) -> dict[str, Any]: ...

    def restore(self, snapshot: dict[str, Any], calls: list[dict[str, Any]] | None = None) -> None: ...
