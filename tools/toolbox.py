"""`Toolbox`: a tool set bound to one `Target` (and one NLA), with a budget, the auditor's notes,
stored vectors and a log of every call. `Toolbox.call(name, args)` never raises for anything
the calling model can get wrong: bad arguments, unknown ids, an empty prompt, a spent budget
all come back as an error `ToolResult` whose text says what to do."""

from __future__ import annotations

import difflib
import re
import threading
import time
import traceback
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from nla_core.errors import NLAError

from .base import (
    TOOL_SETS,
    TOOLS,
    Budget,
    ToolboxError,
    ToolDef,
    ToolError,
    ToolResult,
    cut_point,
    format_validation_error,
    truncate,
)
from .notes import Notes
from .sources import get_verbalize_source

if TYPE_CHECKING:
    from nla_core.protocols import NLALike, TargetLike

__all__ = ["Toolbox", "CallRecord", "StoredVector", "DEFAULT_MAX_CHARS"]

DEFAULT_MAX_CHARS = 6000


def suggest_tool(name: str, names: list[str]) -> str | None:
    """The tool an unknown name most likely meant: spelling similarity, plus a bonus for the
    share of the tool's words the name contains (so `record_note` suggests `note`, not
    `read_notes`, and `record_hypothesis` suggests `add_hypothesis`)."""
    words = set(re.split(r"[^a-z0-9]+", name.lower()))
    best, best_score = None, 0.0
    for tool in names:
        parts = [w for w in tool.split("_") if w]
        score = difflib.SequenceMatcher(None, name.lower(), tool).ratio() + 0.3 * sum(w in words for w in parts) / len(parts)
        if score > best_score:
            best, best_score = tool, score
    return best if best_score >= 0.5 else None


@dataclass
class CallRecord:
    """One tool call as it happened. `text` is the full output (before truncation); `shown` is
    what the calling model read."""

    call_id: str
    name: str
    args: Any
    text: str
    shown: str
    is_error: bool
    tokens_generated: int = 0
    nla_tokens: int = 0
    seconds: float = 0.0
    started: float = 0.0  # time.time()
    external_id: str | None = None
    refused: bool = False  # refused for budget: not charged
    truncated: bool = False
    data: Any = None
    internal_error: str | None = None  # traceback of an unexpected failure (never shown to the model)

    def as_dict(self) -> dict[str, Any]:
        return {
            "call_id": self.call_id, "external_id": self.external_id, "name": self.name, "args": self.args,
            "text": self.text, "shown": self.shown, "is_error": self.is_error, "refused": self.refused,
            "truncated": self.truncated, "tokens_generated": self.tokens_generated, "nla_tokens": self.nla_tokens,
            "seconds": round(self.seconds, 3), "started": self.started, "internal_error": self.internal_error,
        }


@dataclass
class StoredVector:
    id: str
    vector: Any  # torch.Tensor [d]
    source: str  # how it was made, in words


