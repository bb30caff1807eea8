"""NLA inference (verbalize / reconstruct / round trip / steer) and checkpoint layouts."""


import pytest
import torch
import yaml
from peft import LoraConfig

from nla_core import (
    NLA,
    BadVectorError,
    CheckpointError,
    EmptyInputError,
    LayerOutOfRangeError,
    PositionOutOfRangeError,
    SidecarDriftError,
    read_activations,
)
from nla_core.checkpoint import extract_explanation, read_meta, write_meta
from nla_core.errors import BadArgumentError
from nla_core.nla import AR_ADAPTER, AV_ADAPTER
from nla_core.testing import tiny_handle


def _acts(h, layer=2, n=3):
    texts = ["The weather is lovely today in the park", "Python code: def f(x): return x", "Paris is the capital"]
    return read_activations(h, texts[:n], layer, positions=[-1]).stacked()


def test_verbalize_is_batched_and_ordered(tiny):
    nla = NLA.untrained(tiny, layer=2)
    acts = _acts(tiny)
    out = nla.verbalize(acts, n_samples=2, max_new_tokens=6, temperature=0.9, seed=1)
    assert [(v.index, v.sample) for v in out] == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)]
    one = nla.verbalize(acts[1], max_new_tokens=6)
    batched = nla.verbalize(acts, max_new_tokens=6)
    assert one[0].raw == batched[1].raw  # greedy: batching does not change the result
    assert not nla.trained


def test_best_of_keeps_the_candidate_the_ar_reconstructs_best(tiny):
    from nla_core.metrics import normalized_mse

    nla = NLA.untrained(tiny, layer=2)
    acts = _acts(tiny)
    greedy = nla.verbalize(acts, max_new_tokens=6)
    rivals = nla._explain(acts, [i for i in range(3) for _ in range(3)], 6, 0.8, 16, 8)  # what best_of=4 draws
    best = nla.verbalize(acts, max_new_tokens=6, best_of=4, seed=7)
    assert [(v.index, v.sample) for v in best] == [(0, 0), (1, 0), (2, 0)]
    for i, v in enumerate(best):
        pool = [greedy[i].text] + [r[0] for r in rivals[3 * i:3 * i + 3]]
        err = normalized_mse(nla.reconstruct_explanations(pool), acts[i].expand(len(pool), -1))
        assert v.text == pool[int(err.argmin())]
    with pytest.raises(BadArgumentError, match="best_of"):
        nla.verbalize(acts, best_of=0)


def test_injection_changes_what_the_av_sees(tiny):
    nla = NLA.untrained(tiny, layer=2)
    a, b = _acts(tiny, n=2)
    ids = torch.tensor([nla.actor_prompt()], device=tiny.device)

    def next_token_logits(v):
        with nla.injection(v[None]), torch.no_grad():
            return tiny.model(input_ids=ids).logits[0, -1]

    assert not torch.allclose(next_token_logits(a), next_token_logits(b))
    torch.testing.assert_close(next_token_logits(a), next_token_logits(3 * a))  # rescaled to injection_scale


def test_reconstruct_and_round_trip(tiny):
    nla = NLA.untrained(tiny, layer=2)
    rec = nla.reconstruct(["a sentence", "another one about cats"])
    assert rec.shape == (2, tiny.d_model) and torch.isfinite(rec).all()
    rt = nla.round_trip(_acts(tiny), max_new_tokens=5)
    assert rt.mse.shape == (3,) and rt.baseline_source == "this batch"
    assert torch.allclose(rt.mse, 2 * (1 - rt.cos), atol=1e-4)  # MSE = 2(1 - cos) at norm sqrt(d)
    assert rt.fve == pytest.approx(1 - float(rt.mse.mean()) / rt.baseline)


@pytest.mark.parametrize(
    "bad, error",
    [(torch.randn(7), BadVectorError), (torch.full((64,), float("nan")), BadVectorError),
     (torch.zeros(64), BadVectorError), (torch.randn(0, 64), EmptyInputError)],
)
def test_bad_vectors_are_refused(tiny, bad, error):
    with pytest.raises(error) as exc:
        NLA.untrained(tiny, layer=2).verbalize(bad)
    assert exc.value.fix


def test_bad_layers_positions_and_text(tiny):
    with pytest.raises(LayerOutOfRangeError, match="0 and 3"):
        NLA.untrained(tiny, layer=4)
    with pytest.raises(PositionOutOfRangeError, match="out of range"):
        read_activations(tiny, ["two words"], 1, positions=[50])
    with pytest.raises(EmptyInputError):
        read_activations(tiny, ["   "], 1)
    with pytest.raises(EmptyInputError):
        NLA.untrained(tiny, layer=2).reconstruct([""])


def test_steer_returns_steered_beside_unsteered(tiny):
    nla = NLA.untrained(tiny, layer=2)
    r = nla.steer("Tell me about dogs", torch.randn(tiny.d_model), strength=8.0, max_new_tokens=6)
    assert len(r.steered) == len(r.unsteered) == 1 and r.added_norm > 0
    assert r.steered != r.unsteered
    same = nla.steer("Tell me about dogs", torch.randn(tiny.d_model), strength=0.0, max_new_tokens=6)
    assert same.steered == same.unsteered
    with pytest.raises(BadVectorError):
        nla.steer("hi", torch.randn(tiny.d_model), strength=float("inf"))


