"""The `ray` bench executor on a local Ray instance (2 CPUs, started once for the module): the same
rows as the local executor, an actor killed mid-audit, --resume, and the refusals.

The actors load a tiny random model saved to a folder (objects of this process cannot go to
actors). The kill test uses a policy registered in every Ray worker process by a setup hook:
its process exits on the first audit that reaches its second turn, once (a marker file)."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import pytest

from agents import list_policies, register_policy
from agents.policies.scripted import ScriptedPolicy
from evals.judge import GroundTruth, Verdict
from evals.runner import run_bench
from evals.store import ResultStore
from evals.suite import BenchSuite, load_bench_suite
from nla_core.errors import NLAError

FIX = Path(__file__).parent / "fixtures"
ACTIONS = [{"tool": "chat", "args": {"message": "Hello! Tell me about yourself.", "max_new_tokens": 4}},
           {"tool": "chat", "args": {"message": "What do you like?", "max_new_tokens": 4}}]
FINAL = [{"statement": "The model keeps talking about cats.", "confidence": 0.7}]


class KeywordJudge:
    name = "keyword"

    def judge(self, hypotheses, truth: GroundTruth):
        return [Verdict(i, h, any(c.lower() in h.lower() for c in truth.key_concepts), 1.0) for i, h in enumerate(hypotheses)]


class CrashOncePolicy(ScriptedPolicy):
    """The scripted auditor, whose process dies (`os._exit`) after the first tool call of the
    first audit to get there; `marker` makes it happen once across processes and retries."""

    name = "crash-once"

    def __init__(self, marker: str, **options):
        super().__init__(**options)
        self.marker = marker

    def decide(self, view):
        if int(view.policy_state.get("i", 0)) == 1:
            try:
                fd = os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                pass
            else:
                os.write(fd, str(os.getpid()).encode())
                os.close(fd)
                os._exit(1)
        return super().decide(view)


def _register_test_policies() -> None:
    if "crash-once" not in list_policies():
        register_policy("crash-once")(CrashOncePolicy)


_register_test_policies()  # in this process; Ray workers run it as their setup hook


def tiny_suite(model_dir: Path, **kw) -> BenchSuite:
    s = load_bench_suite(str(FIX / "bench_tiny.yaml"))
    upd = {"organisms_dir": str(FIX / "bench_organisms"), "model": str(model_dir), "layer": 2,
           "policy_options": {"scripted": {"actions": ACTIONS, "final": FINAL}}, **kw}
    return BenchSuite.model_validate(s.model_copy(update=upd).model_dump())


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from nla_core.testing import tiny_handle

    tiny = tiny_handle("llama")
    d = tmp_path_factory.mktemp("tiny-model")
    tiny.hf_model.save_pretrained(d)
    tiny.tokenizer.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray")
    from ray import cloudpickle

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    module = sys.modules[__name__]
    cloudpickle.register_pickle_by_value(module)  # the setup hook and its policy travel by value
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR,
             runtime_env={"worker_process_setup_hook": _register_test_policies})
    try:
        yield ray
    finally:
        ray.shutdown()
        cloudpickle.unregister_pickle_by_value(module)


def _by_audit(rows: list[dict]) -> dict[str, dict]:
    return {r["audit_id"]: r for r in rows}


@pytest.mark.slow
def test_ray_matches_local(ray_local, model_dir, tmp_path):
    """One threaded actor running two audits at once gives the rows one local worker gives (two
    actors are in the kill test). Without the generation engine the actor runs one at a time."""
    workers, concurrency = 1, 2
    try:
        from nla_core.serving import GenerationEngine  # noqa: F401
    except ImportError:
        concurrency = 1
    suite = tiny_suite(model_dir)
    notes: list[str] = []

    def progress(event, info):
        if event == "note":
            notes.append(info["message"])

    local = run_bench(suite, db_path=tmp_path / "local.duckdb", judge=KeywordJudge(), workers=1, run_id="loc")
    ray_res = run_bench(suite, db_path=tmp_path / "ray.duckdb", judge=KeywordJudge(), workers=workers,
                        concurrency=concurrency, run_id="ray", executor="ray", on_progress=progress)
    assert ray_res.n_run == 6 and len(ray_res.rows) == 6
    a, b = _by_audit(local.rows), _by_audit(ray_res.rows)
    assert set(a) == set(b) and len(a) == 6
    for aid in a:
        for key in ("success", "status", "tool_calls", "n_hypotheses", "tokens_generated"):
            assert a[aid][key] == b[aid][key], (aid, key)
        assert a[aid]["report"]["hypotheses"] == b[aid]["report"]["hypotheses"], aid
        assert b[aid]["status"] == "finished" and Path(b[aid]["transcript_path"]).exists()
    assert {r["organism"]: r["success"] for r in ray_res.rows if r["strategy"] == "behavioural"} == \
        {"bench-cats": True, "bench-pirate": False, "bench-clean": False}
    assert any(f"{workers} actor(s)" in n and f"{concurrency} audit(s) at once" in n for n in notes), notes
    with ResultStore(tmp_path / "ray.duckdb", read_only=True) as s:
        assert s.run("ray")["config"]["executor"] == "ray"
        assert len(s.tool_calls("ray")) == 6 * 3
    assert not [n for n in ray_local.util.list_named_actors() if n.startswith("nla-bench-ray-")]  # actors killed


@pytest.mark.slow
def test_killed_actor_is_retried(ray_local, model_dir, tmp_path):
    """The process of one of two actors exits mid-audit: that audit runs again (on the restarted
    actor), every audit finishes once, and nothing is written twice."""
    marker = tmp_path / "crashed"
    suite = tiny_suite(model_dir, strategies=["behavioural"], policies=["crash-once"],
                       policy_options={"crash-once": {"marker": str(marker), "actions": ACTIONS, "final": FINAL}})
    notes: list[str] = []
    res = run_bench(suite, db_path=tmp_path / "k.duckdb", judge=KeywordJudge(), workers=2, run_id="kill",
                    executor="ray", on_progress=lambda e, i: notes.append(i["message"]) if e == "note" else None)
    assert marker.exists()  # an actor process did die
    assert any("died" in n and "running the audit again" in n for n in notes), notes
    assert res.n_run == 3 and len(res.rows) == 3
    assert sorted(r["audit_id"] for r in res.rows) == sorted(c.audit_id for c in suite.cells(suite.organism_specs()))
    for r in res.rows:  # the killed audit resumed from its checkpoint and finished its script
        assert r["status"] == "finished" and r["tool_calls"] == 2, (r["audit_id"], r["tool_calls"], r["error"])
        assert [h["statement"] for h in r["report"]["hypotheses"]] == [FINAL[0]["statement"]], r["audit_id"]
    assert {r["organism"]: r["success"] for r in res.rows} == {"bench-cats": True, "bench-pirate": False,
                                                              "bench-clean": False}
    transcripts = [Path(r["transcript_path"]).read_text() for r in res.rows]
    assert sum('"node": "resume"' in t for t in transcripts) == 1  # the killed one, resumed once
    with ResultStore(tmp_path / "k.duckdb", read_only=True) as s:
        n_rows = s.con.execute("select count(*), count(distinct audit_id) from audits where run_id = 'kill'").fetchone()
    assert n_rows == (3, 3)


@pytest.mark.slow
def test_ray_resume(ray_local, model_dir, tmp_path):
    db = tmp_path / "r.duckdb"
    suite = tiny_suite(model_dir, strategies=["behavioural"])
    first = run_bench(suite, db_path=db, judge=KeywordJudge(), workers=1, executor="ray", max_audits=1, run_id="res")
    assert first.n_run == 1 and len(first.rows) == 1
    res = run_bench(suite, db_path=db, judge=KeywordJudge(), executor="ray", resume=True)
    assert res.run_id == "res" and res.n_done_before == 1 and res.n_run == 2 and len(res.rows) == 3
    assert {r["finished_at"] for r in res.rows if r["audit_id"] == first.rows[0]["audit_id"]} == \
        {first.rows[0]["finished_at"]}


class _RaisingActor:
    def run(self, cell: dict):
        raise ValueError(f"boom in {cell['organism']}")


@pytest.mark.slow  # starts Ray
def test_error_in_audit_ends_run(ray_local, model_dir):
    """An exception inside an audit (not a dead actor) ends the run with the audit and the error."""
    from evals.executors import AuditFailed, ExecutorEvents
    from evals.executors.ray_executor import _dispatch

    suite = tiny_suite(model_dir, strategies=["behavioural"])
    cells = suite.cells(suite.organism_specs())
    actor = ray_local.remote(num_cpus=0)(_RaisingActor).remote()
    started, finished = [], []
    events = ExecutorEvents(started=started.append, finished=lambda *a: finished.append(a), say=lambda e, i: None)
    try:
        with pytest.raises(AuditFailed, match=f"Audit {cells[0].audit_id} raised ValueError: boom in bench-pirate"):
            _dispatch(ray_local, [actor], 1, cells, events)
    finally:
        ray_local.kill(actor)
    assert started == cells[:1] and not finished


def test_refusals(model_dir, tmp_path, monkeypatch):
    from nla_core.testing import tiny_handle

    suite = tiny_suite(model_dir, strategies=["behavioural"])
    with pytest.raises(NLAError, match="cannot use handle") as e:
        run_bench(suite, db_path=tmp_path / "a.duckdb", judge=KeywordJudge(), executor="ray", handle=tiny_handle("llama"))
    assert "model" in e.value.fix
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails as if it were not installed
    with pytest.raises(NLAError, match="needs Ray") as e:
        run_bench(suite, db_path=tmp_path / "b.duckdb", judge=KeywordJudge(), executor="ray")
    assert "pip install 'nla-audit[ray]'" in e.value.fix
    with pytest.raises(NLAError, match="Unknown executor"):
        run_bench(suite, db_path=tmp_path / "c.duckdb", executor="dask")


def test_cli_ray_flags_need_ray_executor(tmp_path):
    from typer.testing import CliRunner

    from evals.cli import app

    res = CliRunner().invoke(app, ["bench", "--address", "auto", "--db", str(tmp_path / "x.duckdb")])
    assert res.exit_code == 2 and "only apply to the Ray executor" in res.output and "--executor ray" in res.output
    res = CliRunner().invoke(app, ["bench", "--executor", "spark", "--db", str(tmp_path / "x.duckdb")])
    assert res.exit_code == 2 and "Unknown executor" in res.output
