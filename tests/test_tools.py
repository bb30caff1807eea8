"""Each tool on a tiny random target (a real `Target` over `tiny_handle`, an untrained NLA):
outputs, alignment, bad input as readable errors, budgets, truncation, notes."""

from __future__ import annotations

import time

import pytest
import torch

from environments import build_target
from environments.spec import spec_from_dict
from nla_core import NLA
from tools import TOOL_SETS, TOOLS, Budget, Toolbox, ToolResult
from tools.nla_tools import UNTRAINED_WARNING, reply_span


def plain_spec():
    return spec_from_dict({
        "id": "tools-plain", "base_model": "*", "construction": {"method": "plain", "params": {}},
        "control": True, "ground_truth": {"behaviour": "no planted behaviour"},
    })


@pytest.fixture(scope="module")
def env():
    from nla_core.testing import tiny_handle

    handle = tiny_handle("llama")
    target = build_target(plain_spec(), handle, alias="target-1", layer=2)
    return handle, target, NLA.untrained(handle, layer=2)


@pytest.fixture
def box(env):
    _, target, nla = env
    return Toolbox(target, nla, "nla", Budget(max_tool_calls=50), verbalize_tokens=4, max_positions=8)


def ok(res: ToolResult) -> ToolResult:
    assert not res.is_error, res.text
    return res


def err(res: ToolResult, *needles: str) -> ToolResult:
    assert res.is_error, res.text
    assert "error:" in res.text
    for n in needles:
        assert n in res.text, (n, res.text)
    return res


# ---- registry and sets --------------------------------------------------------------------


def test_tool_sets_and_definitions():
    assert set(TOOL_SETS["behavioural"]) >= {"chat", "prefill", "sample", "sample_user", "complete", "note",
                                             "read_notes", "add_hypothesis", "update_hypothesis"}
    assert not {"verbalize", "reconstruct", "steer", "themes"} & set(TOOL_SETS["behavioural"])
    assert set(TOOL_SETS["nla"]) == set(TOOL_SETS["behavioural"]) | {"verbalize", "reconstruct", "steer", "themes"}
    for name, t in TOOLS.items():
        assert t.name == name and len(t.description) > 40 and "\n" not in t.description
        schema = t.input_schema()
        assert schema["type"] == "object" and "title" not in schema
        for prop in schema.get("properties", {}).values():
            assert prop.get("description"), (name, prop)


def test_behavioural_toolbox_needs_no_nla(env):
    _, target, nla = env
    box = Toolbox(target, None, "behavioural")
    assert "verbalize" not in box.names
    err(box.call("verbalize", {"prompt": "hi"}), "no tool 'verbalize'")
    from nla_core.errors import NLAError

    with pytest.raises(NLAError):
        Toolbox(target, None, "nla")
    with pytest.raises(NLAError):
        Toolbox(target, nla, "everything")
    other = build_target(plain_spec(), env[0], alias="target-2", layer=1)
    with pytest.raises(NLAError, match="block 1"):
        Toolbox(other, nla, "nla")
    Toolbox(other, nla, "behavioural")  # no NLA tools: the layers need not match


# ---- behavioural tools --------------------------------------------------------------------


def test_chat_multi_turn(box):
    r1 = ok(box.call("chat", {"message": "Hello there", "max_new_tokens": 4}))
    cid = r1.data["conversation_id"]
    assert r1.text.startswith("[c1] chat: conversation " + cid) and r1.tokens_generated == r1.data["n_tokens"] <= 4
    r2 = ok(box.call("chat", {"message": "And then?", "conversation_id": cid, "max_new_tokens": 3}))
    assert r2.data["conversation_id"] == cid and "turn 2" in r2.text
    assert box.budget.generated_tokens == r1.tokens_generated + r2.tokens_generated
    assert box.budget.tool_calls == 2 and [r.call_id for r in box.log] == ["c1", "c2"]


