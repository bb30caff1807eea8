"""The NLA's reference set: what it says about the *base* model on ordinary text.

A checkpoint is shipped with `reference_explanations.jsonl`: greedy explanations of base-model
activations (every adapter off, no organism) read at the NLA's layer at a fixed, seeded sample
of content positions of the shipped ordinary texts (`data/texts.jsonl`). Two users:

* the placebo arm of the benchmark explains these activations instead of the target's;
* an auditor scores the themes of a target's explanations by surprise against this set
  (`content.surprising_terms`): words the NLA says about the target far more often than it
  says about ordinary text. No organism knowledge goes into it.
"""

from __future__ import annotations

import json
import random
import weakref
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError

__all__ = ["REFERENCE_TEXTS", "REFERENCE_SKIP", "REFERENCE_FILE", "reference_texts", "reference_activations",
           "write_reference_explanations", "load_reference_explanations"]

REFERENCE_TEXTS = Path(__file__).resolve().parent / "data" / "texts.jsonl"
REFERENCE_SKIP = 8  # the first tokens of a text carry little context (training skips them too)
REFERENCE_FILE = "reference_explanations.jsonl"

# Per model (keyed on the transformers module, which survives PEFT wrapping) and layer, so a
# benchmark reads the reference texts once per process, not once per audit.
_CACHE: weakref.WeakKeyDictionary[torch.nn.Module, dict[int, torch.Tensor]] = weakref.WeakKeyDictionary()


def reference_texts() -> list[str]:
    rows = [json.loads(line) for line in REFERENCE_TEXTS.read_text().splitlines() if line.strip()]
    return [r["text"] for r in rows]


def reference_activations(handle: Any, layer: int) -> torch.Tensor:
    """[N, d] activations of the base model after block `layer` at every token after the first
    `REFERENCE_SKIP` of each shipped ordinary text (texts in file order, tokens in order)."""
    from .activations import read_activations

    per_layer = _CACHE.setdefault(handle.hf_model, {})
    if layer not in per_layer:
        with torch.no_grad(), handle.use_adapter(None):
            acts = read_activations(handle, reference_texts(), layer)
        rows = [v[REFERENCE_SKIP:] for v in acts.vectors if v.shape[0] > REFERENCE_SKIP]
        per_layer[layer] = torch.cat(rows).float().cpu()
    return per_layer[layer]


def write_reference_explanations(nla: Any, folder: str | Path, *, n: int = 192, seed: int = 0,
                                 max_new_tokens: int = 48) -> Path:
    """Verbalize `n` seeded reference activations with `nla` (greedy) and write them to
    `folder/reference_explanations.jsonl` (one {"index", "explanation"} per line)."""
    if nla.target is None:
        raise CheckpointError("The NLA has no base model to read reference activations from.",
                              "load it with the model handle: NLA.load(path, handle).")
    ref = reference_activations(nla.target, nla.layer)
    idx = sorted(random.Random(seed).sample(range(ref.shape[0]), min(n, ref.shape[0])))
    texts = [v.text for v in nla.verbalize(ref[idx], max_new_tokens=max_new_tokens, seed=seed)]
    out = Path(folder) / REFERENCE_FILE
    tmp = out.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps({"index": i, "explanation": t}) + "\n" for i, t in zip(idx, texts)))
    tmp.replace(out)
    return out


def load_reference_explanations(folder: str | Path) -> list[str]:
    """The reference explanations shipped in a checkpoint folder ([] when it has none)."""
    f = Path(folder) / REFERENCE_FILE
    if not f.exists():
        return []
    return [json.loads(line)["explanation"] for line in f.read_text().splitlines() if line.strip()]
