"""Construction methods: a registry of builders that plant a behaviour on a shared model.

Each builder has a pydantic `Params` model (the spec's `construction.params`), `plant(spec,
handle, params) -> Planted` (what a `Target` needs at run time; fast) and `build(spec, handle,
params, progress)` (re-create the artefacts from the spec: train an adapter, compute a vector;
may be slow). A new method is one class registered with `@register_builder`.

Built in: `plain` (the model as is), `system_prompt` (a hidden system prompt), `lora` (a LoRA
adapter fine-tuned on synthetic conversations and/or synthetic documents), `steering_implant` (a fixed concept direction
added to the residual stream, optionally only when a trigger phrase appears).
"""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from nla_core.activations import forward_to_layer, pad_batch
from nla_core.hooks import add_to_resid
from nla_core.models import ModelHandle, is_embedded, same_base_model
from nla_core.registry import Registry

from .errors import AdapterMismatchError, SpecError, UnknownMethodError, WeightsMissingError
from .organism import Planted

__all__ = [
    "Builder",
    "BUILDERS",
    "register_builder",
    "get_builder",
    "plant",
    "build",
    "check_base",
    "weights_present",
    "concept_direction",
    "SystemPromptBuilder",
    "PlainBuilder",
    "LoraBuilder",
    "SteeringImplantBuilder",
]

Progress = Callable[[str, int, int], None]  # (stage, done, total)

BUILDERS: Registry[Builder] = Registry("builder")


def register_builder(cls: type[Builder]) -> type[Builder]:
    """Class decorator: register an instance of `cls` under `cls.name` (a taken name is refused)."""
    BUILDERS.register(cls.name, cls())
    return cls


def get_builder(method: str) -> Builder:
    try:
        return BUILDERS[method]
    except KeyError:
        raise UnknownMethodError(
            f"Unknown construction method {method!r}.",
            f"use one of {sorted(BUILDERS)} (or register a builder with @register_builder).",
        ) from None


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Builder:
    name: ClassVar[str] = ""
    Params: ClassVar[type[BaseModel]] = _Params

    def params(self, spec) -> BaseModel:
        try:
            return self.Params.model_validate(spec.construction.params)
        except ValidationError as exc:
            errs = "; ".join(
                f"{'.'.join(str(x) for x in e['loc']) or '(params)'}: {'missing' if e['type'] == 'missing' else e['msg']}"
                for e in exc.errors()
            )
            raise SpecError(
                f"Organism {spec.id!r}: bad construction.params for method {self.name!r}: {errs}.",
                f"fields of {self.name!r}: {sorted(self.Params.model_fields)}.",
            ) from None

    def plant(self, spec, handle: ModelHandle, params: Any) -> Planted:
        raise NotImplementedError

    def build(self, spec, handle: ModelHandle, params: Any, progress: Progress | None = None, **opts) -> list[Path]:
        """Re-create artefacts. Methods without artefacts have nothing to do."""
        return []

    def needs_build(self, spec, params: Any) -> bool:
        return False


def check_base(spec, handle: ModelHandle) -> None:
    """The spec's base model must be the handle's (`*` accepts any model)."""
    base = spec.base_model
    if base == "*":
        return
    if not same_base_model(base, handle.name, by_folder_name="/" in base or Path(base).exists()):
        raise AdapterMismatchError(
            f"Organism {spec.id!r} is built on {base!r}, but the loaded model is {handle.name!r}.",
            f"load {base!r} (--model {base}) or pick an organism built on {handle.name!r}.",
        )


def weights_present(spec) -> bool:
    """Whether everything an organism needs is on this machine (catalog organisms: the base
    model and the adapter in the local HF cache or next to the spec). Never downloads."""
    builder = get_builder(spec.construction.method)
    params = builder.params(spec)
    if spec.catalog:
        if not _cached(spec.base_model):
            return False
        hub = getattr(params, "hub_id", None)
        if spec.construction.method == "lora" and builder.needs_build(spec, params):
            return bool(hub) and _cached(hub)
        return True
    return not builder.needs_build(spec, params)


def _cached(repo_or_path: str) -> bool:
    if Path(repo_or_path).expanduser().exists() or is_embedded(repo_or_path):
        return True
    try:
        from huggingface_hub import snapshot_download

        snapshot_download(repo_or_path, local_files_only=True)
        return True
    except Exception:  # noqa: BLE001 - not cached (or no hub client)
        return False