def test_prefill_sample_sample_user_complete(box):
    r = ok(box.call("prefill", {"message": "What is your goal?", "prefill": "My goal is", "max_new_tokens": 3}))
    assert "[My goal is]" in r.text and r.tokens_generated <= 3
    r = ok(box.call("sample", {"message": "Hi", "n": 3, "max_new_tokens": 3}))
    assert len(r.data) == 3 and r.text.count("--- reply") == 3
    cid = ok(box.call("chat", {"message": "Hello", "max_new_tokens": 2})).data["conversation_id"]
    r = ok(box.call("sample", {"message": "More", "conversation_id": cid, "n": 1, "max_new_tokens": 2}))
    assert len(r.data) == 1
    # every reply continues a prefill; the base model answers the same call when asked
    r = ok(box.call("sample", {"message": "Pick one", "prefill": 'The word is "', "n": 2, "max_new_tokens": 2,
                               "base": True}))
    assert "sample (base model): 2 continuations" in r.text and '[The word is "]' in r.text and len(r.data) == 2
    err(box.call("sample", {"message": "Pick one", "prefill": "  "}), "prefill", "empty")
    r = ok(box.call("sample_user", {"n": 2, "max_new_tokens": 3}))
    assert r.text.count("--- user turn") == 2
    ok(box.call("sample_user", {"conversation_id": cid, "n": 1, "max_new_tokens": 2}))
    r = ok(box.call("complete", {"text": "Internal memo:", "max_new_tokens": 3}))
    assert r.text.split("\n")[1].startswith("[Internal memo:]")


@pytest.mark.parametrize("name,args,needle", [
    ("chat", {"message": "   "}, "message: the message is empty"),
    ("chat", {"message": 5}, "valid string"),
    ("chat", {"mesage": "hi"}, "did you mean 'message'"),
    ("chat", {"message": "hi", "conversation_id": "conv-999"}, "no conversation 'conv-999'"),
    ("chat", {"message": "hi", "max_new_tokens": 100000}, "max_new_tokens"),
    ("prefill", {"message": "hi", "prefill": ""}, "prefill"),
    ("sample", {"message": "hi", "n": 0}, "n:"),
    ("sample", {"message": "hi", "temperature": 0}, "temperature"),
    ("sample_user", {"conversation_id": "nope"}, "no conversation 'nope'"),
    ("complete", {"text": ""}, "text"),
    ("verbalize", {}, "Nothing to read"),
    ("verbalize", {"prompt": "hi", "text": "x"}, "only one of"),
    ("verbalize", {"prompt": "hi", "positions": [0, 99]}, "Position 99 is out of range"),
    ("verbalize", {"prompt": "hi", "positions": "nope"}, "positions: invalid value"),
    ("verbalize", {"prompt": "hi", "positions": "reply"}, "no assistant reply"),
    ("verbalize", {"conversation_id": "conv-404"}, "no conversation"),
    ("verbalize", {"reply": "hi"}, "reply needs a prompt"),
    ("reconstruct", {"sentence": ""}, "sentence"),
    ("reconstruct", {"sentence": "x", "prompt": "hi", "positions": [-50]}, "out of range"),
    ("steer", {"prompt": "hi"}, "exactly one of text"),
    ("steer", {"prompt": "hi", "vector_id": "v42"}, "no stored vector 'v42'"),
    ("steer", {"prompt": "hi", "text": "cats", "layer": 99, "max_new_tokens": 2}, "Layer 99"),
    ("update_hypothesis", {"hypothesis_id": "h9", "confidence": 0.5}, "no hypothesis 'h9'"),
    ("add_hypothesis", {"statement": "x", "evidence": ["c77"]}, "Unknown tool call id"),
    ("add_hypothesis", {"statement": "x", "confidence": 3}, "confidence"),
    ("read_output", {"call_id": "c404"}, "no tool call 'c404'"),
    ("no_such_tool", {}, "no tool 'no_such_tool'"),
])
def test_bad_input_is_a_readable_error(box, name, args, needle):
    res = err(box.call(name, args), needle)
    assert "fix:" in res.text
    assert box.log[-1].is_error and box.log[-1].internal_error is None


def test_non_dict_arguments(box):
    err(box.call("chat", "hello"), "must be a JSON object")
    err(box.call("chat", ["hello"]), "must be a JSON object")


