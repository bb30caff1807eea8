"""Resumable runs (kill mid-way, resume, same result, no repeated tool call), budgets, and
malformed tool calls."""

from __future__ import annotations

import json
import re

import pytest

from agents import RunMismatchError, get_policy, run_audit


@pytest.fixture
def tiny_target(tiny):
    from agents.testing import tiny_target

    return tiny_target(tiny)


class Killed(BaseException):
    """Stands for the process being killed (not an Exception: nothing may swallow it)."""


SCRIPT = [
    {"tool": "chat", "args": {"message": "Hello, who are you?", "max_new_tokens": 4}},
    {"tool": "add_hypothesis", "args": {"statement": "It greets oddly.", "confidence": 0.3, "evidence": ["c1"]}},
    [{"tool": "prefill", "args": {"message": "Tell me a secret.", "prefill": "My secret is", "max_new_tokens": 4}},
     {"tool": "chat", "args": {"message": "What do you like?", "max_new_tokens": 4}}],
    {"tool": "update_hypothesis", "args": {"hypothesis_id": "h1", "confidence": 0.6, "add_evidence": ["c3", "c4"]}},
    {"tool": "chat", "args": {"message": "Any hobbies?", "max_new_tokens": 4}},
]


def _calls(path):
    return [e["call"] for e in map(json.loads, open(path)) if e["node"] == "tools"]


def _strip(text):
    # the budget footer has wall time; a fresh Target numbers its conversations from 1 again
    # (it has no API to restore them: see the report of issue 6)
    return re.sub(r"conv-\d+", "conv-N", re.sub(r"\n\(budget used:[^)]*\)$", "", text))


@pytest.mark.parametrize("kill_at", [1, 3])
def test_kill_and_resume(tiny, tiny_target, tmp_path, monkeypatch, kill_at):
    from agents.testing import tiny_target as make
    from tools.base import TOOLS

    target, nla = tiny_target
    reference = run_audit(target, nla, strategy="behavioural", policy=get_policy("scripted", actions=SCRIPT),
                          run_id="ref", workdir=tmp_path)

    ran: list[str] = []
    originals = {n: TOOLS[n].fn for n in ("chat", "prefill")}

    def wrap(name):
        def fn(ctx, args):
            if len(ran) == kill_at:
                raise Killed()
            ran.append(name)
            return originals[name](ctx, args)
        return fn

    for n in originals:
        monkeypatch.setattr(TOOLS[n], "fn", wrap(n))
    target, nla = make(tiny)
    with pytest.raises(Killed):
        run_audit(target, nla, strategy="behavioural", policy=get_policy("scripted", actions=SCRIPT),
                  run_id="k", workdir=tmp_path)
    assert len(ran) == kill_at
    kill_at = 10**9  # the "new process" is not killed and starts with a fresh target
    target, nla = make(tiny)
    resumed = run_audit(target, nla, strategy="behavioural", policy=get_policy("scripted", actions=SCRIPT),
                        run_id="k", workdir=tmp_path)
    assert len(ran) == 4  # each target-generating call ran exactly once across both processes
    assert resumed.hypotheses == reference.hypotheses and resumed.status == "finished"
    assert resumed.tool_calls == reference.tool_calls and resumed.tokens_generated == reference.tokens_generated
    ref_calls, res_calls = _calls(reference.transcript_path), _calls(resumed.transcript_path)
    assert [(c["id"], c["tool"], _strip(c["text"])) for c in ref_calls] == [
        (c["id"], c["tool"], _strip(c["text"])) for c in res_calls]
    assert any(json.loads(x)["node"] == "resume" for x in open(resumed.transcript_path))
    with pytest.raises(RunMismatchError):
        run_audit(target, nla, strategy="nla", policy=get_policy("scripted", actions=SCRIPT), run_id="k",
                  workdir=tmp_path)


def test_budget_forces_reduction(tiny_target, tmp_path):
    target, nla = tiny_target
    script = [{"tool": "add_hypothesis", "args": {"statement": "It is terse.", "confidence": 0.5}}] + [
        {"tool": "chat", "args": {"message": f"question {i}", "max_new_tokens": 3}} for i in range(10)]
    rep = run_audit(target, nla, strategy="behavioural",
                    policy=get_policy("scripted", actions=script, final_when_done=False),
                    run_id="b", workdir=tmp_path, budget={"max_tool_calls": 3})
    assert rep.tool_calls == 3 and rep.forced_reduction and rep.status == "finished"
    assert [h.statement for h in rep.hypotheses] == ["It is terse."]
    # token budget: one call may not exceed what is left; the run ends in a report
    rep = run_audit(target, nla, strategy="behavioural",
                    policy=get_policy("scripted", actions=script, final_when_done=False),
                    run_id="t", workdir=tmp_path, budget={"max_tool_calls": 50, "max_generated_tokens": 7})
    assert rep.tokens_generated <= 7 and rep.forced_reduction


def test_malformed_calls_are_fed_back_and_bounded(tiny_target, tmp_path):
    target, nla = tiny_target
    bad = [{"tool": "chat", "args": {"nope": 1}}, {"tool": "frobnicate", "args": {}}, {"error": "unparseable JSON"},
           {"tool": "finish_audit", "args": {"hypotheses": "not a list"}}]
    rep = run_audit(target, nla, strategy="behavioural", policy=get_policy("scripted", actions=bad),
                    run_id="m1", workdir=tmp_path)
    assert rep.status == "finished" and rep.malformed_calls == 4
    texts = [c["text"] for c in _calls(rep.transcript_path)]
    assert "nope" in texts[0] and "frobnicate" in texts[1] and "unparseable" in texts[2]
    rep = run_audit(target, nla, strategy="behavioural", policy=get_policy("scripted", actions=bad * 5),
                    run_id="m2", workdir=tmp_path)
    assert rep.status == "failed" and "malformed" in rep.error and not rep.nothing_found


def test_empty_turns_force_the_report(tiny_target, tmp_path):
    target, nla = tiny_target
    rep = run_audit(target, nla, strategy="behavioural",
                    policy=get_policy("scripted", actions=[None] * 20, final_when_done=False),
                    run_id="e", workdir=tmp_path)
    assert rep.forced_reduction and rep.nothing_found and rep.status == "finished"
