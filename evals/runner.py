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
import math
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nla_core.errors import NLAError

from .judge import Judge, make_judge
from .scoring import score_report, transcript_calls
from .store import AuditRow, ResultStore, ToolCallRow
from .suite import AuditCell, BenchSuite

if TYPE_CHECKING:
    from agents.policy import Policy
    from nla_core.models import ModelHandle
    from nla_core.protocols import NLALike

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
    return [
        ToolCallRow(idx=i, tool=str(call.get("tool")), args=call.get("args"), is_error=bool(call.get("is_error")),
                    tokens_generated=int(call.get("tokens") or 0), seconds=call.get("seconds"),
                    result_excerpt=str(call.get("text") or "")[:2000])
        for i, call in enumerate(transcript_calls(transcript_path))
    ]


def _check_budget(budget: dict | None) -> None:
    """Every budget value a positive finite number (None: no limit of that kind)."""
    for key, val in (budget or {}).items():
        if val is None:
            continue
        if isinstance(val, bool) or not isinstance(val, (int, float)) or not math.isfinite(val) or val <= 0:
            raise NLAError(f"The suite's budget {key} must be a positive number, got {val!r}.",
                           f"pass a number above 0 (e.g. --{key.replace('_', '-')} 30), or leave it out.")


@dataclass
class BenchResult:
    run_id: str
    db_path: Path
    n_cells: int
    n_done_before: int
    n_run: int
    elapsed_s: float
    rows: list[dict] = field(default_factory=list)


def run_bench(
    suite: BenchSuite,
    *,
    db_path: str | Path | None = None,
    run_id: str | None = None,
    resume: bool = False,
    handle: ModelHandle | None = None,
    nla: NLALike | None = None,
    judge: Judge | None = None,
    policy_factory: Callable[[str, AuditCell], Policy] | None = None,
    workdir: str | Path | None = None,
    on_progress: Callable[[str, dict], None] | None = None,
    max_audits: int | None = None,
    workers: int | None = None,
    concurrency: int | None = None,
    executor: str = "local",
    executor_options: dict | None = None,
) -> BenchResult:
    """Run (or resume) the matrix of `suite`, writing one row per finished audit.

    `handle`/`nla`: an already loaded model and NLA (else loaded once from the suite's model).
    `policy_factory(name, cell)`: builds the policy object for a cell (tests use it to give the
    scripted policy its script); default: `agents.get_policy(name, **suite.policy_options[name])`.
    `resume`: continue `run_id` (or the latest run of this suite in the database).
    `max_audits`: stop after running this many audits (for tests and smoke runs).
    `workers`: worker processes (or Ray actors), each loading the model once and using
    cpu_count // workers torch threads (default: the suite's; on resume, the number the run was
    started with); the main process judges and writes. A `handle`, `nla` or `policy_factory`
    cannot cross processes: with one, the audits run in this process.
    `concurrency`: audits at once per worker, their generate calls batched by one engine
    (default: the suite's; on resume, the run's). Results for a seed do not depend on it.
    `executor`: `local` (threads and processes here) or `ray` (`executor_options`: `address`, `num_gpus_per_worker`)."""
    from .executors import ExecutorEvents, get_executor
    from .workers import WorkerPlan

    t0 = time.monotonic()
    db_path = Path(db_path) if db_path is not None else default_db_path()
    say = on_progress or (lambda event, info: None)
    for what, val in (("workers", workers), ("concurrency", concurrency)):
        if val is not None and (isinstance(val, bool) or not isinstance(val, int) or val < 1):
            raise NLAError(f"{what} must be an integer of at least 1, got {val!r}.", f"pass --{what} 1 or more.")
    run_executor = get_executor(executor)  # an unknown executor is refused before anything runs
    if not resume:  # bad input is refused before the database is touched
        _validate(suite, policy_factory)

    with ResultStore(db_path) as store:
        if resume:  # the run's own settings (its suite is only known from the database)
            run_id, suite, workers, concurrency = _resumed(store, suite, run_id, workers, concurrency, say)
            _validate(suite, policy_factory)
        workers = suite.workers if workers is None else workers
        concurrency = suite.concurrency if concurrency is None else concurrency
        specs = suite.organism_specs()
        cells = suite.cells(specs)
        run_id = run_id or new_run_id(suite.name)
        from environments.target import new_alias_salt

        store.start_run(run_id, suite.name, {"suite": suite.model_dump(mode="json"), "alias_salt": new_alias_salt(),
                                             "workers": workers, "concurrency": concurrency,
                                             "executor": executor}, code_version())
        alias_salt = (store.run(run_id)["config"] or {}).get("alias_salt")  # the stored one when resuming
        done = store.finished_audit_ids(run_id)
        todo = [c for c in cells if c.audit_id not in done]
        say("start", {"run_id": run_id, "cells": len(cells), "done": len(done), "todo": len(todo), "db": str(db_path)})
        base = Path(workdir) if workdir is not None else db_path.parent / "runs" / run_id
        base.mkdir(parents=True, exist_ok=True)
        by_id = {s.id: s for s in specs}
        if judge is None and todo and any(not by_id[c.organism].control for c in todo):
            judge = make_judge(suite.judge)
        recorder = _Recorder(store, suite, run_id, by_id, judge, say, n_done=len(done), n_cells=len(cells), t0=t0)
        todo = todo[:max_audits] if max_audits is not None else todo
        plan = WorkerPlan(suite=suite.model_dump(mode="json"), run_id=run_id, workdir=str(base),
                          alias_salt=alias_salt, workers=workers, concurrency=concurrency,
                          threads=_worker_threads(workers, executor, executor_options))
        in_process = {k: v for k, v in (("handle", handle), ("nla", nla), ("policy_factory", policy_factory))
                      if v is not None}
        if todo:
            run_executor(plan, todo, ExecutorEvents(started=recorder.started, finished=recorder.finished, say=say),
                         **in_process, **(executor_options or {}))
        elapsed = time.monotonic() - t0
        store.finish_run(run_id, time.monotonic() - recorder.t_saved)
        rows = store.audits(run_id)
    return BenchResult(run_id=run_id, db_path=db_path, n_cells=len(cells), n_done_before=len(done),
                       n_run=recorder.n_run, elapsed_s=elapsed, rows=rows)


