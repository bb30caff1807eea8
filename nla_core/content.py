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
* **Topic retrieval** (semantic, finer than recall): each explanation, with the words it shares
  with the last `TAIL_TOKENS` tokens removed, is embedded with the shipped sentence model
  (`sentence.py`) and ranks every held-out topic (its terms) by cosine; top-1 / top-10 is how
  often its own topic comes first / among the first ten. The placebo ranks another document's
  topic for the same explanation; chance top-10 is 10 / number of topics. It credits "lava,
  eruption" for *volcano*, which recall does not.
* **Topic probe**: how much of the topic a *linear* read of the activation carries for topics
  never seen in training: ridge regression from the (centred) activation to the topic word's
  input embedding, fitted on training topics, then each held-out activation ranks the held-out
  topics by cosine. Top-1 / top-10 far below 1 mean the layer carries the topic weakly at these
  positions, which bounds what any verbalizer can name.
"""

from __future__ import annotations

import math
import re
import threading
from collections import Counter, defaultdict
from collections.abc import Sequence
from typing import Any

import snowballstemmer
import torch

from .metrics import mean_baseline, normalize, normalized_mse

__all__ = ["TAIL_TOKENS", "stem", "stems", "stems_match", "names_topic", "topic_recall", "placebo_terms", "distinct_rate",
           "centred_fve", "topic_probe", "topic_word_embeddings", "strip_tail_words", "topic_retrieval", "surprising_terms"]

TAIL_TOKENS = 8
_WORD = re.compile(r"[A-Za-z]+")
# A snowball stemmer keeps its cursor in the object, so threads that share one corrupt each
# other's stems (audits call `themes` from several threads at once): one stemmer per thread.
_STEMMERS = threading.local()


def stem(word: str) -> str:
    """The English snowball stem of `word` (lower-cased)."""
    stemmer = getattr(_STEMMERS, "english", None)
    if stemmer is None:
        stemmer = _STEMMERS.english = snowballstemmer.stemmer("english")
    return stemmer.stemWord(word.lower())


def stems(text: str) -> set[str]:
    return {stem(w) for w in _WORD.findall(text)}


def stems_match(a: str, b: str) -> bool:
    """Two stems name the same word: equal, or the shorter (5 letters or more) begins the longer
    ("volcan" and "volcano", "loyal" and "loyalti"; not "vole" and "volcano")."""
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
        t = stem(term)
        if any(stems_match(t, r) for r in recent):
            continue
        if any(stems_match(t, s) for s in said):
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


def strip_tail_words(explanation: str, tail: str) -> str:
    """`explanation` without the words whose stem occurs in `tail` (what the text just said)."""
    recent = stems(tail)
    return " ".join(w for w in explanation.split()
                    if not any(stems_match(st, r) for st in stems(w) for r in recent))


def topic_retrieval(explanations: Sequence[str], topics: Sequence[str], terms: Sequence[Sequence[str]],
                    tails: Sequence[str], embed) -> dict | None:
    """Semantic topic retrieval (see the module doc). `embed(texts)` -> [n, e] unit vectors.
    Rows are grouped by document (the placebo pairs each row with the next other topic)."""
    if len(set(topics)) < 2:
        return None
    names = sorted(set(topics))
    term_of = {t: ts for t, ts in zip(topics, terms)}
    cands = embed([", ".join(term_of[t]) or t for t in names])  # [k, e]
    said = embed([strip_tail_words(e, tail) or "nothing" for e, tail in zip(explanations, tails)])  # [n, e]
    sims = said @ cands.T  # [n, k]
    placebo = [names.index(ts[0]) if ts else 0 for ts in placebo_terms(topics, [[t] for t in topics])]

    def ranks(idx: list[int]) -> torch.Tensor:
        own = sims[torch.arange(len(idx)), torch.as_tensor(idx)][:, None]
        return (sims > own).sum(1).float()

    r, p = ranks([names.index(t) for t in topics]), ranks(placebo)
    return {"top1": float((r == 0).float().mean()), "top10": float((r < 10).float().mean()),
            "placebo_top1": float((p == 0).float().mean()), "placebo_top10": float((p < 10).float().mean()),
            "chance_top10": min(1.0, 10 / len(names)), "n_topics": len(names), "n_rows": len(topics)}


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


def topic_word_embeddings(embedding: torch.Tensor, tokenizer, topics) -> dict[str, torch.Tensor]:
    """The topic probe's target for each topic: the mean input embedding ([vocab, d] `embedding`)
    of the tokens of " topic"."""
    return {t: embedding[tokenizer.encode(" " + t, add_special_tokens=False)].float().mean(0) for t in set(topics)}


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


_STOP = frozenset("""the a an and or of to in on at for with from by as is are was were be been it its this that
these those what which who whom whose there their they them he she his her you your we our i me my not no
but if then than so such can could would should will shall may might must do does did done has have had
about into over under after before next word words topic kind text answer explanation more most some any""".split())


def surprising_terms(explanations: Sequence[str], reference: Sequence[str], *, k: int = 10, min_count: int = 2,
                     min_z: float = 2.0, prior: float = 0.5) -> list[dict]:
    """Words the NLA says about `explanations` far more often than about `reference` (its
    explanations of the base model's replies to everyday prompts): the log-odds ratio of each word stem's
    per-explanation presence, both rates smoothed by `prior`, divided by its standard error (a
    z-score). Returns up to `k` stems with z >= `min_z` seen in >= `min_count` explanations,
    most surprising first (ties in stem order), each with the commonest surface word, its count and z."""
    def presence(texts: Sequence[str]) -> Counter[str]:
        return Counter(w for t in texts for w in stems(t) if len(w) >= 3 and w not in _STOP)

    if not explanations:
        return []
    counts, ref_counts = presence(explanations), presence(reference)
    n_y, n_r = len(explanations), max(1, len(reference))
    surface: dict[str, Counter[str]] = defaultdict(Counter)
    for t in explanations:
        for w in _WORD.findall(t):
            st = stem(w)
            if st in counts:
                surface[st][w.lower()] += 1
    out: list[dict[str, Any]] = []
    for w, y in counts.items():
        if y < min_count:
            continue
        r = ref_counts.get(w, 0)
        # per-explanation presence rates as binomial log-odds, smoothed by `prior`
        lo_y = math.log((y + prior) / (n_y - y + prior))
        lo_r = math.log((r + prior) / (n_r - r + prior))
        se = math.sqrt(1 / (y + prior) + 1 / (n_y - y + prior) + 1 / (r + prior) + 1 / (n_r - r + prior))
        z = (lo_y - lo_r) / se
        if z >= min_z:
            word = surface[w].most_common(1)[0][0] if surface[w] else w
            out.append({"term": word, "stem": w, "count": y, "share": y / n_y, "reference_share": r / n_r, "z": z})
    out.sort(key=lambda d: (-d["z"], d["stem"]))  # ties by stem: the same list in every process
    return out[:k]
