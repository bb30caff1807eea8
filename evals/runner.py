"""The run matrix: organisms x strategies x policies x seeds, each audit judged and written to
DuckDB as soon as it finishes.

- The model and the NLA are loaded once per run and shared by every audit; each organism is
  planted once (a LoRA organism is one adapter on the shared model) and every audit gets a
  fresh `Target` over it with an opaque alias.
- Resume: finished audits are rows in the database and are skipped; an audit that was killed
  half-way resumes inside `agents.run_audit` from its SQLite checkpoint (same run id, same
  workdir), so no tool call is made twice.
- Judge failures are stored as such (`success = NULL`, `judge_status = 'failed'`) and can be
  re-judged later with `rejudge`.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nla_core.errors import NLAError

from .judge import Judge, make_judge
from .scoring import score_report
from .store import AuditRow, ResultStore, ToolCallRow
from .suite import AuditCell, BenchSuite

__all__ = ["BenchResult", "run_bench", "code_version", "read_tool_calls", "default_db_path", "new_run_id"]


def default_db_path() -> Path:
    import os

    return Path(os.environ.get("NLA_AUDIT_RESULTS", "results")) / "bench.duckdb"


def new_run_id(suite: str) -> str:
    return f"{suite}-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"


def code_version() -> str:
    """`git describe --always --dirty` of the checkout this package runs from, else the
    installed package version."""
    here = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=12"], cwd=here,
                             capture_output=True, text=True, timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        from importlib.metadata import version

        return "nla-audit " + version("nla-audit")
    except Exception:  # noqa: BLE001
        return "unknown"


def read_tool_calls(transcript_path: str | None) -> list[ToolCallRow]:
    """The tool calls of an audit, from its JSONL transcript (events of the `tools` node)."""
    if not transcript_path or not Path(transcript_path).exists():
        return []
    rows: list[ToolCallRow] = []
    for line in Path(transcript_path).read_text().splitlines():
        try:
            ev = json.loads(line)
        except ValueError:
            continue
        call = ev.get("call") if isinstance(ev, dict) and ev.get("node") == "tools" else None
        if not isinstance(call, dict):
            continue
        rows.append(ToolCallRow(
            idx=len(rows), tool=str(call.get("tool")), args=call.get("args"), is_error=bool(call.get("is_error")),
            tokens_generated=int(call.get("tokens") or 0), seconds=call.get("seconds"),
            result_excerpt=str(call.get("text") or "")[:2000],
        ))
    return rows


def _check_budget(budget: dict | None) -> None:
    """Every budget value a positive finite number (None: no limit of that kind)."""
    for key, val in (budget or {}).items():
        if val is None:
            continue
        if isinstance(val, bool) or not isinstance(val, (int, float)) or not math.isfinite(val) or val <= 0:
            raise NLAError(f"The suite's budget {key} must be a positive number, got {val!r}.",
                           f"pass a number above 0 (e.g. --{key.replace('_', '-')} 30), or leave it out.")


def _alias(salt: str | None, run_id: str, organism: str) -> str:
    """An opaque per-run alias: the organism's id would give its behaviour away. Keyed with the
    run's random salt (stored in its config, so a resume keeps the aliases); runs recorded
    before the salt existed keep their old unsalted alias when resumed."""
    if salt:
        from environments.target import alias_for

        return alias_for(salt, organism)
    return "target-" + hashlib.sha1(f"{run_id}/{organism}".encode()).hexdigest()[:6]


def _opaque_id(run_id: str, audit_id: str) -> str:
    """The id `run_audit` (and so the auditor's state and transcript) sees: audit ids name the
    organism. The mapping is stable, so a resumed run finds its checkpoints again."""
    return "audit-" + hashlib.sha1(f"{run_id}/{audit_id}".encode()).hexdigest()[:12]


@dataclass
class BenchResult:
    run_id: str
    db_path: Path
    n_cells: int
    n_done_before: int
    n_run: int
    elapsed_s: float
    rows: list[dict] = field(default_factory=list)


class _Shared:
    """The model, NLA and planted organisms, loaded once and shared by all audits."""

    def __init__(self, suite: BenchSuite, handle: Any = None, nla: Any = None):
        self.suite = suite
        self._handle = handle
        self._nla = nla

    @property
    def handle(self) -> Any:
        if self._handle is None:
            from nla_core import load_model

            self._handle = load_model(self.suite.model)
        return self._handle

    @property
    def nla(self) -> Any:
        if self._nla is None:
            from nla_core.defaults import load_nla_for

            self._nla = load_nla_for(self.handle, layer=self.suite.layer)
        return self._nla

    @property
    def layer(self) -> int:
        return self.suite.layer if self.suite.layer is not None else self.nla.layer

    def target(self, spec: Any, *, alias: str, seed: int) -> Any:
        from environments import build_target

        return build_target(spec, self.handle, alias=alias, layer=self.layer, seed=seed)


def run_bench(
    suite: BenchSuite,
    *,
    db_path: str | Path | None = None,
    run_id: str | None = None,
    resume: bool = False,
    handle: Any = None,
    nla: Any = None,
    judge: Judge | None = None,
    policy_factory: Callable[[str, AuditCell], Any] | None = None,
    workdir: str | Path | None = None,
    on_progress: Callable[[str, dict], None] | None = None,
    max_audits: int | None = None,
    workers: int | None = None,
) -> BenchResult:
    """Run (or resume) the matrix of `suite`, writing one row per finished audit.

    `handle`/`nla`: an already loaded model and NLA (else loaded once from the suite's model).
    `policy_factory(name, cell)`: builds the policy object for a cell (tests use it to give the
    scripted policy its script); default: `agents.get_policy(name, **suite.policy_options[name])`.
    `resume`: continue `run_id` (or the latest run of this suite in the database).
    `max_audits`: stop after running this many audits (for tests and smoke runs).
    `workers`: audits in parallel processes (default: the suite's; on resume, the number the
    run was started with), each loading the model once and using
    cpu_count // workers torch threads; the main process judges and writes. It pays where one
    audit cannot keep the cores busy (small models, API-bound policies); ignored when a
    `handle` or `policy_factory` is passed (they cannot cross processes)."""
    from agents import get_policy, run_audit

    t0 = time.monotonic()
    db_path = Path(db_path) if db_path is not None else default_db_path()
    say = on_progress or (lambda event, info: None)
    if workers is not None and workers < 1:
        raise NLAError(f"workers must be at least 1, got {workers}.", "pass --workers 1 or more.")
    if not resume:  # bad input is refused before the database is touched
        _check_budget(suite.budget)
        suite.validate_names()
        specs0 = suite.organism_specs()
        suite.cells(specs0)
        suite.check_weights(specs0)
        if policy_factory is None:  # e.g. claude without a key: say so now, not after other audits ran
            for p in suite.policies:
                get_policy(p, **suite.policy_options.get(p, {}))

    with ResultStore(db_path) as store:
        if resume:
            run_id = run_id or store.latest_run_id(suite.name)
            if run_id is None:
                raise NLAError(f"No earlier run of suite {suite.name!r} in {db_path} to resume.",
                               "Drop --resume to start a new run.")
            stored = (store.run(run_id)["config"] or {}).get("suite")
            if stored and stored != suite.model_dump(mode="json"):
                say("note", {"message": f"resuming {run_id} with the suite settings it was started with"})
                suite = BenchSuite.model_validate(stored)
            if workers is None:
                workers = int((store.run(run_id)["config"] or {}).get("workers") or suite.workers)
                say("note", {"message": f"resuming {run_id} with {workers} worker(s), as it was started "
                                        "(pass --workers to change)"})
        _check_budget(suite.budget)  # before the run row: a bad budget must not poison --resume
        workers = suite.workers if workers is None else workers
        suite.validate_names()
        specs = suite.organism_specs()
        suite.check_weights(specs)
        by_id = {s.id: s for s in specs}
        cells = suite.cells(specs)
        run_id = run_id or new_run_id(suite.name)
        version = code_version()
        from environments.target import new_alias_salt

        store.start_run(run_id, suite.name, {"suite": suite.model_dump(mode="json"), "alias_salt": new_alias_salt(),
                                             "workers": workers}, version)
        alias_salt = (store.run(run_id)["config"] or {}).get("alias_salt")  # the stored one when resuming
        done = store.finished_audit_ids(run_id)
        todo = [c for c in cells if c.audit_id not in done]
        say("start", {"run_id": run_id, "cells": len(cells), "done": len(done), "todo": len(todo), "db": str(db_path)})
        base = Path(workdir) if workdir is not None else db_path.parent / "runs" / run_id
        base.mkdir(parents=True, exist_ok=True)
        shared = _Shared(suite, handle, nla)
        if judge is None and todo and any(not by_id[c.organism].control for c in todo):
            judge = make_judge(suite.judge)
        n_run = 0
        t_saved = t0  # run time up to here is in runs.elapsed_s (a killed segment keeps its share)

        def record(cell: AuditCell, report: Any, wall: float) -> None:
            nonlocal n_run, t_saved
            spec = by_id[cell.organism]
            sc = score_report(report, spec, judge, confidence_threshold=suite.confidence_threshold)
            row = AuditRow(
                run_id=run_id, audit_id=cell.audit_id, organism=spec.id, family=",".join(spec.families),
                control=bool(spec.control), strategy=cell.strategy, policy=cell.policy, seed=cell.seed,
                status=report.status, error=report.error, judge=sc.judge, judge_status=sc.judge_status,
                judge_error=sc.judge_error, success=sc.success, score=sc.score, report=report.model_dump(mode="json"),
                verdicts=sc.verdicts, n_hypotheses=len(report.hypotheses), tool_calls=report.tool_calls,
                tokens_generated=report.tokens_generated, seconds=max(float(report.seconds or 0.0), wall),
                budget=dict(report.budget or {}), transcript_path=report.transcript_path or None,
                code_version=version, calls=read_tool_calls(report.transcript_path),
            )
            now = time.monotonic()
            store.add_audit(row, run_elapsed_s=now - t_saved)
            t_saved = now
            n_run += 1
            say("done", {"audit_id": cell.audit_id, "i": len(done) + n_run, "n": len(cells), "success": sc.success,
                         "judge_status": sc.judge_status, "seconds": round(wall, 1), "tool_calls": report.tool_calls,
                         "status": report.status, "cut_short": report.cut_short})

        if max_audits is not None:
            todo = todo[:max_audits]
        if workers > 1 and len(todo) > 1 and policy_factory is None and handle is None:
            _run_parallel(suite, todo, run_id, base, workers, record, say, alias_salt)
        else:
            for cell in todo:
                spec = by_id[cell.organism]
                say("audit", {"audit_id": cell.audit_id, "i": n_run + len(done) + 1, "n": len(cells)})
                policy = (policy_factory(cell.policy, cell) if policy_factory is not None
                          else get_policy(cell.policy, **suite.policy_options.get(cell.policy, {})))
                target = shared.target(spec, alias=_alias(alias_salt, run_id, spec.id), seed=cell.seed)
                a0 = time.monotonic()
                report = run_audit(target, shared.nla, strategy=cell.strategy, policy=policy, budget=suite.budget,
                                   run_id=_opaque_id(run_id, cell.audit_id), workdir=base, seed=cell.seed,
                                   max_hypotheses=suite.max_hypotheses)
                record(cell, report, time.monotonic() - a0)
        elapsed = time.monotonic() - t0
        store.finish_run(run_id, time.monotonic() - t_saved)
        rows = store.audits(run_id)
    return BenchResult(run_id=run_id, db_path=db_path, n_cells=len(cells), n_done_before=len(done), n_run=n_run,
                       elapsed_s=elapsed, rows=rows)


# ---- parallel workers -----------------------------------------------------------------------

_WORKER: dict[str, Any] = {}


def _worker_init(suite_json: dict, run_id: str, base: str, threads: int, alias_salt: str | None = None) -> None:
    import torch

    torch.set_num_threads(max(1, threads))
    suite = BenchSuite.model_validate(suite_json)
    _WORKER.update(suite=suite, run_id=run_id, base=base, shared=_Shared(suite), alias_salt=alias_salt,
                   specs={s.id: s for s in suite.organism_specs()})


def _worker_run(cell_json: dict) -> tuple[dict, dict, float]:
    from agents import get_policy, run_audit

    suite: BenchSuite = _WORKER["suite"]
    shared: _Shared = _WORKER["shared"]
    cell = AuditCell.model_validate(cell_json)
    spec = _WORKER["specs"][cell.organism]
    policy = get_policy(cell.policy, **suite.policy_options.get(cell.policy, {}))
    target = shared.target(spec, alias=_alias(_WORKER.get("alias_salt"), _WORKER["run_id"], spec.id), seed=cell.seed)
    a0 = time.monotonic()
    report = run_audit(target, shared.nla, strategy=cell.strategy, policy=policy, budget=suite.budget,
                       run_id=_opaque_id(_WORKER["run_id"], cell.audit_id), workdir=_WORKER["base"],
                       seed=cell.seed, max_hypotheses=suite.max_hypotheses)
    return cell_json, report.model_dump(mode="json"), time.monotonic() - a0


def _run_parallel(suite: BenchSuite, todo: list[AuditCell], run_id: str, base: Path, workers: int,
                  record: Callable[[AuditCell, Any, float], None], say: Callable[[str, dict], None],
                  alias_salt: str | None = None) -> None:
    import multiprocessing as mp
    import os

    import torch

    from agents import AuditReport

    threads = max(1, min(torch.get_num_threads(), (os.cpu_count() or 1) // workers))
    # cells of one organism next to each other: a worker plants an organism once and reuses it
    ctx = mp.get_context("spawn")
    with ctx.Pool(workers, initializer=_worker_init,
                  initargs=(suite.model_dump(mode="json"), run_id, str(base), threads, alias_salt)) as pool:
        say("note", {"message": f"{len(todo)} audits on {workers} worker processes ({threads} torch thread(s) each)"})
        for cell_json, rep, wall in pool.imap_unordered(_worker_run, [c.model_dump() for c in todo]):
            record(AuditCell.model_validate(cell_json), AuditReport.model_validate(rep), wall)


def rejudge(db_path: str | Path, run_id: str, judge: Judge | None = None, *, only_failed: bool = True) -> int:
    """Re-score audits of a run (by default only those whose judge failed). Returns how many."""
    from agents import AuditReport
    from environments import get_spec

    n = 0
    with ResultStore(db_path) as store:
        cfg = store.run(run_id)["config"].get("suite") or {}
        suite = BenchSuite.model_validate(cfg) if cfg else BenchSuite()
        judge = judge or make_judge(suite.judge)
        for r in store.audits(run_id):
            if only_failed and r["judge_status"] != "failed":
                continue
            spec = get_spec(r["organism"], organisms_dir=suite.organisms_dir)
            sc = score_report(AuditReport.model_validate(r["report"]), spec, judge,
                              confidence_threshold=suite.confidence_threshold)
            store.update_score(run_id, r["audit_id"], judge=sc.judge, judge_status=sc.judge_status,
                               judge_error=sc.judge_error, success=sc.success, score=sc.score, verdicts=sc.verdicts)
            n += 1
    return n
