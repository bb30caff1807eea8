"""Training NLAs: corpus -> activation dataset -> warm-start explanations -> AR warm-start
(MSE) -> AV warm-start (SFT) -> joint loop (GRPO for the AV, MSE for the AR) -> evaluation.

Every stage works in a run folder (`Run`), is resumable from its last checkpoint, shows a
progress bar and appends to a JSONL log. The stages: `data` (build_data), `warmstart` (AR and AV
warm-starts), `rl` (the joint loop), `evaluation`; `ship` packages a result. What they share is in
`common` (stage loop, checkpoints, precision, adapters) and `objectives` (AV log-probs, AR step);
`config` holds the presets.
"""

from .common import load_explanations, load_nla, new_nla, save_nla
from .config import (
    PLAIN_CRITIC_TEMPLATE,
    PRESETS,
    SHORT_ACTOR_TEMPLATE,
    ConfigChangedError,
    TrainConfig,
    config_diff,
    preset,
)
from .corpus import load_corpus, shipped_prompts, shipped_texts
from .data import build_data
from .dataset import ActivationDataset, DatasetMismatchError, DatasetSplit, extract_dataset, split_documents
from .document import Document
from .evaluation import evaluate
from .grpo import group_advantages, grpo_loss, kl_k3, rewards_from_mse
from .objectives import av_logprobs
from .rl import train_rl
from .run import Run, StageLog
from .summarize import (
    ClaudeSummarizer,
    OfflineSummarizer,
    copy_stats,
    estimate_cost,
    longest_common_run,
    make_summarizer,
    trigram_copy_rate,
)
from .warmstart import train_ar_warmstart, train_av_warmstart

__all__ = [
    "PLAIN_CRITIC_TEMPLATE", "PRESETS", "SHORT_ACTOR_TEMPLATE", "ConfigChangedError", "TrainConfig", "config_diff", "preset",
    "Document", "load_corpus", "shipped_prompts", "shipped_texts",
    "ActivationDataset", "DatasetMismatchError", "DatasetSplit", "extract_dataset", "split_documents",
    "group_advantages", "grpo_loss", "kl_k3", "rewards_from_mse",
    "Run", "StageLog",
    "av_logprobs", "build_data", "evaluate", "load_explanations", "load_nla", "new_nla", "save_nla",
    "train_ar_warmstart", "train_av_warmstart", "train_rl",
    "ClaudeSummarizer", "OfflineSummarizer", "copy_stats", "estimate_cost", "longest_common_run",
    "make_summarizer", "trigram_copy_rate",
]