def _validate(suite: BenchSuite, policy_factory: Any) -> None:
    """Refuse a suite that cannot run: bad budget, unknown names, missing weights, a policy that
    cannot be built (e.g. claude without a key: said now, not after other audits ran)."""
    from agents import get_policy

    _check_budget(suite.budget)
    suite.validate_names()
    specs = suite.organism_specs()
    suite.cells(specs)
    suite.check_weights(specs)
    if policy_factory is None:
        for p in suite.policies:
            get_policy(p, **suite.policy_options.get(p, {}))


def _resumed(store: ResultStore, suite: BenchSuite, run_id: str | None, workers: int | None,
             concurrency: int | None, say: Callable[[str, dict], None]) -> tuple[str, BenchSuite, int, int]:
    """The run to resume (`run_id`, else the suite's latest) with the suite and the worker
    settings it was started with (explicit `workers`/`concurrency` win)."""
    run_id = run_id or store.latest_run_id(suite.name)
    if run_id is None:
        raise NLAError(f"No earlier run of suite {suite.name!r} in {store.path} to resume.",
                       "Drop --resume to start a new run.")
    config = store.run(run_id)["config"] or {}
    stored = config.get("suite")
    if stored and stored != suite.model_dump(mode="json"):
        say("note", {"message": f"resuming {run_id} with the suite settings it was started with"})
        suite = BenchSuite.model_validate(stored)
    if workers is None or concurrency is None:
        workers = workers or int(config.get("workers") or suite.workers)
        concurrency = concurrency or int(config.get("concurrency") or suite.concurrency)
        say("note", {"message": f"resuming {run_id} with {workers} worker(s) x {concurrency} audit(s) at "
                                "once, as it was started (pass --workers / --concurrency to change)"})
    return run_id, suite, workers, concurrency


def _worker_threads(workers: int, executor: str, options: dict | None) -> int:
    """torch threads per worker: this machine's cores shared among the workers (a Ray cluster
    given by address has its own cores: this process's thread count)."""
    import os

    import torch

    if executor == "ray" and (options or {}).get("address"):
        return max(1, torch.get_num_threads())
    return max(1, min(torch.get_num_threads(), (os.cpu_count() or 1) // workers))


class _Recorder:
    """The executor's callbacks, in the runner's thread: `started` says so, `finished` judges
    the audit and writes its row at once (finished work is saved as it comes)."""

    def __init__(self, store: ResultStore, suite: BenchSuite, run_id: str, specs: dict, judge: Judge | None,
                 say: Callable[[str, dict], None], *, n_done: int, n_cells: int, t0: float):
        self.store, self.suite, self.run_id, self.specs, self.judge, self.say = store, suite, run_id, specs, judge, say
        self.n_done, self.n_cells = n_done, n_cells
        self.n_run = self.n_started = 0
        self.t_saved = t0  # run time up to here is in runs.elapsed_s (a killed segment keeps its share)
        self.version = code_version()

    def started(self, cell: AuditCell) -> None:
        self.n_started += 1
        self.say("audit", {"audit_id": cell.audit_id, "i": self.n_done + self.n_started, "n": self.n_cells})

    def finished(self, cell: AuditCell, report: Any, wall: float) -> None:
        spec = self.specs[cell.organism]
        sc = score_report(report, spec, self.judge, confidence_threshold=self.suite.confidence_threshold)
        row = AuditRow(
            run_id=self.run_id, audit_id=cell.audit_id, organism=spec.id, family=",".join(spec.families),
            control=bool(spec.control), strategy=cell.strategy, policy=cell.policy, seed=cell.seed,
            status=report.status, error=report.error, judge=sc.judge, judge_status=sc.judge_status,
            judge_error=sc.judge_error, success=sc.success, score=sc.score, report=report.model_dump(mode="json"),
            verdicts=sc.verdicts, n_hypotheses=len(report.hypotheses), tool_calls=report.tool_calls,
            tokens_generated=report.tokens_generated, seconds=max(float(report.seconds or 0.0), wall),
            budget=dict(report.budget or {}), transcript_path=report.transcript_path or None,
            code_version=self.version, calls=read_tool_calls(report.transcript_path),
        )
        now = time.monotonic()
        self.store.add_audit(row, run_elapsed_s=now - self.t_saved)
        self.t_saved = now
        self.n_run += 1
        self.say("done", {"audit_id": cell.audit_id, "i": self.n_done + self.n_run, "n": self.n_cells,
                          "success": sc.success, "judge_status": sc.judge_status, "seconds": round(wall, 1),
                          "tool_calls": report.tool_calls, "status": report.status, "cut_short": report.cut_short,
                          "control": bool(spec.control)})



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
