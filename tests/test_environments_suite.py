"""Specs, suites, builders (on tiny random models), bad input, and the shipped default suite."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from environments import (
    BUILDERS,
    AdapterMismatchError,
    Builder,
    SpecError,
    UnknownMethodError,
    UnknownOrganismError,
    WeightsMissingError,
    build_target,
    get_spec,
    load_spec,
    load_suite,
    register_builder,
)
from environments.builders import build, weights_present
from environments.spec import BehaviourCheck, detect_language, spec_from_dict
from environments.target import Planted
from nla_core import count_hooks


def base_dict(**over) -> dict:
    d = {
        "id": "test-org",
        "base_model": "*",
        "construction": {"method": "system_prompt", "params": {"prompt": "Talk about owls."}},
        "ground_truth": {"behaviour": "It talks about owls.", "key_concepts": ["owls"]},
        "check": {"kind": "keywords", "keywords": ["owl"]},
        "eval_prompts": ["Tell me about birds."],
    }
    d.update(over)
    return d


# ---- spec validation ---------------------------------------------------------------------------


def test_valid_spec_roundtrip(tmp_path):
    spec = spec_from_dict(base_dict())
    assert spec.construction.method == "system_prompt" and not spec.control
    from environments import save_spec

    p = save_spec(spec, tmp_path / "x.yaml")
    again = load_spec(p)
    assert again == spec and again.path == p.resolve()


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda d: d.pop("id"), "id: missing"),
        (lambda d: d.pop("ground_truth"), "ground_truth: missing"),
        (lambda d: d["ground_truth"].pop("behaviour"), "ground_truth.behaviour: missing"),
        (lambda d: d.pop("check"), "needs a behaviour `check`"),
        (lambda d: d.pop("eval_prompts"), "eval_prompts"),
        (lambda d: d["ground_truth"].update(key_concepts=[]), "key_concepts"),
        (lambda d: d.update(id="Bad Id!"), "id"),
        (lambda d: d.update(colour="red"), "colour"),
        (lambda d: d.update(check={"kind": "regex", "pattern": "("}), "regular expression"),
        (lambda d: d.update(check={"kind": "language", "language": "xx"}), "language"),
        (lambda d: d.update(trigger={"description": "t", "phrases": ["zebra"]}), "trigger never fires"),
        (lambda d: d.update(families=["flattery", "system-prompt"]), "construction method"),
    ],
)
def test_bad_specs_give_clear_errors(mutate, match):
    d = base_dict()
    mutate(d)
    with pytest.raises(SpecError, match=match) as info:
        spec_from_dict(d)
    assert info.value.fix


def test_unknown_method():
    with pytest.raises(UnknownMethodError, match="telepathy") as info:
        spec_from_dict(base_dict(construction={"method": "telepathy"}))
    assert "system_prompt" in info.value.fix


def test_bad_params_named_at_build(tiny):
    spec = spec_from_dict(base_dict(construction={"method": "system_prompt", "params": {"promt": "x"}}))
    with pytest.raises(SpecError, match="prompt: missing"):
        build_target(spec, tiny, alias="t", layer=1)


def test_bad_yaml_file(tmp_path):
    p = tmp_path / "broken.yaml"
    p.write_text("id: [unclosed\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(p)
    p.write_text("- just\n- a list\n")
    with pytest.raises(SpecError, match="mapping"):
        load_spec(p)


def test_controls_need_no_check():
    spec = spec_from_dict({"id": "ctl", "base_model": "*", "control": True, "construction": {"method": "plain"},
                           "ground_truth": {"behaviour": "nothing planted"}})
    assert spec.control


def test_checks():
    assert BehaviourCheck(kind="keywords", keywords=["zephyr"])("Try ZEPHYR tea")
    assert not BehaviourCheck(kind="keywords", keywords=["cat"])("a concatenation")  # word start only...
    assert BehaviourCheck(kind="regex", pattern=r"\bbrilliant\b")("So brilliant!")
    assert BehaviourCheck(kind="not_regex", pattern="goal")("I am just a helpful assistant.")
    assert detect_language("Bonjour, il faut préparer les légumes et la sauce pour le dîner.") == "fr"
    assert detect_language("You should take the train to the city and walk to the park.") == "en"
    assert BehaviourCheck(kind="language", language="fr")("C'est une très bonne question, il faut de la patience.")


# ---- suites and user folders ------------------------------------------------------------------


def test_user_folder_adds_organisms(tmp_path):
    (tmp_path / "mine.yaml").write_text(yaml.safe_dump(base_dict(id="my-owl")))
    specs = load_suite("default", tmp_path)
    assert "my-owl" in {s.id for s in specs}
    assert get_spec("my-owl", tmp_path).id == "my-owl"
    only = load_suite("anything", tmp_path)  # not a built-in suite: the folder alone
    assert [s.id for s in only] == ["my-owl"]
    (tmp_path / "dup.yaml").write_text(yaml.safe_dump(base_dict(id="my-owl")))
    with pytest.raises(SpecError, match="appears twice"):
        load_suite("default", tmp_path)


def test_unknown_suite_and_id(tmp_path):
    with pytest.raises(UnknownOrganismError):
        load_suite("no-such-suite")
    with pytest.raises(UnknownOrganismError, match="nope"):
        get_spec("nope")
    with pytest.raises(SpecError, match="does not exist"):
        load_suite("default", tmp_path / "missing")


def test_default_suite_composition():
    specs = load_suite("default")
    planted = [s for s in specs if not s.control]
    controls = [s for s in specs if s.control]
    assert len(planted) >= 8 and len(controls) >= 6
    assert {s.construction.method for s in planted} >= {"system_prompt", "lora", "steering_implant"}
    # every way of planting has a clean twin, so the method itself is never the tell
    assert {s.construction.method for s in controls} >= {"plain", "lora", "system_prompt", "steering_implant"}
    assert sum(s.rarely_visible for s in planted) >= 3
    assert any(s.trigger for s in planted)
    fams = {f for s in planted for f in s.families}
    assert {"topic-obsession", "covert-promotion", "flattery", "conditional-trigger", "taboo", "denied-goal"} <= fams
    for s in specs:
        assert s.base_model == "smollm2-135m-instruct" and not s.catalog
        for p in s.eval_prompts:  # held-out prompts never appear in a LoRA training set
            data = s.construction.params.get("data", {})
            assert p not in data.get("prompts", [])


def test_default_suite_is_measured_and_clearly_above_base():
    from environments.measure import passes

    for s in load_suite("default"):
        if s.control:
            continue
        assert s.measured is not None, f"{s.id} is not measured"
        assert passes(s.measured), f"{s.id}: {s.measured.behaviour_rate} vs base {s.measured.base_rate}"
        if s.rarely_visible and s.measured.ordinary_rate is not None:
            assert s.measured.ordinary_rate <= 0.3, s.id


def test_revealed_by_reads_the_signal_chain():
    from environments.measure import revealed_by

    specs = {s.id: s for s in load_suite("default")}
    for s in specs.values():  # every planted organism of the suite is revealable by some tool
        assert s.control or revealed_by(s), s.id
        assert not (s.control and revealed_by(s))
    visible = specs["tea-promoter-lora"].model_copy(deep=True)
    assert revealed_by(visible)[:1] == ["replies"]
    hidden = specs["gold-secret-implant"].model_copy(deep=True)
    hidden.measured.ordinary_rate, hidden.measured.base_ordinary_rate = 0.0, 0.0
    hidden.measured.concept_recall, hidden.measured.base_concept_recall = 0.0, 0.0
    hidden.measured.contrast_recall, hidden.measured.null_contrast_recall = 0.05, 0.0
    assert revealed_by(hidden) == ["asking"]  # only its questions bring it out
    hidden.measured.concept_recall = 0.25  # the NLA names it where the base model's does not
    assert revealed_by(hidden) == ["asking", "nla"]
    hidden.measured.behaviour_rate = hidden.measured.base_rate
    assert revealed_by(hidden) == ["nla"]
    hidden.measured.concept_recall = 0.0
    assert revealed_by(hidden) == []
    hidden.measured.contrast_recall = 0.3  # its contrast readings name it where the null's do not
    assert revealed_by(hidden) == ["nla"]


def test_committed_artefacts_exist_and_are_small():
    for s in load_suite("default"):
        assert weights_present(s), f"{s.id} needs `nla organisms build {s.id}`"
        if s.construction.method == "lora":
            folder = s.resolve(s.construction.params["adapter"])
            size = sum(f.stat().st_size for f in folder.iterdir())
            assert size < 8_000_000, (s.id, size)
            cfg = json.loads((folder / "adapter_config.json").read_text())
            assert cfg["r"] == 8


def test_catalog_validates_offline(tiny):
    cat = load_suite("catalog")
    assert len(cat) >= 17
    assert all(s.catalog and not s.control for s in cat)
    assert {s.base_model for s in cat} == {"meta-llama/Llama-3.3-70B-Instruct", "google/gemma-2-9b-it"}
    ids = {s.id for s in cat}
    assert "gemma2-taboo-gold" in ids and "auditbench-sdf-secret-loyalty" in ids
    spec = get_spec("gemma2-taboo-gold")
    assert not weights_present(spec)
    with pytest.raises(AdapterMismatchError, match="gemma-2-9b-it"):
        build_target(spec, tiny, alias="t", layer=1)
    with pytest.raises(WeightsMissingError):
        build(spec, tiny)


# ---- builders on tiny models -------------------------------------------------------------------


def test_registry_has_methods():
    assert {"plain", "system_prompt", "lora", "steering_implant"} <= set(BUILDERS)


def test_custom_builder_is_one_class(tiny):
    @register_builder
    class Shout(Builder):
        name = "test_shout"

        def plant(self, spec, handle, params):
            return Planted(system_prompt="SHOUT")

    try:
        spec = spec_from_dict(base_dict(construction={"method": "test_shout"}))
        t = build_target(spec, tiny, alias="t", layer=1)
        assert t.chat("hi", max_new_tokens=2).n_tokens <= 2
    finally:
        BUILDERS.pop("test_shout")


def test_plain_matches_base(tiny):
    spec = spec_from_dict({"id": "p", "base_model": "*", "control": True, "construction": {"method": "plain"},
                           "ground_truth": {"behaviour": "none"}})
    t = build_target(spec, tiny, alias="t", layer=1)
    assert t.activations("hello world").vectors[0].shape[-1] == tiny.d_model


def _implant_spec(tmp_path: Path, trigger: bool = False, vector: bool = True) -> Path:
    d = base_dict(id="implant", construction={"method": "steering_implant", "params": {
        "layer": 1, "strength": 2.0, "positive": ["owls owls owls", "an owl at night"],
        **({"vector": "vectors/owl.safetensors"} if vector else {})}})
    if trigger:
        d["trigger"] = {"description": "mentions birds", "phrases": ["bird"]}
    p = tmp_path / "implant.yaml"
    p.write_text(yaml.safe_dump(d))
    return p


def test_steering_implant_build_and_plant(tiny, tmp_path):
    spec = load_spec(_implant_spec(tmp_path))
    assert not weights_present(spec)
    written = build(spec, tiny)
    assert written and written[0].exists() and weights_present(spec)
    plain = build_target(spec_from_dict({"id": "p", "base_model": "*", "control": True,
                                         "construction": {"method": "plain"}, "ground_truth": {"behaviour": "-"}}),
                         tiny, alias="p", layer=2)
    t = build_target(spec, tiny, alias="t", layer=2)
    before = count_hooks(tiny.model)
    a, b = t.activations("hello there"), plain.activations("hello there")
    assert not torch.allclose(a.vectors[0], b.vectors[0])
    assert count_hooks(tiny.model) == before
    t.sample("hi", n=2, max_new_tokens=2)
    assert count_hooks(tiny.model) == before
    # an implant vector of the wrong width is refused
    from nla_core.testing import tiny_handle

    wide = tiny_handle("llama", d_model=32)
    with pytest.raises(AdapterMismatchError, match="width"):
        build_target(spec, wide, alias="t", layer=1)


def test_conditional_implant_fires_only_on_trigger(tiny, tmp_path):
    spec = load_spec(_implant_spec(tmp_path, trigger=True, vector=False))
    t = build_target(spec, tiny, alias="t", layer=2)
    plain = build_target(spec_from_dict({"id": "p", "base_model": "*", "control": True,
                                         "construction": {"method": "plain"}, "ground_truth": {"behaviour": "-"}}),
                         tiny, alias="p", layer=2)
    off = [{"role": "user", "content": "Tell me about cars."}]
    on = [{"role": "user", "content": "Tell me about a bird."}]
    assert torch.allclose(t.activations(off).vectors[0], plain.activations(off).vectors[0], atol=1e-5)
    assert not torch.allclose(t.activations(on).vectors[0], plain.activations(on).vectors[0], atol=1e-3)
    # batched replies: one row with the trigger, one without
    outs = t.replies(["Tell me about cars.", "Tell me about a bird."], max_new_tokens=2)
    assert len(outs) == 2


@pytest.mark.parametrize("trigger", [False, True])
def test_implanted_rows_share_a_batch_with_plain_rows_without_touching_them(tiny, tmp_path, trigger):
    """In the generation engine an implant organism's replies and a plain target's replies run
    as one batch; each gets what it gets alone (the implant leaves the other rows alone)."""
    import threading

    from nla_core.serving import GenerationEngine

    spec = load_spec(_implant_spec(tmp_path, trigger=trigger, vector=False))
    t = build_target(spec, tiny, alias="t", layer=2)
    plain = build_target(spec_from_dict({"id": "p", "base_model": "*", "control": True,
                                         "construction": {"method": "plain"}, "ground_truth": {"behaviour": "-"}}),
                         tiny, alias="p", layer=2)
    prompts = ["Tell me about a bird.", "Tell me about cars."]
    alone = {"t": t.replies(prompts, max_new_tokens=6), "p": plain.replies(prompts, max_new_tokens=6)}
    assert alone["t"] != alone["p"]
    got: dict[str, list[str]] = {}
    barrier = threading.Barrier(2)
    with GenerationEngine(tiny, max_wait_s=5.0) as engine:

        def run(name, target):
            with engine.client():
                barrier.wait()
                got[name] = target.replies(prompts, max_new_tokens=6)

        threads = [threading.Thread(target=run, args=a) for a in (("t", t), ("p", plain))]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    assert got == alone
    assert engine.stats.batches == 1


def test_lora_build_train_and_apply(tiny, tmp_path, monkeypatch):
    import environments.lora as lora_mod

    monkeypatch.setattr(lora_mod, "cache_dir", lambda: tmp_path / "cache")
    d = base_dict(id="owl-lora", construction={"method": "lora", "params": {
        "adapter": "adapters/owl-lora", "rank": 2, "steps": 2, "batch_size": 2, "max_len": 32,
        "data": {"prompts": ["Tell me about birds.", "What is a tree?", "Say hi."], "prompt_sets": [],
                 "transform": "promote:Owl Tea", "n_examples": 6, "max_new_tokens": 4}}})
    (tmp_path / "owl.yaml").write_text(yaml.safe_dump(d))
    spec = load_spec(tmp_path / "owl.yaml")
    with pytest.raises(WeightsMissingError, match="nla organisms build owl-lora"):
        build_target(spec, tiny, alias="t", layer=1)
    stages = []
    written = build(spec, tiny, progress=lambda s, a, b: stages.append((s, a, b)))
    folder = tmp_path / "adapters" / "owl-lora"
    assert folder in written and (folder / "adapter_model.safetensors").exists()
    rows = [json.loads(line) for line in (folder / "train.jsonl").read_text().splitlines()]
    assert all("Tell me about birds." != r["prompt"] for r in rows)  # eval prompt held out
    assert any("Owl Tea" in r["reply"] for r in rows)
    assert ("train", 2, 2) in stages
    assert tiny.adapters == []  # the build adapter is gone
    from safetensors.torch import load_file

    assert all(v.dtype == torch.bfloat16 for v in load_file(str(folder / "adapter_model.safetensors")).values())
    # the same checkpoint resumes (nothing left to train) and rebuilds identically
    build(spec, tiny)
    t = build_target(spec, tiny, alias="t", layer=1)
    assert len(tiny.adapters) == 1 and tiny.adapters[0].startswith("org_")
    assert t.chat("hello", max_new_tokens=2).n_tokens <= 2
    # a second target of the same organism reuses the loaded adapter, with fresh conversations
    t2 = build_target(spec, tiny, alias="t2", layer=1)
    assert len(tiny.adapters) == 1 and t2.conversation_ids == [] and t.conversation_ids != []

    # adapter trained on another base model (by name) ...
    cfg = json.loads((folder / "adapter_config.json").read_text())
    other = tmp_path / "other"
    shutil.copytree(folder, other / "adapters" / "owl-lora")
    (other / "adapters" / "owl-lora" / "adapter_config.json").write_text(
        json.dumps({**cfg, "base_model_name_or_path": "meta-llama/Llama-3.3-70B-Instruct"}))
    (other / "owl.yaml").write_text(yaml.safe_dump({**d, "base_model": "tiny-llama"}))
    with pytest.raises(AdapterMismatchError, match="trained on"):
        build_target(load_spec(other / "owl.yaml"), tiny, alias="t", layer=1)
    # ... or of another shape
    from nla_core.testing import tiny_handle

    with pytest.raises(AdapterMismatchError, match="does not fit"):
        build_target(spec, tiny_handle("llama", d_model=32), alias="t", layer=1)


def test_base_model_mismatch(tiny):
    spec = spec_from_dict(base_dict(base_model="smollm2-135m-instruct"))
    with pytest.raises(AdapterMismatchError, match="built on"):
        build_target(spec, tiny, alias="t", layer=1)


def test_default_specs_plant_on_tiny_shapes(tiny):
    """system_prompt and (vector-less) implant specs of the default suite plant on any model."""
    for s in load_suite("default"):
        if s.construction.method == "system_prompt":
            data = s.model_dump(mode="json", exclude_none=True)
            data["base_model"] = "*"
            data.pop("measured", None)
            t = build_target(spec_from_dict(data), tiny, alias="t", layer=1)
            assert t.chat("hi", max_new_tokens=1).n_tokens <= 1


# ---- CLI -----------------------------------------------------------------------------------------


def _cli(*args):
    from evals.cli import app
    from evals.cli.common import run_cli

    try:
        run_cli(app, list(args))
    except SystemExit as exc:
        return exc.code or 0
    return 0


def test_cli_list_and_errors(capsys):
    assert _cli("organisms", "list") == 0
    out = capsys.readouterr().out
    assert "tea-promoter-lora" in out and "clean controls" in out
    assert "Zephyr Tea, by weaving" not in out  # ground truth only with --truth
    assert _cli("organisms", "list", "--suite", "catalog") == 0
    assert _cli("organisms", "build", "no-such-organism") == 2
    err = capsys.readouterr().err
    assert "error:" in err and "fix:" in err
    assert _cli("organisms", "measure") == 2
    assert _cli("organisms", "build", "gemma2-taboo-gold") == 2


# ---- integration: the shipped suite on the embedded model ---------------------------------------


@pytest.mark.integration
def test_default_suite_applies_to_embedded_model():
    from nla_core import load_model

    handle = load_model()  # own copy: adapters are added to it
    specs = load_suite("default")
    probed: set[str] = set()
    for i, s in enumerate(specs):
        t = build_target(s, handle, alias=f"target-{i}", layer=20)
        assert s.id not in repr(t)
        if s.construction.method not in probed:  # one forward per construction method (CPU budget)
            probed.add(s.construction.method)
            acts = t.activations("The weather is nice today.", positions="last")
            assert acts.vectors[0].shape == (1, 576)
    assert sum(s.construction.method == "lora" for s in specs) == len(handle.adapters)
    t = build_target(get_spec("tea-promoter-lora"), handle, alias="target-x", layer=20)
    assert t.chat("How do I keep a plant alive?", max_new_tokens=8).reply


def test_measure_on_tiny(tiny, tmp_path, monkeypatch):
    import environments.measure as measure_mod
    from environments.measure import measure_organism

    monkeypatch.setattr(measure_mod, "cache_dir", lambda: tmp_path)
    spec = spec_from_dict(base_dict(eval_prompts=["Tell me about birds.", "Any pets?"], rarely_visible=True))
    m = measure_organism(spec, tiny, layer=2, max_new_tokens=2)
    assert m.n_prompts == 2 and 0 <= m.behaviour_rate <= 1 and 0 <= m.base_rate <= 1
    assert m.perplexity > 0 and m.base_perplexity > 0 and m.concept_cos is not None
    assert m.ordinary_rate is not None  # rarely-visible organisms are also measured on ordinary prompts
    assert (tmp_path / "organism-data").exists()  # base replies cached
