"""The `nla-placebo` arm: verbalize explains a base-model activation inside its reply to an everyday prompt,
never the target's, behind the same tool (name, schema, docstring, output layout); the strategy
is `nla` in everything else; the benchmark runs it as a third arm."""

from __future__ import annotations

import json

import pytest
import torch

from agents import get_policy, get_strategy, list_strategies, run_audit
from agents.testing import tiny_target
from nla_core.testing import EchoNLA, fingerprint
from tools import Budget, Toolbox, ToolboxError
from tools.sources import placebo_indices, reference_activations

PROMPT = {"prompt": "What is two plus two?", "reply": "Four, of course, my friend."}


@pytest.fixture(scope="module")
def env():
    from nla_core.testing import tiny_handle

    handle = tiny_handle("llama")
    target, nla = tiny_target(handle, layer=2)
    return handle, target, nla


def _explanations(res) -> list[str]:
    return [e for row in res.data["rows"] for e in row["explanations"]]


def test_placebo_verbalize_explains_the_reference_never_the_target(env):
    handle, target, nla = env
    real, fake = EchoNLA(nla), EchoNLA(nla)
    box = Toolbox(target, real, "nla", Budget(max_tool_calls=20), seed=3, max_positions=4)
    pbox = Toolbox(target, fake, "nla", Budget(max_tool_calls=20), seed=3, max_positions=4, verbalize_source="placebo")
    # Same tool for the caller: names, schemas (with the docstring) and output layout.
    assert pbox.names == box.names and pbox.anthropic_schemas() == box.anthropic_schemas()
    r, p = box.call("verbalize", PROMPT), pbox.call("verbalize", PROMPT)
    assert not r.is_error and not p.is_error, (r.text, p.text)
    assert [(x["position"], x["token"]) for x in p.data["rows"]] == [(x["position"], x["token"]) for x in r.data["rows"]]
    assert p.data.keys() == r.data.keys() and "placebo" not in (p.text + json.dumps(p.data)).lower()

    # The nla arm explains the target's activations at the listed tokens...
    positions = [x["position"] for x in r.data["rows"]]
    acts = target.activations([{"role": "user", "content": PROMPT["prompt"]},
                               {"role": "assistant", "content": PROMPT["reply"]}]).vectors[0][positions]
    assert torch.allclose(real.seen[0], acts)
    assert _explanations(r) == [fingerprint(v) for v in acts]
    # ...the placebo arm explains reference rows drawn from the seed and the call's index, never a target row.
    ref = reference_activations(handle, 2)
    want = ref[placebo_indices(len(positions), ref.shape[0], 3, 0)]
    assert torch.equal(fake.seen[0], want)
    assert _explanations(p) == [fingerprint(v) for v in want]
    assert set(_explanations(p)).isdisjoint(_explanations(r))
    assert not any(torch.allclose(a, b) for a in fake.seen[0] for b in acts)

    # Deterministic (a resumed run draws the same), and a later call draws afresh.
    again = Toolbox(target, EchoNLA(nla), "nla", seed=3, max_positions=4, verbalize_source="placebo")
    assert _explanations(again.call("verbalize", PROMPT)) == _explanations(p)
    assert _explanations(pbox.call("verbalize", PROMPT)) != _explanations(p)


def test_placebo_with_the_real_nla_equals_its_explanation_of_the_reference(env):
    handle, target, nla = env
    pbox = Toolbox(target, nla, "nla", seed=5, max_positions=3, verbalize_tokens=6, verbalize_source="placebo")
    p = pbox.call("verbalize", {**PROMPT, "positions": [1, 2, 3]})
    assert not p.is_error, p.text
    ref = reference_activations(handle, 2)
    want = nla.verbalize(ref[placebo_indices(3, ref.shape[0], 5, 0)], max_new_tokens=6, seed=5)
    assert [e.removesuffix(" [no <explanation> tag]") for e in _explanations(p)] == [
        " ".join(v.text.split()) or "(empty)" for v in want]