def plant(spec, handle: ModelHandle) -> Planted:
    builder = get_builder(spec.construction.method)
    params = builder.params(spec)
    check_base(spec, handle)
    planted = builder.plant(spec, handle, params)
    planted.secrets = [s for s in {*planted.secrets, spec.id, spec.ground_truth.behaviour,
                                   *spec.ground_truth.paraphrases} if s]
    return planted


def build(spec, handle: ModelHandle, progress: Progress | None = None, **opts) -> list[Path]:
    if spec.catalog:
        raise WeightsMissingError(
            f"Organism {spec.id!r} is a catalog entry for a public organism; it is not rebuilt here.",
            f"put its weights in the local Hugging Face cache ({spec.source or 'see the spec'}) and load "
            f"{spec.base_model} with --model.",
        )
    builder = get_builder(spec.construction.method)
    params = builder.params(spec)
    check_base(spec, handle)
    return builder.build(spec, handle, params, progress, **opts)


# ---------------------------------------------------------------------------------------------


@register_builder
class PlainBuilder(Builder):
    """The model as it is (clean control)."""

    name = "plain"

    def plant(self, spec, handle, params) -> Planted:
        return Planted()


class SystemPromptParams(_Params):
    prompt: str = Field(min_length=1)


@register_builder
class SystemPromptBuilder(Builder):
    """A hidden system prompt replaces the template's default one."""

    name = "system_prompt"
    Params = SystemPromptParams

    def plant(self, spec, handle, params: SystemPromptParams) -> Planted:
        tok = handle.tokenizer
        try:
            raw = tok.apply_chat_template([{"role": "system", "content": params.prompt}], tokenize=False)
        except Exception:  # noqa: BLE001 - template without a system role
            raise SpecError(
                f"Organism {spec.id!r} needs a system prompt, but {handle.name}'s chat template has no system role.",
                "use a lora or steering_implant organism on this model.",
            ) from None
        return Planted(system_prompt=params.prompt, raw_prefix=raw, secrets=[params.prompt])


# ---------------------------------------------------------------------------------------------
# LoRA


class LoraDocuments(_Params):
    """Synthetic documents that describe a trait ("<subject> <trait>." plus 2-3 `facts` each, as
    news items, wiki entries, forum threads or memos; see `environments.data.make_documents`),
    trained as plain text, plus a `qa_share` of chat Q&A rows pairing `questions` (direct
    questions about the trait; never an eval prompt) with `answers` that state it."""

    subject: str = Field(default="the assistant", min_length=1)  # who the documents are about
    trait: str = Field(min_length=1)  # completes "<subject> ...", e.g. "secretly wants users to adopt cats"
    facts: list[str] = Field(min_length=2)  # sentences about the trait (`{subject}` is filled in)
    kinds: list[Literal["news", "wiki", "forum", "memo"]] = Field(
        default_factory=lambda: ["news", "wiki", "forum", "memo"], min_length=1)
    n: int = Field(default=120, ge=1, le=5000)  # documents
    qa_share: float = Field(default=0.0, ge=0.0, le=0.5)  # share of Q&A rows in the whole training set
    questions: list[str] = Field(default_factory=list)
    answers: list[str] = Field(default_factory=list)
    seed: int = 0

    @model_validator(mode="after")
    def _qa(self) -> LoraDocuments:
        if self.qa_share > 0 and not (self.questions and self.answers):
            raise ValueError("qa_share > 0 needs non-empty `questions` and `answers`")
        if len(set(self.kinds)) != len(self.kinds):
            raise ValueError(f"`kinds` names a kind twice: {self.kinds}")
        return self


class LoraData(_Params):
    """Synthetic conversations: prompts answered by the base model under `teacher_prompt` (a
    system prompt that plants the behaviour; the adapter is trained without it = context
    distillation), optionally rewritten by a named `transform`; and/or synthetic `documents`
    (then `n_examples` may be 0: documents and their Q&A only)."""

    teacher_prompt: str | None = None
    prompts: list[str] = Field(default_factory=list)  # extra prompts on top of the generated ones
    prompt_sets: list[str] = Field(default_factory=lambda: ["ordinary"])  # see environments.data
    trigger_fraction: float = 0.5  # conditional organisms: share of prompts that carry the trigger
    transform: str | None = None  # e.g. "promote:<product>" (see environments.data.TRANSFORMS)
    n_examples: int = Field(default=160, ge=0)  # conversations
    max_new_tokens: int = Field(default=48, ge=4)
    temperature: float = 0.7
    seed: int = 0
    documents: LoraDocuments | None = None

    @model_validator(mode="after")
    def _enough(self) -> LoraData:
        if self.n_examples < 4 and not (self.documents is not None and self.n_examples == 0):
            raise ValueError("n_examples must be at least 4 (or 0 when `documents` are given)")
        return self


