"""The generation engine: concurrent generate calls share batches and get what they would alone."""

from __future__ import annotations

import contextlib
import threading

import pytest
import torch

from nla_core.generation import RowHooks, generate_ids
from nla_core.hooks import add_to_resid, count_hooks
from nla_core.serving import GenerationEngine, active_engine


def _prompts(handle, texts):
    tok = handle.tokenizer
    return [list(tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True,
                                         tokenize=True, return_dict=True)["input_ids"]) for t in texts]


TEXTS = ["Tell me about the ocean.", "What is two plus two?", "A haiku about cats, please.",
         "How do I bake bread?", "Name a planet.", "Why is the sky blue?"]


def _calls(handle):
    """Six different calls: greedy and sampled, one row and several, different lengths and hooks."""
    ids = _prompts(handle, TEXTS)
    d = handle.d_model
    push = torch.ones(d) * 0.5

    def shifted(payloads):  # a per-row hook, as an organism's implant: rows say how far to push
        # (None: a row of another call in the batch, left alone)
        return add_to_resid(handle.layers, 1, torch.stack([push * (p or 0.0) for p in payloads]))

    return [
        dict(prompts=[ids[0]], max_new_tokens=12),
        dict(prompts=[ids[1]] * 3, max_new_tokens=9, temperature=1.0, seed=11),
        dict(prompts=[ids[2], ids[3]], max_new_tokens=7, temperature=0.7, top_p=0.9, seed=5),
        dict(prompts=[ids[4]] * 2, max_new_tokens=10, hooks=RowHooks("push", [1.0, 2.0], shifted)),
        dict(prompts=[ids[5]], max_new_tokens=10, hooks=RowHooks("push", [3.0], shifted)),
        dict(prompts=[ids[0]], max_new_tokens=6, temperature=1.3, seed=3, stop=["e"]),
    ]


def _alone(handle):
    return [[g.token_ids for g in generate_ids(handle, **c)] for c in _calls(handle)]


def test_rows_keep_their_own_random_stream(tiny):
    ids = _prompts(tiny, TEXTS[:2])
    both = generate_ids(tiny, [ids[0], ids[1]], max_new_tokens=10, temperature=1.0, seed=4)
    # row 1 of the call alone, padded differently and without row 0 beside it: same tokens
    again = generate_ids(tiny, [ids[0], ids[1]], max_new_tokens=10, temperature=1.0, seed=4, batch_size=1)
    assert [g.token_ids for g in both] == [g.token_ids for g in again]
    other = generate_ids(tiny, [ids[0], ids[1]], max_new_tokens=10, temperature=1.0, seed=5)
    assert [g.token_ids for g in other] != [g.token_ids for g in both]


def _in_clients(handle, fns):
    """Run each function in its own client thread of one engine, released together; their
    results in order, and the engine's stats."""
    got: dict[int, object] = {}
    barrier = threading.Barrier(len(fns))
    with GenerationEngine(handle, max_wait_s=5.0) as engine:

        def run(i: int) -> None:
            with engine.client():
                assert active_engine(handle) is engine
                barrier.wait()
                got[i] = fns[i]()

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(fns))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    return [got[i] for i in range(len(fns))], engine.stats


def _tokens(handle, call):
    return lambda: [g.token_ids for g in generate_ids(handle, **call)]


def test_concurrent_calls_share_batches_and_match_the_unbatched_path(tiny):
    expected = _alone(tiny)
    calls = _calls(tiny)
    got, stats = _in_clients(tiny, [_tokens(tiny, c) for c in calls])
    assert got == expected
    # every call (hook-free or with row hooks) joined one batch
    assert stats.calls == len(calls)
    assert stats.batches == 1
    assert count_hooks(tiny.model) == 0


