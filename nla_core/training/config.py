"""One pydantic config per training run, with a CPU preset (small, the embedded model on 2
cores) and a GPU preset (the released recipe's scale). The run folder keeps the config it was
started with; resuming with a different one is refused and the changed fields are named."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..errors import NLAError

__all__ = [
    "CorpusConfig", "LoraConfigModel", "ARWarmstartConfig", "AVWarmstartConfig", "RLConfig",
    "EvalConfig", "TrainConfig", "ConfigChangedError", "preset", "PRESETS", "SHORT_ACTOR_TEMPLATE", "PLAIN_CRITIC_TEMPLATE",
    "CPU_ACTOR_TEMPLATE",
    "config_diff",
]

# A shorter AV prompt than the default (about 60 instead of 100 tokens with SmolLM2's chat
# template): on CPU the AV's cost is dominated by its prompt.
SHORT_ACTOR_TEMPLATE = (
    "Describe the activation vector in <concept>{injection_char}</concept>: topic, kind of text and "
    "the next words, inside <explanation></explanation> tags."
)


PLAIN_CRITIC_TEMPLATE = "{explanation}"


class ConfigChangedError(NLAError):
    pass


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CorpusConfig(_Strict):
    # "offline" (target-written chat transcripts from the shipped prompt list + shipped texts),
    # a local .txt/.jsonl file or folder, or "hf:NAME[:SPLIT]" (only with NLA_AUDIT_ALLOW_DOWNLOAD=1).
    source: str = "offline"
    n_chats: int = 104  # offline: how many shipped prompts the target answers
    reply_tokens: int = 96  # offline: length of each target-written reply
    reply_temperature: float = 0.7
    include_shipped_texts: bool = True
    # offline: WordNet topic documents (one per topic, see topics.py); with them the held-out
    # split holds whole topics never seen in training, and `nla eval` reports topic recall.
    n_topics: int = 0
    topic_chat_share: float = 0.5
    max_docs: int | None = None
    max_doc_tokens: int = 256
    positions_per_doc: int = 16
    skip_first: int = 10  # never sample the first tokens (atypical norms)
    # Split by document: fractions for AR warm-start, AV warm-start, RL, held-out.
    splits: dict[str, float] = Field(
        default_factory=lambda: {"ar_warm": 0.3, "av_warm": 0.3, "rl": 0.25, "heldout": 0.15}
    )


class LoraConfigModel(_Strict):
    rank: int = 4
    alpha: int = 8
    dropout: float = 0.0
    targets: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"])
    # The AR adapts only blocks >= ar_from_fraction * K (cheaper backward; the head does most
    # of the work). 0 adapts every block up to K.
    ar_from_fraction: float = 0.5


class ARWarmstartConfig(_Strict):
    # The head is first fitted in closed form (ridge, validated) on cached AR features.
    steps: int = 20  # then LoRA + head steps
    batch_size: int = 16
    lr: float = 5e-5  # LoRA
    # The head starts from the closed-form fit and its inputs include a few huge residual
    # dimensions, so Adam steps on it must be small.
    head_step_lr: float = 2e-5


class AVWarmstartConfig(_Strict):
    steps: int = 40
    batch_size: int = 8
    lr: float = 1e-3


class RLConfig(_Strict):
    steps: int = 16
    batch_prompts: int = 2  # activations per step
    group_size: int = 4  # G samples per activation
    temperature: float = 1.0
    max_new_tokens: int = 48  # room for the tags around a ~32-token explanation
    av_lr: float = 1e-4
    ar_lr: float = 5e-5
    ar_head_lr: float = 2e-5
    kl_coef: float = 0.01
    missing_tag_reward: float = -2.0
    ar_steps_per_iter: int = 1
    # reward = (1 - w) * (-MSE) + w * InfoNCE log-prob of the own activation among the batch's
    # activations plus `contrastive_negatives` others from the RL split (cosine / temperature).
    # Without it the AV can collapse onto a template that the AR memorises (FVE still rises).
    contrastive_weight: float = 0.0
    contrastive_temperature: float = 0.1
    contrastive_negatives: int = 60


class EvalConfig(_Strict):
    n_heldout: int = 32
    max_new_tokens: int = 56
    n_examples: int = 5


class TrainConfig(_Strict):
    preset: str = "cpu"
    model: str | None = None  # None: the embedded default
    layer: int | None = None  # None: the block near 2/3 depth
    seed: int = 0
    threads: int = 1  # torch CPU threads
    finetune: Literal["lora", "full"] = "lora"
    # bf16 autocast for the training forwards and backwards (not for reading activations, the
    # ridge features or evaluation). "auto": on CUDA, and on CPUs with native bf16 (avx512_bf16 /
    # amx_bf16), where it measured 2.7x faster per AV step than float32 on 2 cores.
    autocast: Literal["auto", "off", "bf16"] = "auto"
    actor_template: str | None = SHORT_ACTOR_TEMPLATE  # None: the package default
    # The AR reads the last token of this template. None: the released wording ("Summary of
    # the following text: <text>...</text> <summary>"). The CPU preset reads the explanation's
    # own last token, which the offline summaries end on the current token: on a 135M model
    # with little training that state is far easier to map back to the activation.
    critic_template: str | None = PLAIN_CRITIC_TEMPLATE
    summarizer: Literal["auto", "offline", "claude"] = "auto"
    claude_model: str = "claude-haiku-4-5"
    claude_concurrency: int = 8
    explanation_tokens: int = 32  # warm-start explanations are cut to this many tokens
    save_every: int = 5
    corpus: CorpusConfig = Field(default_factory=CorpusConfig)
    lora: LoraConfigModel = Field(default_factory=LoraConfigModel)
    ar_warmstart: ARWarmstartConfig = Field(default_factory=ARWarmstartConfig)
    av_warmstart: AVWarmstartConfig = Field(default_factory=AVWarmstartConfig)
    rl: RLConfig = Field(default_factory=RLConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    # ---- io ---------------------------------------------------------------------------------

    @classmethod
    def from_file(cls, path: str | Path) -> TrainConfig:
        path = Path(path)
        if not path.exists():
            raise NLAError(f"Config file {path} does not exist.", "pass a YAML file written by `nla train config`.")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
            base = preset(raw.get("preset", "cpu")).model_dump()
            return cls.model_validate(_merge(base, raw))
        except (yaml.YAMLError, ValidationError) as exc:
            raise NLAError(f"{path} is not a valid training config: {exc}", "fix the fields named above.") from exc

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False, allow_unicode=True)

    def stage_hash(self, *sections: str) -> str:
        """Hash of the fields a stage depends on (the data fields plus its own sections). Step
        counts are left out: raising one continues a stage from its checkpoint (`Run.open`
        decides when that is allowed)."""
        d = self.model_dump(mode="json")
        keep = {k: d[k] for k in ("model", "layer", "seed", "finetune", "actor_template", "critic_template",
                                  "explanation_tokens", "corpus", "lora")}
        keep.update({s: {k: v for k, v in d[s].items() if k != "steps"} for s in sections})
        return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def config_diff(old: TrainConfig, new: TrainConfig, prefix: str = "") -> list[str]:
    """Dotted names of the fields that differ (ignoring `threads`, which never changes results)."""
    a, b = old.model_dump(mode="json"), new.model_dump(mode="json")

    def walk(x: Any, y: Any, p: str) -> list[str]:
        if isinstance(x, dict) and isinstance(y, dict):
            out = []
            for k in sorted(set(x) | set(y)):
                out += walk(x.get(k), y.get(k), f"{p}.{k}" if p else k)
            return out
        return [] if x == y else [f"{p} ({x!r} -> {y!r})"]

    return walk(a, b, prefix)


# The CPU preset's AV prompt: shorter than the default one (the AV's cost on CPU grows with it).
CPU_ACTOR_TEMPLATE = (
    "What is in <concept>{injection_char}</concept>? Answer inside <explanation></explanation> tags: topic and next words."
)


def _cpu() -> TrainConfig:
    """The embedded model on 2 cores, about 2 hours on one torch thread: the recipe of the
    shipped checkpoint (its `config.yaml` records the run itself). It ships the AV warm-start:
    900 SFT steps beat 300 SFT + 60 RL steps on every content figure, 1500 beat 900 and 2400
    steps overfit; half the documents go to the AV warm-start, since more explanations raised
    topic recall and retrieval at the same 1500 steps, while all 4,886 topics instead of 3,000
    changed nothing, and LoRA rank 32 gained little over rank 8 while a full fine-tune lost most of
    the topic recall (README). Needs WordNet (Debian's `wordnet-base`) for the topic documents."""
    # Block 24, not the generic 2/3 depth (20): the topic is three times as linearly retrievable
    # there (`nla data probe-layers`), and the verbalizer names unseen topics ten times as often.
    return TrainConfig(
        preset="cpu", layer=24, threads=1, actor_template=CPU_ACTOR_TEMPLATE, explanation_tokens=28, save_every=10,
        corpus=CorpusConfig(n_chats=100, n_topics=3000, positions_per_doc=6, max_doc_tokens=192,
                            splits={"ar_warm": 0.3, "av_warm": 0.5, "rl": 0.05, "heldout": 0.15}),
        lora=LoraConfigModel(rank=8, alpha=16),
        ar_warmstart=ARWarmstartConfig(steps=60, batch_size=32),
        av_warmstart=AVWarmstartConfig(steps=1500, batch_size=8, lr=1e-3),
        rl=RLConfig(steps=60, batch_prompts=4, group_size=4, max_new_tokens=40, contrastive_weight=0.5),
        eval=EvalConfig(n_heldout=256, max_new_tokens=44),
    )


def _gpu() -> TrainConfig:
    """The released recipe's scale (Qwen-7B case study), for a GPU and a hub corpus."""
    return TrainConfig(
        preset="gpu", threads=8, actor_template=None, critic_template=None, explanation_tokens=150, save_every=50,
        corpus=CorpusConfig(n_chats=20000, reply_tokens=256, max_doc_tokens=512, positions_per_doc=10,
                            splits={"ar_warm": 0.25, "av_warm": 0.25, "rl": 0.45, "heldout": 0.05}),
        lora=LoraConfigModel(rank=64, alpha=128, ar_from_fraction=0.0,
                             targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
        ar_warmstart=ARWarmstartConfig(steps=1000, batch_size=64, lr=2e-5, head_step_lr=1e-4),
        av_warmstart=AVWarmstartConfig(steps=1000, batch_size=32, lr=2e-5),
        rl=RLConfig(steps=2000, batch_prompts=16, group_size=8, max_new_tokens=150, av_lr=1e-5, ar_lr=5e-5, ar_head_lr=5e-5,
                    kl_coef=0.01),
        eval=EvalConfig(n_heldout=512, max_new_tokens=150),
    )


def _tiny() -> TrainConfig:
    """Seconds on a tiny random model (tests)."""
    return TrainConfig(
        preset="tiny", explanation_tokens=16, save_every=2,
        corpus=CorpusConfig(n_chats=3, reply_tokens=8, max_doc_tokens=48, positions_per_doc=3),
        ar_warmstart=ARWarmstartConfig(steps=3, batch_size=4),
        av_warmstart=AVWarmstartConfig(steps=3, batch_size=4),
        rl=RLConfig(steps=3, batch_prompts=2, group_size=2, max_new_tokens=6),
        eval=EvalConfig(n_heldout=4, max_new_tokens=8, n_examples=2),
    )


PRESETS = {"cpu": _cpu, "gpu": _gpu, "tiny": _tiny}


def preset(name: str) -> TrainConfig:
    if name not in PRESETS:
        raise NLAError(f"Unknown training preset {name!r}.", f"choose one of {sorted(PRESETS)}.")
    return PRESETS[name]()
