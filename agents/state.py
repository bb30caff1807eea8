"""Typed graph state. Everything in it is plain JSON (dicts, lists, strings, numbers), so the
SQLite checkpointer can store it without custom serialisers and a resumed run sees exactly
what the killed one had."""

from __future__ import annotations

import operator
from typing import Annotated, Any, Literal, TypedDict

__all__ = ["AuditState", "CallRecord", "HypothesisRecord", "Usage", "new_usage"]


class CallRecord(TypedDict, total=False):
    id: str                 # the toolbox's call id ("c7"), what hypotheses cite; "x3" for calls the graph handles
    tool: str               # a toolbox tool, or "finish_audit"
    ref: str                # the policy's own id for the call (e.g. an Anthropic tool_use id)
    args: dict[str, Any]
    kind: Literal["toolbox", "agent", "malformed", "refused"]
    text: str               # what the policy reads back
    is_error: bool
    data: Any               # the tool's structured output (JSON), when it has one
    tokens: int
    seconds: float
    step: int


class HypothesisRecord(TypedDict, total=False):
    """Mirror of the toolbox's `tools.notes.Hypothesis` (the agent records them with the free
    `add_hypothesis` / `update_hypothesis` tools)."""

    id: str                 # "h1"
    statement: str
    confidence: float
    evidence: list[str]     # call ids
    status: Literal["open", "confirmed", "rejected"]
    history: list[str]


class Usage(TypedDict):
    tool_calls: int
    tokens_generated: int
    seconds: float
    steps: int
    malformed: int
    tool_errors: int
    empty_turns: int
    llm_calls: int
    llm_input_tokens: int
    llm_output_tokens: int
    llm_cache_read_tokens: int
    llm_cache_write_tokens: int
    llm_retries: int


def new_usage() -> Usage:
    return Usage(tool_calls=0, tokens_generated=0, seconds=0.0, steps=0, malformed=0, tool_errors=0,
                 empty_turns=0, llm_calls=0, llm_input_tokens=0, llm_output_tokens=0,
                 llm_cache_read_tokens=0, llm_cache_write_tokens=0, llm_retries=0)


class AuditState(TypedDict, total=False):
    run_id: str
    strategy: str
    policy: str
    seed: int
    max_hypotheses: int
    limits: dict[str, float]             # max_tool_calls, max_generated_tokens (+ max_seconds when capped)
    phase: Literal["investigate", "reduce", "done"]
    calls: Annotated[list[CallRecord], operator.add]
    events: Annotated[list[dict[str, Any]], operator.add]   # the transcript, one entry per step
    pending: list[dict[str, Any]]        # actions decided but not yet executed
    hypotheses: dict[str, HypothesisRecord]
    notes: list[str]                     # the agent's scratchpad (memory file)
    toolbox_notes: dict[str, Any]        # `Toolbox.notes.model_dump()`, restored on resume
    vectors: dict[str, Any]              # the toolbox's stored vectors (id -> source, floats), restored on resume
    policy_state: dict[str, Any]         # policy-private memory (e.g. the LLM conversation)
    usage: Usage
    reduce_attempts: int
    status: Literal["running", "finished", "failed"]
    error: str | None
    final: list[dict[str, Any]]          # ranked hypotheses of the report
    nothing_found: bool
    forced_reduction: bool
    cut_short: str | None                # the budget that ended the investigation early, if one did
