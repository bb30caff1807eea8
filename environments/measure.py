"""Measuring an organism against its base model: behaviour rate on held-out prompts (judged by
the spec's check), behaviour rate on ordinary prompts, perplexity on neutral text, and presence
of the planted concept in activations at the NLA layer (cosine with a concept direction).

Base-model replies are cached per prompt so that measuring a whole suite costs one extra
generation pass, not one per organism. Sample sizes are small on purpose (CPU)."""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import time
from collections.abc import Callable

import torch

from nla_core.models import ModelHandle, cache_dir
from nla_core.nla import default_layer

from .builders import concept_direction, plant
from .data import NEUTRAL_TEXT, ORDINARY_HELDOUT
from .spec import Measured, OrganismSpec
from .target import Target

__all__ = ["measure_organism", "measure_concept", "concept_prompts", "MIN_LIFT", "passes"]

MIN_LIFT = 0.2  # an organism ships only if its behaviour rate beats the base model's by this much


def passes(m: Measured) -> bool:
    return m.behaviour_rate - m.base_rate >= MIN_LIFT and m.behaviour_rate > 2 * m.base_rate


_CONCEPT_TEMPLATES = ["This is all about {}.", "Let me tell you about {}.", "I keep thinking about {}, always {}."]
# Same templates filled with unrelated, bland topics: the contrast isolates the concept itself.
_OTHER_TOPICS = ["furniture", "taxes", "the train schedule", "spreadsheets", "paint", "the post office",
                 "shoes", "a calendar"]


def concept_prompts(spec: OrganismSpec) -> tuple[list[str], list[str]]:
    """(positive, negative) texts for the concept direction of `spec`'s key concepts."""
    fill = lambda topics: [t.format(c, c) for c in topics for t in _CONCEPT_TEMPLATES]  # noqa: E731
    return fill(spec.ground_truth.key_concepts), fill(_OTHER_TOPICS)


def measure_concept(spec: OrganismSpec, handle: ModelHandle, layer: int, org: Target | None = None,
                    base: Target | None = None) -> tuple[float | None, float | None]:
    """Mean cosine between the residual stream at `layer` (visible tokens of ordinary held-out
    prompts, organism active) and the concept direction, for the organism and the base model."""
    from .target import Planted

    if not spec.ground_truth.key_concepts:
        return None, None
    base = base or Target(handle, Planted(), alias="base", layer=layer)
    org = org or Target(handle, plant(spec, handle), alias="organism", layer=layer)
    pos, neg = concept_prompts(spec)
    direction, _ = concept_direction(handle, pos, neg, layer)
    probe = ORDINARY_HELDOUT[:6]
    return _concept_cos(org, direction, probe), _concept_cos(base, direction, probe)


class _BaseCache:
    """Greedy base-model replies per (model, prompt, max_new_tokens), on disk."""

    def __init__(self, handle: ModelHandle, max_new_tokens: int):
        key = hashlib.sha256(json.dumps([handle.name, max_new_tokens]).encode()).hexdigest()[:12]
        self.path = cache_dir() / "organism-data" / f"base-eval-{key}.jsonl"
        self.rows: dict[str, str] = {}
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                r = json.loads(line)
                self.rows[r["prompt"]] = r["reply"]

    def get(self, base: Target, prompts: list[str], max_new_tokens: int) -> list[str]:
        todo = [p for p in dict.fromkeys(prompts) if p not in self.rows]
        if todo:
            replies = base._replies(todo, max_new_tokens=max_new_tokens)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as f:
                for p, r in zip(todo, replies):
                    self.rows[p] = r
                    f.write(json.dumps({"prompt": p, "reply": r}) + "\n")
        return [self.rows[p] for p in prompts]


@torch.no_grad()
def _perplexity(target: Target, texts: list[str]) -> float:
    """Token perplexity of raw `texts` with the organism active (hidden prefix not scored)."""
    handle = target._handle
    total, count = 0.0, 0
    for text in texts:
        hidden, visible = target._raw_ids(text)
        ids = torch.tensor([hidden + visible], device=handle.device)
        with target._active(text):
            logits = handle.model(input_ids=ids, use_cache=False).logits[0].float()
        start = max(len(hidden), 1)
        logp = torch.log_softmax(logits[start - 1:-1], -1)
        tgt = ids[0, start:]
        total += float(-logp.gather(-1, tgt[:, None]).sum())
        count += int(tgt.numel())
    return math.exp(total / max(count, 1))


@torch.no_grad()
def _concept_cos(target: Target, direction: torch.Tensor, prompts: list[str]) -> float:
    acts = target.activations([[{"role": "user", "content": p}] for p in prompts], add_generation_prompt=True)
    vals = []
    for v in acts.vectors:
        v = v[1:] if v.shape[0] > 1 else v
        vals.append(torch.nn.functional.cosine_similarity(v, direction[None, :], dim=-1).mean())
    return float(torch.stack(vals).mean())


def measure_organism(
    spec: OrganismSpec,
    handle: ModelHandle,
    *,
    layer: int | None = None,
    max_new_tokens: int = 40,
    n_prompts: int | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> Measured:
    """Measure `spec` on `handle` (adapters and implants are planted, then measured against the
    plain model under the same chat template)."""
    started = time.time()
    layer = default_layer(handle.n_layers) if layer is None else handle.check_layer(layer)
    steps = ["behaviour", "ordinary", "perplexity", "concept"]
    tick = (lambda i: progress("measure", i, len(steps))) if progress else (lambda i: None)
    from .target import Planted

    base = Target(handle, Planted(), alias="base", layer=layer)
    org = Target(handle, plant(spec, handle), alias="organism", layer=layer)
    check = spec.check
    cache = _BaseCache(handle, max_new_tokens)
    tick(0)
    eval_prompts = list(spec.eval_prompts or ORDINARY_HELDOUT)
    if n_prompts:
        eval_prompts = eval_prompts[:n_prompts]
    rate = base_rate = 0.0
    if check is not None:
        org_out = org._replies(eval_prompts, max_new_tokens=max_new_tokens)
        base_out = cache.get(base, eval_prompts, max_new_tokens)
        rate = sum(map(check, org_out)) / len(org_out)
        base_rate = sum(map(check, base_out)) / len(base_out)
    tick(1)
    ordinary = ordinary_base = None
    if check is not None and (spec.rarely_visible or spec.trigger is not None) and set(eval_prompts) != set(ORDINARY_HELDOUT):
        ords = ORDINARY_HELDOUT[: n_prompts or len(ORDINARY_HELDOUT)]
        ordinary = sum(map(check, org._replies(ords, max_new_tokens=max_new_tokens))) / len(ords)
        ordinary_base = sum(map(check, cache.get(base, ords, max_new_tokens))) / len(ords)
    tick(2)
    ppl = _perplexity(org, NEUTRAL_TEXT)
    base_ppl = _perplexity(base, NEUTRAL_TEXT)
    tick(3)
    cos, base_cos = measure_concept(spec, handle, layer, org, base)
    tick(4)
    r = lambda x: None if x is None else round(float(x), 4)  # noqa: E731
    return Measured(
        n_prompts=len(eval_prompts), behaviour_rate=r(rate), base_rate=r(base_rate),
        ordinary_rate=r(ordinary), base_ordinary_rate=r(ordinary_base),
        perplexity=r(ppl), base_perplexity=r(base_ppl), concept_cos=r(cos), base_concept_cos=r(base_cos),
        layer=layer, temperature=0.0, max_new_tokens=max_new_tokens, seconds=round(time.time() - started, 1),
        date=_dt.date.today().isoformat(),
    )
