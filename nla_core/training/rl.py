"""The joint loop: the AV by GRPO (reward -MSE of the live AR's reconstruction, optionally mixed
with an in-batch InfoNCE term; KL to the warm-start AV), the AR by MSE on the AV's fresh samples."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoint import extract_explanation
from ..errors import EmptyInputError
from ..generation import Generation, generate_ids
from ..metrics import mean_baseline, normalized_mse
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
    load_nla,
    load_state,
    stage_dataset,
    train_mean,
    trainable,
)
from .config import RLConfig, TrainConfig
from .dataset import DatasetSplit
from .grpo import contrastive_logprob, group_advantages, grpo_loss, rewards_from_mse
from .objectives import ar_step, ar_update, av_logprobs
from .run import Run

__all__ = ["train_rl", "REF_ADAPTER"]

REF_ADAPTER = "nla_av_ref"


def train_rl(run: Run, handle: ModelHandle, *, progress: bool = True, max_steps: int | None = None) -> StageResult:
    """Each step: B activations from the RL split, G samples each from the AV (activation
    injected); reward -MSE of the live AR's reconstruction (normalised), mixed with an in-batch
    InfoNCE term when `contrastive_weight` > 0, and -2 without the tag;
    group-normalised advantages; AV loss = policy gradient + kl_coef * KL to the warm-start AV;
    then the AR takes MSE steps on the fresh samples. Logs the share of time in generation,
    scoring and backward."""
    check_model(run, handle)
    cfg = run.config
    r = cfg.rl
    torch.set_num_threads(cfg.threads)
    stage = "rl"
    if (done := finished_result(run, stage)) is not None:
        return done
    sdir = run.stage_dir(stage)
    ds = stage_dataset(run, handle)
    chash = cfg.stage_hash("ar_warmstart", "av_warmstart", stage)
    sp = ds.split("rl")
    if len(sp) == 0:
        raise EmptyInputError("The RL split is empty.", "use a larger corpus.")
    mean = train_mean(run)
    warm = run.require("av_warmstart", "nla train av-warmstart")
    state = load_state(sdir, chash)
    nla = load_nla(warm if state is None else sdir / "ckpt", handle)
    nla.mean = mean
    if state is None:
        state = {"step": 0, "config_hash": chash}
    ref_handle, ref_adapter = _reference(nla, handle, warm)
    av_opt = torch.optim.AdamW(adapter_params(nla.av, nla.av_adapter), lr=r.av_lr, weight_decay=0.0)
    ar_opt = torch.optim.AdamW([{"params": adapter_params(nla.ar, nla.ar_adapter), "lr": r.ar_lr},
                                {"params": list(nla.head.parameters()), "lr": r.ar_head_lr}], weight_decay=0.0)
    if state.get("av_optim"):
        av_opt.load_state_dict(state["av_optim"])
        ar_opt.load_state_dict(state["ar_optim"])
    G = r.group_size
    loop = StageLoop(run, stage, nla, steps=r.steps, max_steps=max_steps, start=state["step"],
                     desc="joint RL (GRPO + AR MSE)", progress=progress)
    times = {"generation": 0.0, "scoring": 0.0, "backward_av": 0.0, "backward_ar": 0.0}
    while loop.running:
        step = loop.step
        idx = batch_indices(len(sp), r.batch_prompts, step, cfg.seed + 2)
        v = sp.vectors[idx]
        vg = v.repeat_interleave(G, dim=0)
        # 1. sample
        t0 = time.time()
        gens = _sample(nla, vg, r, seed=cfg.seed * 7919 + step)
        t1 = time.time()
        # 2. score with the live AR
        sc = _score(nla, gens, v, vg, sp, idx, step, cfg)
        adv = group_advantages(sc.rewards, G)
        completions = _completions(nla, gens, r.max_new_tokens)
        with torch.no_grad(), autocast(cfg):
            ref_logp, _ = av_logprobs(nla, vg, completions, ref_adapter, handle=ref_handle)
        t2 = time.time()
        # 3. AV policy step
        with trainable(nla.av, nla.av_adapter):
            with autocast(cfg):
                logp, mask = av_logprobs(nla, vg, completions, nla.av_adapter)
            loss, info = grpo_loss(logp, ref_logp, adv, mask, r.kl_coef)
            av_opt.zero_grad(set_to_none=True)
            loss.backward()
        av_opt.step()
        t3 = time.time()
        # 4. AR step(s) on the fresh samples
        ar_mse = None
        if sc.tagged:
            assert sc.pred is not None  # the AR's forward of the tagged samples
            ar_mse = ar_update(nla, ar_opt, sc.pred, vg[sc.tagged])
            for _ in range(r.ar_steps_per_iter - 1):
                ar_mse = ar_step(nla, ar_opt, [sc.bodies[i] or "" for i in sc.tagged], vg[sc.tagged], cfg)
        t4 = time.time()
        for k, dt in zip(times, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            times[k] += dt
        base = mean_baseline(vg, mean)
        fve_tagged = 1 - float(sc.mse[sc.tagged].mean()) / base if sc.tagged else None
        rec = dict(reward=float(sc.rewards.mean()), fve_samples=fve_tagged,
                   nce=float(sc.nce.mean()) if sc.nce is not None else None, tag_fraction=float(sc.has_tag.float().mean()),
                   kl=info["kl"], loss=loss.item(), ar_mse=ar_mse, mean_tokens=sum(len(g.token_ids) for g in gens) / len(gens),
                   t_generation=round(t1 - t0, 2), t_scoring=round(t2 - t1, 2), t_backward_av=round(t3 - t2, 2),
                   t_backward_ar=round(t4 - t3, 2))
        loop.done_step(rec, {"fve": f"{fve_tagged:.3f}" if fve_tagged is not None else "-", "tag": f"{rec['tag_fraction']:.2f}"},
                       lambda: {**state, "av_optim": av_opt.state_dict(), "ar_optim": ar_opt.state_dict()})
    if ref_adapter is not None:
        handle.delete_adapter(ref_adapter)
    spent = sum(times.values())
    return loop.finish(time_share={k: round(v / spent, 3) for k, v in times.items()} if spent else None)


def _reference(nla: NLA, handle: ModelHandle, warm: Path) -> tuple[ModelHandle, str | None]:
    """The frozen reference, the warm-start AV: its adapter loaded beside the live one, or (full
    fine-tune) its own copy of the model."""
    if nla.av_adapter is not None:
        handle.load_adapter(warm / "av", REF_ADAPTER)
        return handle, REF_ADAPTER
    return load_nla(warm, handle).av, None


def _sample(nla: NLA, vg: torch.Tensor, r: RLConfig, *, seed: int) -> list[Generation]:
    """One sample from the AV per row of `vg` (each group's activation repeated G times), injected."""
    return generate_ids(nla.av, [nla.actor_prompt()] * len(vg), max_new_tokens=r.max_new_tokens, temperature=r.temperature,
                        batch_size=len(vg), adapter=nla.av_adapter,
                        hooks=lambda rows: nla.injection(vg[list(rows)]), seed=seed)


@dataclass
class _Scores:
    bodies: list[str | None]  # each sample's explanation (None without the tag)
    has_tag: torch.Tensor  # [n] bool
    tagged: list[int]  # the samples with a non-empty explanation
    mse: torch.Tensor  # [n] the live AR's normalised MSE (4.0 untagged)
    pred: torch.Tensor | None  # the AR's reconstructions of the tagged samples, with grad
    rewards: torch.Tensor  # [n]
    nce: torch.Tensor | None  # the InfoNCE term of the tagged samples (contrastive_weight > 0)


def _score(nla: NLA, gens: list[Generation], v: torch.Tensor, vg: torch.Tensor, sp: DatasetSplit, idx: list[int],
           step: int, cfg: TrainConfig) -> _Scores:
    """Rewards of the samples: -MSE of the live AR's reconstruction, -2 (missing_tag_reward)
    without the tag, mixed with an InfoNCE term against other activations of the split."""
    r = cfg.rl
    bodies = [extract_explanation(g.text) for g in gens]
    has_tag = torch.tensor([b is not None and bool(b.strip()) for b in bodies])
    mse = torch.full((len(gens),), 4.0)
    tagged = [i for i in range(len(gens)) if has_tag[i]]
    pred = None
    if tagged:
        # with grad: the same forward serves the reward and the AR's first step
        with trainable(nla.ar, nla.ar_adapter), autocast(cfg):
            pred = nla.predict([bodies[i] or "" for i in tagged])
        mse[tagged] = normalized_mse(pred.detach(), vg[tagged]).cpu()  # rewards live on the CPU
    rewards = rewards_from_mse(mse, has_tag, r.missing_tag_reward)
    nce = None
    if pred is not None and r.contrastive_weight > 0:
        # the batch's own activations first, then negatives drawn from the rest of the split
        others = [i for i in batch_indices(len(sp), r.contrastive_negatives + len(idx), step, cfg.seed + 3) if i not in idx]
        cands = torch.cat([v, sp.vectors[others[: r.contrastive_negatives]]])
        own = torch.as_tensor(tagged) // r.group_size
        nce = contrastive_logprob(pred.detach(), own, cands, r.contrastive_temperature).cpu()
        w = r.contrastive_weight
        rewards[tagged] = (1 - w) * rewards[tagged] + w * nce
    return _Scores(bodies, has_tag, tagged, mse, pred, rewards, nce)


def _completions(nla: NLA, gens: list[Generation], max_new_tokens: int) -> list[list[int]]:
    """The sampled token ids with EOS where the sample ended before the limit (EOS alone for an
    empty sample)."""
    eos = nla.av.tokenizer.eos_token_id
    completions = [g.token_ids + ([eos] if len(g.token_ids) < max_new_tokens else []) for g in gens]
    return [c if c else [eos] for c in completions]
