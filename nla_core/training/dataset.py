"""Activation datasets: vectors after block K at sampled positions of each document, with the
source context kept, stored as Parquet with a YAML sidecar (model, layer, positions, norms,
splits). Documents, not activations, are split into AR warm-start / AV warm-start / RL /
held-out, so no held-out context leaks into training."""

from __future__ import annotations

import random
import re
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
import yaml
from safetensors.torch import save_file

from ..activations import encode, pad_batch
from ..errors import EmptyInputError, NLAError
from ..hooks import capture_resid, resid_site
from ..metrics import normalize
from ..models import ModelHandle, same_base_model
from .config import TrainConfig
from .document import Document

__all__ = [
    "ActivationDataset", "DatasetSplit", "DatasetMismatchError", "extract_dataset", "split_documents",
    "SPLITS", "TRAIN_SPLITS",
]

SPLITS = ("ar_warm", "av_warm", "rl", "heldout")
TRAIN_SPLITS = ("ar_warm", "av_warm", "rl")
ACTS_FILE, SIDECAR_FILE, STATS_FILE = "activations.parquet", "dataset.yaml", "stats.safetensors"
_ROLE = re.compile(r"(?:<\|im_start\|>|<start_of_turn>|<\|start_header_id\|>)\s*(\w+)")


class DatasetMismatchError(NLAError):
    pass


def split_documents(doc_ids: list[str], fractions: dict[str, float], seed: int) -> dict[str, str]:
    """doc_id -> split, by a seeded shuffle and cumulative fractions; every split gets at least
    one document."""
    if len(doc_ids) < len(SPLITS):
        raise EmptyInputError(
            f"The corpus has {len(doc_ids)} usable documents; splitting by document needs at least {len(SPLITS)}.",
            "add documents (longer than the skipped first tokens), or raise corpus.n_chats.",
        )
    missing = [s for s in SPLITS if fractions.get(s, 0) <= 0]
    if missing:
        raise NLAError(f"corpus.splits gives no share to {missing}.", f"give each of {list(SPLITS)} a positive fraction.")
    order = sorted(doc_ids)
    random.Random(seed).shuffle(order)
    total = sum(fractions[s] for s in SPLITS)
    counts = [max(1, round(len(order) * fractions[s] / total)) for s in SPLITS]
    while sum(counts) > len(order):
        counts[counts.index(max(counts))] -= 1
    counts[0] += len(order) - sum(counts)
    out, i = {}, 0
    for s, c in zip(SPLITS, counts):
        for d in order[i : i + c]:
            out[d] = s
        i += c
    return out


@dataclass
class DatasetSplit:
    name: str
    vectors: torch.Tensor  # [n, d] raw activations
    # act_id, doc_id, position, token, context, role, genre, next_tokens, norm, and for topic
    # documents topic, topic_terms, category (empty otherwise)
    rows: list[dict]

    def __len__(self) -> int:
        return len(self.rows)


class ActivationDataset:
    def __init__(self, folder: Path, meta: dict, table: pa.Table):
        self.folder, self.meta, self.table = folder, meta, table

    @classmethod
    def load(cls, folder: str | Path) -> ActivationDataset:
        folder = Path(folder)
        if not (folder / SIDECAR_FILE).exists() or not (folder / ACTS_FILE).exists():
            raise NLAError(f"No activation dataset in {folder}.", "run `nla data build` first.")
        meta = yaml.safe_load((folder / SIDECAR_FILE).read_text())
        return cls(folder, meta, pq.read_table(folder / ACTS_FILE))

    def __len__(self) -> int:
        return self.table.num_rows

    @property
    def layer(self) -> int:
        return int(self.meta["layer"])

    def check(self, handle: ModelHandle, layer: int) -> None:
        """Refuse a dataset read from another model or layer than the one being trained."""
        m = self.meta
        same_model = same_base_model(m["model"], handle.name)
        if not same_model or int(m["d_model"]) != handle.d_model:
            raise DatasetMismatchError(
                f"The dataset in {self.folder} was read from {m['model']!r} (d_model {m['d_model']}), "
                f"not from {handle.name!r} (d_model {handle.d_model}).",
                "rebuild it with `nla data build` for this model, or train on the model it came from.",
            )
        if int(m["layer"]) != layer:
            raise DatasetMismatchError(
                f"The dataset in {self.folder} holds activations after block {m['layer']}, but the NLA reads block {layer}.",
                f"rebuild the dataset at block {layer}, or train the NLA at block {m['layer']}.",
            )

    def split(self, name: str) -> DatasetSplit:
        import pyarrow.compute as pc

        t = self.table.filter(pc.equal(self.table["split"], name))
        d = int(self.meta["d_model"])
        flat = t["vector"].combine_chunks().flatten().to_numpy(zero_copy_only=False)
        vecs = torch.from_numpy(flat.copy()).float().reshape(-1, d)
        rows = t.drop(["vector"]).to_pylist()
        return DatasetSplit(name, vecs, rows)

    def train_mean(self) -> torch.Tensor:
        """Mean of the normalised training activations (the predict-the-mean baseline)."""
        vecs = torch.cat([self.split(s).vectors for s in TRAIN_SPLITS])
        return normalize(vecs).mean(dim=0)


def _first_mention(tok, ids: list[int], terms: list[str]) -> int:
    """Index of the token by which one of `terms` has been written (len(ids) if never)."""
    pattern = re.compile(r"\b(" + "|".join(re.escape(t) for t in terms) + ")", re.I)
    for p in range(len(ids)):
        if pattern.search(tok.decode(ids[: p + 1])):
            return p
    return len(ids)


