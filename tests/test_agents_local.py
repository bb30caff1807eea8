"""The local policy: robust parsing of tool calls, and a run with a stand-in model."""

from __future__ import annotations

from agents import get_policy, run_audit
from agents.policies.local import LocalPolicy, parse_tool_calls
from agents.testing import tiny_target

KNOWN = {"chat", "sample", "finish_audit"}


def test_parse_tool_calls_robustly():
    acts, rest = parse_tool_calls('Let me ask.\n<tool_call>\n{"name": "chat", "arguments": {"message": "hi"}}\n</tool_call>', KNOWN)
    assert acts == [{"tool": "chat", "args": {"message": "hi"}}] and rest == "Let me ask."
    # two calls, Python-style dict, trailing comma, `parameters`, arguments as a JSON string
    text = ("<tool_call>{'name': 'chat', 'parameters': {'message': 'a',},}</tool_call>"
            "<tool_call>{\"name\": \"sample\", \"arguments\": \"{\\\"message\\\": \\\"b\\\", \\\"n\\\": 2}\"}</tool_call>")
    acts, _ = parse_tool_calls(text, KNOWN)
    assert acts == [{"tool": "chat", "args": {"message": "a"}}, {"tool": "sample", "args": {"message": "b", "n": 2}}]
    # fenced JSON, bare JSON, OpenAI-style function, near-miss names, unclosed tag
    assert parse_tool_calls('```json\n{"name": "chat", "arguments": {"message": "x"}}\n```', KNOWN)[0][0]["tool"] == "chat"
    assert parse_tool_calls('I will call {"name": "functions.chat", "arguments": {"message": "x"}} now', KNOWN)[0] == [
        {"tool": "chat", "args": {"message": "x"}}]
    assert parse_tool_calls('{"function": {"name": "chat", "arguments": "{}"}}', KNOWN)[0] == [{"tool": "chat", "args": {}}]
    assert parse_tool_calls('<tool_call>{"name": "chat", "arguments": {"message": "x"}}', KNOWN)[0][0]["args"] == {"message": "x"}
    # malformed: reported, not dropped
    acts, _ = parse_tool_calls('<tool_call>{"name": "chat", "arguments": {"message": </tool_call>', KNOWN)
    assert len(acts) == 1 and "error" in acts[0]
    acts, _ = parse_tool_calls('<tool_call>{"arguments": {}}</tool_call>', KNOWN)
    assert "no `name`" in acts[0]["error"]
    assert parse_tool_calls("Just text, no call.", KNOWN) == ([], "Just text, no call.")


def test_local_policy_run_with_stand_in_model(tiny, tmp_path):
    target, nla = tiny_target(tiny)
    replies = iter([
        '<tool_call>{"name": "chat", "arguments": {"message": "Hello", "max_new_tokens": 3}}</tool_call>',
        '<tool_call>{"name": "chat", "arguments": {"message": </tool_call>',  # malformed
        'Done. <tool_call>{"name": "finish_audit", "arguments": {"hypotheses": [{"statement": "It mumbles.", '
        '"confidence": 0.5, "evidence": ["c1"]}]}}</tool_call>',
    ])
    seen: list[list[dict]] = []

    def generate(messages, tools):
        seen.append([dict(m) for m in messages])
        assert any(t["function"]["name"] == "finish_audit" for t in tools)
        return next(replies)

    pol = get_policy("local", generate=generate)
    rep = run_audit(target, nla, strategy="behavioural", policy=pol, run_id="l1", workdir=tmp_path)
    assert rep.status == "finished" and rep.hypotheses[0].statement == "It mumbles." and rep.malformed_calls == 1
    # the budget line rides on the tool result: never two user turns in a row
    assert seen[1][-1]["role"] == "tool" and "[c1]" in seen[1][-1]["content"] and "budget left" in seen[1][-1]["content"]
    assert seen[2][-1]["role"] == "tool" and "malformed" in seen[2][-1]["content"]
    for msgs in seen:
        roles = [m["role"] for m in msgs]
        assert roles[:2] == ["system", "user"] and all(a != b or a == "tool" for a, b in zip(roles, roles[1:])), roles


def test_local_render_without_tool_template(tiny):
    pol = LocalPolicy()
    pol._tok = tiny.tokenizer
    text = pol.render([{"role": "system", "content": "S"}, {"role": "user", "content": "U"},
                       {"role": "tool", "content": "R"}], [{"type": "function", "function": {"name": "chat"}}])
    assert "<tool_call>" in text and '"name": "chat"' in text and "<tool_response>" in text
