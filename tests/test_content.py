"""Content of explanations: the topic metric and its placebo, distinct rate, centred FVE, the
contrastive reward, the WordNet topic corpus (a tiny wndb-format fixture), topic-aware
summaries and positions, and the whole tiny pipeline reporting the held-out content keys."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from nla_core.content import (
    centred_fve,
    distinct_rate,
    names_topic,
    placebo_terms,
    strip_tail_words,
    topic_probe,
    topic_recall,
    topic_retrieval,
)
from nla_core.errors import NLAError
from nla_core.training import OfflineSummarizer, Run, preset
from nla_core.training.grpo import contrastive_logprob
from nla_core.training.topics import WordNet, topic_document_ids, topic_documents, wordnet_dir

WN_FIXTURE = Path(__file__).parent / "fixtures" / "wordnet"


# ---- the topic metric ---------------------------------------------------------------------


def test_names_topic_by_stem_and_not_from_the_tail():
    assert names_topic("Topic: volcanoes and eruptions.", ["volcano"])
    assert names_topic("a volcanic landscape", ["volcano"])  # stem prefix, 6 letters
    assert not names_topic("Topic: mountains.", ["volcano"])
    assert not names_topic("the vole ran", ["volcano"])  # "vole" is no prefix of the stem
    assert names_topic("about dogs", ["dog", "domestic"])
    # a word the text just said reads the current token, not the topic
    assert not names_topic("Topic: volcano.", ["volcano"], tail=" the old volcano")
    assert names_topic("Topic: volcano.", ["volcano"], tail=" people fled from the ash.")


def test_topic_recall_and_placebo_pairing():
    topics = ["volcano", "volcano", "dog", "bread"]
    terms = [["volcano"], ["volcano"], ["dog"], ["bread"]]
    expl = ["lava and a volcano", "volcano", "a dog barks", "cheese"]
    assert topic_recall(expl, terms, [""] * 4) == 0.75
    placebo = placebo_terms(topics, terms)
    # every row is paired with another topic, cyclically
    assert [p[0] for p in placebo] == ["dog", "dog", "bread", "volcano"]
    assert topic_recall(expl, placebo, [""] * 4) == 0.0
    assert topic_recall([], [], []) is None
    assert placebo_terms(["a", "a"], [["a"], ["a"]]) == [(), ()]  # nothing else to pair with


def test_strip_tail_words_drops_what_the_text_just_said():
    assert strip_tail_words("Topic: volcanoes, lava and ash", "the volcano") == "Topic: lava and ash"
    assert strip_tail_words("lava and ash", "") == "lava and ash"


def test_topic_retrieval_with_the_shipped_embedder_ranks_the_own_topic_first():
    from nla_core.sentence import get_embedder

    topics = ["volcano", "volcano", "cat", "violin", "bread"]
    terms = [["volcano"], ["volcano"], ["cat", "true cat"], ["violin", "fiddle"], ["bread", "breadstuff"]]
    said = ["lava and ash pour from an erupting mountain", "molten rock, eruption",
            "a purring kitten on the sofa", "a string instrument played with a bow", "a loaf baked from flour"]
    r = topic_retrieval(said, topics, terms, [""] * 5, get_embedder())
    assert r["top1"] == 1.0 and r["n_topics"] == 4
    assert r["placebo_top1"] == 0.0  # another document's topic never comes first


def test_distinct_rate_counts_templates():
    assert distinct_rate(["a b", "A  b", "c"]) == pytest.approx(2 / 3)
    assert distinct_rate([]) is None


def test_centred_fve_is_not_inflated_by_a_shared_direction():
    torch.manual_seed(0)
    d = 64
    shared = torch.randn(d) * 10
    gold = shared + torch.randn(200, d)
    unrelated = shared + torch.randn(200, d)
    mean = torch.nn.functional.normalize(gold, dim=-1).mul(d ** 0.5).mean(0)
    assert centred_fve(gold, gold, mean) == pytest.approx(1.0, abs=1e-5)
    # raw cosine is high (the shared direction) but the centred figure sees no information
    assert torch.nn.functional.cosine_similarity(unrelated, gold).mean() > 0.9
    assert centred_fve(unrelated, gold, mean) < 0.05


def test_topic_probe_finds_a_linear_topic_code_and_not_noise():
    torch.manual_seed(0)
    d, e = 32, 16
    names = [f"t{i}" for i in range(60)]
    emb = {t: torch.randn(e) for t in names}
    mix = torch.randn(e, d)
    train_t, held_t = names[:40] * 10, names[40:] * 3  # held-out topics never seen in the fit

    def acts(ts, signal):
        return torch.stack([signal * emb[t] @ mix + torch.randn(d) for t in ts])

    mean = torch.zeros(d)
    held_targets = {t: emb[t] for t in names[40:]}
    good = topic_probe(acts(train_t, 3.0), torch.stack([emb[t] for t in train_t]), acts(held_t, 3.0), held_t, held_targets, mean)
    assert good["top1"] > 0.8 and good["n_topics"] == 20 and good["n_rows"] == 60
    noise = topic_probe(acts(train_t, 0.0), torch.stack([emb[t] for t in train_t]), acts(held_t, 0.0), held_t, held_targets, mean)
    assert noise["top1"] < 0.2 and noise["median_rank"] > 3


def test_contrastive_logprob_prefers_the_own_activation():
    torch.manual_seed(0)
    cands = torch.randn(6, 16)
    pred = cands[[2, 4]] + 0.01 * torch.randn(2, 16)
    right = contrastive_logprob(pred, torch.tensor([2, 4]), cands, 0.1)
    wrong = contrastive_logprob(pred, torch.tensor([0, 1]), cands, 0.1)
    assert right.shape == (2,) and (right > wrong).all()
    assert (right <= 0).all() and right.exp().gt(0.9).all()


# ---- the WordNet topic corpus -------------------------------------------------------------


def test_wordnet_topics_from_the_fixture():
    wn = WordNet(WN_FIXTURE)
    topics = dict(wn.topics())
    # tagged, one-word, concrete lemmas of 4+ letters only: no attribute ("size"), no untagged
    # lemma ("stratovolcano"), no short word ("dog")
    assert set(topics) == {"bread", "canine", "lamp", "mountain", "volcano"}
    v = topics["volcano"]
    assert v.definition == "a mountain formed by volcanic material"
    assert v.examples == ["the volcano erupted at dawn"]
    assert wn.name(v.related(("@",))[0]) == "mountain"


def test_topic_documents_one_per_topic_with_terms(tmp_path):
    wn = WordNet(WN_FIXTURE)
    docs = topic_documents(10, seed=3, wordnet=wn)
    assert len(docs) == 5 and len({d.doc_id for d in docs}) == 5
    by_topic = {d.meta["topic"]: d for d in docs}
    v = by_topic["volcano"]
    assert v.meta["topic_terms"] == ["volcano"] and v.meta["category"] == "mountain"
    text = v.text if not v.is_chat else v.messages[-1]["content"]
    assert "volcanic material" in text and "mountain" in text and "Stratovolcano" in text
    assert by_topic["bread"].meta["topic_terms"] == ["bread", "breadstuff"]
    assert any(d.is_chat for d in docs) and any(not d.is_chat for d in docs)
    assert topic_documents(0, wordnet=wn) == []
    assert [d.doc_id for d in topic_documents(3, seed=1, wordnet=wn)] == [d.doc_id for d in topic_documents(3, seed=1, wordnet=wn)]
    for n, seed in ((3, 1), (10, 3), (0, 0)):  # which topics a corpus holds, without writing it
        assert topic_document_ids(n, seed=seed, wordnet=wn) == {d.doc_id for d in topic_documents(n, seed=seed, wordnet=wn)}


def test_missing_wordnet_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("NLA_AUDIT_WORDNET", str(tmp_path))
    with pytest.raises(NLAError) as err:
        wordnet_dir()
    assert "wordnet-base" in err.value.fix


def test_summaries_name_a_known_topic_first_and_keep_it():
    s = OfflineSummarizer(max_words=12)
    row = {"context": "A volcano is a mountain. Kinds of volcano include many shapes of rock and ash clouds",
           "token": " clouds", "role": "", "genre": "encyclopedia", "next_tokens": [" and", "."],
           "topic": "volcano", "category": "mountain"}
    out = s.summarize_one(row)
    assert out.startswith("Topic: volcano, a kind of mountain.")
    assert len(out.split()) <= 12 and out.endswith("clouds")
    plain = s.summarize_one({**row, "topic": ""})
    assert "a kind of" not in plain


# ---- the pipeline with topics -------------------------------------------------------------


def cfg_layer(run) -> int:
    import yaml

    return yaml.safe_load((run.data_dir / "dataset.yaml").read_text())["layer"]


def test_pipeline_with_topics_reports_content(tiny, tmp_path, monkeypatch):
    from nla_core.training import build_data, evaluate, train_ar_warmstart, train_av_warmstart, train_rl
    from nla_core.training.dataset import ActivationDataset
    from nla_core.training.ship import ship_checkpoint

    monkeypatch.setenv("NLA_AUDIT_WORDNET", str(WN_FIXTURE))
    cfg = preset("tiny")
    cfg.model = "tiny-llama"
    cfg.corpus.n_topics = 5
    cfg.corpus.n_chats = 2
    cfg.corpus.include_shipped_texts = False
    cfg.corpus.skip_first = 2
    cfg.corpus.splits = {"ar_warm": 0.34, "av_warm": 0.17, "rl": 0.17, "heldout": 0.32}
    cfg.rl.contrastive_weight = 0.5
    cfg.rl.contrastive_negatives = 4
    run = Run.open(tmp_path / "run", cfg)
    build_data(run, tiny, progress=False)
    ds = ActivationDataset.load(run.data_dir)
    topic_rows = [r for r in ds.table.drop(["vector"]).to_pylist() if r["topic"]]
    assert topic_rows
    for r in topic_rows:
        # sampled only where the topic has been named
        assert any(t in r["context"].lower() for t in r["topic_terms"]), r
    held = {r["topic"] for r in ds.split("heldout").rows if r["topic"]}
    train = {r["topic"] for s in ("ar_warm", "av_warm", "rl") for r in ds.split(s).rows if r["topic"]}
    assert held and not held & train  # whole topics held out
    train_ar_warmstart(run, tiny, progress=False)
    train_av_warmstart(run, tiny, progress=False)
    rl = train_rl(run, tiny, progress=False)
    assert rl["step"] == cfg.rl.steps
    steps = [r for r in run.log("rl").read() if r.get("event") == "step"]
    assert all(r["nce"] is None or (math.isfinite(r["nce"]) and r["nce"] <= 0) for r in steps)
    rep = evaluate(run, tiny, stage="rl", progress=False)
    for key in ("round_trip_fve_centred", "topic_recall", "topic_recall_placebo", "distinct_rate", "collapse_gap"):
        assert rep[key] is not None and math.isfinite(rep[key]), key
    if rep["n_topics"] >= 2:
        assert 0 <= rep["topic_retrieval"]["top10"] <= 1 and rep["topic_retrieval"]["n_topics"] == rep["n_topics"]
    assert rep["notes"] == []
    assert 1 <= rep["n_topics"] <= len(held)
    rows = [json.loads(x) for x in (run.root / "eval_rl_rows.jsonl").read_text().splitlines()]
    assert len(rows) == rep["n_heldout"] and rows[0]["explanation"] == rep["examples"][0]["explanation"]
    # --unseen-by: only held-out topics another corpus lacks; the run's own corpus has them all
    with pytest.raises(NLAError, match="unseen"):
        evaluate(run, tiny, stage="rl", progress=False, unseen_by=run.root)
    smaller = cfg.model_copy(deep=True)
    smaller.corpus.n_topics = 2
    (tmp_path / "small").mkdir()
    (tmp_path / "small" / "config.yaml").write_text(smaller.to_yaml())
    seen = topic_document_ids(2, seed=cfg.seed)
    assert {r["doc_id"] for r in rows if r["topic"]} - seen  # the seeds give the smaller corpus other topics
    sub = evaluate(run, tiny, stage="rl", progress=False, unseen_by=tmp_path / "small")
    sub_rows = [json.loads(x) for x in (run.root / "eval_rl_unseen_by_small_rows.jsonl").read_text().splitlines()]
    assert sub_rows and all(r["topic"] and r["doc_id"] not in seen for r in sub_rows)
    assert sub["n_heldout"] == len(sub_rows) < len(rows) and sub["unseen_by"] == str(tmp_path / "small")
    out = ship_checkpoint(run, run.final("rl"), tmp_path / "ckpt", handle=tiny)
    from nla_core.reference import load_reference_explanations, reference_activations

    ref = load_reference_explanations(out)
    assert len(ref) == reference_activations(tiny, cfg_layer(run)).shape[0] == 192
    assert len(load_reference_explanations(out, contrast=True)) == 192  # and the contrast readings' null
    heldout = json.loads((out / "training_report.json").read_text())["heldout"]
    assert {"fve", "fve_centred", "topic_recall", "topic_recall_placebo", "distinct_rate"} <= set(heldout)
    assert heldout["fve"] == rep["round_trip_fve"]
    # shipping an earlier stage records that stage's figures, not the latest stage's; without the
    # sentence-embedding wheel, topic retrieval is left out and the report says why
    import nla_core.training.evaluation as evaluation

    def no_wheel():
        raise NLAError("The sentence-embedding wheel is not installed.", "install it.")

    monkeypatch.setattr(evaluation, "get_embedder", no_wheel)
    warm = evaluate(run, tiny, stage="av_warmstart", progress=False)
    assert warm["topic_retrieval"] is None and warm["topic_recall"] is not None
    assert len(warm["notes"]) == 1 and "topic_retrieval left out" in warm["notes"][0] and "not installed" in warm["notes"][0]
    out = ship_checkpoint(run, run.final("av_warmstart"), tmp_path / "ckpt-warm")
    assert json.loads((out / "training_report.json").read_text())["heldout"]["fve"] == warm["round_trip_fve"]


def test_surprising_terms_rank_what_the_reference_rarely_says():
    from nla_core.content import surprising_terms

    reference = [f"Topic: cooking, a kind of food. Next: the {w}" for w in ("pan", "oven", "salt", "dough")] * 10
    ours = ["Topic: ocean waves and the sea", "the ocean, tides", "Topic: cooking fish by the ocean",
            "Topic: cooking, a kind of food"]
    top = surprising_terms(ours, reference)
    assert top and top[0]["term"] == "ocean" and top[0]["count"] == 3
    assert all(t["stem"] not in ("cook", "food") for t in top)  # the reference says them as often
    assert surprising_terms([], reference) == []
    # nothing is surprising about the reference itself
    assert surprising_terms(reference[:8], reference) == []
    # equal z-scores come in stem order, whatever the order of the words (set order varies by process)
    tied = surprising_terms(["zebra yak", "yak zebra", "apple"], reference)
    assert [t["term"] for t in tied] == ["yak", "zebra"]
    assert surprising_terms(["yak zebra", "zebra yak"], reference) == surprising_terms(["zebra yak", "yak zebra"],
                                                                                         reference)


def test_stems_are_right_when_threads_stem_at_once():
    # Audits call `themes` from several threads; one shared snowball stemmer corrupted stems
    # and raised IndexError (seen in a benchmark run).
    import sys
    import threading

    from nla_core.content import stems

    text = "relaxation memorable vacationing generously organisations happily running " * 20
    want = stems(text)
    failures: list[object] = []

    def work():
        for _ in range(100):
            try:
                if stems(text) != want:
                    failures.append("wrong stems")
            except Exception as e:  # noqa: BLE001  # the failure the test exists to catch
                failures.append(e)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads often, so a shared stemmer would be hit mid-word
    try:
        threads = [threading.Thread(target=work) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    assert want == {"relax", "memor", "vacat", "generous", "organis", "happili", "run"}
    assert failures == []


def test_probe_layers_reports_every_other_block(tiny, monkeypatch):
    from nla_core.training.layer_probe import probe_layers

    monkeypatch.setenv("NLA_AUDIT_WORDNET", str(WN_FIXTURE))
    figs = probe_layers(tiny, n_topics=12, positions=2, max_tokens=64, held_share=0.5, every=2)
    assert list(figs) == list(range(0, tiny.n_layers - 1, 2))
    for v in figs.values():
        assert 0 <= v["top1"] <= v["top10"] <= 1 and v["n_topics"] >= 2
