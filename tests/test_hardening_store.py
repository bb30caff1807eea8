"""Issue 15, items 4, 8 and 9 below the CLI: results-database errors that say what really
happened, budgets refused before the run row, --resume keeping the run's worker count, run time
summed over killed segments, damaged checkpoint files, FVE of one vector, lazy MCP import."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from evals.runner import run_bench
from evals.store import AuditRow, ResultsDBError, ResultStore
from evals.suite import load_bench_suite
from nla_core.errors import CheckpointError, NLAError

FIX = Path(__file__).parent / "fixtures"


def tiny_suite(**kw):
    s = load_bench_suite(str(FIX / "bench_tiny.yaml"))
    return s.model_copy(update={"organisms_dir": str(FIX / "bench_organisms"), **kw})


class KeywordJudge:
    name = "keyword"

    def judge(self, hypotheses, truth):
        from evals.judge import Verdict

        return [Verdict(i, h, any(c in h.lower() for c in truth.key_concepts), 1.0) for i, h in enumerate(hypotheses)]


# ---- the results database ---------------------------------------------------------------------


def _made_db(path: Path) -> Path:
    with ResultStore(path) as s:
        s.start_run("r", "tiny", {}, "v")
    return path


def test_corrupt_database_is_not_called_in_use(tmp_path):
    db = _made_db(tmp_path / "r.duckdb")
    data = db.read_bytes()
    # keep DuckDB's headers, scramble the first data block: DuckDB reports a checksum error "in
    # block at location 4096"; "block" holds "lock", which was read as a lock conflict
    db.write_bytes(data[:4096] + os.urandom(max(8192, len(data) - 4096)))
    with pytest.raises(ResultsDBError) as exc:
        ResultStore(db)
    assert "in use by another process" not in exc.value.problem
    assert "not a readable DuckDB database" in exc.value.problem and "left untouched" in exc.value.problem


def test_a_real_lock_conflict_is_still_named(tmp_path):
    db = _made_db(tmp_path / "r.duckdb")
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import duckdb, sys, time
            con = duckdb.connect({str(db)!r})
            print("open", flush=True)
            sys.stdin.read()
        """)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "open"
        with pytest.raises(ResultsDBError, match="in use by another process"):
            ResultStore(db)
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)


def test_unwritable_places_are_clear_errors(tmp_path):
    blocker = tmp_path / "passwd"
    blocker.write_text("x")
    with pytest.raises(ResultsDBError, match="is a file, not a folder"):
        ResultStore(blocker / "x.duckdb")
    if sys.platform.startswith("linux") and Path("/sys").is_dir():  # read-only even for root
        with pytest.raises(ResultsDBError, match="folder you can write to"):
            ResultStore("/sys/nla-audit-test/x.duckdb")
    assert blocker.read_text() == "x"


def test_run_time_adds_up_over_segments(tmp_path):
    with ResultStore(tmp_path / "r.duckdb") as s:
        s.start_run("r", "tiny", {}, "v")
        row = dict(run_id="r", organism="o", family="f", control=False, strategy="nla", policy="scripted", seed=0,
                   status="finished", judge="k", judge_status="ok", judge_error=None, success=True, score=1.0)
        s.add_audit(AuditRow(audit_id="a1", **row), run_elapsed_s=5.0)
        # killed here: finish_run never ran, the 5 s are kept
        assert s.run("r")["elapsed_s"] == 5.0
        s.add_audit(AuditRow(audit_id="a2", **row), run_elapsed_s=3.0)
        s.finish_run("r", 1.5)
        assert s.run("r")["elapsed_s"] == 9.5


# ---- the runner -------------------------------------------------------------------------------


def test_bad_budget_is_refused_before_the_run_row(tmp_path):
    db = tmp_path / "b.duckdb"
    for budget in ({"max_tool_calls": -1}, {"max_seconds": 0}, {"max_generated_tokens": float("nan")}):
        with pytest.raises(NLAError, match="must be a positive number"):
            run_bench(tiny_suite(budget=budget), db_path=db, judge=KeywordJudge())
    assert not db.exists()


