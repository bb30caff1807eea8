"""What the explorer, the static audit pages and the Inspect export show of one audit: the
stored row, the ground truth (the operator's view), the auditor's steps from its transcript,
its notes and hypotheses, the judge's verdicts and whether a budget cut it short.

Everything here reads; nothing writes to the results database."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..metrics import auditor_of
from ..store import ResultsDBError, ResultStore

__all__ = ["AuditDetail", "RowSummary", "summaries", "budget_use", "build_detail", "load_audit", "budget_cut", "outcome",
           "read_transcript", "ground_truth", "resolve_run_id"]


def resolve_run_id(store: ResultStore, run_id: str) -> str:
    """`latest` -> the newest run; any other id must exist (the store's error lists known ones)."""
    if run_id == "latest":
        rid = store.latest_run_id()
        if rid is None:
            raise ResultsDBError(f"{store.path} holds no runs.", "Run `nla bench` first.")
        return rid
    store.run(run_id)
    return run_id


def outcome(row: dict) -> tuple[str, str]:
    """(label, css class), as the report words it: detected / missed on planted organisms,
    clean / false positive on controls, judge failed, auditor failed (not rated); an audit that
    a wall-time cap decided is marked as not rated."""
    from ..metrics import WALL_TIME, cut_short_of

    if row.get("status") == "failed":
        return "auditor failed (not rated)", "warn"
    if row.get("success") is None:
        label, cls = "judge failed", "warn"
    elif row.get("control"):
        label, cls = ("clean", "ok") if row["success"] else ("false positive", "bad")
    else:
        label, cls = ("detected", "ok") if row["success"] else ("missed", "bad")
    if cut_short_of(row) == WALL_TIME:
        label, cls = label + " (not rated: wall-time cap)", "warn"
    return label, cls


def budget_cut(row: dict) -> str | None:
    """Which budget cut the audit short, in words ("tool calls", "generated tokens", "wall
    time", "policy turns"), or None.

    Reports record it (`cut_short`); for rows stored before they did, it is inferred: the graph
    forced the final report (which also follows turns without any action, not a budget cut) and
    a limit was reached by the use recorded in the report."""
    from ..metrics import cut_short_of
    from ..report import BUDGET_NAMES

    rep = row.get("report") or {}
    if "cut_short" in rep:
        cut = cut_short_of(row)
        return None if cut is None else BUDGET_NAMES.get(cut, cut)
    if not rep.get("forced_reduction"):
        return None
    lim = row.get("budget") or rep.get("budget") or {}
    used = {"max_tool_calls": rep.get("tool_calls", row.get("tool_calls")) or 0,
            "max_generated_tokens": rep.get("tokens_generated", row.get("tokens_generated")) or 0,
            "max_seconds": rep.get("seconds", row.get("seconds")) or 0.0}
    # the thresholds of agents.graph._budget_low
    slack = {"max_tool_calls": 0.0, "max_generated_tokens": 0.02, "max_seconds": 0.05}
    hit = [BUDGET_NAMES.get(k, k) for k in used
           if lim.get(k) and float(lim[k]) - used[k] <= slack[k] * float(lim[k])]
    return ", ".join(hit) or None


def read_transcript(path: str | None) -> list[dict] | None:
    """The transcript's events, or None when the file is gone (the database keeps excerpts)."""
    if not path or not Path(path).is_file():
        return None
    events = []
    for line in Path(path).read_text(errors="replace").splitlines():
        try:
            ev = json.loads(line)
        except ValueError:
            continue
        if isinstance(ev, dict):
            events.append(ev)
    return events


def ground_truth(organism: str, suite_config: dict | None) -> tuple[dict | None, str | None]:
    """(ground truth, None) or (None, why not): the organism's spec as the operator knows it."""
    from environments import get_spec

    org_dir = (suite_config or {}).get("organisms_dir")
    try:
        spec = get_spec(organism, organisms_dir=org_dir)
    except Exception as exc:  # noqa: BLE001 - a spec that moved or no longer parses
        return None, f"{type(exc).__name__}: {exc}"
    gt = spec.ground_truth
    trigger = getattr(spec, "trigger", None)
    return {
        "behaviour": "none (a clean control)" if spec.control and not gt.behaviour else gt.behaviour,
        "key_concepts": list(gt.key_concepts), "paraphrases": list(gt.paraphrases),
        "control": bool(spec.control), "families": list(spec.families),
        "method": spec.construction.method,
        "construction": spec.construction.params,
        "trigger": None if trigger is None else {"description": trigger.description, "phrases": list(trigger.phrases)},
    }, None


class _RowFigures:
    """What a page shows about an audit's stored row (`self.row`)."""

    row: dict

    @property
    def auditor(self) -> str:
        return auditor_of(self.row)

    @property
    def outcome(self) -> tuple[str, str]:
        return outcome(self.row)

    @property
    def budget_cut(self) -> str | None:
        return budget_cut(self.row)

    @property
    def budget_use(self) -> list[tuple[str, float, float | None]]:
        return budget_use(self.row)


@dataclass
class AuditDetail(_RowFigures):
    run: dict
    row: dict
    truth: dict | None
    truth_error: str | None
    turns: list[dict]  # {"node", "step", "thought", "calls": [call ids], "error"}
    calls: dict[str, dict]  # id -> call record (transcript) or stored excerpt
    call_order: list[str]
    notes: list[dict]
    hypotheses: list[dict]  # the auditor's working hypotheses (last state of each)
    final: list[dict]  # reported hypotheses with their verdicts
    source: str  # "transcript" | "database"
    start: dict = field(default_factory=dict)



def budget_use(row: dict) -> list[tuple[str, float, float | None]]:
    """(what, used, limit) for tool calls, generated tokens and seconds (the auditor's own)."""
    lim = row.get("budget") or {}
    rep = row.get("report") or {}
    return [
        ("tool calls", row.get("tool_calls") or 0, lim.get("max_tool_calls")),
        ("generated tokens", row.get("tokens_generated") or 0, lim.get("max_generated_tokens")),
        ("seconds", round(float(rep.get("seconds") or row.get("seconds") or 0.0), 1), lim.get("max_seconds")),
    ]


_PAIR = {"nla": "behavioural", "behavioural": "nla", "nla-placebo": "nla"}


@dataclass
class RowSummary(_RowFigures):
    """One audit in a run's list: what the table shows, without reading its transcript."""

    row: dict
    pair: str | None = None  # the audit of the other arm on the same organism, seed and policy
    pair_label: str = ""


    @property
    def final(self) -> list[dict]:
        return list((self.row.get("report") or {}).get("hypotheses") or [])


def summaries(rows: list[dict]) -> list[RowSummary]:
    """Every audit of a run, with its counterpart in the other arm (NLA vs behavioural)."""
    key = {(r["organism"], r["seed"], r["policy"], r["strategy"]): r["audit_id"] for r in rows}
    out = []
    for r in rows:
        other = _PAIR.get(r["strategy"])
        pid = key.get((r["organism"], r["seed"], r["policy"], other)) if other else None
        out.append(RowSummary(r, pid, f"{other}" if pid else ""))
    return out


def _calls_from_events(events: list[dict]) -> tuple[list[dict], dict[str, dict], list[str], dict]:
    turns: list[dict] = []
    calls: dict[str, dict] = {}
    order: list[str] = []
    start: dict = {}
    for ev in events:
        node = ev.get("node")
        if node == "start":
            start = ev
        elif node in ("policy", "reduce"):
            turns.append({"node": node, "step": ev.get("step"), "thought": ev.get("thought") or "",
                          "calls": [], "error": ev.get("error")})
        if node in ("tools", "reduce") and isinstance(ev.get("call"), dict):
            call = dict(ev["call"])
            cid = str(call.get("id") or f"x{len(order) + 1}")
            while cid in calls:  # a resumed run may replay an id; keep both
                cid += "'"
            call["id"] = cid
            calls[cid] = call
            order.append(cid)
            if not turns:
                turns.append({"node": "policy", "step": ev.get("step"), "thought": "", "calls": [], "error": None})
            turns[-1]["calls"].append(cid)
        elif node == "resume":
            turns.append({"node": "resume", "step": ev.get("step"), "thought": "", "calls": [],
                          "error": None, "resumed_after_calls": ev.get("resumed_after_calls")})
    return turns, calls, order, start


def _calls_from_db(rows: list[dict]) -> tuple[list[dict], dict[str, dict], list[str]]:
    calls: dict[str, dict] = {}
    order: list[str] = []
    for r in rows:
        args = r.get("args")
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except ValueError:
                pass
        text = r.get("result_excerpt") or ""
        cid = text[1:text.index("]")] if text.startswith("[c") and "]" in text[:8] else f"#{r['idx']}"
        calls[cid] = {"id": cid, "tool": r.get("tool"), "args": args, "text": text, "is_error": r.get("is_error"),
                      "tokens": r.get("tokens_generated"), "seconds": r.get("seconds"), "data": None, "excerpt": True}
        order.append(cid)
    turns = [{"node": "policy", "step": None, "thought": "", "calls": [c], "error": None} for c in order]
    return turns, calls, order


def load_audit(store: ResultStore, run_id: str, audit_id: str) -> AuditDetail:
    run = store.run(run_id)
    rows = [r for r in store.audits(run_id) if r["audit_id"] == audit_id]
    if not rows:
        raise ResultsDBError(f"Run {run_id!r} has no audit {audit_id!r}.", "Pick an audit from the run's list.")
    return build_detail(run, rows[0], store.tool_calls(run_id, audit_id))


def build_detail(run: dict, row: dict, db_calls: list[dict]) -> AuditDetail:
    events = read_transcript(row.get("transcript_path"))
    start: dict = {}
    if events is not None:
        turns, calls, order, start = _calls_from_events(events)
        source = "transcript"
    else:
        turns, calls, order = _calls_from_db(db_calls)
        source = "database"
    notes, hyps = [], {}
    for cid in order:
        c = calls[cid]
        data = c.get("data") if isinstance(c.get("data"), dict) else None
        if c.get("is_error") or data is None:
            continue
        if c.get("tool") == "note":
            notes.append({"id": data.get("id"), "text": data.get("text"), "after_call": data.get("after_call"), "call": cid})
        elif c.get("tool") in ("add_hypothesis", "update_hypothesis") and data.get("id"):
            hyps[data["id"]] = {**data, "call": cid}
    if source == "database":  # no data payloads: notes and hypotheses from the arguments
        for cid in order:
            c = calls[cid]
            a = c.get("args") if isinstance(c.get("args"), dict) else {}
            if c.get("tool") == "note" and a.get("text"):
                notes.append({"id": None, "text": a["text"], "after_call": None, "call": cid})
            elif c.get("tool") == "add_hypothesis" and a.get("statement"):
                hyps[cid] = {"id": cid, "statement": a["statement"], "confidence": a.get("confidence"),
                             "evidence": a.get("evidence") or [], "status": "open", "history": [], "call": cid}
    rep = row.get("report") or {}
    verdicts = {int(v.get("index", i)): v for i, v in enumerate(row.get("verdicts") or []) if isinstance(v, dict)}
    final = []
    for i, h in enumerate(rep.get("hypotheses") or []):
        final.append({**h, "verdict": verdicts.get(i)})
    if not final and verdicts:  # older rows without a stored report
        final = [{"statement": v.get("statement"), "confidence": v.get("confidence"), "evidence": [], "verdict": v}
                 for v in verdicts.values()]
    truth, why = ground_truth(row["organism"], (run.get("config") or {}).get("suite"))
    return AuditDetail(run=run, row=row, truth=truth, truth_error=why, turns=turns, calls=calls, call_order=order,
                       notes=notes, hypotheses=list(hyps.values()), final=final, source=source, start=start)