def test_calls_with_different_adapters_and_hooks_share_one_batch(tiny):
    """An organism's LoRA rows, another adapter's rows with an injection-like row hook, and plain
    base-model rows run as one PEFT mixed batch and get exactly their unbatched tokens."""
    from peft import LoraConfig

    for name in ("organism", "av"):
        tiny.add_adapter(name, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                          init_lora_weights=False))  # random B: each adapter changes the output
    tiny.model.eval()
    calls = _calls(tiny)
    calls[0]["adapter"] = "organism"
    calls[1]["adapter"] = "organism"
    calls[3]["adapter"] = "av"
    calls[4]["adapter"] = "av"
    expected = [[g.token_ids for g in generate_ids(tiny, **c)] for c in calls]
    plain = [[g.token_ids for g in generate_ids(tiny, **{**c, "adapter": None})] for c in calls[:2]]
    assert plain != expected[:2]  # the adapter matters, so a row given the wrong one would show
    got, stats = _in_clients(tiny, [_tokens(tiny, c) for c in calls])
    assert got == expected
    assert stats.batches == 1 and stats.calls == len(calls)
    assert count_hooks(tiny.model) == 0


def test_threads_outside_the_engine_generate_directly(tiny):
    ids = _prompts(tiny, TEXTS[:1])
    with GenerationEngine(tiny):
        assert active_engine(tiny) is None  # this thread is not a client
        out = generate_ids(tiny, ids, max_new_tokens=5)
    assert len(out) == 1 and out[0].n_tokens <= 5


def test_an_error_reaches_every_caller_and_the_engine_goes_on(tiny):
    ids = _prompts(tiny, TEXTS[:2])

    def broken(payloads):
        raise RuntimeError("hook failed")

    def broken_when_decoding(payloads):  # fine for the prefill (one row), fails for the two rows decoding
        if len(payloads) > 1:
            raise RuntimeError("hook failed while decoding")
        return contextlib.nullcontext()

    with GenerationEngine(tiny) as engine, engine.client():
        with pytest.raises(RuntimeError, match="hook failed"):  # while joining: the call's prefill
            generate_ids(tiny, ids[:1], max_new_tokens=4, hooks=RowHooks("bad", [0], broken))
        assert generate_ids(tiny, ids[1:], max_new_tokens=4)[0].n_tokens <= 4
        with pytest.raises(RuntimeError, match="while decoding"):  # in a decode step: the batch is lost
            generate_ids(tiny, ids[:1] * 2, max_new_tokens=4, hooks=RowHooks("bad", [0, 0], broken_when_decoding))
        assert generate_ids(tiny, ids[1:], max_new_tokens=4)[0].n_tokens <= 4
    assert count_hooks(tiny.model) == 0


def test_one_engine_per_model(tiny):
    with GenerationEngine(tiny):
        with pytest.raises(RuntimeError, match="already served"):
            GenerationEngine(tiny)
    GenerationEngine(tiny).close()  # closed engines free the model


def test_steered_generation_shares_a_batch_and_matches_alone(tiny):
    """Both runs of a steered generation (plain and steered) join other calls' batches."""
    from nla_core.steering import steered_generations

    ids = _prompts(tiny, TEXTS[:2])
    vec = torch.randn(tiny.d_model)

    def steer():
        s, p, _ = steered_generations(tiny, ids[0], vec, 1, 4.0, n=2, max_new_tokens=8, temperature=0.9, seed=2)
        return [s, p]

    def other():
        return [g.text for g in generate_ids(tiny, [ids[1]] * 2, max_new_tokens=8)]

    alone = [steer(), other()]
    assert alone[0][0] != alone[0][1]  # the steering changes the text
    got, stats = _in_clients(tiny, [steer, other])
    assert got == alone
    assert stats.alone == 0  # nothing had to wait for a batch of its own
    assert count_hooks(tiny.model) == 0