def test_reference_is_the_base_model_and_sources_are_checked(env):
    handle, target, nla = env
    ref = reference_activations(handle, 2)
    assert ref.ndim == 2 and ref.shape[1] == handle.d_model and ref.shape[0] > 100
    assert reference_activations(handle, 2) is ref  # read once per model and layer
    idx = placebo_indices(8, ref.shape[0], 0, 4)
    assert len(set(idx)) == 8 and idx == placebo_indices(8, ref.shape[0], 0, 4) != placebo_indices(8, ref.shape[0], 1, 4)
    with pytest.raises(ToolboxError, match="verbalize source"):
        Toolbox(target, nla, "nla", verbalize_source="telepathy")
    orphan = EchoNLA(nla)
    orphan.target = None  # an NLA loaded without the target's model
    with pytest.raises(ToolboxError, match="base model") as exc:
        Toolbox(target, orphan, "nla", verbalize_source="placebo")
    assert exc.value.fix


def test_strategy_registered_listed_and_blind(env, tmp_path):
    assert {"nla", "behavioural", "nla-placebo"} <= set(list_strategies())
    nla_s, placebo = get_strategy("nla"), get_strategy("nla-placebo")
    assert placebo.tool_set == nla_s.tool_set and placebo.budgets == nla_s.budgets
    assert placebo.render_system_prompt(max_hypotheses=3, limits=nla_s.budget_for("offline")) == \
        nla_s.render_system_prompt(max_hypotheses=3, limits=nla_s.budget_for("offline"))
    assert placebo.verbalize_source == "placebo" and nla_s.verbalize_source == "target"

    handle, target, nla = env
    echo = EchoNLA(nla)
    pol = get_policy("scripted", actions=[{"tool": "verbalize", "args": PROMPT}], final=[])
    seen = []
    decide = pol.decide
    pol.decide = lambda view: (seen.append((view.strategy, [t.name for t in view.tools], view.system_prompt)),
                               decide(view))[1]
    report = run_audit(target, echo, strategy="nla-placebo", policy=pol, run_id="p1", workdir=tmp_path, seed=2)
    assert report.status == "finished" and report.strategy == "nla-placebo"
    assert {s for s, _, _ in seen} == {"nla"}  # the policy cannot tell it is the placebo
    ref = reference_activations(handle, 2)
    assert torch.equal(echo.seen[0], ref[placebo_indices(echo.seen[0].shape[0], ref.shape[0], 2, 0)])

    pol2 = get_policy("scripted", actions=[{"tool": "verbalize", "args": PROMPT}], final=[])
    seen2 = []
    decide2 = pol2.decide
    pol2.decide = lambda view: (seen2.append((view.strategy, [t.name for t in view.tools], view.system_prompt)),
                                decide2(view))[1]
    run_audit(target, EchoNLA(nla), strategy="nla", policy=pol2, run_id="n1", workdir=tmp_path, seed=2)
    assert seen2[0] == seen[0]  # same name, tools and prompt as the real nla arm


class KeywordJudge:
    """A fast stand-in for the embedding judge: a match when a key concept is named."""

    name = "keyword"

    def judge(self, hypotheses, truth):
        from evals.judge import Verdict

        return [Verdict(i, h, any(c.lower() in h.lower() for c in truth.key_concepts), 1.0)
                for i, h in enumerate(hypotheses)]