def test_chat_conversations_read(tiny):
    conv = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi there"}]
    acts = read_activations(tiny, [conv], 1)
    assert "<|im_start|>" in acts.tokens[0]
    with pytest.raises(EmptyInputError):
        read_activations(tiny, [[{"role": "robot", "content": "x"}]], 1)


def test_extract_explanation():
    assert extract_explanation("junk <explanation> a b </explanation> tail") == "a b"
    assert extract_explanation("<explanation> never closed") is None


def _trained_like(h, layer=2):
    """An NLA with random (non-zero) LoRA adapters, as after training."""
    nla = NLA.untrained(h, layer=layer)
    cfg = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    h.add_adapter(AV_ADAPTER, LoraConfig(**cfg))
    h.add_adapter(AR_ADAPTER, LoraConfig(**cfg))
    nla.av, nla.ar, nla.target = h, h, h
    nla.av_adapter, nla.ar_adapter = AV_ADAPTER, AR_ADAPTER
    with torch.no_grad():
        nla.head.weight.add_(0.01 * torch.randn_like(nla.head.weight))
    nla.mean = torch.randn(h.d_model)
    nla.meta.trained = True
    return nla


def test_adapter_layout_round_trip(tmp_path):
    h = tiny_handle()
    nla = _trained_like(h)
    acts = _acts(h)
    want_text = [v.raw for v in nla.verbalize(acts, max_new_tokens=6)]
    want_vec = nla.reconstruct(["some explanation"])
    nla.save(tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "av" / "adapter_config.json").exists()
    assert (tmp_path / "ckpt" / "ar" / "value_head.safetensors").exists()
    loaded = NLA.load(tmp_path / "ckpt", tiny_handle())  # a fresh base with the same random seed
    assert loaded.trained and loaded.shares_weights and loaded.mean is not None
    assert [v.raw for v in loaded.verbalize(acts, max_new_tokens=6)] == want_text
    torch.testing.assert_close(loaded.reconstruct(["some explanation"]), want_vec, rtol=1e-4, atol=1e-4)
    # The adapters change behaviour: the plain base reconstructs differently.
    plain = NLA.untrained(tiny_handle(), layer=2)
    assert not torch.allclose(plain.reconstruct(["some explanation"]), want_vec, atol=1e-3)
    assert loaded.round_trip(acts, max_new_tokens=4).baseline_source == "training set"


def test_released_layout_loads_unchanged(tmp_path):
    h = tiny_handle()
    nla = _trained_like(h)
    acts = _acts(h)
    want_text = [v.raw for v in nla.verbalize(acts, max_new_tokens=6)]
    want_vec = nla.reconstruct(["some explanation"])
    av_dir, ar_dir = nla.export_released(tmp_path / "release")
    # Exactly the released layout: full HF folders with sidecars, the AR truncated to K+1 blocks.
    for d in (av_dir, ar_dir):
        assert (d / "config.json").exists() and (d / "model.safetensors").exists() and (d / "nla_meta.yaml").exists()
    assert yaml.safe_load((ar_dir / "config.json").read_text())["num_hidden_layers"] == 3
    meta = yaml.safe_load((av_dir / "nla_meta.yaml").read_text())
    assert meta["kind"] == "nla_model" and meta["role"] == "actor"
    assert set(meta["tokens"]) >= {"injection_char", "injection_token_id", "injection_left_neighbor_id", "injection_right_neighbor_id"}
    assert meta["critic"]["extraction_layer_index"] == 2 and "actor" in meta["prompt_templates"]
    loaded = NLA.load(av_dir)  # finds the sibling critic folder
    assert not loaded.shares_weights
    assert [v.raw for v in loaded.verbalize(acts, max_new_tokens=6)] == want_text
    torch.testing.assert_close(loaded.reconstruct(["some explanation"]), want_vec, rtol=1e-4, atol=1e-4)
    with pytest.raises(CheckpointError, match="critic"):
        NLA.load(ar_dir)


def test_sidecar_drift_is_named(tmp_path):
    h = tiny_handle()
    nla = _trained_like(h)
    nla.save(tmp_path / "ckpt")
    meta = read_meta(tmp_path / "ckpt")
    drifted = meta.model_copy(deep=True)
    drifted.tokens.injection_token_id += 1
    write_meta(tmp_path / "ckpt", drifted)
    with pytest.raises(SidecarDriftError, match="tokenizer drift"):
        NLA.load(tmp_path / "ckpt", tiny_handle())
    drifted = meta.model_copy(deep=True)
    drifted.tokens.injection_right_neighbor_id += 1
    write_meta(tmp_path / "ckpt", drifted)
    with pytest.raises(SidecarDriftError, match="template drift"):
        NLA.load(tmp_path / "ckpt", tiny_handle())
    write_meta(tmp_path / "ckpt", meta)
    with pytest.raises(SidecarDriftError, match="d_model"):
        NLA.load(tmp_path / "ckpt", tiny_handle(d_model=32))
    (tmp_path / "ckpt" / "nla_meta.yaml").unlink()
    with pytest.raises(CheckpointError, match="not an NLA checkpoint"):
        NLA.load(tmp_path / "ckpt", tiny_handle())


def test_shared_weights_cost_one_model(tmp_path):
    h = tiny_handle()
    n_base = sum(p.numel() for p in h.hf_model.parameters())
    nla = _trained_like(h)
    total = sum(p.numel() for p in h.model.parameters()) + nla.head.weight.numel()
    assert nla.shares_weights
    assert total < 1.2 * n_base  # target + AV + AR: one base, two small adapters, one head