def test_rows_that_finish_early_leave_the_batch_without_changing_the_others(tiny):
    """Rows of different lengths in one batch: finished rows are dropped from the forward pass
    (and the KV cache, and per-row hooks re-installed for the rest); every row still gets the
    tokens it gets alone."""
    from nla_core.generation import GenRow, decode_rows, row_seed

    ids = _prompts(tiny, TEXTS)
    push = torch.ones(tiny.d_model) * 0.5
    seen: list[int] = []

    def shifted(payloads):
        seen.append(len(payloads))
        return add_to_resid(tiny.layers, 1, torch.stack([push * p for p in payloads]))

    def rows():
        return [GenRow(ids[i], n, t, 1.0, row_seed(3, i), payload=float(i))
                for i, (n, t) in enumerate([(2, 0.0), (14, 0.9), (5, 0.0), (14, 0.0), (1, 1.2), (9, 0.7)])]

    batch = rows()
    together = decode_rows(tiny, batch, batch_size=16, hooks=RowHooks("push", [r.payload for r in batch], shifted))
    assert seen[0] == 6 and len(seen) > 1 and seen[-1] < 6  # re-installed for fewer rows
    for i, r in enumerate(rows()):
        alone = decode_rows(tiny, [r], batch_size=1, hooks=RowHooks("push", [r.payload], shifted))
        assert together[i].token_ids == alone[0].token_ids
    assert count_hooks(tiny.model) == 0


def test_rows_with_the_same_prompt_and_payload_share_one_prefill(tiny):
    """Samples of one prompt (same adapter, same hook payload) are prefilled once and their
    cache copied; rows whose payloads differ are not merged. Each row gets what it gets alone."""
    from nla_core.generation import GenRow, decode_rows, row_seed

    ids = _prompts(tiny, TEXTS[:2])
    push = torch.ones(tiny.d_model) * 0.5
    seen: list[int] = []

    def shifted(payloads):
        seen.append(len(payloads))
        return add_to_resid(tiny.layers, 1, torch.stack([push * p for p in payloads]))

    plan = [(0, 1.0), (0, 1.0), (0, 1.0), (1, 1.0), (1, 2.0), (0, 2.0)]  # (prompt, push)

    def rows():
        return [GenRow(ids[p], 8, 1.0, 1.0, row_seed(9, i), payload=push_by) for i, (p, push_by) in enumerate(plan)]

    batch = rows()
    together = decode_rows(tiny, batch, batch_size=16, hooks=RowHooks("push", [r.payload for r in batch], shifted))
    assert seen[:2] == [4, 6]  # 4 distinct (prompt, payload) rows prefilled, then all 6 decode
    texts = [g.token_ids for g in together]
    assert texts[0] != texts[1]  # samples of one prefill still draw their own tokens
    for i, r in enumerate(rows()):
        alone = decode_rows(tiny, [r], batch_size=1, hooks=RowHooks("push", [r.payload], shifted))
        assert texts[i] == alone[0].token_ids
    assert count_hooks(tiny.model) == 0


def _when(engine, steps: int, timeout: float = 60.0) -> None:
    """Block until the engine has run `steps` decode steps (the running batch is under way)."""
    import time

    end = time.monotonic() + timeout
    while engine.stats.steps < steps:
        assert time.monotonic() < end, f"the engine stopped after {engine.stats.steps} steps"
        time.sleep(0.002)


