"""The GRPO pieces of the joint loop, as plain tensor functions (tested on hand-made numbers)."""

from __future__ import annotations

import torch

__all__ = ["group_advantages", "kl_k3", "grpo_loss", "rewards_from_mse"]


def rewards_from_mse(mse: torch.Tensor, has_tag: torch.Tensor, missing_tag_reward: float = -2.0) -> torch.Tensor:
    """Reward = -MSE (normalised vectors) for outputs with an <explanation> tag, a fixed
    penalty for those without."""
    return torch.where(has_tag.bool(), -mse.float(), torch.full_like(mse.float(), missing_tag_reward))


def contrastive_logprob(pred: torch.Tensor, own: torch.Tensor, candidates: torch.Tensor, temperature: float) -> torch.Tensor:
    """InfoNCE: log-softmax over `candidates` [m, d] of cosine(pred_i, candidate) / temperature,
    taken at each row's own activation `own[i]` (an index into `candidates`). [n]"""
    p = torch.nn.functional.normalize(pred.float(), dim=-1)
    c = torch.nn.functional.normalize(candidates.to(pred.device).float(), dim=-1)
    logits = p @ c.T / temperature  # [n, m]
    return torch.log_softmax(logits, dim=-1).gather(-1, own.to(pred.device).long()[:, None])[:, 0]


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-6) -> torch.Tensor:
    """(r - mean of its group) / (std of its group + eps), groups being consecutive runs of
    `group_size` samples of the same activation. A group whose rewards are all equal gets 0.
    The std is the population std (divide by G), as in GRPO."""
    r = rewards.float().reshape(-1, group_size)
    mean = r.mean(dim=1, keepdim=True)
    std = r.std(dim=1, unbiased=False, keepdim=True)
    return ((r - mean) / (std + eps)).reshape(-1)


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token estimator of KL(policy || reference) from samples of the policy:
    exp(ref - logp) - (ref - logp) - 1 (non-negative, unbiased; "k3")."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def grpo_loss(
    logp: torch.Tensor,
    ref_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
) -> tuple[torch.Tensor, dict]:
    """On-policy GRPO loss for token log-probs `logp` [n, T] (with grad), `mask` [n, T] for real
    tokens, one advantage per sequence. Per token: -A * ratio + kl_coef * k3, where ratio =
    exp(logp - logp.detach()) (1 in value, the policy gradient in grad). Each sequence's tokens
    are averaged, then sequences are averaged."""
    mask = mask.float()
    ratio = torch.exp(logp - logp.detach())
    per_tok = -advantages.to(logp.device).float()[:, None] * ratio  # rewards are scored on the CPU
    kl = kl_k3(logp, ref_logp) if ref_logp is not None else torch.zeros_like(logp)
    per_tok = per_tok + kl_coef * kl
    lengths = mask.sum(dim=1).clamp_min(1)
    loss = ((per_tok * mask).sum(dim=1) / lengths).mean()
    kl_mean = float(((kl.detach() * mask).sum(dim=1) / lengths).mean())
    return loss, {"kl": kl_mean}
