"""The `nla_meta.yaml` sidecar and NLA checkpoint folders.

Two layouts load here:

* the public NLA release: an AV folder and an AR folder, each a full HF model (the AR truncated
  to K+1 blocks, with `value_head.safetensors`) and its own `nla_meta.yaml`
  (`role: actor` / `role: critic`);
* ours: one folder with `nla_meta.yaml` (`role: nla_pair`, `base_model: ...`), PEFT adapters in
  `av/` and `ar/` over the shared base weights, `ar/value_head.safetensors`, and optional
  `stats.safetensors` (mean of the normalised training activations, for FVE).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import CheckpointError, SidecarDriftError

__all__ = [
    "SIDECAR",
    "ACTOR_TEMPLATE",
    "CRITIC_TEMPLATE",
    "EXPLANATION_OPEN",
    "EXPLANATION_CLOSE",
    "NLAMeta",
    "TokenMeta",
    "ExtractionMeta",
    "CriticMeta",
    "read_meta",
    "write_meta",
    "marker_token_id",
    "extract_explanation",
    "check_safetensors",
    "load_safetensors",
]

SIDECAR = "nla_meta.yaml"
EXPLANATION_OPEN, EXPLANATION_CLOSE = "<explanation>", "</explanation>"

# Our own wording; released checkpoints bring theirs in the sidecar.
ACTOR_TEMPLATE = (
    "Between the concept tags below is one activation vector from inside a language model. "
    "Say what the model is representing at that point: in 2-3 short snippets, name the topic, "
    "the kind of text, and what is likely to come next. Answer inside <explanation></explanation> "
    "tags.\n\n<concept>{injection_char}</concept>"
)
CRITIC_TEMPLATE = "Summary of the following text: <text>{explanation}</text> <summary>"

ACTOR_ROLES = {"actor", "av"}
CRITIC_ROLES = {"critic", "ar"}
PAIR_ROLE = "nla_pair"


class TokenMeta(BaseModel):
    model_config = ConfigDict(extra="allow")
    injection_char: str
    injection_token_id: int
    injection_left_neighbor_id: int
    injection_right_neighbor_id: int


class ExtractionMeta(BaseModel):
    model_config = ConfigDict(extra="allow")
    injection_scale: float | None = None
    mse_scale: float | str | None = "sqrt_d_model"
    layer_index: int | None = None


class CriticMeta(BaseModel):
    model_config = ConfigDict(extra="allow")
    extraction_layer_index: int


class NLAMeta(BaseModel):
    """`nla_meta.yaml`. Unknown fields of released sidecars are kept and written back."""

    model_config = ConfigDict(extra="allow")
    kind: str = "nla_model"
    role: str = PAIR_ROLE
    base_model: str | None = None
    d_model: int
    extraction: ExtractionMeta = Field(default_factory=ExtractionMeta)
    tokens: TokenMeta | None = None
    prompt_templates: dict[str, str] = Field(default_factory=dict)
    critic: CriticMeta | None = None
    trained: bool = True

    @property
    def layer(self) -> int:
        if self.critic is not None:
            return self.critic.extraction_layer_index
        if self.extraction.layer_index is not None:
            return self.extraction.layer_index
        raise CheckpointError(
            "nla_meta.yaml names no extraction layer (critic.extraction_layer_index).",
            "add `critic: {extraction_layer_index: K}` to the sidecar.",
        )

    @property
    def actor_template(self) -> str:
        t = self.prompt_templates.get("av") or self.prompt_templates.get("actor")
        if not t:
            raise CheckpointError("nla_meta.yaml has no prompt_templates.actor.", "add the AV prompt template.")
        return t

    @property
    def critic_template(self) -> str:
        t = self.prompt_templates.get("ar") or self.prompt_templates.get("critic")
        if not t:
            raise CheckpointError("nla_meta.yaml has no prompt_templates.critic.", "add the AR prompt template.")
        return t

    @property
    def mse_scale(self) -> float:
        raw = self.extraction.mse_scale
        if raw is None or raw == "sqrt_d_model":
            return math.sqrt(self.d_model)
        return float(raw)

    @classmethod
    def build(
        cls,
        tokenizer: Any,
        *,
        d_model: int,
        layer: int,
        injection_scale: float,
        base_model: str | None,
        injection_char: str | None = None,
        actor_template: str = ACTOR_TEMPLATE,
        critic_template: str = CRITIC_TEMPLATE,
        trained: bool = False,
    ) -> NLAMeta:
        """A sidecar for `tokenizer`, with the marker and its neighbours read off the live
        tokenizer (the marker is a rare single-token character chosen automatically)."""
        char = injection_char or pick_marker(tokenizer)
        token_id = marker_token_id(tokenizer, char)
        left, right = _neighbours(tokenizer, actor_template, char, token_id)
        return cls(
            role=PAIR_ROLE,
            base_model=base_model,
            d_model=d_model,
            extraction=ExtractionMeta(injection_scale=injection_scale, layer_index=layer),
            tokens=TokenMeta(
                injection_char=char,
                injection_token_id=token_id,
                injection_left_neighbor_id=left,
                injection_right_neighbor_id=right,
            ),
            prompt_templates={"actor": actor_template, "critic": critic_template},
            critic=CriticMeta(extraction_layer_index=layer),
            trained=trained,
        )

    def verify(self, tokenizer: Any, *, d_model: int, n_layers: int | None, where: str) -> None:
        """Assert the sidecar against the live tokenizer and model; name what drifted."""
        if d_model != self.d_model:
            raise SidecarDriftError(
                f"{where}: nla_meta.yaml says d_model={self.d_model} but the model has {d_model}.",
                "load the checkpoint with the base model it was trained on.",
            )
        if n_layers is not None and not 0 <= self.layer < n_layers:
            raise SidecarDriftError(
                f"{where}: extraction layer {self.layer} does not exist in a {n_layers}-block model.",
                "load the checkpoint with the base model it was trained on.",
            )
        if self.tokens is None:
            return
        t = self.tokens
        live = tokenizer.encode(t.injection_char, add_special_tokens=False)
        if live != [t.injection_token_id]:
            raise SidecarDriftError(
                f"{where}: tokenizer drift: marker {t.injection_char!r} encodes to {live}, the sidecar "
                f"says [{t.injection_token_id}].",
                "use the tokenizer the checkpoint was trained with.",
            )
        left, right = _neighbours(tokenizer, self.actor_template, t.injection_char, t.injection_token_id)
        if (left, right) != (t.injection_left_neighbor_id, t.injection_right_neighbor_id):
            raise SidecarDriftError(
                f"{where}: template drift: marker neighbours are ({left}, {right}) with the live "
                f"tokenizer, the sidecar says ({t.injection_left_neighbor_id}, "
                f"{t.injection_right_neighbor_id}).",
                "use the tokenizer and actor template the checkpoint was trained with.",
            )


def marker_token_id(tokenizer: Any, char: str) -> int:
    ids = tokenizer.encode(char, add_special_tokens=False)
    if len(ids) != 1:
        raise CheckpointError(
            f"Marker {char!r} is {len(ids)} tokens in this tokenizer; it must be exactly one.",
            "pick a rare character that the tokenizer keeps whole.",
        )
    return ids[0]


def pick_marker(tokenizer: Any) -> str:
    """The highest-id single-token CJK character: rare in ordinary text, one token long."""
    for token_id in range(len(tokenizer) - 1, 0, -1):
        s = tokenizer.decode([token_id])
        if len(s) == 1 and 0x3000 <= ord(s) <= 0x9FFF:
            if tokenizer.encode(s, add_special_tokens=False) == [token_id]:
                return s
    raise CheckpointError(
        "Found no single-token CJK character in this tokenizer to use as the injection marker.",
        "pass injection_char explicitly.",
    )


def actor_prompt_ids(tokenizer: Any, template: str, char: str) -> list[int]:
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": template.format(injection_char=char)}],
        tokenize=False,
        add_generation_prompt=True,
    )
    return tokenizer.encode(text, add_special_tokens=False)


def _neighbours(tokenizer: Any, template: str, char: str, token_id: int) -> tuple[int, int]:
    ids = actor_prompt_ids(tokenizer, template, char)
    hits = [i for i, t in enumerate(ids) if t == token_id]
    if len(hits) != 1 or not 0 < hits[0] < len(ids) - 1:
        raise SidecarDriftError(
            f"The marker {char!r} appears {len(hits)} times in the rendered actor prompt (need 1, "
            "not at either end).",
            "check the actor template and the tokenizer's chat template.",
        )
    p = hits[0]
    return ids[p - 1], ids[p + 1]


def extract_explanation(text: str) -> str | None:
    """The text between the first <explanation> tags, or None when the tags are missing."""
    start = text.find(EXPLANATION_OPEN)
    if start < 0:
        return None
    end = text.find(EXPLANATION_CLOSE, start)
    if end < 0:
        return None
    return text[start + len(EXPLANATION_OPEN) : end].strip()


def read_meta(folder: str | Path) -> NLAMeta:
    path = Path(folder) / SIDECAR
    if not path.exists():
        raise CheckpointError(
            f"No {SIDECAR} in {folder}: this is not an NLA checkpoint.",
            "point at a folder that holds nla_meta.yaml (an AV folder, or one of ours with av/ and ar/).",
        )
    try:
        raw = yaml.safe_load(path.read_text())
        return NLAMeta.model_validate(raw)
    except (yaml.YAMLError, ValidationError) as exc:
        raise CheckpointError(f"{path} is not a valid sidecar: {exc}", "restore the file from the checkpoint.") from exc


def write_meta(folder: str | Path, meta: NLAMeta) -> Path:
    path = Path(folder) / SIDECAR
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(meta.model_dump(mode="json", exclude_none=True), sort_keys=False, allow_unicode=True))
    tmp.replace(path)
    return path


def check_safetensors(*folders: str | Path) -> None:
    """Refuse a checkpoint whose `.safetensors` files (adapters, value head, stats) are truncated
    or not safetensors at all, naming the file, before PEFT or torch read it. Reading the header
    is enough: safetensors checks that the data it describes covers the file exactly."""
    from safetensors import safe_open

    for folder in folders:
        folder = Path(folder)
        files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else [folder]
        for f in files:
            try:
                with safe_open(str(f), framework="pt") as fh:
                    fh.keys()
            except Exception as exc:  # SafetensorError, OSError: the file cannot be used either way
                raise CheckpointError(
                    f"{f} is damaged (truncated or not a safetensors file): {exc}",
                    "copy the checkpoint folder again, or point at an intact checkpoint.",
                ) from None


def load_safetensors(path: str | Path, key: str) -> Any:
    """Tensor `key` of the safetensors file at `path`, with a CheckpointError (not a raw
    SafetensorError or KeyError) when the file is damaged or lacks the tensor."""
    from safetensors.torch import load_file

    check_safetensors(path)
    tensors = load_file(str(path))
    if key not in tensors:
        raise CheckpointError(f"{path} holds no tensor {key!r} (it has {', '.join(sorted(tensors)) or 'none'}).",
                              "use the file written with this checkpoint.")
    return tensors[key]
