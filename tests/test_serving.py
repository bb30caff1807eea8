"""The generation engine: concurrent generate calls share batches and get what they would alone."""

from __future__ import annotations

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
        return add_to_resid(handle.layers, 1, torch.stack([push * p for p in payloads]))

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


def test_concurrent_calls_share_batches_and_match_the_unbatched_path(tiny):
    expected = _alone(tiny)
    got: dict[int, list[list[int]]] = {}
    calls = _calls(tiny)
    barrier = threading.Barrier(len(calls))
    with GenerationEngine(tiny, max_wait_s=5.0) as engine:

        def run(i: int) -> None:
            with engine.client():
                assert active_engine(tiny) is engine
                barrier.wait()
                got[i] = [g.token_ids for g in generate_ids(tiny, **calls[i])]

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        stats = engine.stats
    assert [got[i] for i in range(len(calls))] == expected
    # the two hook-free calls without a hooks function and the two "push" calls merged
    assert stats.calls == len(calls)
    assert stats.batches < len(calls)
    assert stats.rows_per_batch > 1.5
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

    with GenerationEngine(tiny) as engine, engine.client():
        with pytest.raises(RuntimeError, match="hook failed"):
            generate_ids(tiny, ids[:1], max_new_tokens=4, hooks=RowHooks("bad", [0], broken))
        assert generate_ids(tiny, ids[1:], max_new_tokens=4)[0].n_tokens <= 4


def test_one_engine_per_model(tiny):
    with GenerationEngine(tiny):
        with pytest.raises(RuntimeError, match="already served"):
            GenerationEngine(tiny)
    GenerationEngine(tiny).close()  # closed engines free the model
