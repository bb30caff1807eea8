"""The warm-start stages: the AR first (ridge fit of its head on cached features, then LoRA +
head steps on MSE of normalised vectors), then the AV (SFT on the warm-start explanations with
the activation injected), starting from the AR warm-start's checkpoint."""

from __future__ import annotations

import time

import torch

from ..activations import forward_to_layer, pad_batch
from ..checkpoint import EXPLANATION_CLOSE, EXPLANATION_OPEN
from ..metrics import mean_baseline, normalize, normalized_mse
from ..models import ModelHandle
from ..nla import NLA
from .common import (
    StageLoop,
    StageResult,
    adapter_params,
    autocast,
    batch_indices,
    check_model,
    finished_result,
    fve_with_mean,
    heldout_sample,
    load_nla,
    load_state,
    new_nla,
    save_state,
    split_with_text,
    stage_dataset,
    train_mean,
    trainable,
)
from .config import TrainConfig
from .objectives import ar_step, av_logprobs
from .run import Run

__all__ = ["train_ar_warmstart", "train_av_warmstart"]


# ---- AR warm-start ------------------------------------------------------------------------


@torch.no_grad()
def _ar_features(nla: NLA, texts: list[str], config: TrainConfig, batch: int = 32) -> torch.Tensor:
    """The AR's last-token residual (before the head) for each text, in the training forwards'
    precision (the LoRA steps that follow the fit see the same features)."""
    out = []
    for i in range(0, len(texts), batch):
        ids = nla.critic_ids(texts[i : i + batch])
        input_ids, mask = pad_batch(ids, nla.ar.tokenizer.pad_token_id)
        with nla.ar.use_adapter(nla.ar_adapter), autocast(config):
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
    assert best is not None
    return best[2].T.float().contiguous(), {"val_fve": best[0], "ridge": best[1]}


def train_ar_warmstart(run: Run, handle: ModelHandle, *, progress: bool = True, max_steps: int | None = None) -> StageResult:
    """Fit the AR head on cached features (ridge, instant), then LoRA + head steps on MSE of
    normalised vectors. Data: the AR warm-start split (and the RL split's summaries)."""
    check_model(run, handle)
    cfg = run.config
    scfg = cfg.ar_warmstart
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    stage = "ar_warmstart"
    if (done := finished_result(run, stage)) is not None:
        return done
    sdir, log = run.stage_dir(stage), run.log(stage)
    ds = stage_dataset(run, handle)
    layer = ds.layer
    chash = cfg.stage_hash(stage)
    vecs, texts, _ = split_with_text(run, ds, ("ar_warm", "rl"))
    hv, htexts, _ = split_with_text(run, ds, ("heldout",))
    keep = heldout_sample(len(htexts), cfg.eval.n_heldout)
    hv, htexts = hv[keep], [htexts[i] for i in keep]
    mean = train_mean(run)
    state = load_state(sdir, chash)
    if state is None:
        nla = new_nla(handle, cfg, layer, float(ds.meta["norms"]["median"]), mean)
        # untrained AR (identity head) on the summaries: the floor to beat
        f0 = fve_with_mean(nla.reconstruct(htexts), hv, mean)
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
        f1 = fve_with_mean(nla.reconstruct(htexts), hv, mean)
        log.write(event="head_fit", untrained_heldout_fve=f0, heldout_fve=f1, seconds=round(time.time() - t0, 2), **info)
        state = {"step": 0, "config_hash": chash, "untrained_heldout_fve": f0, "head_fit_heldout_fve": f1}
        save_state(sdir, nla, {**state, "optim": None})
    else:
        nla = load_nla(sdir / "ckpt", handle)
        nla.mean = mean
    params = adapter_params(nla.ar, nla.ar_adapter)
    opt = torch.optim.AdamW([{"params": params, "lr": scfg.lr},
                             {"params": list(nla.head.parameters()), "lr": scfg.head_step_lr}], weight_decay=0.0)
    if state.get("optim"):
        opt.load_state_dict(state["optim"])
    loop = StageLoop(run, stage, nla, steps=scfg.steps, max_steps=max_steps, start=state["step"],
                     desc="AR warm-start", progress=progress)
    while loop.running:
        idx = batch_indices(len(texts), scfg.batch_size, loop.step, cfg.seed)
        t0 = time.time()
        mse = ar_step(nla, opt, [texts[i] for i in idx], vecs[idx], cfg)
        loop.done_step({"mse": mse, "seconds": round(time.time() - t0, 3)}, {"mse": f"{mse:.3f}"},
                       lambda: {**state, "optim": opt.state_dict()})

    def heldout(result: StageResult) -> None:
        result["heldout_fve_on_summaries"] = fve_with_mean(nla.reconstruct(htexts), hv, mean)

    return loop.finish(heldout, untrained_heldout_fve=state.get("untrained_heldout_fve"),
                       head_fit_heldout_fve=state.get("head_fit_heldout_fve"))


# ---- AV warm-start (SFT) ------------------------------------------------------------------


def _sft_target(text: str) -> str:
    return f"{EXPLANATION_OPEN}\n{text}\n{EXPLANATION_CLOSE}"


def _completion_ids(nla: NLA, text: str) -> list[int]:
    tok = nla.av.tokenizer
    return tok.encode(text, add_special_tokens=False) + [tok.eos_token_id]


def train_av_warmstart(run: Run, handle: ModelHandle, *, progress: bool = True, max_steps: int | None = None) -> StageResult:
    """SFT of the AV on `<explanation>summary</explanation>` with the activation injected.
    Starts from the AR warm-start's checkpoint (which carries the trained AR)."""
    check_model(run, handle)
    cfg = run.config
    scfg = cfg.av_warmstart
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed + 1)
    stage = "av_warmstart"
    if (done := finished_result(run, stage)) is not None:
        return done
    sdir = run.stage_dir(stage)
    ds = stage_dataset(run, handle)
    chash = cfg.stage_hash("ar_warmstart", stage)
    vecs, texts, _ = split_with_text(run, ds, ("av_warm",))
    mean = train_mean(run)
    state = load_state(sdir, chash)
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
    loop = StageLoop(run, stage, nla, steps=scfg.steps, max_steps=max_steps, start=state["step"],
                     desc="AV warm-start (SFT)", progress=progress)
    while loop.running:
        idx = batch_indices(len(texts), scfg.batch_size, loop.step, cfg.seed + 1)
        t0 = time.time()
        with trainable(nla.av, nla.av_adapter):
            with autocast(cfg):
                logp, mask = av_logprobs(nla, vecs[idx], [targets[i] for i in idx], nla.av_adapter)
            loss = -(logp * mask).sum() / mask.sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
        opt.step()
        loop.done_step({"nll": loss.item(), "tokens": int(mask.sum()), "seconds": round(time.time() - t0, 3)},
                       {"nll": f"{loss.item():.3f}"}, lambda: {**state, "optim": opt.state_dict()})
    return loop.finish()