class Toolbox:
    """The tools of `tool_set` ("nla" = all, "behavioural" = no NLA tools) over `target`.
    `verbalize_source`: what verbalize explains, "target" or "placebo" (`tools.sources`).

    `.names`, `.call(name, args)`, `.langchain_tools()`, `.anthropic_schemas()`, `.mcp_server()`,
    `.notes`, `.log`, `.budget`, `.vectors`.
    """

    def __init__(
        self,
        target: TargetLike,
        nla: NLALike | None = None,
        tool_set: str = "nla",
        budget: Budget | None = None,
        *,
        max_chars: int = DEFAULT_MAX_CHARS,
        tools: list[str] | None = None,
        seed: int = 0,
        max_positions: int = 16,
        verbalize_tokens: int = 96,
        verbalize_source: str = "target",
    ):
        if tools is None:
            if tool_set not in TOOL_SETS:
                raise ToolboxError(f"Unknown tool set {tool_set!r}.", f"choose one of {sorted(TOOL_SETS)}.")
            tools = list(TOOL_SETS[tool_set])
        unknown = [t for t in tools if t not in TOOLS]
        if unknown:
            raise ToolboxError(f"Unknown tool(s) {unknown}.", f"choose from {sorted(TOOLS)}.")
        if nla is None and any(TOOLS[t].needs_nla for t in tools):
            raise ToolboxError(
                f"The {tool_set!r} tool set needs an NLA (verbalize, reconstruct, steer, themes).",
                "pass nla=NLA.load(...) (or NLA.untrained(handle) for plumbing tests), or use tool_set='behavioural'.",
            )
        if nla is not None and any(TOOLS[t].needs_nla for t in tools):
            t_layer, t_width = getattr(target, "layer", None), getattr(target, "d_model", None)
            if t_layer is not None and t_layer != nla.layer:
                raise ToolboxError(
                    f"The target reads activations at block {t_layer} but the NLA reads block {nla.layer}.",
                    f"build the target with layer={nla.layer} (build_target(..., layer=nla.layer)).",
                )
            if t_width is not None and t_width != nla.d_model:
                raise ToolboxError(f"The target's width {t_width} differs from the NLA's d_model {nla.d_model}.",
                               "use the NLA trained for this target's base model.")
        self.target = target
        self.nla = nla
        self.tool_set = tool_set
        self.names: list[str] = list(tools)
        self.budget = budget if budget is not None else Budget()
        self.max_chars = max_chars
        self.seed = seed
        self.max_positions = max_positions  # tokens verbalized per call
        self.verbalize_tokens = verbalize_tokens  # longest explanation, in tokens
        # Which activations verbalize explains ("target", or "placebo" for the control arm).
        # Private on purpose: nothing the calling model can read says which one it is.
        self._verbalize_source = get_verbalize_source(verbalize_source)
        self.tokenizer = getattr(getattr(nla, "av", None), "tokenizer", None) or getattr(target, "tokenizer", None)
        self.notes = Notes()
        self.log: list[CallRecord] = []
        self.vectors: dict[str, StoredVector] = {}
        self.conversations: list[str] = []  # conversation ids this audit created, in order
        self._lock = threading.RLock()
        self._by_id: dict[str, CallRecord] = {}
        self._verbalize_source.check(self)

    def __repr__(self) -> str:  # never the target's internals
        return f"Toolbox(tool_set={self.tool_set!r}, tools={len(self.names)}, calls={len(self.log)})"

    # ---- calling ------------------------------------------------------------------------

    def tool(self, name: str) -> ToolDef:
        return TOOLS[name]

    def call(self, name: str, args: dict[str, Any] | None = None, *, call_id: str | None = None) -> ToolResult:
        """Run tool `name` with `args` (a dict from the calling model). Never raises for bad input
        or a spent budget. `call_id` is the caller's own id for this call (e.g. LangChain's
        tool_call_id); the toolbox's short id (`c1`, `c2`, ...) is printed in the result."""
        with self._lock:
            return self._call(name, args, call_id)

    def _call(self, name: str, raw: Any, external_id: str | None) -> ToolResult:
        cid = f"c{len(self.log) + 1}"
        started, t0 = time.time(), time.monotonic()
        rec = CallRecord(cid, str(name), raw, "", "", False, started=started, external_id=external_id)

        def finish(result: ToolResult, *, charge: bool, refused: bool = False, internal: str | None = None) -> ToolResult:
            rec.seconds = time.monotonic() - t0
            if charge:
                self.budget.charge(calls=1, tokens=result.tokens_generated, nla_tokens=result.nla_tokens)
            body = rec.text = result.text
            shown, cut = truncate(body, self.max_chars, self._more_hint(cid, rec, result, body))
            footer = self.budget.summary()
            result.text = f"[{cid}] " + shown + (f"\n({footer})" if footer and not refused else "")
            result.call_id = cid
            rec.shown, rec.is_error, rec.refused, rec.truncated = result.text, result.is_error, refused, cut
            rec.tokens_generated, rec.nla_tokens, rec.data = result.tokens_generated, result.nla_tokens, result.data
            rec.internal_error = internal
            self.log.append(rec)
            self._by_id[cid] = rec
            if external_id:
                self._by_id.setdefault(external_id, rec)
            return result

        def error(problem: str, fix: str | None = None) -> ToolResult:
            text = f"error: {problem}" + (f"\nfix: {fix}" if fix else "")
            return ToolResult(text, is_error=True, data={"error": problem, "fix": fix})

        if name not in self.names:
            close = suggest_tool(name, self.names) if isinstance(name, str) else None
            hint = f" Did you mean {close}?" if close else ""
            return finish(error(f"There is no tool {name!r} in this tool set.{hint}",
                                f"use one of: {', '.join(self.names)}."), charge=False)
        tool = TOOLS[name]
        if not tool.free:
            why = self.budget.refusal()
            if why:
                return finish(error(why), charge=False, refused=True)
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            return finish(error(f"The arguments of {name} must be a JSON object (a dict), got {type(raw).__name__}.",
                                "pass named arguments, e.g. {\"message\": \"hello\"}."), charge=not tool.free)
        try:
            args = tool.args_model.model_validate(raw)
        except ValidationError as exc:
            problem, fix = format_validation_error(tool, exc)
            return finish(error(problem, fix), charge=not tool.free)
        if not tool.free:
            why = self.budget.refusal(max_tokens=int(tool.max_tokens(args)))
            if why:
                return finish(error(why), charge=False, refused=True)
        self.budget.start()
        try:
            out = tool.fn(self, args)
            result = out if isinstance(out, ToolResult) else ToolResult(str(out))
        except ToolError as exc:
            return finish(error(exc.problem, exc.fix), charge=not tool.free)
        except NLAError as exc:
            return finish(error(exc.problem, exc.fix), charge=not tool.free)
        except Exception as exc:  # a bug or a failure we did not foresee: readable, and the audit goes on
            return finish(
                error(f"{name} failed with an internal error ({type(exc).__name__}).",
                      "try again with different arguments, or use another tool."),
                charge=not tool.free, internal=traceback.format_exc(),
            )
        return finish(result, charge=not tool.free)

    def _more_hint(self, cid: str, rec: CallRecord, result: ToolResult, body: str) -> str:
        shown = cut_point(body, self.max_chars)
        if rec.name == "read_output" and isinstance(result.data, dict) and "call_id" in result.data:
            src, off = result.data["call_id"], result.data["offset"]
            return f"Call read_output(call_id='{src}', offset={off + shown}) to read on."
        return f"Call read_output(call_id='{cid}', offset={shown}) to read the rest."

    # ---- helpers the tools use ------------------------------------------------------------

    def last_call_id(self) -> str | None:
        return self.log[-1].call_id if self.log else None

    def has_call(self, call_id: str) -> bool:
        return call_id in self._by_id

    def canonical_call_id(self, call_id: str) -> str:
        return self._by_id[call_id].call_id

    def recent_call_ids(self, n: int) -> list[str]:
        return [r.call_id for r in self.log[-n:]]

    def full_output(self, call_id: str) -> str:
        rec = self._by_id.get(call_id.strip())
        if rec is None:
            recent = ", ".join(self.recent_call_ids(8)) or "none yet"
            raise ToolError(f"There is no tool call {call_id!r} in this audit (recent: {recent}).",
                            "use the id printed at the start of a tool result, e.g. [c3].")
        return rec.text

    def explained(self, vectors: Any) -> Any:
        """The vectors verbalize hands to the NLA for the target's `vectors` [n, d]: the same
        ones, or the placebo's (see `tools.sources`)."""
        return self._verbalize_source.explain(self, vectors)

    def contrasted(self, target: Any, base: Any) -> tuple[Any, list[int]]:
        """For a contrast reading of the target's `target` and the base model's `base` activations
        [n, d] at the same tokens: (vectors to explain, which rows they are), see `tools.sources`."""
        return self._verbalize_source.contrast(self, target, base)

    def store_vector(self, vector: Any, source: str) -> StoredVector:
        sv = StoredVector(f"v{len(self.vectors) + 1}", vector.detach().float().cpu().flatten(), source)
        self.vectors[sv.id] = sv
        return sv

    def get_vector(self, vector_id: str) -> StoredVector:
        sv = self.vectors.get(vector_id.strip())
        if sv is None:
            known = ", ".join(self.vectors) or "none yet"
            raise ToolError(
                f"There is no stored vector {vector_id!r} (known: {known}).",
                "reconstruct a sentence first (its result names a vector id such as v1), or pass text instead.",
            )
        return sv

    # ---- exports ----------------------------------------------------------------------

    def langchain_tools(self) -> list[Any]:
        from .export import langchain_tools

        return langchain_tools(self)

    def anthropic_schemas(self) -> list[dict[str, Any]]:
        from .export import anthropic_schemas

        return anthropic_schemas(self.names)

    def mcp_server(self, name: str = "nla-audit") -> Any:
        from .mcp_server import build_mcp_server

        return build_mcp_server(self, name=name)

    # ---- accounting ---------------------------------------------------------------------

    @property
    def tokens_generated(self) -> int:
        return self.budget.generated_tokens

    @property
    def tool_calls(self) -> int:
        return self.budget.tool_calls

    def transcript(self) -> list[dict[str, Any]]:
        return [r.as_dict() for r in self.log]

    # ---- state that survives a restart ----------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """What an audit must keep to resume this toolbox after a kill, as plain JSON: the notes,
        the stored vectors and the budget counters (the call log is kept by the caller, call by
        call). `restore` takes it back."""
        with self._lock:
            return {
                "notes": self.notes.model_dump(),
                "vectors": {k: {"source": v.source, "vector": [round(float(x), 6) for x in v.vector.tolist()]}
                            for k, v in self.vectors.items()},
                "budget": {"tool_calls": int(self.budget.tool_calls),
                           "generated_tokens": int(self.budget.generated_tokens),
                           "nla_tokens": int(self.budget.nla_tokens), "seconds": self.budget.seconds},
            }

    def restore(self, snapshot: dict[str, Any], calls: list[dict[str, Any]] | None = None) -> None:
        """Put back what a killed audit's toolbox knew, without calling any tool again.
        `snapshot`: as `snapshot()` returns it (any key may be missing or None: left as is; the
        budget counters only when some call was counted). `calls`: the calls made so far, as
        {id, tool, args, text, is_error, tokens, seconds, ref, data} (the audit transcript's
        records), put in the call log when it is still empty."""
        import torch

        with self._lock:
            if calls and not self.log:
                for c in calls:
                    rec = CallRecord(c["id"], c["tool"], c.get("args"), c.get("text", ""), c.get("text", ""),
                                     bool(c.get("is_error")), tokens_generated=int(c.get("tokens", 0)),
                                     seconds=float(c.get("seconds", 0.0)), external_id=c.get("ref") or None,
                                     data=c.get("data"))
                    self.log.append(rec)
                    self._by_id[rec.call_id] = rec
                    if rec.external_id:
                        self._by_id.setdefault(rec.external_id, rec)
            if snapshot.get("notes") is not None:
                self.notes = type(self.notes).model_validate(snapshot["notes"])
            for k, v in (snapshot.get("vectors") or {}).items():
                self.vectors[k] = StoredVector(k, torch.tensor(v["vector"], dtype=torch.float32), v["source"])
            counters = snapshot.get("budget") or {}
            if counters.get("tool_calls"):
                self.budget.tool_calls = int(counters["tool_calls"])
                self.budget.generated_tokens = int(counters.get("generated_tokens", 0))
                if counters.get("nla_tokens") is not None:
                    self.budget.nla_tokens = int(counters["nla_tokens"])
                self.budget.started_at = time.monotonic() - float(counters.get("seconds", 0.0))
