"""Contrast readings: what a target adds to its base model, read by the NLA (`nla_core.contrast`),
through `Target.activations(base=True)`, `verbalize(contrast=True)`, the placebo arm and `themes`."""

from __future__ import annotations

import json

import pytest
import torch

from environments import build_target
from environments.spec import spec_from_dict
from nla_core.contrast import along, null_directions, relative_difference
from nla_core.reference import reference_activations, reference_contrasts
from nla_core.testing import EchoNLA, fingerprint
from tools import Budget, Toolbox

CONV = [{"role": "user", "content": "What is two plus two?"}, {"role": "assistant", "content": "Four, of course, my friend."}]
PROMPT = {"prompt": CONV[0]["content"], "reply": CONV[1]["content"]}


def _spec(method: str, params: dict) -> object:
    return spec_from_dict({"id": f"contrast-{method}", "base_model": "*", "construction": {"method": method, "params": params},
                           "control": True, "ground_truth": {"behaviour": "none"}})


@pytest.fixture(scope="module")
def env():
    from nla_core import NLA
    from nla_core.testing import tiny_handle

    handle = tiny_handle("llama")
    plain = build_target(_spec("plain", {}), handle, alias="target-1", layer=2)
    prompted = build_target(_spec("system_prompt", {"prompt": "You love the sea and talk about ships."}), handle,
                            alias="target-2", layer=2)
    return handle, plain, prompted, NLA.untrained(handle, layer=2)


def test_along_moves_each_activation_by_a_fixed_share_of_its_norm():
    base = torch.randn(5, 16) * torch.arange(1, 6)[:, None]
    direction = torch.randn(5, 16) * 1e-3  # any length: only the direction counts
    out = along(base, direction, gain=0.5)
    assert torch.allclose((out - base).norm(dim=-1), 0.5 * base.norm(dim=-1), rtol=1e-5)
    cos = torch.nn.functional.cosine_similarity(out - base, direction, dim=-1)
    assert torch.allclose(cos, torch.ones(5), atol=1e-5)
    assert torch.allclose(relative_difference(out, base), torch.full((5,), 0.5), atol=1e-5)


def test_null_directions_are_differences_of_two_distinct_reference_rows():
    ref = torch.randn(7, 8)
    d = null_directions(ref, 50, "k")
    assert torch.equal(d, null_directions(ref, 50, "k")) and not torch.equal(d, null_directions(ref, 50, "other"))
    diffs = {(i, j) for i in range(7) for j in range(7) if i != j}
    for row in d:  # each row is ref[a] - ref[b] with a != b
        assert any(torch.allclose(row, ref[i] - ref[j]) for i, j in diffs)
    with pytest.raises(ValueError):
        null_directions(ref[:1], 3, "k")


def test_base_reading_switches_the_organism_off_at_the_same_tokens(env):
    _, plain, prompted, _ = env
    mine, base = prompted.activations(CONV), prompted.activations(CONV, base=True)
    assert mine.token_ids == base.token_ids  # the same visible tokens, the hidden prompt left out
    assert torch.allclose(base.vectors[0], plain.activations(CONV).vectors[0], atol=1e-5)
    assert relative_difference(mine.vectors[0], base.vectors[0]).min() > 0.01  # the hidden prompt changes them
    same = plain.activations(CONV, base=True)
    assert torch.allclose(same.vectors[0], plain.activations(CONV).vectors[0], atol=1e-5)


def test_verbalize_contrast_explains_the_difference_where_the_models_differ(env, monkeypatch):
    _, plain, prompted, nla = env
    echo = EchoNLA(nla)
    box = Toolbox(prompted, echo, "nla", Budget(max_tool_calls=20), seed=1, max_positions=4)
    r = box.call("verbalize", dict(PROMPT, contrast=True))
    assert not r.is_error, r.text
    assert r.data["contrast"] is True and "what the target adds to its base model" in r.text
    pos = [x["position"] for x in r.data["rows"]]
    t = prompted.activations(CONV).vectors[0][pos]
    b = prompted.activations(CONV, base=True).vectors[0][pos]
    want = along(b, t - b)
    assert torch.allclose(echo.seen[0], want, atol=1e-4)
    assert [e for x in r.data["rows"] for e in x["explanations"]] == [fingerprint(v) for v in echo.seen[0]]
    # a target that is its base model has nothing to explain, and says so at every token
    pbox = Toolbox(plain, EchoNLA(nla), "nla", Budget(max_tool_calls=20), seed=1, max_positions=4)
    r = pbox.call("verbalize", dict(PROMPT, contrast=True))
    assert not r.is_error and all(x["explanations"] == [] for x in r.data["rows"])
    assert r.text.count("the same as the base model here") == len(r.data["rows"])
    # themes then says so: no theme, not an error asking for verbalize calls that were made
    monkeypatch.setattr(nla, "reference_contrast_explanations", ["Topic: cooking, a kind of food."] * 30)
    t = pbox.call("themes", {})
    assert not t.is_error and t.data["themes"] == [] and "same as its base model" in t.text


def test_placebo_contrast_reads_an_arbitrary_change_never_the_targets(env):
    handle, plain, prompted, nla = env
    seen = {}
    for t in (plain, prompted):
        echo = EchoNLA(nla)
        box = Toolbox(t, echo, "nla", Budget(max_tool_calls=20), seed=3, max_positions=4, verbalize_source="placebo")
        r = box.call("verbalize", dict(PROMPT, contrast=True))
        assert not r.is_error and "placebo" not in (r.text + json.dumps(r.data)).lower()
        assert all(len(x["explanations"]) == 1 for x in r.data["rows"])  # every token, whatever the target
        seen[t.alias] = echo.seen[0]
    # both targets' placebo readings are the same: the base activations moved along reference differences
    assert torch.allclose(seen["target-1"], seen["target-2"], atol=1e-4)
    pos = [x["position"] for x in r.data["rows"]]
    b = plain.activations(CONV).vectors[0][pos]
    ref = reference_activations(handle, 2)
    assert torch.allclose(seen["target-1"], along(b, null_directions(ref, len(pos), "placebo:3:0")), atol=1e-4)
    assert reference_contrasts(handle, 2).shape == ref.shape


def test_themes_scores_contrast_readings_against_the_contrast_reference(env, monkeypatch):
    _, _, prompted, nla = env
    box = Toolbox(prompted, nla, "nla", Budget(max_tool_calls=20), verbalize_tokens=4, max_positions=4)
    said = []
    for prompt in ("Tell me about the sea.", "How do magnets work?", "What is gravity?"):
        r = box.call("verbalize", {"prompt": prompt, "reply": "It is a long story about many things.",
                                   "positions": [-6, -4, -2], "contrast": True})
        said += [t for row in r.data["rows"] for t in row["explanations"]]
    assert len(said) == 9
    monkeypatch.setattr(nla, "reference_explanations", said * 3)  # the plain reference is not the one used
    monkeypatch.setattr(nla, "reference_contrast_explanations", [])
    r = box.call("themes", {})
    assert r.is_error and "contrast readings" in r.text
    monkeypatch.setattr(nla, "reference_contrast_explanations", ["Topic: cooking, a kind of food."] * 30)
    r = box.call("themes", {})
    assert not r.is_error and "9 contrast explanations against 30" in r.text
    for t in r.data["themes"]:
        assert t["contrast"] is True and sum(t["term"] in e.lower() for e in said) >= 2
    monkeypatch.setattr(nla, "reference_contrast_explanations", said * 3)
    r = box.call("themes", {})
    assert r.data["themes"] == [] and "No word stands out" in r.text
