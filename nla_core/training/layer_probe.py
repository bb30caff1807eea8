"""Which block carries the topic? The topic probe (`content.topic_probe`) at every other block,
on WordNet topic documents with whole topics held out: the measurement behind the CPU preset's
NLA layer. One forward per document gives every block's residual stream."""

from __future__ import annotations

import random
from collections.abc import Callable

import torch

from ..activations import encode, pad_batch
from ..content import topic_probe, topic_word_embeddings
from ..metrics import normalize
from ..models import ModelHandle
from .dataset import _first_mention
from .topics import topic_documents

__all__ = ["probe_layers"]


@torch.no_grad()
def probe_layers(handle: ModelHandle, *, n_topics: int = 1500, positions: int = 4, max_tokens: int = 192,
                 held_share: float = 1 / 6, every: int = 2, seed: int = 0, batch_size: int = 16,
                 progress: Callable[[int], None] | None = None) -> dict[int, dict]:
    """{block: topic_probe figures} for blocks 0, every, 2*every, ... (the residual stream after
    the block, as `capture_resid` reads it). Positions are
    sampled after the topic's first mention (as in training); a `held_share` of the topics is
    held out whole and ranked among themselves."""
    tok = handle.tokenizer
    special = set(tok.all_special_ids)
    rng = random.Random(seed)
    docs = topic_documents(n_topics, seed=seed)
    rows = []
    for d in docs:
        ids = encode(handle, d.content)[:max_tokens]
        first = _first_mention(tok, ids, d.meta["topic_terms"])
        cands = [p for p in range(max(10, first), len(ids)) if ids[p] not in special]
        if cands:
            rows.append((d.meta["topic"], ids, sorted(rng.sample(cands, min(positions, len(cands))))))
    blocks = list(range(0, handle.n_layers - 1, every))  # not the last: HF applies the final norm there
    acts: dict[int, list[torch.Tensor]] = {b: [] for b in blocks}
    topics: list[str] = []
    with handle.use_adapter(None):
        for s in range(0, len(rows), batch_size):
            chunk = rows[s : s + batch_size]
            batch_ids, mask = pad_batch([c[1] for c in chunk], tok.pad_token_id)
            out = handle.model(input_ids=batch_ids.to(handle.device), attention_mask=mask.to(handle.device),
                               output_hidden_states=True, use_cache=False)
            for j, (topic, _, pos) in enumerate(chunk):
                for b in blocks:  # hidden_states[0] is the embedding output, [b + 1] after block b
                    acts[b].append(out.hidden_states[b + 1][j, pos].float().cpu())
                topics += [topic] * len(pos)
            if progress:
                progress(len(chunk))
    target = topic_word_embeddings(handle.embedding_matrix, tok, topics)
    names = sorted(set(topics))
    random.Random(seed + 1).shuffle(names)
    held = set(names[: max(2, int(len(names) * held_share))])
    tr = [i for i, t in enumerate(topics) if t not in held]
    he = [i for i, t in enumerate(topics) if t in held]
    out_figs = {}
    for b in blocks:
        x = torch.cat(acts[b])
        mean = normalize(x[tr]).mean(0)
        out_figs[b] = topic_probe(x[tr], torch.stack([target[topics[i]] for i in tr]), x[he],
                                      [topics[i] for i in he], {t: target[t] for t in held}, mean)
    return out_figs
