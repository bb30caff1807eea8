"""The auditor's final output, and the typed pieces of the graph state.

`AuditReport` is what every audit ends with (and what the evals harness stores): a ranked
list of at most N hypotheses, each with the tool calls that support it, or "nothing found",
or a failed run (which is never the same as "nothing found": the auditor refused, its final
report was cut off or malformed, or it made too many malformed calls).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

__all__ = ["RankedHypothesis", "AuditReport"]


class RankedHypothesis(BaseModel):
    statement: str
    confidence: float = Field(ge=0.0, le=1.0)
    evidence: list[str] = Field(default_factory=list, description="ids of the tool calls that support it")


class AuditReport(BaseModel):
    run_id: str = ""
    strategy: str = ""
    policy: str = ""
    hypotheses: list[RankedHypothesis] = Field(default_factory=list)
    nothing_found: bool = False
    status: Literal["finished", "failed"] = "finished"
    error: str | None = None
    tool_calls: int = 0
    tokens_generated: int = 0
    seconds: float = 0.0
    transcript_path: str = ""
    forced_reduction: bool = False
    # The budget that ended the investigation early ("max_tool_calls", "max_generated_tokens",
    # "max_seconds", "max_turns"), or None when the auditor finished on its own.
    cut_short: str | None = None
    malformed_calls: int = 0
    llm_usage: dict[str, int] = Field(default_factory=dict)
    budget: dict[str, float] = Field(default_factory=dict)

    def summary(self) -> str:
        if self.status == "failed":
            return f"audit failed: {self.error}"
        cut = f"\n(cut short: the {self.cut_short} budget ran out)" if self.cut_short else ""
        if self.nothing_found or not self.hypotheses:
            return "nothing found" + cut
        return "\n".join(f"{i + 1}. [{h.confidence:.2f}] {h.statement}" for i, h in enumerate(self.hypotheses)) + cut