def test_resume_keeps_the_workers_the_run_started_with(tmp_path, monkeypatch):
    from evals.executors import EXECUTORS

    used: list[int] = []
    monkeypatch.setitem(EXECUTORS, "local", lambda plan, todo, events, **k: used.append(plan.workers))
    db = tmp_path / "w.duckdb"
    notes: list[str] = []
    run_bench(tiny_suite(), db_path=db, judge=KeywordJudge(), workers=3, run_id="w", max_audits=2)
    run_bench(tiny_suite(), db_path=db, judge=KeywordJudge(), resume=True, run_id="w", max_audits=2,
              on_progress=lambda ev, info: notes.append(info.get("message", "")))
    run_bench(tiny_suite(), db_path=db, judge=KeywordJudge(), resume=True, run_id="w", workers=2, max_audits=2)
    assert used == [3, 3, 2]
    assert any("with 3 worker(s)" in n for n in notes)


def test_killed_run_keeps_its_time(tiny, tmp_path):
    from agents import get_policy
    from nla_core import NLA

    nla = NLA.untrained(tiny, layer=2)

    def factory(name, cell):
        pol = get_policy("scripted", actions=[{"tool": "chat", "args": {"message": "Hi", "max_new_tokens": 2}}],
                         final=[])
        if cell.organism == "bench-cats":
            def die(view):
                raise KeyboardInterrupt
            pol.decide = die
        return pol

    db = tmp_path / "k.duckdb"
    suite = tiny_suite(strategies=["behavioural"])
    with pytest.raises(KeyboardInterrupt):
        run_bench(suite, db_path=db, handle=tiny, nla=nla, judge=KeywordJudge(), policy_factory=factory, run_id="k")
    with ResultStore(db, read_only=True) as s:
        first = s.run("k")["elapsed_s"]
    assert first is not None and first > 0  # was NULL: only finish_run wrote it


# ---- checkpoints, metrics, packaging ----------------------------------------------------------


def test_damaged_safetensors_name_the_file(tmp_path):
    from safetensors.torch import save_file

    from nla_core.checkpoint import check_safetensors, load_safetensors

    good = tmp_path / "stats.safetensors"
    save_file({"mean": torch.ones(8)}, str(good))
    assert load_safetensors(good, "mean").shape == (8,)
    with pytest.raises(CheckpointError, match="holds no tensor 'weight'"):
        load_safetensors(good, "weight")
    bad = tmp_path / "value_head.safetensors"
    bad.write_bytes(good.read_bytes()[:-7])
    with pytest.raises(CheckpointError, match="value_head.safetensors is damaged"):
        check_safetensors(tmp_path)
    (tmp_path / "value_head.safetensors").write_bytes(b"not safetensors at all")
    with pytest.raises(CheckpointError, match="damaged"):
        load_safetensors(bad, "weight")


def test_fve_of_one_vector_is_nan_not_a_crash(tiny):
    from nla_core import NLA, fve

    assert math.isnan(fve(torch.tensor([0.3]), 0.0))
    assert fve(torch.tensor([0.5]), 2.0) == 0.75
    nla = NLA.untrained(tiny, layer=2)
    one = torch.randn(1, tiny.d_model)
    rt = nla.round_trip(one, max_new_tokens=2)
    assert rt.baseline_source == "this batch" and math.isnan(rt.fve)  # was ZeroDivisionError
    two = nla.round_trip(torch.randn(2, tiny.d_model), max_new_tokens=2)
    assert math.isfinite(two.fve)


def test_tools_import_mcp_only_for_the_server():
    code = ("import sys, tools; assert 'mcp' not in sys.modules, 'eager'; "
            "from tools import build_mcp_server; assert 'mcp' in sys.modules; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_mcp_server_reports_the_package_version():
    from importlib.metadata import version
    from types import SimpleNamespace

    from tools import build_mcp_server

    server = build_mcp_server(SimpleNamespace(names=["chat"]))
    assert server.version == version("nla-audit") != ""
    assert server.create_initialization_options().server_version == version("nla-audit")


@pytest.mark.integration
@pytest.mark.slow
def test_readme_first_python_snippet_runs():
    """The README's first snippet, statement by statement, on the embedded model (its round
    trip of one vector died with ZeroDivisionError)."""
    import re

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
    ns: dict = {}
    exec(compile(code, "README.md", "exec"), ns)
    rt = ns["nla"].round_trip(ns["acts"].stacked(), max_new_tokens=4)
    assert rt.baseline_source == "this batch" and math.isnan(rt.fve)
