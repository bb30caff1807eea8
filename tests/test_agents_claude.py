"""The claude policy against a fake Anthropic client: request shapes, tool results, usage,
caching, forced final report, retries and clean failures."""

from __future__ import annotations

import os

import pytest

from agents import MissingAPIKeyError, get_policy, run_audit
from agents.testing import FakeAnthropic, text_reply, tool_use


@pytest.fixture
def tiny_target(tiny):
    from agents.testing import tiny_target

    return tiny_target(tiny)


def test_missing_key_is_a_clean_error(monkeypatch):
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    with pytest.raises(MissingAPIKeyError) as exc:
        get_policy("claude")
    assert "ANTHROPIC_API_KEY" in exc.value.problem and exc.value.fix


def test_claude_request_shapes(tiny_target, tmp_path):
    target, nla = tiny_target
    fake = FakeAnthropic([
        [text_reply("Let me talk to it."), tool_use("chat", {"message": "Hi there", "max_new_tokens": 4}, "tu1")],
        [tool_use("chat", {"mesage": "typo"}, "tu2"), tool_use("no_such_tool", {}, "tu3")],
        [tool_use("add_hypothesis", {"statement": "It says odd words.", "confidence": 0.4, "evidence": ["c1"]}, "tu4")],
        [text_reply("thinking without a tool")],
        [tool_use("finish_audit", {"hypotheses": [{"statement": "It says odd words.", "confidence": 0.4,
                                                     "evidence": ["c1"]}]}, "tu5")],
    ])
    pol = get_policy("claude", client=fake, model="claude-test-model")
    report = run_audit(target, nla, strategy="behavioural", policy=pol, run_id="c1", workdir=tmp_path)
    assert report.status == "finished"
    assert [h.statement for h in report.hypotheses] == ["It says odd words."]
    assert report.malformed_calls == 2
    assert report.llm_usage["llm_calls"] == 5 and report.llm_usage["llm_input_tokens"] == 500
    assert report.llm_usage["llm_cache_read_tokens"] == 400

    reqs = fake.requests
    first = reqs[0]
    assert first["model"] == "claude-test-model" and first["max_tokens"] > 0
    assert first["system"][0]["cache_control"] == {"type": "ephemeral"}
    names = [t["name"] for t in first["tools"]]
    assert {"chat", "sample", "prefill", "note", "add_hypothesis", "finish_audit"} <= set(names)
    assert "verbalize" not in names  # behavioural strategy: no NLA tools
    assert all(set(t) == {"name", "description", "input_schema"} for t in first["tools"])
    assert first["messages"][0]["role"] == "user" and "target-1" in first["messages"][0]["content"][0]["text"]
    assert "tool_choice" not in first
    # turn 2 carries the tool_result of tu1, and the cache mark on the newest user block
    second = reqs[1]["messages"]
    assert [m["role"] for m in second] == ["user", "assistant", "user"]
    res = second[-1]["content"][0]
    assert res["type"] == "tool_result" and res["tool_use_id"] == "tu1" and "[c1]" in res["content"]
    assert second[-1]["content"][-1]["cache_control"] == {"type": "ephemeral"}
    assert "cache_control" not in second[0]["content"][-1]  # only the newest user turn is marked
    # malformed calls come back as errors for both tool_use ids
    third = reqs[2]["messages"][-1]["content"]
    assert [b["tool_use_id"] for b in third[:2]] == ["tu2", "tu3"] and all(b.get("is_error") for b in third[:2])
    assert "mesage" in third[0]["content"]
    # a text-only turn is answered with a nudge
    assert reqs[4]["messages"][-1]["content"][0]["type"] == "text"


def test_claude_forced_final_report(tiny_target, tmp_path):
    target, nla = tiny_target
    fake = FakeAnthropic([[tool_use("chat", {"message": f"hello {i}", "max_new_tokens": 3}, f"t{i}")] for i in range(2)]
                         + [[tool_use("finish_audit", {"hypotheses": []}, "fin")]])
    pol = get_policy("claude", client=fake)
    report = run_audit(target, nla, strategy="nla", policy=pol, run_id="c2", workdir=tmp_path,
                       budget={"max_tool_calls": 2})
    assert report.tool_calls == 2 and report.forced_reduction and report.nothing_found
    assert report.status == "finished" and report.cut_short == "max_tool_calls"
    # an auditor that ignores the demand for the report is failed, not "nothing found"
    fake = FakeAnthropic([[tool_use("chat", {"message": f"hello {i}", "max_new_tokens": 3}, f"t{i}")] for i in range(5)])
    bad = run_audit(target, nla, strategy="nla", policy=get_policy("claude", client=fake), run_id="c3",
                    workdir=tmp_path, budget={"max_tool_calls": 2})
    assert bad.status == "failed" and not bad.nothing_found and "final report" in bad.error
    last = fake.requests[-1]
    assert last["tool_choice"] == {"type": "tool", "name": "finish_audit"}
    assert "budget is spent" in last["messages"][-1]["content"][-1]["text"]


def test_claude_network_errors_retry_then_fail(tiny_target, tmp_path):
    import anthropic
    import httpx

    target, nla = tiny_target
    req = httpx.Request("POST", "https://api.anthropic.com/v1/messages")
    err = anthropic.APIConnectionError(request=req)
    sleeps: list[float] = []
    # one transient failure is retried and the run goes on
    fake = FakeAnthropic([err, [tool_use("finish_audit", {"hypotheses": [], "nothing_found": True})]])
    pol = get_policy("claude", client=fake, sleep=sleeps.append, max_retries=2)
    ok = run_audit(target, nla, strategy="nla", policy=pol, run_id="n1", workdir=tmp_path)
    assert ok.status == "finished" and ok.llm_usage["llm_retries"] == 1 and len(sleeps) == 1
    # persistent failures: a failed run, never "nothing found"
    fake = FakeAnthropic([err] * 3)
    pol = get_policy("claude", client=fake, sleep=sleeps.append, max_retries=2)
    bad = run_audit(target, nla, strategy="nla", policy=pol, run_id="n2", workdir=tmp_path)
    assert bad.status == "failed" and not bad.nothing_found and "APIConnectionError" in bad.error
    assert len(fake.requests) == 3


@pytest.mark.api
def test_claude_live(tiny_target, tmp_path):
    target, nla = tiny_target
    pol = get_policy("claude", model=os.environ.get("NLA_CLAUDE_MODEL", "claude-haiku-4-5"), max_tokens=1024)
    report = run_audit(target, nla, strategy="behavioural", policy=pol, run_id="live", workdir=tmp_path,
                       budget={"max_tool_calls": 3, "max_generated_tokens": 200, "max_seconds": 300})
    assert report.status == "finished" and report.llm_usage["llm_calls"] >= 1