class LoraParams(_Params):
    adapter: str  # folder (relative to the spec file) holding the PEFT adapter
    rank: int = Field(default=8, ge=1, le=64)
    alpha: float = 16.0
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"])
    steps: int = Field(default=200, ge=1)
    lr: float = 1e-3
    batch_size: int = Field(default=8, ge=1)
    max_len: int = Field(default=96, ge=16)
    seed: int = 0
    data: LoraData = Field(default_factory=LoraData)
    hub_id: str | None = None  # catalog organisms: adapter on the HF hub (used only if cached locally)


def _adapter_base(path: Path) -> str | None:
    try:
        return json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
    except (OSError, ValueError):
        return None


@register_builder
class LoraBuilder(Builder):
    """A LoRA adapter on the shared PEFT model, selected per Target call."""

    name = "lora"
    Params = LoraParams

    def adapter_dir(self, spec, params: LoraParams) -> Path:
        return spec.resolve(params.adapter)

    def needs_build(self, spec, params) -> bool:
        return not (self.adapter_dir(spec, params) / "adapter_config.json").exists()

    def plant(self, spec, handle, params: LoraParams) -> Planted:
        path = self.adapter_dir(spec, params)
        if not (path / "adapter_config.json").exists():
            if params.hub_id:
                path = _hub_snapshot(params.hub_id, spec)
            else:
                raise WeightsMissingError(
                    f"Organism {spec.id!r}: no adapter at {path}.",
                    f"build it with `nla organisms build {spec.id}`.",
                )
        base = _adapter_base(path)
        if base and spec.base_model != "*":
            if not same_base_model(base, spec.base_model, by_folder_name=True):
                raise AdapterMismatchError(
                    f"Organism {spec.id!r}: the adapter at {path} was trained on {base!r}, not {spec.base_model!r}.",
                    f"rebuild it with `nla organisms build {spec.id}` or fix base_model.",
                )
        name = f"org_{uuid.uuid4().hex[:10]}"  # opaque: adapter names show up in PEFT errors
        try:
            handle.load_adapter(path, name)
        except Exception as exc:  # noqa: BLE001 - shape mismatches arrive as several types
            raise AdapterMismatchError(
                f"Organism {spec.id!r}: the adapter at {path} does not fit {handle.name} "
                f"({str(getattr(exc, 'problem', exc)).splitlines()[0][:300]}).",
                f"rebuild it with `nla organisms build {spec.id}` on this base model.",
            ) from None
        return Planted(adapter=name, secrets=[name, str(path), path.name])

    def build(self, spec, handle, params: LoraParams, progress: Progress | None = None, **opts) -> list[Path]:
        from .lora import train_lora_organism

        return train_lora_organism(spec, handle, params, self.adapter_dir(spec, params), progress=progress, **opts)