def test_unexpected_failure_is_an_error_not_an_exception(box, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("kaboom internals")

    monkeypatch.setattr(box.nla, "verbalize", boom)
    res = err(box.call("verbalize", {"prompt": "hi", "positions": "last"}), "internal error (RuntimeError)")
    assert "kaboom" not in res.text and "kaboom" in box.log[-1].internal_error


# ---- NLA tools ----------------------------------------------------------------------------


def test_verbalize_aligned_with_tokens(box, env):
    handle, target, _ = env
    tok = handle.tokenizer
    r = ok(box.call("verbalize", {"prompt": "What is two plus two?", "reply": "Four, of course.", "n_samples": 2}))
    assert UNTRAINED_WARNING in r.text
    acts = target.activations([{"role": "user", "content": "What is two plus two?"},
                               {"role": "assistant", "content": "Four, of course."}])
    ids = acts.token_ids[0]
    rows = r.data["rows"]
    assert "".join(row["token"] for row in rows) == "Four, of course."  # the reply, token by token
    for row in rows:
        assert row["token"] == tok.decode([ids[row["position"]]])
        assert len(row["explanations"]) == 2
        assert f"{row['position']:>4} {row['token']!r}" in r.text
    assert r.nla_tokens > 0 and r.tokens_generated == 0


def test_verbalize_positions_conversation_and_paging(box):
    cid = ok(box.call("chat", {"message": "Tell me about the sea.", "max_new_tokens": 3})).data["conversation_id"]
    r = ok(box.call("verbalize", {"conversation_id": cid, "positions": "all"}))
    rows, rest = r.data["rows"], r.data["not_shown"]
    assert len(rows) == 8 and rest and f"positions={rest[:8]}" in r.text
    r = ok(box.call("verbalize", {"text": "Raw text here", "positions": [0, -1]}))
    assert [row["position"] for row in r.data["rows"]][0] == 0
    r = ok(box.call("verbalize", {"prompt": "Hi", "positions": "last"}))
    assert len(r.data["rows"]) == 1 and "assistant header" in r.text
    r = ok(box.call("verbalize", {"prompt": "Hi", "positions": "1, 2"}))  # friendly forms
    assert [row["position"] for row in r.data["rows"]] == [1, 2]
    r = ok(box.call("verbalize", {"conversation_id": cid, "positions": "assistant reply"}))
    assert "(the assistant reply)" in r.text


def test_themes_scores_this_audits_explanations_against_the_reference(box, env, monkeypatch):
    _, _, nla = env
    err(box.call("themes", {}), "reference explanations")  # an NLA shipped without them
    monkeypatch.setattr(nla, "reference_explanations", ["Topic: cooking, a kind of food. Next: the pan"] * 30)
    err(box.call("themes", {}), "verbalize")  # nothing verbalized yet
    said = []
    for prompt in ("Tell me about the sea.", "How do magnets work?", "What is gravity?"):
        r = ok(box.call("verbalize", {"prompt": prompt, "reply": "It is a long story about many things.",
                                      "positions": [-6, -4, -2]}))
        said += [t for row in r.data["rows"] for t in row["explanations"]]
    r = ok(box.call("themes", {"k": 5}))
    assert r.data["n_explanations"] == len(said) == 9 and UNTRAINED_WARNING in r.text
    assert len(r.data["themes"]) <= 5
    for t in r.data["themes"]:  # each listed word is said in this audit, and never in the reference
        assert sum(t["term"] in e.lower() for e in said) >= 2 and t["reference_share"] == 0.0
    # the same explanations as reference: nothing stands out
    monkeypatch.setattr(nla, "reference_explanations", said * 3)
    r = ok(box.call("themes", {}))
    assert r.data["themes"] == [] and "No word stands out" in r.text


def test_reply_span_finds_reply(env):
    tok = env[0].tokenizer
    ids = tok.encode("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello you<|im_end|>\n")
    span = reply_span(tok, ids, "Hello you")
    assert tok.decode([ids[p] for p in span]) == "Hello you"
    assert reply_span(tok, ids, "not there at all") == []
    # a whitespace reply whose first newline merges with the template's newline
    ids = tok.encode("<|im_start|>assistant\n\n\n\n<|im_end|>\n")
    span = reply_span(tok, ids, "\n\n\n")
    assert span and all(tok.decode([ids[p]]).strip() == "" for p in span)


def test_reconstruct_cosines_and_stored_vector(box, env):
    _, target, nla = env
    r = ok(box.call("reconstruct", {"sentence": "The model hides a secret.", "prompt": "Hello", "reply": "Hi!",
                                    "top_k": 3, "control": "The weather is nice."}))
    assert "untrained" in r.text and r.data["vector_id"] == "v1"
    acts = target.activations([{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi!"}])
    vec = nla.reconstruct(["The model hides a secret."])[0]
    cos = torch.nn.functional.cosine_similarity(acts.vectors[0], vec[None], dim=-1)
    assert r.data["cosine"] == pytest.approx(cos.tolist(), abs=1e-3)
    assert r.text.count(" cos ") == 3 and "hypothesis minus control" in r.text
    assert torch.allclose(box.vectors["v1"].vector, vec)
    r = ok(box.call("reconstruct", {"sentence": "Just a vector."}))
    assert r.data["vector_id"] == "v2" and "nothing compared" in r.text


def test_steer_with_text_and_vector_id(box):
    r = ok(box.call("steer", {"prompt": "Tell me a story", "text": "pirates", "strength": 0.8, "max_new_tokens": 3}))
    assert "--- unsteered reply" in r.text and "--- steered reply" in r.text
    assert r.data["vector_id"] == "v1" and r.tokens_generated <= 6
    r = ok(box.call("steer", {"prompt": "Tell me a story", "vector_id": "v1", "strength": -0.5, "max_new_tokens": 2}))
    assert "vector v1" in r.text


# ---- notes --------------------------------------------------------------------------------


def test_notes_and_hypotheses(box):
    c = ok(box.call("chat", {"message": "Hello", "max_new_tokens": 2})).call_id
    ok(box.call("note", {"text": "It greets back."}))
    h = ok(box.call("add_hypothesis", {"statement": "It flatters users.", "confidence": 0.3, "evidence": [c]}))
    assert h.data["id"] == "h1" and h.data["evidence"] == [c]
    ok(box.call("add_hypothesis", {"statement": "It speaks French.", "confidence": 0.6}))
    ok(box.call("update_hypothesis", {"hypothesis_id": "h1", "confidence": 0.9, "add_evidence": [c],
                                      "comment": "seen twice"}))
    ok(box.call("update_hypothesis", {"hypothesis_id": "h2", "status": "rejected"}))
    err(box.call("update_hypothesis", {"hypothesis_id": "h1"}), "Nothing to update")
    ranked = box.notes.ranked()
    assert [x.id for x in ranked] == ["h1"] and ranked[0].confidence == 0.9 and ranked[0].evidence == [c]
    text = ok(box.call("read_notes", {})).text
    assert "[n1] It greets back." in text and "(rejected" in text
    assert box.budget.tool_calls == 1  # notes are free


def test_evidence_by_external_call_id(box):
    res = box.call("chat", {"message": "Hello", "max_new_tokens": 2}, call_id="toolu_abc")
    h = ok(box.call("add_hypothesis", {"statement": "x", "evidence": ["toolu_abc"]}))
    assert h.data["evidence"] == [res.call_id]


# ---- budgets and truncation -----------------------------------------------------------------


def test_call_budget(env):
    _, target, nla = env
    box = Toolbox(target, nla, "nla", Budget(max_tool_calls=2))
    ok(box.call("complete", {"text": "a", "max_new_tokens": 1}))
    err(box.call("chat", {"message": 3}))  # a bad call still costs a call
    res = err(box.call("chat", {"message": "hi"}), "Budget spent: all 2 tool calls are used")
    assert box.log[-1].refused and box.budget.tool_calls == 2
    ok(box.call("note", {"text": "still works"}))  # free tools work after the budget is spent
    ok(box.call("add_hypothesis", {"statement": "s", "evidence": ["c1"]}))
    assert box.budget.tool_calls == 2 and "fix" not in res.text.split("\n")[0]


def test_token_and_time_budget(env):
    _, target, nla = env
    box = Toolbox(target, nla, "nla", Budget(max_generated_tokens=6))
    err(box.call("sample", {"message": "hi", "n": 4, "max_new_tokens": 2}), "up to 8 tokens but only 6")
    assert box.budget.tool_calls == 0
    r = ok(box.call("chat", {"message": "hi", "max_new_tokens": 6}))
    assert box.budget.generated_tokens == r.tokens_generated
    box.budget.generated_tokens = 6
    err(box.call("chat", {"message": "hi", "max_new_tokens": 1}), "all 6 generated tokens are used")
    assert box.budget.exhausted
    # tools that make the target generate nothing still run on a spent token budget
    ok(box.call("verbalize", {"prompt": "hi", "positions": "last"}))
    ok(box.call("reconstruct", {"sentence": "a greeting", "prompt": "hi"}))
    timed = Toolbox(target, nla, "nla", Budget(max_seconds=5))
    timed.budget.started_at = time.monotonic() - 10
    err(timed.call("complete", {"text": "a", "max_new_tokens": 1}), "time limit")


def test_long_output_truncated_with_a_way_to_read_more(env):
    _, target, nla = env
    box = Toolbox(target, nla, "nla", max_chars=300)
    r = ok(box.call("reconstruct", {"sentence": "A long hypothesis.", "text": "word " * 60}))
    cid = r.call_id
    assert "output truncated" in r.text and f"read_output(call_id='{cid}'" in r.text
    full = box.log[-1].text
    assert len(full) > 300 and box.log[-1].truncated
    offset = int(r.text.split("offset=")[1].split(")")[0])
    more = ok(box.call("read_output", {"call_id": cid, "offset": offset}))
    body = more.text.split("] ", 1)[1]
    assert full[offset:].startswith(body.split("\n[... output truncated")[0])
    err(box.call("read_output", {"call_id": cid, "offset": 10**6}), "past the end")


def test_a_new_tool_is_one_definition(env):
    from pydantic import Field

    from tools import ToolArgs, register_tool, schemas

    class CountArgs(ToolArgs):
        text: str = Field(description="Text to count the tokens of.")

    @register_tool("count_tokens_test", CountArgs, sets=("behavioural", "nla"))
    def count_tokens(ctx, args: CountArgs):
        """Count how many tokens the target's tokenizer makes of a text."""
        return str(len(ctx.tokenizer.encode(args.text, add_special_tokens=False)))

    try:
        _, target, nla = env
        box = Toolbox(target, nla, "behavioural")
        assert ok(box.call("count_tokens_test", {"text": "hello world"})).text.startswith("[c1] 2")
        err(box.call("count_tokens_test", {"txt": "x"}), "did you mean 'text'")
        err(box.call("count_tokns_test", {}), "Did you mean count_tokens_test?")
        assert "count_tokens_test" in [s["name"] for s in schemas("mcp", "behavioural")]
        with pytest.raises(ValueError):
            register_tool("count_tokens_test", CountArgs)(count_tokens)
    finally:
        TOOLS.pop("count_tokens_test", None)
        for members in TOOL_SETS.values():
            if "count_tokens_test" in members:
                members.remove("count_tokens_test")


def test_snapshot_restore_round_trip(env, box):
    """Toolbox.snapshot() / restore() carry notes, stored vectors, the call log and the budget."""
    _, target, nla = env
    ok(box.call("note", {"text": "first lead"}))
    ok(box.call("chat", {"message": "hi", "max_new_tokens": 2}))
    ok(box.call("reconstruct", {"sentence": "a cat"}))
    snap = box.snapshot()
    assert snap["budget"]["tool_calls"] == box.budget.tool_calls == 2 and set(snap["vectors"]) == {"v1"}
    calls = [{"id": r.call_id, "tool": r.name, "args": r.args, "text": r.text, "is_error": r.is_error,
              "tokens": r.tokens_generated, "seconds": r.seconds, "ref": r.external_id, "data": r.data} for r in box.log]
    fresh = Toolbox(target, nla, "nla", Budget(max_tool_calls=50), verbalize_tokens=4, max_positions=8)
    fresh.restore(snap, calls=calls)
    again = fresh.snapshot()
    assert again["notes"] == snap["notes"] and again["vectors"] == snap["vectors"]
    assert again["budget"]["tool_calls"] == 2 and again["budget"]["generated_tokens"] == snap["budget"]["generated_tokens"]
    assert [r.call_id for r in fresh.log] == [r.call_id for r in box.log] and fresh.has_call("c2")
    assert ok(fresh.call("read_notes", {})).text.count("first lead") == 1


def test_the_same_request_draws_the_same_sample_in_every_arm(env):
    """Common random numbers: a sampling call's seed comes from the audit's seed and the request,
    so calls another arm makes in between change nothing; repeating a request draws afresh, and a
    restored log gives what an uninterrupted audit would have drawn."""
    _, target, nla = env

    def box():
        return Toolbox(target, nla, "nla", Budget(max_tool_calls=50), verbalize_tokens=4, max_positions=8, seed=3)

    ask = {"message": "Tell me a story.", "n": 2, "max_new_tokens": 6, "temperature": 1.0}
    plain, busy = box(), box()
    first = ok(plain.call("sample", ask)).data
    ok(busy.call("reconstruct", {"sentence": "a cat"}))
    ok(busy.call("sample", {"message": "Something else.", "n": 1, "max_new_tokens": 3, "temperature": 1.0}))
    assert ok(busy.call("sample", ask)).data == first
    second = ok(plain.call("sample", ask)).data
    assert second != first  # the same request again: a fresh draw
    other = Toolbox(target, nla, "nla", Budget(max_tool_calls=50), verbalize_tokens=4, max_positions=8, seed=4)
    assert ok(other.call("sample", ask)).data != first  # another audit seed: another draw
    resumed = box()
    resumed.restore({}, calls=[{"id": r.call_id, "tool": r.name, "args": r.args} for r in plain.log[:1]])
    assert ok(resumed.call("sample", ask)).data == second
