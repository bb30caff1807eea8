"""Residual-stream hooks: reading, early exit, steering keyed on positions, marker injection."""

import pytest
import torch
from torch import nn

from nla_core import count_hooks, read_activations
from nla_core.activations import encode, forward_to_layer, pad_batch
from nla_core.hooks import InjectionError, StopForward, add_to_resid, capture_resid, inject_at_marker
from nla_core.testing import tiny_handle


def _hidden_states(h, ids):
    with torch.no_grad():
        return h.model(input_ids=torch.tensor([ids], device=h.device), output_hidden_states=True).hidden_states


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3_text", "gemma3"])
def test_read_matches_hidden_states_plus_one(arch):
    h = tiny_handle(arch)
    text = "The quick brown fox jumps over the lazy dog."
    ids = encode(h, text)
    acts = read_activations(h, [text], 2)
    hs = _hidden_states(h, ids)
    assert acts.site == "blocks.2.resid_post"
    assert acts.vectors[0].shape == (len(ids), h.d_model)
    torch.testing.assert_close(acts.vectors[0], hs[3][0].float().cpu(), rtol=1e-4, atol=1e-4)  # activations come back on the CPU


def test_early_exit_skips_later_blocks(tiny):
    ran = []
    handles = [layer.register_forward_hook(lambda m, a, o, i=i: ran.append(i)) for i, layer in enumerate(tiny.layers)]
    try:
        ids, mask = pad_batch([encode(tiny, "hello there")], tiny.tokenizer.pad_token_id)
        forward_to_layer(tiny, ids, mask, 1)
    finally:
        for x in handles:
            x.remove()
    assert ran == [0, 1]


def test_batched_read_equals_one_by_one(tiny):
    texts = ["short", "a somewhat longer sentence with more tokens in it", "medium length text"]
    batched = read_activations(tiny, texts, 3, positions=[-1])
    for i, t in enumerate(texts):
        single = read_activations(tiny, [t], 3, positions=[-1])
        torch.testing.assert_close(batched.vectors[i], single.vectors[0], rtol=1e-4, atol=1e-4)


def test_exception_inside_hook_context_leaves_no_hook(tiny):
    before = count_hooks(tiny.model)
    with pytest.raises(RuntimeError):
        with capture_resid(tiny.layers, 1), add_to_resid(tiny.layers, 2, torch.ones(tiny.d_model)):
            assert count_hooks(tiny.model) == before + 2
            raise RuntimeError("boom")
    assert count_hooks(tiny.model) == before
    with pytest.raises(InjectionError):  # a failing hook also cleans up
        with inject_at_marker(tiny.embed, torch.ones(1, tiny.d_model), marker_id=5, left_id=6, right_id=7):
            tiny.model(input_ids=torch.tensor([[1, 2, 3, 4]], device=tiny.device))
    assert count_hooks(tiny.model) == before


class _TupleBlock(nn.Module):
    """A block that returns a tuple, as decoder layers do in transformers 4.x."""

    def forward(self, x):
        return (x * 2, "extra")


def test_hooks_accept_tuple_outputs():
    layers = nn.ModuleList([_TupleBlock()])
    x = torch.ones(1, 3, 4)
    with capture_resid(layers, 0, stop=False) as cap:
        out = layers[0](x)
    assert isinstance(out, tuple) and out[1] == "extra"
    torch.testing.assert_close(cap.value, x * 2)
    with add_to_resid(layers, 0, torch.full((4,), 0.5)):
        out = layers[0](x)
    assert isinstance(out, tuple) and out[1] == "extra"
    torch.testing.assert_close(out[0], x * 2 + 0.5)
    with pytest.raises(StopForward), capture_resid(layers, 0) as cap:
        layers[0](x)


@pytest.mark.parametrize("positions", [None, [3, 5, 9]])
def test_steering_same_with_and_without_kv_cache(tiny, positions):
    ids = torch.tensor([encode(tiny, "Tell me a story about the sea")])
    v = torch.randn(tiny.d_model) * 3
    runs = {}
    for use_cache in (True, False):
        with add_to_resid(tiny.layers, 1, v, positions=positions), torch.no_grad():
            out = tiny.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                                      use_cache=use_cache, output_scores=True, return_dict_in_generate=True,
                                      pad_token_id=tiny.tokenizer.pad_token_id)
        runs[use_cache] = out
    assert torch.equal(runs[True].sequences, runs[False].sequences)
    for a, b in zip(runs[True].scores, runs[False].scores):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        plain = tiny.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                                    output_scores=True, return_dict_in_generate=True, pad_token_id=tiny.tokenizer.pad_token_id)
    assert any(not torch.allclose(a, b) for a, b in zip(plain.scores, runs[True].scores)), "steering changed nothing"


def test_steering_only_touches_chosen_positions(tiny):
    ids, mask = pad_batch([encode(tiny, "one two three four five six")], tiny.tokenizer.pad_token_id)
    with torch.no_grad():
        base = forward_to_layer(tiny, ids, mask, 1)
        with add_to_resid(tiny.layers, 1, torch.ones(tiny.d_model), positions=[2]):
            steered = forward_to_layer(tiny, ids, mask, 1)
    diff = (steered - base).abs().sum(-1)[0]
    assert diff[2] > 0 and diff[:2].sum() == 0 and diff[3:].sum() == 0


def test_marker_injection_requires_neighbours(tiny):
    vec = torch.randn(2, tiny.d_model, device=tiny.device)
    ids = torch.tensor([[10, 11, 12, 13, 14], [11, 12, 13, 10, 10]], device=tiny.device)  # marker 12 between 11 and 13
    with inject_at_marker(tiny.embed, vec, marker_id=12, left_id=11, right_id=13):
        out = tiny.embed(ids)
    plain = tiny.embed(ids)
    torch.testing.assert_close(out[0, 2], vec[0])
    torch.testing.assert_close(out[1, 1], vec[1])
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[0, 2] = mask[1, 1] = False
    torch.testing.assert_close(out[mask], plain[mask])
    lonely = torch.tensor([[10, 12, 10, 10]], device=tiny.device)  # the marker without its neighbours: not a site
    with pytest.raises(InjectionError, match="exactly one marker"):
        with inject_at_marker(tiny.embed, vec[:1], marker_id=12, left_id=11, right_id=13):
            tiny.embed(lonely)


def test_marker_injection_into_some_rows_leaves_the_others_alone(tiny):
    """In a batch shared with another call's rows (which need not hold a marker), only the
    named rows are injected."""
    vec = torch.randn(1, tiny.d_model, device=tiny.device)
    ids = torch.tensor([[10, 10, 10, 10, 10], [10, 11, 12, 13, 14], [11, 12, 13, 10, 10]], device=tiny.device)
    plain = tiny.embed(ids)
    with inject_at_marker(tiny.embed, vec, marker_id=12, left_id=11, right_id=13, rows=[1]):
        out = tiny.embed(ids)
    torch.testing.assert_close(out[1, 2], vec[0])
    torch.testing.assert_close(out[0], plain[0])
    torch.testing.assert_close(out[2], plain[2])  # a marker in a row that is not ours: untouched
    with pytest.raises(InjectionError, match="exactly one marker"):
        with inject_at_marker(tiny.embed, vec, marker_id=12, left_id=11, right_id=13, rows=[0]):
            tiny.embed(ids)
