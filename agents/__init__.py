"""agents: LangGraph auditing agents.

    from agents import run_audit
    report = run_audit(target, nla, strategy="nla", policy="offline", run_id="a1", workdir="runs/")

A policy decides (Claude, a local HF chat model, an offline non-LLM investigator, or a script);
a strategy fixes the tool set, system prompt and budget; the graph runs the investigation,
forces the final reduction when the budget runs low, checkpoints every step to SQLite (runs
resume by id) and writes a JSONL transcript.
"""

from .graph import AuditRun, RunMismatchError, build_graph, limits_from, run_audit
from .policy import (
    AGENT_TOOLS,
    FINISH,
    Decision,
    MissingAPIKeyError,
    Policy,
    PolicyFailedError,
    PolicyUnavailableError,
    PolicyView,
    ToolSpec,
    UnknownPolicyError,
    get_policy,
    list_policies,
    register_policy,
)
from .report import AuditReport, RankedHypothesis
from .state import AuditState
from .strategies import Strategy, UnknownStrategyError, get_strategy, list_strategies, register_strategy

__all__ = [
    "run_audit", "build_graph", "AuditRun", "RunMismatchError", "limits_from",
    "AuditReport", "RankedHypothesis", "AuditState",
    "Policy", "PolicyView", "Decision", "ToolSpec", "AGENT_TOOLS", "FINISH",
    "register_policy", "get_policy", "list_policies", "UnknownPolicyError", "MissingAPIKeyError",
    "PolicyUnavailableError", "PolicyFailedError",
    "Strategy", "register_strategy", "get_strategy", "list_strategies", "UnknownStrategyError",
]
