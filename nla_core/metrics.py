"""Reconstruction metrics. Vectors are rescaled to norm sqrt(d) before the MSE, so
MSE = 2 (1 - cos); FVE = 1 - MSE / Var, with Var the MSE of predicting the dataset mean.
FVE is NaN where Var is zero (a single vector against its own mean)."""

from __future__ import annotations

import math

import torch

__all__ = ["normalize", "normalized_mse", "mean_baseline", "fve"]


def normalize(v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Rescale each row to L2 norm `scale` (default sqrt(d)); zero rows stay zero."""
    scale = math.sqrt(v.shape[-1]) if scale is None else scale
    return v / (v.float().norm(dim=-1, keepdim=True).clamp_min(1e-12) / scale).to(v.dtype)


def normalized_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-row MSE [n] after rescaling both to norm sqrt(d), on `pred`'s device (a GPU model's
    reconstructions against activations kept on the CPU)."""
    return ((normalize(pred.float()) - normalize(target.to(pred.device).float())) ** 2).mean(dim=-1)


def mean_baseline(vectors: torch.Tensor, mean: torch.Tensor | None = None) -> float:
    """Var: the mean per-row MSE of predicting `mean` (of the normalised vectors; computed
    from `vectors` when not given, e.g. from a training split)."""
    v = normalize(vectors.float())
    mu = v.mean(dim=0) if mean is None else mean.float()
    return float(((v - mu) ** 2).mean())


# A baseline this small means every vector equals the mean (one vector measured against its own
# batch): there is no variance to explain, so FVE is undefined.
_MIN_BASELINE = 1e-12


def fve(mse: torch.Tensor | float, baseline: float) -> float:
    """1 - mean(mse) / baseline. NaN (not an error) when the baseline is zero, i.e. FVE is
    undefined: one vector scored against the mean of its own batch, or identical vectors."""
    m = float(mse.mean()) if isinstance(mse, torch.Tensor) else float(mse)
    if not baseline > _MIN_BASELINE:
        return math.nan
    return 1.0 - m / baseline
