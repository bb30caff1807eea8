"""Issue 15, items 1, 10 and 11: budgets that do not depend on load (no default wall-time cap; a
cap that cuts an audit short says so and is counted apart), prompts that name only real tools,
and a broken auditor recorded as failed, never as a clean "nothing found"."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from agents import AGENT_TOOLS, PolicyFailedError, get_policy, get_strategy, list_strategies, run_audit
from agents.graph import MAX_MALFORMED, TASK, _parse_hypothesis
from agents.policies.local import LocalPolicy

FIX = Path(__file__).parent / "fixtures"


@pytest.fixture
def tiny_target(tiny):
    from agents.testing import tiny_target

    return tiny_target(tiny)


# ---- item 10: the prompts name real tools ---------------------------------------------------------

_IDENT = re.compile(r"`([A-Za-z_][A-Za-z0-9_]*)`|\b([a-z][a-z0-9]*(?:_[a-z0-9]+)+)\b")


def _tool_like(text: str) -> set[str]:
    """Identifiers in `backticks` and snake_case words: what a model would take for names."""
    return {a or b for a, b in _IDENT.findall(text)}


def check_prompt_tools(text: str, tool_set: list[str]) -> list[str]:
    """Problems with the tool names `text` mentions, for an auditor holding `tool_set`."""
    from tools.base import TOOL_SETS, TOOLS

    own = set(tool_set) | {t.name for t in AGENT_TOOLS}
    args = {f for n in tool_set for f in TOOLS[n].args_model.model_fields}
    args |= {p for t in AGENT_TOOLS for p in t.input_schema.get("properties", {})}
    problems = [f"`{w}` is not a tool of this set" for w in sorted(_tool_like(text) - own - args)]
    others = {n for names in TOOL_SETS.values() for n in names} - own  # e.g. verbalize for behavioural
    problems += [f"{w!r} belongs to another tool set" for w in sorted(others & set(re.findall(r"[a-z_]+", text)))]
    return problems


def test_every_tool_a_strategy_prompt_names_exists():
    import tools  # noqa: F401 - registers the tools
    from tools.base import TOOL_SETS, TOOLS

    assert set(list_strategies()) >= {"nla", "behavioural", "nla-placebo"}
    for name in list_strategies():
        st = get_strategy(name)
        tool_set = TOOL_SETS[st.tool_set]
        texts = {"system prompt": st.render_system_prompt(max_hypotheses=5, limits={
                     "max_tool_calls": 10, "max_generated_tokens": 100, "max_seconds": 60}),
                 "task": TASK.format(alias="target-1", max_hypotheses=5)}
        texts.update({f"{t.name} description": t.description for t in AGENT_TOOLS})
        texts.update({f"{n} description": TOOLS[n].description for n in tool_set})
        for what, text in texts.items():
            assert check_prompt_tools(text, tool_set) == [], f"{name}: {what}"


def test_the_prompt_check_catches_made_up_tools():
    from tools.base import TOOL_SETS

    old = ("record each candidate behaviour with `record_hypothesis`, citing the ids of the tool calls that "
           "support it. Keep notes of what you learned with `record_note`.")
    assert check_prompt_tools(old, TOOL_SETS["nla"]) == ["`record_hypothesis` is not a tool of this set",
                                                         "`record_note` is not a tool of this set"]
    assert check_prompt_tools("then verbalize the reply", TOOL_SETS["behavioural"]) == [
        "'verbalize' belongs to another tool set"]


def test_unknown_tool_suggests_the_real_one(tiny_target):
    from tools import Budget, Toolbox

    target, nla = tiny_target
    tb = Toolbox(target, nla, tool_set="nla", budget=Budget())
    assert "Did you mean note?" in tb.call("record_note", {"text": "x"}).text
    assert "Did you mean add_hypothesis?" in tb.call("record_hypothesis", {"statement": "x"}).text
    assert "Did you mean read_notes?" in tb.call("read_note", {}).text


# ---- evidence ids: one format -----------------------------------------------------------------------

def test_evidence_ids_and_graph_record_ids(tiny_target, tmp_path):
    parsed, err = _parse_hypothesis({"statement": "s", "evidence": "see c1, c12 and c7x"}, {"c1", "c12"})
    assert err is None and parsed["evidence"] == ["c1", "c12"]
    target, nla = tiny_target
    script = [{"tool": "chat", "args": {"message": "Hi", "max_new_tokens": 2}},
              {"tool": "add_hypothesis", "args": {"statement": "It is terse.", "confidence": 0.6, "evidence": ["c1"]}},
              {"tool": "chat", "args": {"message": "Hi again", "max_new_tokens": 2}}]
    rep = run_audit(target, nla, strategy="behavioural", run_id="ev", workdir=tmp_path, budget={"max_tool_calls": 2},
                    policy=get_policy("scripted", actions=script, final_when_done=False))
    assert rep.status == "finished" and rep.hypotheses[0].evidence == ["c1"] and rep.cut_short == "max_tool_calls"
    events = [json.loads(x) for x in open(rep.transcript_path)]
    ids = [e["call"]["id"] for e in events if e.get("call")]
    assert ids[:3] == ["c1", "c2", "c3"]  # the toolbox's ids
    assert [e["call"]["id"] for e in events if e["node"] == "reduce"] == ["x1"]  # the graph's own: x1, x2, ...
    assert all(re.fullmatch(r"[cx]\d+", i) for i in ids)


# ---- item 11: the local policy's failures -------------------------------------------------------------

def test_local_malformed_limit_is_checked_at_the_forced_report(tiny_target, tmp_path):
    target, nla = tiny_target
    replies = iter(['<tool_call>{"name": "chat", "arguments": {"message": </tool_call>'] * MAX_MALFORMED
                   + ["I am not sure what to do."] * 20)
    pol = get_policy("local", generate=lambda messages, tools: next(replies))
    rep = run_audit(target, nla, strategy="behavioural", policy=pol, run_id="lm", workdir=tmp_path)
    assert rep.status == "failed" and not rep.nothing_found and rep.malformed_calls == MAX_MALFORMED + 1
    assert "malformed" in rep.error


STRICT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if loop.index0 > 0 and m['role'] == messages[loop.index0 - 1]['role'] %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if m['role'] not in ['system', 'user', 'assistant'] %}{{ raise_exception('Unknown role ' + m['role']) }}{% endif %}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_local_policy_real_model_strict_template_ends_failed(tiny, tmp_path):
    """A real (tiny, random) model as the auditor through the chat-template path, with a template
    that refuses two turns of one role in a row: the conversation alternates, the model never
    makes a valid call, and the audit ends failed, not "nothing found"."""
    import copy

    from agents.testing import tiny_target

    target, nla = tiny_target(tiny)
    tok = copy.deepcopy(tiny.tokenizer)
    tok.chat_template = STRICT_TEMPLATE
    pol = LocalPolicy(model="tiny-random", max_new_tokens=6, max_context_tokens=100_000)
    pol._tok, pol._model = tok, tiny.hf_model  # already loaded: no hub access
    prompts: list[str] = []
    render = pol.render
    pol.render = lambda messages, tools: prompts.append(render(messages, tools)) or prompts[-1]
    rep = run_audit(target, nla, strategy="behavioural", policy=pol, run_id="lt", workdir=tmp_path)
    assert rep.status == "failed" and not rep.nothing_found and "final report" in rep.error, rep
    assert rep.llm_usage["llm_calls"] >= 3 and rep.llm_usage["llm_output_tokens"] > 0
    roles = re.findall(r"<\|im_start\|>(\w+)", max(prompts, key=len))
    assert roles[:3] == ["system", "user", "assistant"] and roles.count("user") >= 3
    assert all(a != b for a, b in zip(roles, roles[1:])), roles
    # the template really does refuse a conversation that does not alternate
    with pytest.raises(Exception, match="alternate"):
        tok.apply_chat_template([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], tokenize=False)
    # and a template that still refuses fails the audit cleanly (no traceback out of run_audit)
    tok.chat_template = "{{ raise_exception('this template takes no system turn') }}"
    with pytest.raises(PolicyFailedError, match="no system turn"):
        render([{"role": "system", "content": "s"}, {"role": "user", "content": "a"}], [])
    rep = run_audit(target, nla, strategy="behavioural", policy=pol, run_id="lt2", workdir=tmp_path)
    assert rep.status == "failed" and "no system turn" in rep.error and not rep.nothing_found


@pytest.mark.integration
@pytest.mark.slow
def test_local_policy_embedded_model_as_auditor(tiny, embedded, tmp_path):
    """One real audit with the embedded SmolLM2-135M as the auditor (of a tiny target): its
    quality is not the point; the chat-template path, the parsing and the bounds are. It ends,
    and ends "nothing found" only through a valid finish_audit it made itself."""
    from agents.graph import MAX_EMPTY_TURNS, MAX_REDUCE_ATTEMPTS
    from agents.testing import tiny_target

    target, nla = tiny_target(tiny)
    pol = LocalPolicy(model="embedded", max_new_tokens=32)
    pol._tok, pol._model = embedded.tokenizer, embedded.hf_model
    rep = run_audit(target, nla, strategy="behavioural", policy=pol, run_id="emb", workdir=tmp_path,
                    budget={"max_tool_calls": 4, "max_generated_tokens": 64})
    events = [json.loads(x) for x in open(rep.transcript_path)]
    turns = [e for e in events if e["node"] in ("policy", "reduce")]
    assert turns and all((e.get("llm_usage") or {}).get("llm_output_tokens", 1) > 0 for e in turns if e["node"] == "policy")
    assert rep.malformed_calls <= MAX_MALFORMED + 1
    assert len(turns) <= 4 * 4 + 20 + MAX_EMPTY_TURNS + MAX_REDUCE_ATTEMPTS
    finishes = [e["call"] for e in events if (e.get("call") or {}).get("tool") == "finish_audit"
                and e["call"]["kind"] == "agent"]
    if rep.status == "finished":
        assert finishes, "a finished audit needs the auditor's own valid finish_audit"
    else:
        assert not rep.nothing_found and rep.error


def test_local_context_is_trimmed_and_alternates():
    pol = LocalPolicy(generate=lambda m, t: "", max_context_tokens=1200, max_new_tokens=200)
    msgs = [{"role": "system", "content": "S" * 400}, {"role": "user", "content": "the task"}]
    for i in range(30):
        msgs += [{"role": "assistant", "content": f"call {i}"}, {"role": "tool", "name": "chat", "content": f"r{i} " * 300}]
    fit = pol.fit_context(msgs, [])
    assert pol._n_tokens(fit, []) <= 1000 and len(msgs) == 62  # the stored conversation is untouched
    assert fit[0] == msgs[0] and fit[1]["content"].startswith("the task") and "left out" in fit[1]["content"]
    assert fit[-2]["content"] == "call 29" and fit[-1]["content"] == msgs[-1]["content"]  # the newest exchange whole
    assert [m["role"] for m in fit[:3]] == ["system", "user", "assistant"]


# ---- item 1: budgets in tool calls and tokens; wall-time cuts said and counted apart -----------------

def test_no_wall_time_cap_by_default(tiny_target, tmp_path):
    from evals.suite import load_bench_suite

    assert "max_seconds" not in (load_bench_suite("default").budget or {})
    for policy in ("offline", "claude", "local"):
        assert "max_seconds" not in get_strategy("nla").budget_for(policy)
    target, nla = tiny_target
    seen = {}

    class Spy:
        name = "spy"

        def decide(self, view):
            seen.update(prompt=view.system_prompt, left=dict(view.budget_left))
            return get_policy("scripted", actions=[]).decide(view)

    rep = run_audit(target, nla, strategy="nla", policy=Spy(), run_id="d", workdir=tmp_path)
    assert rep.status == "finished" and "max_seconds" not in rep.budget and rep.cut_short is None
    assert "seconds" not in seen["left"] and "seconds" not in seen["prompt"].split("Budget:")[1].split(".")[0]


def test_a_wall_time_cut_is_recorded(tiny_target, tmp_path):
    target, nla = tiny_target
    script = [{"tool": "chat", "args": {"message": f"q{i}", "max_new_tokens": 2}} for i in range(5)]
    rep = run_audit(target, nla, strategy="behavioural", policy=get_policy("scripted", actions=script),
                    run_id="w", workdir=tmp_path, budget={"max_seconds": 0.001})
    assert rep.status == "finished" and rep.forced_reduction and rep.cut_short == "max_seconds"
    assert rep.tool_calls == 1 and "max_seconds budget ran out" in rep.summary()


def test_free_tool_loop_is_bounded_by_turns_not_time(tiny_target, tmp_path):
    from agents.graph import max_turns

    target, nla = tiny_target
    loop = [{"tool": "note", "args": {"text": f"thought {i}"}} for i in range(500)]  # free: no tool call spent
    rep = run_audit(target, nla, strategy="behavioural", run_id="loop", workdir=tmp_path, budget={"max_tool_calls": 2},
                    policy=get_policy("scripted", actions=loop, final_when_done=False))
    assert rep.status == "finished" and rep.cut_short == "max_turns" and rep.tool_calls == 0
    steps = [json.loads(x)["step"] for x in open(rep.transcript_path)]
    assert max(steps) == max_turns({"max_tool_calls": 2}) + 1  # the turns, then the forced report


def _bench(tmp_path, tiny, budget, fail_on=None):
    from evals.judge import Verdict
    from evals.runner import run_bench
    from evals.suite import load_bench_suite
    from nla_core import NLA

    class KeywordJudge:
        name = "keyword"

        def judge(self, hypotheses, truth):
            return [Verdict(i, h, any(c.lower() in h.lower() for c in truth.key_concepts), 1.0)
                    for i, h in enumerate(hypotheses)]

    class Refuses:
        name = "scripted"

        def decide(self, view):
            raise PolicyFailedError("the model refused (stop_reason=refusal)")

    def factory(name, cell):
        if cell.organism == fail_on:
            return Refuses()
        return get_policy("scripted", actions=[{"tool": "chat", "args": {"message": "Hi", "max_new_tokens": 2}}],
                          final=[{"statement": "The model speaks like a pirate.", "confidence": 0.3}])

    suite = load_bench_suite(str(FIX / "bench_tiny.yaml"))
    suite = suite.model_copy(update={"organisms_dir": str(FIX / "bench_organisms"), "budget": budget})
    db = tmp_path / "bench.duckdb"
    run_bench(suite, db_path=db, handle=tiny, nla=NLA.untrained(tiny, layer=2), judge=KeywordJudge(),
              policy_factory=factory, run_id="r")
    return db


def test_report_counts_cut_short_and_failed_audits_apart(tiny, tmp_path):
    from evals.report import comparison_table, load_run, run_warnings

    # a refusing auditor on the clean control: failed, not a success
    db = _bench(tmp_path, tiny, {"max_tool_calls": 6, "max_generated_tokens": 200}, fail_on="bench-clean")
    data = load_run(db, "r")
    clean = [r for r in data.rows if r["organism"] == "bench-clean"]
    assert all(r["status"] == "failed" and r["success"] is None and r["judge_status"] == "auditor_failed"
               for r in clean)
    ctrl = {c.auditor: c for c in data.cells if c.group == "controls"}
    assert all((c.n, c.failed) == (0, 1) for c in ctrl.values())
    header, rows = comparison_table(data)
    table = {r[0]: r[1:] for r in rows}
    assert all("auditor failed" in x for x in table["false positives: controls"])
    assert table["auditor failed (not rated)"] == ["1", "1"]
    warn = run_warnings(data)
    assert len(warn) == 1 and "2 of 6 audits failed" in warn[0]
    # a wall-time cap that cuts every audit short: said, counted apart, out of the rates
    db = _bench(tmp_path / "w", tiny, {"max_tool_calls": 6, "max_generated_tokens": 200, "max_seconds": 0.001})
    data = load_run(db, "r")
    assert all(r["report"]["cut_short"] == "max_seconds" for r in data.rows)
    assert all(c.n == 0 and c.timed_out == c.cut_short > 0 for c in data.cells)
    header, rows = comparison_table(data)
    table = {r[0]: r[1:] for r in rows}
    assert all("cut short by wall time" in x for x in table["detection: all organisms"])
    assert table["cut short by a budget"] == ["3 (3 wall time)", "3 (3 wall time)"]
    warn = run_warnings(data)
    assert len(warn) == 1 and "6 of 6 audits were cut short by the wall-time cap" in warn[0]


# ---- the summariser caches only complete answers ------------------------------------------------------

def test_summarizer_does_not_cache_empty_or_truncated(tmp_path):
    from types import SimpleNamespace

    from nla_core.training import ClaudeSummarizer

    answers = [("", "end_turn"), ("<explanation>A recipe; measuring", "max_tokens"),
               ("<explanation>A recipe; measuring flour.</explanation>", "end_turn")]
    calls = []

    def create(**req):
        calls.append(req)
        text, stop = answers[min(len(calls), len(answers)) - 1]
        return SimpleNamespace(content=[SimpleNamespace(type="text", text=text)], stop_reason=stop,
                               usage=SimpleNamespace(input_tokens=10, output_tokens=5))

    client = SimpleNamespace(messages=SimpleNamespace(create=create))
    s = ClaudeSummarizer(client, cache_dir=tmp_path / "cache", backoff=0.0)
    row = {"context": "Mix the flour and the sugar", "token": " sugar"}
    assert s.summarize_one(row) == ""
    assert s.summarize_one(row) == "A recipe; measuring"
    assert s.summarize_one(row) == "A recipe; measuring flour."
    assert s.summarize_one(row) == "A recipe; measuring flour." and len(calls) == 3  # only the last was cached
    assert s.usage["cache_hits"] == 1
