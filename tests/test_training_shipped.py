"""The NLA shipped for the embedded model loads on it and verbalizes with the tag."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.integration


def test_shipped_checkpoint_loads_and_verbalizes():
    from nla_core import NLA, default_checkpoint, load_model, read_activations
    from nla_core.checkpoint import read_meta

    folder = default_checkpoint()
    assert folder is not None, "no NLA checkpoint is shipped under nla_core/checkpoints/"
    meta = read_meta(folder)
    assert meta.trained and meta.layer == 24 and meta.d_model == 576
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    assert size < 12e6, f"shipped checkpoint is {size / 1e6:.1f} MB"
    assert (folder / "training_report.json").exists() and (folder / "stats.safetensors").exists()

    handle = load_model()  # a fresh handle: the session fixture stays adapter-free
    nla = NLA.load(folder, handle)
    assert nla.trained and nla.mean is not None
    acts = read_activations(handle, ["The recipe needs two cups of flour and a pinch of salt."], nla.layer, positions=[-2])
    v = acts.stacked()
    out = nla.verbalize(v, max_new_tokens=64)
    assert out[0].has_tag, out[0].raw
    assert out[0].text.strip()
    rec = nla.reconstruct([out[0].text])
    assert rec.shape == (1, 576) and torch.isfinite(rec).all()


def test_shipped_report_records_content_figures():
    import json

    from nla_core import default_checkpoint

    heldout = json.loads((default_checkpoint() / "training_report.json").read_text())["heldout"]
    for key in ("fve", "fve_centred", "topic_recall", "topic_recall_placebo", "distinct_rate"):
        assert isinstance(heldout[key], float), key
    assert 0.0 <= heldout["topic_recall"] <= 1.0 and 0.0 <= heldout["topic_recall_placebo"] <= 1.0
    assert heldout["n"] >= 256 and heldout["topic_probe"]["n_topics"] >= 100
    # the shipped NLA names unseen topics well above its placebo, and ships its reference set
    assert heldout["topic_recall"] >= 5 * max(heldout["topic_recall_placebo"], 0.004)
    assert heldout["topic_retrieval"]["top10"] > 3 * heldout["topic_retrieval"]["placebo_top10"]
    from nla_core.reference import load_reference_explanations

    assert len(load_reference_explanations(default_checkpoint())) == 192
    contrast = load_reference_explanations(default_checkpoint(), contrast=True)
    assert len(contrast) == 192 and len(set(contrast)) > 150  # explanations of arbitrary changes, not one template


def test_a_contrast_reading_names_what_an_implant_adds_and_its_null_does_not():
    """The implant adds a "gold" direction at block 8 that ordinary replies never show (its
    behaviour needs a direct question); the shipped NLA reading its difference from the base
    model at block 24 names it, and the null (the base activation moved along an arbitrary
    difference of the same size) does not. `nla organisms measure` records 38% vs 0%."""
    from environments import get_spec
    from environments.measure import measure_contrast_recall
    from nla_core import load_model, load_nla_for

    handle = load_model()  # a fresh handle: the organism's and the NLA's adapters go on it
    rec, null, n = measure_contrast_recall(get_spec("gold-secret-implant"), handle, load_nla_for(handle))
    assert n >= 40 and null is not None
    assert rec >= 0.15 and rec >= null + 0.1, (rec, null)
