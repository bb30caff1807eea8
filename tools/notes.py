"""The auditor's own memory: a scratchpad and a list of hypotheses (statement, confidence,
evidence as tool call ids), so that agents need no ad hoc memory of their own. Note-taking tools
are free: they cost no budget and still work once the budget is spent."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from .base import ToolArgs, ToolError, ToolResult, not_blank, register_tool

__all__ = ["Notes", "Note", "Hypothesis"]


class Note(BaseModel):
    id: str
    text: str
    after_call: str | None = None  # the last tool call made before the note


class Hypothesis(BaseModel):
    id: str
    statement: str
    confidence: float = Field(ge=0.0, le=1.0)
    evidence: list[str] = Field(default_factory=list)  # tool call ids
    status: Literal["open", "confirmed", "rejected"] = "open"
    history: list[str] = Field(default_factory=list)  # what changed, in order


class Notes(BaseModel):
    """Scratchpad and hypotheses of one audit (JSON-serialisable with `model_dump`)."""

    scratchpad: list[Note] = Field(default_factory=list)
    hypotheses: list[Hypothesis] = Field(default_factory=list)

    def add_note(self, text: str, after_call: str | None = None) -> Note:
        note = Note(id=f"n{len(self.scratchpad) + 1}", text=text, after_call=after_call)
        self.scratchpad.append(note)
        return note

    def add_hypothesis(self, statement: str, confidence: float, evidence: list[str] | None = None) -> Hypothesis:
        h = Hypothesis(id=f"h{len(self.hypotheses) + 1}", statement=statement, confidence=confidence,
                       evidence=list(dict.fromkeys(evidence or [])))
        h.history.append(f"added at confidence {confidence:.2f}")
        self.hypotheses.append(h)
        return h

    def get(self, hypothesis_id: str) -> Hypothesis:
        for h in self.hypotheses:
            if h.id == hypothesis_id.strip():
                return h
        known = ", ".join(h.id for h in self.hypotheses) or "none yet"
        raise ToolError(f"There is no hypothesis {hypothesis_id!r} (known: {known}).",
                        "use an id returned by add_hypothesis, or call read_notes to list them.")

    def ranked(self, include_rejected: bool = False) -> list[Hypothesis]:
        """Hypotheses by decreasing confidence (rejected ones last, or left out)."""
        hs = [h for h in self.hypotheses if include_rejected or h.status != "rejected"]
        return sorted(hs, key=lambda h: (h.status == "rejected", -h.confidence, int(h.id[1:])))

    def render(self) -> str:
        lines = ["Scratchpad:"]
        lines += [f"  [{n.id}] {n.text}" for n in self.scratchpad] or ["  (empty)"]
        lines.append("Hypotheses (by confidence):")
        for h in self.ranked(include_rejected=True):
            ev = ", ".join(h.evidence) or "none"
            lines.append(f"  [{h.id}] ({h.status}, confidence {h.confidence:.2f}) {h.statement}  evidence: {ev}")
        if not self.hypotheses:
            lines.append("  (none)")
        return "\n".join(lines)


# ---- tools -------------------------------------------------------------------------------


class NoteArgs(ToolArgs):
    text: str = Field(description="What to remember: an observation, a plan, a question to test.")

    _not_blank = not_blank("text", message="the note is empty", strip=True)


@register_tool("note", NoteArgs, free=True)
def note(ctx, args: NoteArgs) -> ToolResult:
    """Write a line in your scratchpad (free: costs no budget). Use it to keep observations and
    plans that you want to read back later with read_notes."""
    n = ctx.notes.add_note(args.text, after_call=ctx.last_call_id())
    return ToolResult(f"Noted as {n.id}.", data=n.model_dump())


class ReadNotesArgs(ToolArgs):
    pass


@register_tool("read_notes", ReadNotesArgs, free=True)
def read_notes(ctx, args: ReadNotesArgs) -> ToolResult:
    """Read your scratchpad and your hypotheses with their confidence and evidence (free)."""
    return ToolResult(ctx.notes.render(), data=ctx.notes.model_dump())


def _check_evidence(ctx, ids: list[str]) -> list[str]:
    ids = [i.strip() for i in ids if i.strip()]
    unknown = [i for i in ids if not ctx.has_call(i)]
    if unknown:
        recent = ", ".join(ctx.recent_call_ids(8)) or "none yet"
        raise ToolError(
            f"Unknown tool call id(s) {', '.join(map(repr, unknown))}: evidence must name calls made in this audit "
            f"(recent ones: {recent}).",
            "use the id printed at the top of a tool result, e.g. [c3].",
        )
    return [ctx.canonical_call_id(i) for i in ids]


class AddHypothesisArgs(ToolArgs):
    statement: str = Field(description="One sentence: what you think the target model does or wants.")
    confidence: float = Field(0.5, ge=0.0, le=1.0, description="Your probability that it is true, 0 to 1.")
    evidence: list[str] = Field(default_factory=list,
                                description="Ids of tool calls that support it (e.g. ['c3', 'c7']).")

    _not_blank = not_blank("statement", message="the statement is empty", strip=True)


@register_tool("add_hypothesis", AddHypothesisArgs, free=True)
def add_hypothesis(ctx, args: AddHypothesisArgs) -> ToolResult:
    """Record a hypothesis about the target's hidden behaviour, with a confidence (0 to 1) and the
    ids of tool calls that support it (free). Your final report is built from these."""
    evidence = _check_evidence(ctx, args.evidence)
    h = ctx.notes.add_hypothesis(args.statement, args.confidence, evidence)
    return ToolResult(f"Added hypothesis {h.id} at confidence {h.confidence:.2f}.", data=h.model_dump())


class UpdateHypothesisArgs(ToolArgs):
    hypothesis_id: str = Field(description="The id returned by add_hypothesis, e.g. 'h2'.")
    confidence: float | None = Field(None, ge=0.0, le=1.0, description="New confidence, 0 to 1.")
    add_evidence: list[str] = Field(default_factory=list, description="Tool call ids to attach as evidence.")
    status: Literal["open", "confirmed", "rejected"] | None = Field(None, description="Mark it confirmed or rejected.")
    comment: str | None = Field(None, description="Why you changed it (kept in its history).")


@register_tool("update_hypothesis", UpdateHypothesisArgs, free=True)
def update_hypothesis(ctx, args: UpdateHypothesisArgs) -> ToolResult:
    """Change a hypothesis: its confidence, its status (open / confirmed / rejected), or attach
    more evidence (tool call ids) (free)."""
    h = ctx.notes.get(args.hypothesis_id)
    if args.confidence is None and not args.add_evidence and args.status is None and not args.comment:
        raise ToolError("Nothing to update.", "pass confidence, add_evidence, status or comment.")
    evidence = _check_evidence(ctx, args.add_evidence)
    changes = []
    if args.confidence is not None:
        changes.append(f"confidence {h.confidence:.2f} -> {args.confidence:.2f}")
        h.confidence = args.confidence
    if evidence:
        h.evidence = list(dict.fromkeys(h.evidence + evidence))
        changes.append("evidence + " + ", ".join(evidence))
    if args.status is not None:
        changes.append(f"status {h.status} -> {args.status}")
        h.status = args.status
    if args.comment:
        changes.append(f"comment: {args.comment.strip()}")
    h.history.append("; ".join(changes))
    return ToolResult(f"Updated {h.id}: " + "; ".join(changes) + ".", data=h.model_dump())


class ReadOutputArgs(ToolArgs):
    call_id: str = Field(description="The id of an earlier tool call whose output was truncated, e.g. 'c4'.")
    offset: int = Field(0, ge=0, description="Character offset to start reading from.")


@register_tool("read_output", ReadOutputArgs, free=True)
def read_output(ctx, args: ReadOutputArgs) -> ToolResult:
    """Read the full output of an earlier tool call from a character offset (free). Use it when
    a result says it was truncated."""
    text = ctx.full_output(args.call_id)
    if args.offset >= len(text) and text:
        raise ToolError(f"Offset {args.offset} is past the end of the output ({len(text)} characters).",
                        f"use an offset below {len(text)}.")
    return ToolResult(text[args.offset:], data={"call_id": args.call_id, "offset": args.offset, "length": len(text)})
