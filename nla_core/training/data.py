"""The data stage: corpus -> activations (Parquet + sidecar) -> warm-start explanations."""

from __future__ import annotations

import time
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch
import yaml

from ..errors import NLAError
from ..models import ModelHandle
from .common import EXPL_FILE, StageResult, check_model, progress_bar, run_layer
from .corpus import load_corpus
from .dataset import ActivationDataset, extract_dataset
from .run import Run, StageLog
from .summarize import copy_stats, make_summarizer

__all__ = ["build_data"]


def build_data(run: Run, handle: ModelHandle, *, progress: bool = True, summarizer: Any = None,
               confirm=None) -> StageResult:
    """Corpus -> activations (Parquet + sidecar) -> warm-start explanations. Each part is
    cached in the run folder and skipped when already there."""
    check_model(run, handle)
    cfg = run.config
    torch.set_num_threads(cfg.threads)
    layer = run_layer(handle, cfg)
    log = run.log("data")
    ds = _activations(run, handle, layer, log, progress)
    if not (run.data_dir / EXPL_FILE).exists():
        _explanations(run, handle, ds, log, progress, summarizer, confirm)
    res = StageResult(dataset=ds.meta, explanations=yaml.safe_load((run.data_dir / "explanations.yaml").read_text()))
    run.write_json("stages/data/summary.json", res)
    return res


def _activations(run: Run, handle: ModelHandle, layer: int, log: StageLog, progress: bool) -> ActivationDataset:
    """The run's activation dataset: the cached one, or the corpus read (the offline corpus
    written by the target) and its activations extracted."""
    cfg = run.config
    t0 = time.time()
    if (run.data_dir / "dataset.yaml").exists() and (run.data_dir / "activations.parquet").exists():
        ds = ActivationDataset.load(run.data_dir)
        ds.check(handle, layer)
        return ds
    n_chats = cfg.corpus.n_chats if cfg.corpus.source == "offline" else 0
    bar = progress_bar(n_chats, "target writes transcripts", enabled=progress and n_chats > 0)
    docs = load_corpus(cfg.corpus, handle, cache=run.data_dir / "transcripts.jsonl", seed=cfg.seed,
                       progress=bar.update)
    bar.close()
    t1 = time.time()
    log.write(event="corpus", documents=len(docs), seconds=round(t1 - t0, 2))
    bar = progress_bar(len(docs), f"activations after block {layer}", enabled=progress)
    ds = extract_dataset(handle, docs, cfg, layer, run.data_dir, progress=bar.update)
    bar.close()
    log.write(event="activations", n=len(ds), seconds=round(time.time() - t1, 2),
              per_second=round(len(ds) / max(1e-9, time.time() - t1), 2))
    return ds


def _explanations(run: Run, handle: ModelHandle, ds: ActivationDataset, log: StageLog, progress: bool,
                  summarizer: Any, confirm) -> None:
    """Write the warm-start explanations (cut to `explanation_tokens`) and their summary
    (`explanations.yaml`: summariser, copy rate against the contexts, length, cost)."""
    cfg = run.config
    rows = ds.table.drop(["vector"]).to_pylist()
    summ = summarizer or make_summarizer(cfg.summarizer, model=cfg.claude_model, cache_dir=run.data_dir / "claude_cache",
                                         concurrency=cfg.claude_concurrency,
                                         max_words=max(8, int(cfg.explanation_tokens * 0.75)),
                                         tokenizer=handle.tokenizer, max_tokens=cfg.explanation_tokens)
    if hasattr(summ, "estimate"):
        est = summ.estimate(rows)
        log.write(event="cost_estimate", **est)
        if confirm is not None and not confirm(est):
            raise NLAError("Stopped before calling Claude.", "rerun and confirm, or use summarizer: offline.")
    t2 = time.time()
    bar = progress_bar(len(rows), f"explanations ({summ.name})", enabled=progress)
    texts = summ.summarize(rows, progress=bar.update)
    bar.close()
    tok = handle.tokenizer
    texts = [tok.decode(tok.encode(t, add_special_tokens=False)[: cfg.explanation_tokens]).strip() or "(empty)"
             for t in texts]
    pq.write_table(pa.table({"act_id": [r["act_id"] for r in rows], "explanation": texts,
                             "source": [summ.name] * len(rows)}), run.data_dir / EXPL_FILE)
    stats = copy_stats(texts, [r["context"] for r in rows], tok)
    lengths = [len(tok.encode(t, add_special_tokens=False)) for t in texts]
    summary = {"summarizer": summ.name, "copy": stats, "mean_tokens": sum(lengths) / len(lengths),
               "seconds": round(time.time() - t2, 2), "usage": getattr(summ, "usage", None)}
    (run.data_dir / "explanations.yaml").write_text(yaml.safe_dump(summary, sort_keys=False))
    log.write(event="explanations", **{k: v for k, v in summary.items() if k != "copy"}, **stats)
