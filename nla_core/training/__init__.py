"""Training NLAs: corpus -> activation dataset -> warm-start explanations -> AR warm-start
(MSE) -> AV warm-start (SFT) -> joint loop (GRPO for the AV, MSE for the AR) -> evaluation.

Every stage works in a run folder (`Run`), is resumable from its last checkpoint, shows a
progress bar and appends to a JSONL log. See `stages` for the stage functions and `config`
for the presets.
"""

from .config import (
    PLAIN_CRITIC_TEMPLATE,
    PRESETS,
    SHORT_ACTOR_TEMPLATE,
    ConfigChangedError,
    TrainConfig,
    config_diff,
    preset,
)
from .corpus import Document, load_corpus, shipped_prompts, shipped_texts
from .dataset import ActivationDataset, DatasetMismatchError, DatasetSplit, extract_dataset, split_documents
from .grpo import group_advantages, grpo_loss, kl_k3, rewards_from_mse
from .run import Run, StageLog
from .stages import (
    av_logprobs,
    build_data,
    evaluate,
    load_explanations,
    load_nla,
    new_nla,
    save_nla,
    train_ar_warmstart,
    train_av_warmstart,
    train_rl,
)
from .summarize import (
    ClaudeSummarizer,
    OfflineSummarizer,
    copy_stats,
    estimate_cost,
    longest_common_run,
    make_summarizer,
    trigram_copy_rate,
)

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