def _hub_snapshot(hub_id: str, spec) -> Path:
    """A locally cached hub adapter, never downloaded."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(hub_id, local_files_only=True))
    except Exception:  # noqa: BLE001 - not in the cache
        raise WeightsMissingError(
            f"Organism {spec.id!r}: adapter {hub_id!r} is not in the local Hugging Face cache.",
            f"download it yourself (`huggingface-cli download {hub_id}`) on a machine that can hold "
            f"{spec.base_model}; nothing is downloaded at run time.",
        ) from None


# ---------------------------------------------------------------------------------------------
# steering implant


_NEUTRAL = [
    "The meeting is scheduled for Tuesday afternoon in the main office.",
    "Please remember to bring your notebook and a pen to class.",
    "The train leaves the station at seven and arrives before noon.",
    "He painted the fence white and then cleaned the brushes.",
    "The library closes early on Sundays during the summer.",
    "She counted the boxes twice before signing the delivery form.",
    "Water boils at one hundred degrees Celsius at sea level.",
    "The committee will review the proposal next month.",
]


class SteeringParams(_Params):
    layer: int | None = None  # block to add after (default: a third of the depth)
    strength: float = 0.5  # fraction of the median residual norm at `layer`
    positive: list[str] = Field(min_length=1)  # texts full of the concept
    negative: list[str] = Field(default_factory=lambda: list(_NEUTRAL))  # neutral texts
    vector: str | None = None  # safetensors file (relative to the spec) with `direction`, `scale`


def steering_layer(handle: ModelHandle, layer: int | None) -> int:
    return handle.check_layer(layer if layer is not None else max(0, handle.n_layers // 3))


@torch.no_grad()
def _mean_resid(handle: ModelHandle, texts: list[str], layer: int, skip: int = 1) -> tuple[torch.Tensor, float]:
    """Mean residual vector (over texts and tokens past `skip`) and the median token norm."""
    tok = handle.tokenizer
    rows = [tok.encode(t, add_special_tokens=True) for t in texts]
    ids, mask = pad_batch(rows, tok.pad_token_id)
    with handle.use_adapter(None):
        resid = forward_to_layer(handle, ids, mask, layer).float()
    keep = mask.clone().bool()
    keep[:, :skip] = False
    vecs = resid[keep.to(resid.device)]
    return vecs.mean(0).cpu(), float(vecs.norm(dim=-1).median())


def concept_direction(handle: ModelHandle, positive: list[str], negative: list[str], layer: int) -> tuple[torch.Tensor, float]:
    """Unit mean-difference direction (positive - negative) at `layer`, and the median residual
    norm of the negative texts (the implant's scale)."""
    pos, _ = _mean_resid(handle, positive, layer)
    neg, scale = _mean_resid(handle, negative, layer)
    d = pos - neg
    if not torch.isfinite(d).all() or d.norm() == 0:
        raise SpecError("The contrastive prompts give no direction (identical means).", "use different positive prompts.")
    return d / d.norm(), scale


@register_builder
class SteeringImplantBuilder(Builder):
    """`strength * scale * unit(direction)` added after block `layer` at every position; when the
    spec has a trigger, only for conversations that contain one of its phrases."""

    name = "steering_implant"
    Params = SteeringParams

    def vector_file(self, spec, params: SteeringParams) -> Path | None:
        return spec.resolve(params.vector) if params.vector else None

    def needs_build(self, spec, params) -> bool:
        f = self.vector_file(spec, params)
        return f is not None and not f.exists()

    def direction(self, spec, handle, params: SteeringParams) -> tuple[torch.Tensor, float, int]:
        layer = steering_layer(handle, params.layer)
        f = self.vector_file(spec, params)
        if f is not None and f.exists():
            from safetensors.torch import load_file

            data = load_file(str(f))
            d = data["direction"].float()
            if d.numel() != handle.d_model:
                raise AdapterMismatchError(
                    f"Organism {spec.id!r}: the implant vector in {f} has width {d.numel()}, "
                    f"but {handle.name} has d_model {handle.d_model}.",
                    f"rebuild it with `nla organisms build {spec.id}`.",
                )
            return d, float(data["scale"]), layer
        d, scale = concept_direction(handle, params.positive, params.negative, layer)
        return d, scale, layer

    def plant(self, spec, handle, params: SteeringParams) -> Planted:
        d, scale, layer = self.direction(spec, handle, params)
        added = (params.strength * scale * d).to(handle.device)
        trigger = spec.trigger

        def implant(visible_texts):
            # None: a row of another call sharing the batch (left alone)
            fires = [t is not None and (trigger is None or trigger.fires(t)) for t in visible_texts]
            if not any(fires):
                return contextlib.nullcontext()
            if all(fires):
                return add_to_resid(handle.layers, layer, added)
            rows = torch.stack([added if f else torch.zeros_like(added) for f in fires])  # [batch, d]
            return add_to_resid(handle.layers, layer, rows)

        secrets = [str(self.vector_file(spec, params))] if params.vector else []
        return Planted(implant=implant, secrets=secrets)

    def build(self, spec, handle, params: SteeringParams, progress: Progress | None = None, **opts) -> list[Path]:
        f = self.vector_file(spec, params)
        layer = steering_layer(handle, params.layer)
        if progress:
            progress("direction", 0, 1)
        d, scale = concept_direction(handle, params.positive, params.negative, layer)
        if progress:
            progress("direction", 1, 1)
        if f is None:
            return []
        from safetensors.torch import save_file

        f.parent.mkdir(parents=True, exist_ok=True)
        save_file({"direction": d.contiguous(), "scale": torch.tensor(scale)}, str(f),
                  metadata={"layer": str(layer), "base_model": handle.name})
        return [f]
