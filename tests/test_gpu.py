"""The CUDA path, opt-in (`gpu`: skipped without a CUDA device, so CI never runs it). A tiny
random model on the GPU goes through what a GPU user runs: activations, the NLA's verbalize /
reconstruct / round trip / steer with vectors that come from the CPU, a LoRA organism's
target, and the training pipeline under bf16 autocast. `NLA_AUDIT_TEST_DEVICE=cuda pytest`
runs every other tiny-model test on the GPU as well."""

from __future__ import annotations

import math

import pytest
import torch

pytestmark = pytest.mark.gpu


@pytest.fixture
def gpu_tiny():
    from nla_core.testing import tiny_handle

    return tiny_handle("llama", device="cuda")


def test_nla_on_the_gpu_takes_vectors_from_the_cpu(gpu_tiny):
    from nla_core import NLA, read_activations

    assert gpu_tiny.device.type == "cuda"
    acts = read_activations(gpu_tiny, ["The volcano erupted at dawn", "Tea is brewed with hot water"], 2,
                            positions=[-1]).stacked()  # [2, 64]
    nla = NLA.untrained(gpu_tiny, layer=2)
    out = nla.verbalize(acts.cpu(), max_new_tokens=6)
    assert [v.index for v in out] == [0, 1]
    assert [v.raw for v in nla.verbalize(acts, max_new_tokens=6)] == [v.raw for v in out]  # greedy, either device
    rec = nla.reconstruct(["volcanoes and lava", "a cup of hot tea"])  # [2, 64]
    assert rec.shape == (2, 64) and torch.isfinite(rec.float()).all()
    rt = nla.round_trip(acts.cpu(), max_new_tokens=4)
    assert len(rt.verbalizations) == 2 and torch.isfinite(rt.mse.float()).all() and math.isfinite(rt.fve)


def test_a_lora_organism_runs_on_the_gpu(gpu_tiny, tmp_path):
    from peft import LoraConfig, get_peft_model

    from environments import build_target
    from environments.spec import spec_from_dict
    from nla_core.testing import tiny_handle

    src = tiny_handle("llama", device="cpu")  # adapters are made on the CPU and loaded onto the GPU model
    get_peft_model(src.model, LoraConfig(r=2, target_modules=["q_proj"]), adapter_name="x").save_pretrained(str(tmp_path / "s"))
    adapter = tmp_path / "s" / "x" if (tmp_path / "s" / "x").exists() else tmp_path / "s"
    spec = spec_from_dict({
        "id": "gpu-organism", "base_model": "*",
        "construction": {"method": "lora", "params": {"adapter": str(adapter)}},
        "ground_truth": {"behaviour": "It loves volcanoes.", "key_concepts": ["volcano"], "paraphrases": []},
        "check": {"kind": "keywords", "keywords": ["volcano"]}, "eval_prompts": ["Hi"], "families": ["canary"],
    })
    target = build_target(spec, gpu_tiny, alias="target-gpu", layer=2)
    assert target.chat("Hello there", max_new_tokens=6).n_tokens <= 6
    own = target.activations("Hello there", positions="last").stacked()  # [1, 64]
    base = target.activations("Hello there", positions="last", base=True).stacked()
    assert own.shape == base.shape == (1, 64) and torch.isfinite(own.float()).all()
    steered, unsteered = target.steer("Hello there", torch.randn(64), 2, 4.0, 6)  # a vector from the CPU
    assert isinstance(steered, str) and isinstance(unsteered, str)


def test_the_training_pipeline_runs_on_the_gpu(gpu_tiny, tmp_path):
    from nla_core import NLA
    from nla_core.training import Run, build_data, evaluate, preset, train_ar_warmstart, train_av_warmstart, train_rl
    from nla_core.training.common import autocast

    cfg = preset("tiny")
    cfg.model = "tiny-llama"
    run = Run.open(tmp_path / "run", cfg)
    build_data(run, gpu_tiny, progress=False)
    with autocast(cfg):  # the GPU trains under bf16 autocast ("auto")
        assert torch.is_autocast_enabled("cuda") and torch.get_autocast_dtype("cuda") == torch.bfloat16
    assert train_ar_warmstart(run, gpu_tiny, progress=False)["step"] == cfg.ar_warmstart.steps
    assert train_av_warmstart(run, gpu_tiny, progress=False)["step"] == cfg.av_warmstart.steps
    rl = train_rl(run, gpu_tiny, progress=False)
    assert rl["step"] == cfg.rl.steps and set(rl["time_share"]) >= {"generation", "scoring"}
    rep = evaluate(run, gpu_tiny, progress=False)
    assert math.isfinite(rep["round_trip_fve"])
    nla = NLA.load(run.final("rl"), gpu_tiny)
    assert nla.mean is not None and nla.mean.shape == (64,)
    assert all(p.device.type == "cuda" for p in gpu_tiny.model.parameters())