def test_calls_join_a_running_batch_and_get_what_they_get_alone(tiny):
    """A long call starts a batch; two calls made while it generates (one after the other, with
    a longer prompt, another hook payload, greedy and sampled) join it between steps, are
    answered when their own rows end, and every call gets its unbatched tokens."""
    ids = _prompts(tiny, TEXTS)
    push = torch.ones(tiny.d_model) * 0.5

    def shifted(payloads):
        return add_to_resid(tiny.layers, 1, torch.stack([push * (p or 0.0) for p in payloads]))

    long_call = dict(prompts=[ids[4]] * 3, max_new_tokens=40, temperature=0.9, seed=1,
                     hooks=RowHooks("push", [1.0, 1.0, 2.0], shifted))
    short = [dict(prompts=[ids[2], ids[3]], max_new_tokens=6, hooks=RowHooks("push", [3.0, 0.5], shifted)),
             dict(prompts=[ids[5]], max_new_tokens=5, temperature=1.1, seed=7)]
    expected = [_tokens(tiny, long_call)(), [_tokens(tiny, c)() for c in short]]
    with GenerationEngine(tiny, max_wait_s=0.0) as engine:
        got: dict[int, object] = {}

        def first() -> None:
            with engine.client():
                got[0] = _tokens(tiny, long_call)()

        def later() -> None:
            with engine.client():
                _when(engine, 3)
                got[1] = [_tokens(tiny, c)() for c in short]
                got[2] = engine.stats.batches, engine.stats.steps

        threads = [threading.Thread(target=f) for f in (first, later)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert [got[0], got[1]] == expected
    assert engine.stats.batches == 1 and engine.stats.joined == 2
    assert got[2][1] < engine.stats.steps  # both short calls were answered while the long one went on
    assert count_hooks(tiny.model) == 0


def test_a_thread_waiting_for_the_model_gets_it_between_steps(tiny):
    """A forward pass outside the engine (it takes the model's lock) does not wait for a long
    running batch to end: the engine lets it in between two steps."""
    ids = _prompts(tiny, TEXTS[:1])
    with GenerationEngine(tiny, max_wait_s=0.0) as engine:
        seen: list[int] = []

        def pushed(payloads):
            return add_to_resid(tiny.layers, 1, torch.ones(tiny.d_model) * 0.1)

        def generating() -> None:
            with engine.client():
                generate_ids(tiny, ids * 2, max_new_tokens=40, hooks=RowHooks("push", [1, 1], pushed))

        def outside() -> None:
            _when(engine, 2)
            with tiny.lock:
                assert count_hooks(tiny.model) == 0  # the batch's hooks are not left on the model
                seen.append(engine.stats.steps)

        threads = [threading.Thread(target=f) for f in (generating, outside)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert seen and seen[0] < engine.stats.steps


def test_a_call_joins_while_ended_rows_still_ride_along(tiny):
    """In a batch of 17 rows one row ends; it stays in the forward pass (dropping pays off only
    for a larger share) while another call joins and the row hooks are entered again for every
    row: the ended row is left alone and the joining call gets what it gets alone."""
    ids = _prompts(tiny, TEXTS)
    push = torch.ones(tiny.d_model) * 0.5

    def shifted(payloads):
        return add_to_resid(tiny.layers, 1, torch.stack([push * (p or 0.0) for p in payloads]))

    many = dict(prompts=[ids[0]] * 16, max_new_tokens=30, temperature=0.9, seed=2,
                hooks=RowHooks("push", [1.0] * 16, shifted))
    brief = dict(prompts=[ids[1]], max_new_tokens=2, hooks=RowHooks("push", [2.0], shifted))
    joining = dict(prompts=[ids[2]], max_new_tokens=5, hooks=RowHooks("push", [3.0], shifted))
    expected = [_tokens(tiny, c)() for c in (many, brief, joining)]

    def late() -> object:
        return _when(engine, 5) or _tokens(tiny, joining)()

    with GenerationEngine(tiny, max_wait_s=1.0) as engine:
        got: dict[int, object] = {}
        barrier = threading.Barrier(3)

        def run(i: int, fn) -> None:
            with engine.client():
                barrier.wait()
                got[i] = fn()

        fns = [_tokens(tiny, many), _tokens(tiny, brief), late]
        threads = [threading.Thread(target=run, args=(i, f)) for i, f in enumerate(fns)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert [got[0], got[1], got[2]] == expected
    assert engine.stats.batches == 1 and engine.stats.joined == 1


def test_a_wrong_number_of_per_row_adapters_is_a_clear_error(tiny):
    from nla_core.errors import NLAError
    from nla_core.generation import GenRow, decode_rows

    rows = [GenRow(prompt=p, max_new_tokens=3, temperature=0.0, top_p=1.0, seed=0) for p in _prompts(tiny, TEXTS[:3])]
    with pytest.raises(NLAError, match="2 adapters for 3 rows"):
        decode_rows(tiny, rows, batch_size=4, adapter=[None, None])
    assert count_hooks(tiny.model) == 0