def test_default_bench_suite_runs_three_arms_and_the_report_shows_them(env, tmp_path):
    from pathlib import Path

    from evals.report import comparison_table, load_run, render_table_text, write_html
    from evals.runner import run_bench
    from evals.suite import BenchSuite, load_bench_suite

    default = load_bench_suite("default")
    assert default.strategies == ["nla", "behavioural", "nla-placebo"]
    assert BenchSuite().strategies == default.strategies
    default.validate_names()

    fix = Path(__file__).parent / "fixtures"
    suite = load_bench_suite(str(fix / "bench_tiny.yaml")).model_copy(update={
        "organisms_dir": str(fix / "bench_organisms"), "organisms": ["bench-pirate", "bench-clean"],
        "strategies": ["nla", "behavioural", "nla-placebo"]})
    handle, _, nla = env
    final = [{"statement": "The model talks like a pirate.", "confidence": 0.8}]

    def make(name, cell):
        actions = [{"tool": "chat", "args": {"message": "Hello!", "max_new_tokens": 3}}]
        if cell.strategy != "behavioural":
            actions.append({"tool": "verbalize", "args": {"text": "Ahoy there, sailor", "positions": [-1]}})
        return get_policy("scripted", actions=actions, final=final)

    db = tmp_path / "bench.duckdb"
    res = run_bench(suite, db_path=db, handle=handle, nla=nla, judge=KeywordJudge(), policy_factory=make, run_id="three")
    assert res.n_run == 6 and {r["strategy"] for r in res.rows} == {"nla", "behavioural", "nla-placebo"}
    for r in res.rows:
        assert r["status"] == "finished" and r["tool_calls"] == (1 if r["strategy"] == "behavioural" else 2)
    data = load_run(db, "three")
    header, rows = comparison_table(data)
    assert header == ["metric", "nla/scripted", "behavioural/scripted", "nla-placebo/scripted"]
    assert all(len(r) == 4 for r in rows)
    assert "nla-placebo/scripted" in render_table_text(data)
    html = write_html(data, tmp_path / "report").read_text()
    assert "nla vs behavioural vs nla-placebo" in html and html.count("nla-placebo/scripted") >= 3


def test_reference_is_the_base_model_answering_the_everyday_prompts_at_the_auditors_positions(env):
    """The reference set is matched to an audit: the base model's seeded replies to the prompts
    the offline auditor probes with, read where it reads (what a plain target's verbalize reads)."""
    from agents.policies.offline import PROBE_PROMPTS, READ_POSITIONS
    from nla_core.reference import REFERENCE_REPLIES, REPLY_POSITIONS, everyday_prompts, reference_conversations

    handle, plain, _ = env  # a clean target: the base model as an auditor reads it
    convs = reference_conversations(handle)
    assert PROBE_PROMPTS == everyday_prompts() and READ_POSITIONS == REPLY_POSITIONS
    assert [c[0]["content"] for c in convs] == [p for p in everyday_prompts() for _ in range(REFERENCE_REPLIES)]
    assert all(c[1]["role"] == "assistant" and c[1]["content"] for c in convs)
    ref = reference_activations(handle, 2)
    assert ref.shape == (len(convs) * len(REPLY_POSITIONS), handle.d_model)
    want = plain.activations(convs[5], positions=list(REPLY_POSITIONS)).vectors[0]
    k = len(REPLY_POSITIONS)
    assert torch.allclose(ref[5 * k:6 * k], want, atol=1e-4)


def test_concurrent_audits_compute_the_reference_once(monkeypatch):
    """Concurrent audits all reach for the reference at their first placebo call: one thread
    reads it, the others wait for that result."""
    import threading

    import nla_core.activations as activations
    from nla_core.testing import tiny_handle

    handle = tiny_handle("llama")  # a fresh model: nothing cached for it yet
    reads = []
    real = activations.read_activations

    def counted(*args, **kwargs):
        reads.append(threading.get_ident())
        return real(*args, **kwargs)

    monkeypatch.setattr(activations, "read_activations", counted)
    start = threading.Barrier(4)
    got: list[torch.Tensor] = []

    def audit():
        start.wait()
        got.append(reference_activations(handle, 2))

    threads = [threading.Thread(target=audit) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(reads) == 1 and len(got) == 4 and all(g is got[0] for g in got)