def _top_next(logits: torch.Tensor, tok, k: int = 3) -> list[str]:
    return [tok.decode([int(i)]) for i in logits.topk(k).indices]


@torch.no_grad()
def extract_dataset(
    handle: ModelHandle,
    docs: list[Document],
    config: TrainConfig,
    layer: int,
    out: Path,
    *,
    batch_size: int = 8,
    progress=None,
) -> ActivationDataset:
    """Read the activations of `docs` after block `layer` and write `out/activations.parquet`
    plus its sidecar. The full forward also gives the model's own next-token guesses at each
    position (the offline summariser uses them)."""
    cfg = config.corpus
    handle.check_layer(layer)
    tok = handle.tokenizer
    special = set(tok.all_special_ids)
    rng = random.Random(config.seed)
    prepared = []
    for doc in docs:
        try:
            ids = encode(handle, doc.content)[: cfg.max_doc_tokens]
        except EmptyInputError:
            continue
        # In a topic document, sample only where the topic has been named: earlier positions
        # (the system prompt, the opening words) cannot carry it, and their summaries would
        # teach the AV to invent topics.
        first = _first_mention(tok, ids, doc.meta["topic_terms"]) if doc.meta.get("topic_terms") else 0
        cands = [p for p in range(max(cfg.skip_first, first), len(ids)) if ids[p] not in special]
        if not cands:
            continue
        pos = sorted(rng.sample(cands, min(cfg.positions_per_doc, len(cands))))
        prepared.append((doc, ids, pos))
    if not prepared:
        raise EmptyInputError(
            f"No document in the corpus is longer than the {cfg.skip_first} skipped first tokens.",
            "use a corpus with longer documents, or lower corpus.skip_first.",
        )
    split_of = split_documents([d.doc_id for d, _, _ in prepared], cfg.splits, config.seed)
    cols: dict[str, list] = {k: [] for k in (
        "act_id", "doc_id", "split", "position", "token_id", "token", "context", "role", "genre",
        "next_tokens", "norm", "topic", "topic_terms", "category", "vector")}
    prepared.sort(key=lambda x: len(x[1]))
    model = handle.model
    for start in range(0, len(prepared), batch_size):
        chunk = prepared[start : start + batch_size]
        input_ids, mask = pad_batch([c[1] for c in chunk], tok.pad_token_id)
        with handle.use_adapter(None), capture_resid(handle.layers, layer, stop=False) as cap:
            logits = model(input_ids=input_ids.to(handle.device), attention_mask=mask.to(handle.device), use_cache=False).logits
        resid = cap.value
        assert resid is not None, "the capture hook did not fire"
        for j, (doc, ids, pos) in enumerate(chunk):
            for p in pos:
                window = ids[max(0, p - 159) : p + 1]
                ctx = tok.decode(window, skip_special_tokens=False)
                roles = _ROLE.findall(tok.decode(ids[: p + 1], skip_special_tokens=False))
                v = resid[j, p].float().cpu()
                cols["act_id"].append(len(cols["act_id"]))
                cols["doc_id"].append(doc.doc_id)
                cols["split"].append(split_of[doc.doc_id])
                cols["position"].append(p)
                cols["token_id"].append(ids[p])
                cols["token"].append(tok.decode([ids[p]]))
                cols["context"].append(ctx)
                cols["role"].append(roles[-1] if roles else "")
                cols["genre"].append(doc.genre)
                cols["next_tokens"].append(_top_next(logits[j, p].float(), tok))
                cols["norm"].append(float(v.norm()))
                cols["topic"].append(doc.meta.get("topic", ""))
                cols["topic_terms"].append(list(doc.meta.get("topic_terms", [])))
                cols["category"].append(doc.meta.get("category", ""))
                cols["vector"].append(v.numpy())
        if progress:
            progress(len(chunk))
    d = handle.d_model
    import numpy as np

    vec = pa.FixedSizeListArray.from_arrays(pa.array(np.stack(cols.pop("vector")).reshape(-1), pa.float32()), d)
    table = pa.table({**{k: v for k, v in cols.items()}, "vector": vec})
    out.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, out / (ACTS_FILE + ".tmp"))
    (out / (ACTS_FILE + ".tmp")).replace(out / ACTS_FILE)
    norms = torch.tensor(cols["norm"])
    splits = {s: {"documents": sum(1 for v in split_of.values() if v == s),
                  "activations": sum(1 for v in cols["split"] if v == s)} for s in SPLITS}
    meta = {
        "kind": "nla_activations",
        "model": handle.name,
        "layer": layer,
        "site": resid_site(layer),
        "d_model": d,
        "n_activations": len(cols["act_id"]),
        "n_documents": len(prepared),
        "corpus": cfg.source,
        "positions": {"policy": "uniform sample without replacement per document, special tokens excluded",
                      "skip_first": cfg.skip_first, "per_document": cfg.positions_per_doc,
                      "max_doc_tokens": cfg.max_doc_tokens, "seed": config.seed},
        "norms": {"mean": float(norms.mean()), "median": float(norms.median()),
                  "min": float(norms.min()), "max": float(norms.max())},
        "splits": splits,
        "config_hash": config.stage_hash(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "vectors": "raw (not normalised), float32, column `vector`",
    }
    (out / SIDECAR_FILE).write_text(yaml.safe_dump(meta, sort_keys=False))
    ds = ActivationDataset(out, meta, table)
    save_file({"mean": ds.train_mean().contiguous()}, str(out / STATS_FILE))
    return ds
