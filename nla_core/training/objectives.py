"""The losses the stages share: the AV's per-token log-probs of completions with the activation
injected (SFT in the AV warm-start; policy and reference in the joint loop), and one AR
optimiser step on MSE of normalised vectors (AR warm-start and the joint loop)."""

from __future__ import annotations

import torch

from ..activations import pad_batch
from ..hooks import inject_at_marker
from ..metrics import normalized_mse
from ..models import ModelHandle
from ..nla import NLA
from .common import autocast, trainable
from .config import TrainConfig

__all__ = ["av_logprobs", "ar_step", "ar_update"]


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
    t = nla.meta.tokens
    assert t is not None, "an NLA's sidecar names its marker tokens"
    return inject_at_marker(h.embed, nla.injected(vectors),
                            marker_id=t.injection_token_id, left_id=t.injection_left_neighbor_id,
                            right_id=t.injection_right_neighbor_id)



def ar_step(nla: NLA, opt: torch.optim.Optimizer, texts: list[str], targets: torch.Tensor, config: TrainConfig) -> float:
    """One optimiser step of the AR (adapter + head) on MSE of normalised vectors; the loss."""
    with trainable(nla.ar, nla.ar_adapter), autocast(config):
        pred = nla.predict(texts)
    return ar_update(nla, opt, pred, targets)


def ar_update(nla: NLA, opt: torch.optim.Optimizer, pred: torch.Tensor, targets: torch.Tensor) -> float:
    """The optimiser step for an AR forward `pred` taken with grad; the loss."""
    with trainable(nla.ar, nla.ar_adapter):
        loss = normalized_mse(pred, targets).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
    opt.step()
    return loss.item()
