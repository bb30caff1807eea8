"""Does an explanation say what the text is about? Content metrics beside FVE.

* **Topic recall**: the share of explanations that name their document's topic. A topic is
  named when a word of the explanation matches one of the topic's terms (WordNet lemmas of the
  topic's synset) after Snowball stemming; one stem may also be a prefix of the other when the
  shorter has at least 5 letters ("volcanic" names "volcano"). A term that occurs among the
  last `TAIL_TOKENS` tokens of the context does not count: saying a word the text just said
  reads the current token, not the topic.
* **Placebo**: the same score with each explanation matched against another document's topic
  (the next row with a different topic). It is what a verbalizer that names frequent topics
  regardless of the activation would score.
* **Distinct rate**: the share of distinct explanations (1.0: no two alike; low: a template).
* **Centred FVE**: FVE after subtracting the training mean from prediction and target and
  renormalising, so a shared direction (anisotropy) cannot inflate it.
* **Topic probe**: how much of the topic a *linear* read of the activation carries for topics
  never seen in training: ridge regression from the (centred) activation to the topic word's
  input embedding, fitted on training topics, then each held-out activation ranks the held-out
  topics by cosine. Top-1 / top-10 far below 1 mean the layer carries the topic weakly at these
  positions, which bounds what any verbalizer can name.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import snowballstemmer
import torch

from .metrics import mean_baseline, normalize, normalized_mse

__all__ = ["TAIL_TOKENS", "stems", "names_topic", "topic_recall", "placebo_terms", "distinct_rate", "centred_fve",
           "topic_probe"]

TAIL_TOKENS = 8
_WORD = re.compile(r"[A-Za-z]+")
_STEMMER = snowballstemmer.stemmer("english")


def stems(text: str) -> set[str]:
    return set(_STEMMER.stemWords([w.lower() for w in _WORD.findall(text)]))


def _match(a: str, b: str) -> bool:
    if a == b:
        return True
    short, long_ = sorted((a, b), key=len)
    return len(short) >= 5 and long_.startswith(short)


def names_topic(explanation: str, terms: Sequence[str], tail: str = "") -> bool:
    """Whether `explanation` names one of `terms`, not counting terms that occur in `tail` (the
    last few tokens of the context)."""
    said = stems(explanation)
    recent = stems(tail)
    for term in terms:
        t = _STEMMER.stemWord(term.lower())
        if any(_match(t, r) for r in recent):
            continue
        if any(_match(t, s) for s in said):
            return True
    return False


def topic_recall(explanations: Sequence[str], terms: Sequence[Sequence[str]], tails: Sequence[str]) -> float | None:
    """Share of explanations that name their topic (see the module doc); None without rows."""
    if not explanations:
        return None
    hits = sum(names_topic(e, t, tail) for e, t, tail in zip(explanations, terms, tails))
    return hits / len(explanations)


def placebo_terms(topics: Sequence[str], terms: Sequence[Sequence[str]]) -> list[Sequence[str]]:
    """For each row, the terms of the next row (cyclically) whose topic differs. Rows come
    grouped by document, so this pairs each explanation with another document's topic."""
    n = len(topics)
    out = []
    for i in range(n):
        j = next(((i + k) % n for k in range(1, n) if topics[(i + k) % n] != topics[i]), None)
        out.append(terms[j] if j is not None else ())
    return out


def distinct_rate(texts: Sequence[str]) -> float | None:
    if not texts:
        return None
    return len({" ".join(t.lower().split()) for t in texts}) / len(texts)


def centred_fve(pred: torch.Tensor, gold: torch.Tensor, mean: torch.Tensor) -> float:
    """FVE of `pred` for `gold` after both are normalised, centred on `mean` (the normalised
    training mean) and renormalised; the baseline predicts the centred rows' own mean."""
    mu = mean.float()
    p = normalize(normalize(pred.float()) - mu)
    g = normalize(normalize(gold.float()) - mu)
    return 1.0 - float(normalized_mse(p, g).mean()) / mean_baseline(g)


def topic_probe(train: torch.Tensor, train_targets: torch.Tensor, held: torch.Tensor, held_topics: Sequence[str],
                topic_targets: dict[str, torch.Tensor], mean: torch.Tensor, ridge: float = 10.0) -> dict:
    """Ridge map from centred, normalised activations `train` [n, d] to `train_targets` [n, e]
    (each row's topic word embedding), then held-out retrieval: each row of `held` ranks the
    topics of `topic_targets` (the held-out ones) by cosine with its prediction. Chance top-1
    is 1 / len(topic_targets)."""
    mu = mean.float()
    x = normalize(train.float()) - mu
    y_mean = train_targets.float().mean(0)
    w = torch.linalg.solve(x.T @ x + ridge * len(x) / 100 * torch.eye(x.shape[1]), x.T @ (train_targets.float() - y_mean))
    pred = torch.nn.functional.normalize((normalize(held.float()) - mu) @ w, dim=-1)
    names = sorted(topic_targets)
    cands = torch.nn.functional.normalize(torch.stack([topic_targets[t] for t in names]).float() - y_mean, dim=-1)
    sims = pred @ cands.T  # [m, topics]
    own = torch.as_tensor([names.index(t) for t in held_topics])
    rank = (sims > sims[torch.arange(len(own)), own][:, None]).sum(1).float()
    return {"top1": float((rank == 0).float().mean()), "top10": float((rank < 10).float().mean()),
            "median_rank": float(rank.median()), "n_topics": len(names), "n_rows": len(own)}
