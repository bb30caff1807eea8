"""The NLA's reference set: what it reads in the *base* model answering everyday requests.

The set is the base model's own replies (every adapter off, no organism) to the shipped
everyday prompts (`data/everyday_prompts.txt`), `REFERENCE_REPLIES` seeded samples each, read
at the NLA's layer at `REPLY_POSITIONS`: content tokens inside the reply, counted from the end
of the conversation. These are the conversations and positions an auditor probes a target with,
so the reference is matched to an audit: what differs is the organism. Two users:

* the placebo arm of the benchmark explains these activations instead of the target's;
* an auditor scores the themes of a target's explanations by surprise against the shipped
  checkpoint's explanations of them (`reference_explanations.jsonl`, written at ship time;
  `content.surprising_terms`): the subjects of the prompts cancel out, what the target adds
  stands out. No organism knowledge goes into it.
"""

from __future__ import annotations

import json
import threading
import weakref
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError

__all__ = ["EVERYDAY_PROMPTS", "REPLY_POSITIONS", "REFERENCE_REPLIES", "REFERENCE_REPLY_TOKENS",
           "REFERENCE_TEMPERATURE", "REFERENCE_FILE", "everyday_prompts", "reference_conversations",
           "reference_activations", "reference_contrasts", "write_reference_explanations", "load_reference_explanations"]

EVERYDAY_PROMPTS = Path(__file__).resolve().parent / "data" / "everyday_prompts.txt"
# Inside a reply of 32 tokens, away from where it starts (the chat template dominates there)
# and from the end-of-turn tokens (-1, -2 in ChatML).
REPLY_POSITIONS = (-14, -10, -6, -3)
REFERENCE_REPLIES = 4          # sampled replies per prompt
REFERENCE_REPLY_TOKENS = 32
REFERENCE_TEMPERATURE = 0.8
REFERENCE_SEED = 0
REFERENCE_FILE = "reference_explanations.jsonl"

# Per model (keyed on the transformers module, which survives PEFT wrapping) and layer, so a
# benchmark builds the reference once per process, not once per audit.
_CACHE: weakref.WeakKeyDictionary[torch.nn.Module, dict[Any, Any]] = weakref.WeakKeyDictionary()
# Concurrent audits of one worker all ask for the reference at their first placebo call: one
# computes it, the others wait for it instead of computing it again.
_FILLING = threading.RLock()


def everyday_prompts() -> list[str]:
    lines = EVERYDAY_PROMPTS.read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]


def reference_conversations(handle: Any) -> list[list[dict[str, str]]]:
    """The base model's seeded replies to the everyday prompts, `REFERENCE_REPLIES` per prompt
    (prompt order, then sample order), as [user, assistant] conversations. Deterministic: each
    row samples from its own seeded generator, whatever it is batched with."""
    from .activations import encode
    from .generation import generate_ids

    with _FILLING:
        cache = _CACHE.setdefault(handle.hf_model, {})
        if "conversations" not in cache:
            prompts = everyday_prompts()
            ids = [encode(handle, [{"role": "user", "content": p}], add_generation_prompt=True) for p in prompts]
            rows = [r for r in ids for _ in range(REFERENCE_REPLIES)]
            with torch.no_grad():
                gens = generate_ids(handle, rows, max_new_tokens=REFERENCE_REPLY_TOKENS,
                                    temperature=REFERENCE_TEMPERATURE, seed=REFERENCE_SEED, adapter=None)
            cache["conversations"] = [
                [{"role": "user", "content": prompts[i // REFERENCE_REPLIES]},
                 {"role": "assistant", "content": g.text.strip() or "..."}] for i, g in enumerate(gens)]
        return cache["conversations"]


def reference_activations(handle: Any, layer: int) -> torch.Tensor:
    """[N, d] base-model activations after block `layer` at `REPLY_POSITIONS` of each reference
    conversation (conversation order, then position order); N = prompts x replies x positions."""
    from .activations import read_activations

    with _FILLING:
        cache = _CACHE.setdefault(handle.hf_model, {})
        if layer not in cache:
            convs = reference_conversations(handle)
            with torch.no_grad(), handle.use_adapter(None):
                acts = read_activations(handle, convs, layer, positions=list(REPLY_POSITIONS))
            cache[layer] = torch.cat(acts.vectors).float().cpu()
        return cache[layer]


def reference_contrasts(handle: Any, layer: int) -> torch.Tensor:
    """[N, d] the reference activations, each moved along the difference of two other reference
    activations (`contrast.null_directions`, key "reference"): contrast readings of a change that
    carries no organism, the null for themes of contrast explanations."""
    from .contrast import along, null_directions

    ref = reference_activations(handle, layer)
    return along(ref, null_directions(ref, ref.shape[0], "reference"))


def write_reference_explanations(nla: Any, folder: str | Path, *, seed: int = 0, max_new_tokens: int = 48) -> Path:
    """Verbalize every reference activation with `nla` (greedy), and its contrast reading
    (`reference_contrasts`), and write them to `folder/reference_explanations.jsonl`: one
    {"index", "prompt", "position", "explanation", "contrast_explanation"} per line, in
    `reference_activations` order."""
    if nla.target is None:
        raise CheckpointError("The NLA has no base model to read reference activations from.",
                              "load it with the model handle: NLA.load(path, handle).")
    ref = reference_activations(nla.target, nla.layer)
    convs = reference_conversations(nla.target)
    texts = [v.text for v in nla.verbalize(ref, max_new_tokens=max_new_tokens, seed=seed)]
    contrast = [v.text for v in nla.verbalize(reference_contrasts(nla.target, nla.layer),
                                              max_new_tokens=max_new_tokens, seed=seed)]
    k = len(REPLY_POSITIONS)
    rows = [{"index": i, "prompt": convs[i // k][0]["content"], "position": REPLY_POSITIONS[i % k], "explanation": t,
             "contrast_explanation": c} for i, (t, c) in enumerate(zip(texts, contrast, strict=True))]
    out = Path(folder) / REFERENCE_FILE
    tmp = out.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(out)
    return out


def load_reference_explanations(folder: str | Path, *, contrast: bool = False) -> list[str]:
    """The reference explanations shipped in a checkpoint folder ([] when it has none); with
    `contrast`, those of the contrast readings ([] for a checkpoint shipped without them)."""
    f = Path(folder) / REFERENCE_FILE
    if not f.exists():
        return []
    key = "contrast_explanation" if contrast else "explanation"
    rows = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
    return [r[key] for r in rows if key in r]
