"""The audit graph end to end with the scripted policy on a tiny target (real Toolbox)."""

from __future__ import annotations

import json

import pytest

from agents import AuditReport, get_policy, get_strategy, run_audit
from agents.policy import UnknownPolicyError
from agents.strategies import UnknownStrategyError


def _finish(hyps, nothing=False):
    return {"tool": "finish_audit", "args": {"hypotheses": hyps, "nothing_found": nothing}}


def test_scripted_end_to_end(tiny_target, tmp_path):
    target, nla = tiny_target
    script = [
        {"tool": "chat", "args": {"message": "Hello! What do you like?", "max_new_tokens": 6}},
        [{"tool": "note", "args": {"text": "replies look random"}},
         {"tool": "add_hypothesis", "args": {"statement": "The model talks about oceans.", "confidence": 0.6,
                                             "evidence": ["c1"]}}],
        {"tool": "sample", "args": {"message": "Tell me a story.", "n": 2, "max_new_tokens": 5}},
        {"tool": "update_hypothesis", "args": {"hypothesis_id": "h1", "confidence": 0.7, "add_evidence": ["c4"]}},
        _finish([{"statement": "The model talks about oceans.", "confidence": 0.7, "evidence": ["c1", "c4", "c99"]},
                 {"statement": "The model is rude.", "confidence": 0.2, "evidence": []}]),
    ]
    report = run_audit(target, nla, strategy="behavioural", policy=get_policy("scripted", actions=script),
                       run_id="r1", workdir=tmp_path, max_hypotheses=1)
    assert isinstance(report, AuditReport)
    assert report.status == "finished" and not report.nothing_found
    assert [h.statement for h in report.hypotheses] == ["The model talks about oceans."]  # at most N
    assert report.hypotheses[0].evidence == ["c1", "c4"]  # unknown ids dropped
    assert report.tool_calls == 2 and report.tokens_generated > 0
    lines = [json.loads(x) for x in open(report.transcript_path)]
    nodes = [e["node"] for e in lines]
    assert nodes[0] == "start" and nodes[-1] == "report"
    called = [e["call"]["tool"] for e in lines if e["node"] == "tools"]
    assert called == ["chat", "note", "add_hypothesis", "sample", "update_hypothesis", "finish_audit"]
    # finished runs are not re-run: the stored report comes back
    again = run_audit(target, nla, strategy="behavioural", policy=get_policy("scripted", actions=[]),
                      run_id="r1", workdir=tmp_path, max_hypotheses=1)
    assert again.hypotheses == report.hypotheses


def test_nothing_found_and_bad_names(tiny_target, tmp_path):
    target, nla = tiny_target
    report = run_audit(target, nla, strategy="nla", policy=get_policy("scripted", actions=[_finish([], True)]),
                       run_id="r2", workdir=tmp_path)
    assert report.nothing_found and report.status == "finished" and report.hypotheses == []
    with pytest.raises(UnknownPolicyError):
        get_policy("nope")
    with pytest.raises(UnknownStrategyError):
        get_strategy("nope")
    assert get_strategy("nla").budget_for("offline") == get_strategy("behavioural").budget_for("offline")
    assert get_strategy("nla").budget_for("claude") == get_strategy("behavioural").budget_for("claude")


@pytest.fixture
def tiny_target(tiny):
    from agents.testing import tiny_target

    return tiny_target(tiny)
