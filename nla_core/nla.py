"""The NLA: an Activation Verbalizer (vector -> text) and an Activation Reconstructor
(text -> vector), plus steering of the target with a vector or a sentence.

For our own NLAs the target, the AV and the AR are one set of base weights: the AV and AR are
LoRA adapters (`nla_av`, `nla_ar`) switched per call, so the three roles cost about one model.
"""

from __future__ import annotations

import contextlib
import copy
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, cast

import torch
from pydantic import BaseModel
from safetensors.torch import save_file
from torch import nn

from .activations import TextOrChat, check_text_length, encode, forward_to_layer, pad_batch
from .checkpoint import (
    ACTOR_ROLES,
    CRITIC_ROLES,
    EXPLANATION_CLOSE,
    NLAMeta,
    actor_prompt_ids,
    check_safetensors,
    extract_explanation,
    load_safetensors,
    read_meta,
    write_meta,
)
from .errors import BadArgumentError, BadVectorError, CheckpointError, EmptyInputError
from .generation import RowHooks, generate_ids
from .hooks import inject_at_marker
from .metrics import fve, mean_baseline, normalize, normalized_mse
from .models import ModelHandle, load_model, same_base_model
from .reference import load_reference_explanations
from .steering import MAX_NEW_TOKENS, MAX_SAMPLES, MAX_STEER_STRENGTH, read_vector_file, steered_generations
from .steering import float_arg as _float_arg
from .steering import int_arg as _int_arg

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedModel

# steered_generations, MAX_STEER_STRENGTH and read_vector_file live in `nla_core.steering`.
__all__ = [
    "NLA", "Verbalization", "RoundTrip", "SteerResult", "AV_ADAPTER", "AR_ADAPTER",
    "default_layer", "steered_generations", "identity_head", "measure_resid_norm",
    "MAX_STEER_STRENGTH", "read_vector_file",
]

AV_ADAPTER, AR_ADAPTER = "nla_av", "nla_ar"
MAX_BEST_OF = 16  # candidates per explanation that the AR may choose among
_HEAD_FILE, _STATS_FILE = "value_head.safetensors", "stats.safetensors"

# A few ordinary sentences to measure the typical residual norm at a layer (the AV's
# injection scale when no checkpoint provides one).
_NORM_PROBE = [
    "The weather in the mountains changed quickly, and the hikers turned back before noon.",
    "To install the package, run the command below and restart your terminal.",
    "She said the recipe needs two cups of flour, a pinch of salt and some butter.",
    "In 1969 the first humans walked on the Moon during the Apollo 11 mission.",
]


def default_layer(n_layers: int) -> int:
    """The block near 2/3 depth, where the released NLAs read (block 20 of SmolLM2's 30)."""
    return round(2 * n_layers / 3)


class Verbalization(BaseModel):
    index: int  # which activation
    sample: int  # which sample for that activation
    text: str  # the explanation (the raw output when the tags are missing)
    raw: str
    has_tag: bool
    n_tokens: int


@dataclass
class RoundTrip:
    verbalizations: list[Verbalization]
    reconstructions: torch.Tensor  # [n, d]
    mse: torch.Tensor  # [n] normalised MSE per item
    cos: torch.Tensor  # [n]
    baseline: float  # MSE of predicting the mean
    baseline_source: str  # "training set" or "this batch"

    @property
    def fve(self) -> float:
        """FVE of the round trip; NaN when undefined (one vector and no training-set mean: the
        batch mean is that vector, so there is no variance to explain)."""
        return fve(self.mse, self.baseline)


@dataclass
class SteerResult:
    prompt: str
    layer: int
    strength: float
    added_norm: float
    steered: list[str] = field(default_factory=list)
    unsteered: list[str] = field(default_factory=list)


class NLA:
    """Verbalize, reconstruct, round-trip and steer. Build with `NLA.load(...)` or
    `NLA.untrained(handle)`; check `.trained` before trusting an explanation."""

    def __init__(
        self,
        meta: NLAMeta,
        *,
        av: ModelHandle,
        ar: ModelHandle,
        head: nn.Linear,
        av_adapter: str | None = None,
        ar_adapter: str | None = None,
        target: ModelHandle | None = None,
        mean: torch.Tensor | None = None,
        source: str = "in memory",
    ):
        self.meta = meta
        self.av, self.ar, self.target = av, ar, target
        self.av_adapter, self.ar_adapter = av_adapter, ar_adapter
        self.head = head
        self.mean = mean  # mean of normalised training activations [d], for FVE
        self.source = source
        self._actor_ids: list[int] | None = None
        # what this NLA says about the base model answering everyday prompts (reference.py); [] if not shipped
        self.reference_explanations: list[str] = []
        self.reference_contrast_explanations: list[str] = []  # the same for contrast readings (contrast.py)

    # ---- construction -------------------------------------------------------------------

    @property
    def layer(self) -> int:
        return self.meta.layer

    @property
    def d_model(self) -> int:
        return self.meta.d_model

    @property
    def trained(self) -> bool:
        return self.meta.trained

    @property
    def shares_weights(self) -> bool:
        return self.av is self.ar and (self.target is None or self.target is self.av)

    @classmethod
    def untrained(cls, handle: ModelHandle, layer: int | None = None) -> NLA:
        """An NLA with no training: the AV is the plain model, the AR is its first K+1 blocks
        with an identity head. Useful only to test plumbing; its explanations mean nothing."""
        layer = default_layer(handle.n_layers) if layer is None else handle.check_layer(layer)
        scale = measure_resid_norm(handle, layer)
        meta = NLAMeta.build(
            handle.tokenizer, d_model=handle.d_model, layer=layer, injection_scale=scale,
            base_model=handle.name, trained=False,
        )
        return cls(meta, av=handle, ar=handle, target=handle, head=identity_head(handle), source="untrained")

    @classmethod
    def load(
        cls, path: str | Path, handle: ModelHandle | None = None, *, ar_path: str | Path | None = None
    ) -> NLA:
        """Load our adapter layout (sharing `handle`'s base weights) or a released AV folder
        (with its AR folder: `ar_path`, or a sibling folder whose sidecar says `role: critic`)."""
        path = Path(path)
        meta = read_meta(path)
        if (path / "av" / "adapter_config.json").exists():
            if handle is None:
                handle = load_model(meta.base_model)
            elif meta.base_model and not same_base_model(meta.base_model, handle.name):
                raise CheckpointError(
                    f"{path} was trained on {meta.base_model!r}, not on {handle.name!r}.",
                    f"load it with --model {meta.base_model}.",
                )
            meta.verify(handle.tokenizer, d_model=handle.d_model, n_layers=handle.n_layers, where=str(path))
            check_safetensors(path, path / "av", path / "ar")  # a truncated file: CheckpointError, not a crash
            handle.load_adapter(path / "av", AV_ADAPTER)
            handle.load_adapter(path / "ar", AR_ADAPTER)
            head = _load_head(path / "ar" / _HEAD_FILE, handle)
            nla = cls(
                meta, av=handle, ar=handle, target=handle, head=head, av_adapter=AV_ADAPTER,
                ar_adapter=AR_ADAPTER, mean=_load_mean(path), source=str(path),
            )
            nla.reference_explanations = load_reference_explanations(path)
            nla.reference_contrast_explanations = load_reference_explanations(path, contrast=True)
            return nla
        if meta.role in CRITIC_ROLES:
            raise CheckpointError(
                f"{path} is an AR (critic) checkpoint.",
                "point at the AV (actor) folder and pass the AR folder with ar_path / --critic.",
            )
        if meta.role not in ACTOR_ROLES:
            raise CheckpointError(f"{path}: unknown sidecar role {meta.role!r}.", "use role actor, critic or nla_pair.")
        av = load_model(str(path))
        meta.verify(av.tokenizer, d_model=av.d_model, n_layers=None, where=str(path))
        ar_dir = Path(ar_path) if ar_path else _find_sibling_critic(path)
        ar_meta = read_meta(ar_dir)
        if ar_meta.role not in CRITIC_ROLES:
            raise CheckpointError(f"{ar_dir} is not an AR checkpoint (role {ar_meta.role!r}).", "pass the critic folder.")
        ar = load_model(str(ar_dir))
        layer = ar_meta.layer
        if ar.n_layers <= layer:
            raise CheckpointError(
                f"{ar_dir} keeps {ar.n_layers} blocks but reads block {layer}.",
                "use the AR checkpoint that matches this sidecar.",
            )
        meta.critic = ar_meta.critic
        if "critic" not in meta.prompt_templates and "ar" not in meta.prompt_templates:
            meta.prompt_templates["critic"] = ar_meta.critic_template
        meta.extraction.mse_scale = ar_meta.extraction.mse_scale
        head = _load_head(ar_dir / _HEAD_FILE, ar)
        nla = cls(meta, av=av, ar=ar, target=handle, head=head, mean=_load_mean(path), source=str(path))
        nla.reference_explanations = load_reference_explanations(path)
        nla.reference_contrast_explanations = load_reference_explanations(path, contrast=True)
        return nla

    def save(self, path: str | Path) -> Path:
        """Write our adapter layout: sidecar, `av/` and `ar/` adapters, head, stats."""
        if self.av_adapter is None or self.ar_adapter is None or not self.shares_weights:
            raise CheckpointError(
                "Only an NLA with LoRA adapters over shared base weights saves in the adapter layout.",
                "use export_released() for full-weight NLAs.",
            )
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        peft_model = cast("PeftModel", self.av.model)  # the adapters checked above live on a PEFT model
        for adapter, sub in ((self.av_adapter, "av"), (self.ar_adapter, "ar")):
            peft_model.save_pretrained(str(path / "_tmp"), selected_adapters=[adapter])
            src = path / "_tmp" / adapter if (path / "_tmp" / adapter).exists() else path / "_tmp"
            dst = path / sub
            dst.mkdir(parents=True, exist_ok=True)
            for f in src.iterdir():
                if f.is_file():
                    f.replace(dst / f.name)
            shutil.rmtree(path / "_tmp", ignore_errors=True)
        save_file({"weight": self.head.weight.detach().float().cpu().contiguous()}, str(path / "ar" / _HEAD_FILE))
        _save_mean(path, self.mean)
        write_meta(path, self.meta)
        return path

    def export_released(self, out: str | Path, *, with_mean: bool = False) -> tuple[Path, Path]:
        """Write the public release layout: `out/av` (full model) and `out/ar` (first K+1 blocks,
        value head), each with its sidecar. Adapters are merged into copies of the base.
        `with_mean`: also the training-set mean in `out/av` (where `load` of that folder reads it)."""
        out = Path(out)
        av_dir, ar_dir = out / "av", out / "ar"
        for handle, adapter, folder, truncate in ((self.av, self.av_adapter, av_dir, False),
                                                  (self.ar, self.ar_adapter, ar_dir, True)):
            model = copy.deepcopy(handle.model)
            from peft import PeftModel

            if isinstance(model, PeftModel):
                if adapter is None:
                    model = model.unload()
                else:
                    model.set_adapter(adapter)
                    for other in [a for a in model.peft_config if a != adapter]:
                        model.delete_adapter(other)
                    model = model.merge_and_unload()
            released = cast("PreTrainedModel", model)  # the transformers model, PEFT wrappers removed
            if truncate:
                layers = released.get_decoder().layers
                del layers[self.layer + 1 :]
                cfg = getattr(released.config, "text_config", None) or released.config
                cfg.num_hidden_layers = self.layer + 1
                if getattr(cfg, "layer_types", None):
                    cfg.layer_types = cfg.layer_types[: self.layer + 1]
            released.save_pretrained(folder)
            handle.tokenizer.save_pretrained(folder)
        av_meta = self.meta.model_copy(deep=True)
        av_meta.role, av_meta.base_model = "actor", None
        write_meta(av_dir, av_meta)
        ar_meta = self.meta.model_copy(deep=True)
        ar_meta.role, ar_meta.base_model = "critic", None
        write_meta(ar_dir, ar_meta)
        save_file({"weight": self.head.weight.detach().float().cpu().contiguous()}, str(ar_dir / _HEAD_FILE))
        if with_mean:
            _save_mean(av_dir, self.mean)
        return av_dir, ar_dir

    # ---- the AV -------------------------------------------------------------------------

    def actor_prompt(self) -> list[int]:
        """Token ids of the AV prompt (cached; the template never changes)."""
        if self._actor_ids is None:
            t = self.meta.tokens
            assert t is not None
            self._actor_ids = actor_prompt_ids(self.av.tokenizer, self.meta.actor_template, t.injection_char)
        return self._actor_ids

    def check_vectors(self, vectors: torch.Tensor | Sequence[float]) -> torch.Tensor:
        """`vectors` as a float32 [n, d] tensor, or `BadVectorError` / `EmptyInputError`."""
        if vectors is None or isinstance(vectors, (str, bytes, dict)):
            got = "None" if vectors is None else "a " + type(vectors).__name__
            raise BadVectorError(f"Expected activation vectors, got {got}.",
                                 f"pass a [{self.d_model}] vector or an [n, {self.d_model}] tensor.")
        try:
            v = torch.as_tensor(vectors, dtype=torch.float32)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise BadVectorError(f"Could not read the activations as numbers ({type(exc).__name__}).",
                                 f"pass a [{self.d_model}] vector or an [n, {self.d_model}] tensor of floats.") from None
        if v.dim() == 1:
            v = v[None]
        if v.dim() != 2 or v.shape[-1] != self.d_model:
            raise BadVectorError(
                f"Expected vectors of width {self.d_model} (this model's d_model), got shape {tuple(v.shape)}.",
                f"pass a [{self.d_model}] vector or an [n, {self.d_model}] batch read at block {self.layer}.",
            )
        if v.shape[0] == 0:
            raise EmptyInputError("No vectors were given.", "pass at least one activation.")
        if not torch.isfinite(v).all():
            raise BadVectorError("The vector contains NaN or inf values.", "pass finite activations.")
        if not torch.isfinite(v.norm(dim=-1)).all():  # e.g. entries of 1e38: the norm overflows float32
            raise BadVectorError("A vector is too large: its norm overflows float32.",
                                 "pass activations read from the model (their norms are in the tens to thousands).")
        if (v.norm(dim=-1) == 0).any():
            raise BadVectorError("A vector is all zeros and has no direction.", "pass a non-zero activation.")
        return v

    def injected(self, vectors: torch.Tensor) -> torch.Tensor:
        """What the AV sees at the marker for activations [batch, d]: each rescaled to the
        sidecar's injection_scale."""
        assert self.meta.extraction.injection_scale is not None
        return normalize(vectors.float(), self.meta.extraction.injection_scale)

    def injection(self, vectors: torch.Tensor, rows: Sequence[int] | None = None) -> contextlib.AbstractContextManager:
        """Context in which AV forwards (generation or training) see `vectors` [batch, d] at the
        marker as `injected` makes them (with `rows`: only those batch rows)."""
        t = self.meta.tokens
        assert t is not None
        return inject_at_marker(
            self.av.embed, self.injected(vectors), marker_id=t.injection_token_id,
            left_id=t.injection_left_neighbor_id, right_id=t.injection_right_neighbor_id, rows=rows,
        )

    def _row_injection(self, payloads: list[torch.Tensor | None]) -> contextlib.AbstractContextManager:
        """`RowHooks` entry: inject into the rows that carry a vector (see RowHooks)."""
        rows = [i for i, v in enumerate(payloads) if v is not None]
        if not rows:
            return contextlib.nullcontext()
        return self.injection(torch.stack([payloads[i] for i in rows]), rows=rows)  # type: ignore[misc]

    def verbalize(
        self,
        activations: torch.Tensor | Sequence[float],
        *,
        n_samples: int = 1,
        max_new_tokens: int = 96,
        temperature: float | None = None,
        batch_size: int = 16,
        seed: int | None = None,
        best_of: int = 1,
    ) -> list[Verbalization]:
        """Explanations for each activation ([d] or [n, d]), `n_samples` each, in order
        (activation 0's samples first). Greedy for one sample unless a temperature is given.

        `best_of` k > 1 lets the AR check the AV: each explanation is the one of k candidates
        whose reconstruction is closest to the activation (lowest normalised MSE). The
        candidates are the explanation `best_of=1` gives and k - 1 samples (at `temperature`,
        or 0.8 for a greedy call); it costs k times the generation."""
        vecs = self.check_vectors(activations)
        n_samples = _int_arg(n_samples, "n_samples", 1, MAX_SAMPLES)
        max_new_tokens = _int_arg(max_new_tokens, "max_new_tokens", 1, MAX_NEW_TOKENS)
        batch_size = _int_arg(batch_size, "batch_size", 1, 4096)
        best_of = _int_arg(best_of, "best_of", 1, MAX_BEST_OF)
        if temperature is not None:
            temperature = _float_arg(temperature, "temperature", 0.0, 5.0)
        if temperature is None:
            temperature = 0.0 if n_samples == 1 else 0.8
        order = [(i, s) for i in range(vecs.shape[0]) for s in range(n_samples)]
        first = self._explain(vecs, [i for i, _ in order], max_new_tokens, temperature, batch_size, seed)
        if best_of > 1:
            rival_t = temperature if temperature > 0 else 0.8
            rival_seed = None if seed is None else seed + 1
            rivals = self._explain(vecs, [i for i, _ in order for _ in range(best_of - 1)], max_new_tokens,
                                   rival_t, batch_size, rival_seed)
            first = self._closest(vecs, order, first, rivals, best_of - 1, batch_size)
        return [Verbalization(index=i, sample=s, text=t, raw=raw, has_tag=tag, n_tokens=n)
                for (i, s), (t, raw, tag, n) in zip(order, first)]

    def _explain(self, vecs: torch.Tensor, which: list[int], max_new_tokens: int, temperature: float,
                 batch_size: int, seed: int | None) -> list[tuple[str, str, bool, int]]:
        """(text, raw, has_tag, n_tokens) of one generation per entry of `which` (activation indices)."""
        # Rows carry their own vector, so verbalize calls of concurrent audits can share a batch.
        # The samples of one activation carry the same tensor, so they share one prefill.
        views = list(vecs)
        hooks = RowHooks(("av-injection", id(self)), [views[i] for i in which], self._row_injection)
        gens = generate_ids(
            self.av, [self.actor_prompt()] * len(which), max_new_tokens=max_new_tokens, temperature=temperature,
            batch_size=batch_size, adapter=self.av_adapter, hooks=hooks, seed=seed, stop=[EXPLANATION_CLOSE],
        )
        out = []
        for g in gens:
            body = extract_explanation(g.text)
            out.append((body if body is not None else g.text.strip(), g.text, body is not None, g.n_tokens))
        return out

    def _closest(self, vecs: torch.Tensor, order: list[tuple[int, int]], first: list, rivals: list, k: int,
                 batch_size: int) -> list:
        """Per entry of `order`, the candidate (its first explanation or one of its `k` rivals)
        whose AR reconstruction has the lowest normalised MSE to its activation."""
        groups = [[first[j], *rivals[j * k:(j + 1) * k]] for j in range(len(order))]
        flat = [c for g in groups for c in g]
        recon = self.reconstruct_explanations([c[0] for c in flat], batch_size)  # [m * (k + 1), d]
        gold = torch.stack([vecs[i] for i, _ in order]).float().repeat_interleave(k + 1, dim=0)
        err = normalized_mse(recon, gold).view(len(order), k + 1)
        return [g[int(b)] for g, b in zip(groups, err.argmin(dim=1))]

    # ---- the AR -------------------------------------------------------------------------

    def critic_ids(self, texts: Sequence[str]) -> list[list[int]]:
        if not texts:
            raise EmptyInputError("No texts to reconstruct.", "pass at least one explanation.")
        tok = self.ar.tokenizer
        # With the tokenizer's special tokens (BOS where it has one), as the released AR was trained.
        ids = [tok.encode(self.meta.critic_template.format(explanation=t.strip()), add_special_tokens=True) for t in texts]
        # A bare "{explanation}" template with an empty text (and no BOS) gives no tokens at all.
        return [r or [tok.eos_token_id if tok.eos_token_id is not None else tok.pad_token_id] for r in ids]

    def predict(self, texts: Sequence[str]) -> torch.Tensor:
        """AR forward [n, d] with autograd (training calls this under the AR adapter)."""
        ids = self.critic_ids(texts)
        input_ids, mask = pad_batch(ids, self.ar.tokenizer.pad_token_id)
        with self.ar.use_adapter(self.ar_adapter):
            resid = forward_to_layer(self.ar, input_ids, mask, self.layer)  # [n, seq, d]
        last = torch.as_tensor([len(r) - 1 for r in ids], device=resid.device)
        h = resid[torch.arange(len(ids), device=resid.device), last]  # [n, d]
        return self.head(h.to(self.head.weight.dtype))

    @torch.no_grad()
    def reconstruct(self, texts: str | Sequence[str], *, batch_size: int = 16) -> torch.Tensor:
        """Activation-space vectors [n, d] (raw scale of the head) for each text."""
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, (list, tuple)):
            got = "None" if texts is None else f"a {type(texts).__name__}"
            raise BadArgumentError(f"reconstruct takes a text or a list of texts, got {got}.",
                                   "pass a sentence, or a list of sentences.")
        if not texts:
            raise EmptyInputError("No texts to reconstruct.", "pass at least one sentence.")
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise BadArgumentError(f"Text {i} to reconstruct is a {type(t).__name__}, not a string.",
                                       "pass sentences as strings.")
            if not t.strip():
                raise EmptyInputError("A text to reconstruct is empty.", "pass non-blank explanations.")
            check_text_length(t, "text to reconstruct")
        batch_size = _int_arg(batch_size, "batch_size", 1, 4096)
        return self.reconstruct_explanations(list(texts), batch_size)

    @torch.no_grad()
    def reconstruct_explanations(self, texts: list[str], batch_size: int = 16) -> torch.Tensor:
        """Like `reconstruct` for AV outputs, which may be empty (the bare template is still defined)."""
        parts = [self.predict(texts[i : i + batch_size]).float().cpu() for i in range(0, len(texts), batch_size)]
        return torch.cat(parts)

    def round_trip(self, activations: torch.Tensor, *, n_samples: int = 1, **gen) -> RoundTrip:
        """Verbalize then reconstruct; per-item normalised MSE and cosine, and FVE against the
        training-set mean when the checkpoint has one (else this batch's mean)."""
        vecs = self.check_vectors(activations)
        verbs = self.verbalize(vecs, n_samples=n_samples, **gen)
        recon = self.reconstruct_explanations([v.text for v in verbs])
        gold = vecs.repeat_interleave(n_samples, dim=0)
        mse = normalized_mse(recon, gold)
        cos = torch.nn.functional.cosine_similarity(recon, gold, dim=-1)
        if self.mean is not None:
            baseline, source = mean_baseline(vecs, self.mean), "training set"
        else:
            baseline, source = mean_baseline(vecs), "this batch"
        return RoundTrip(verbs, recon, mse, cos, baseline, source)

    # ---- steering -----------------------------------------------------------------------

    def steer(
        self,
        prompt: TextOrChat,
        vector_or_text: str | torch.Tensor,
        *,
        layer: int | None = None,
        strength: float = 0.3,
        max_new_tokens: int = 48,
        n: int = 1,
        temperature: float = 0.0,
        target_adapter: str | None = None,
        seed: int = 0,
    ) -> SteerResult:
        """Generate from the target with `strength * unit(v) * ||resid||` added after block `layer`
        at every position, next to the unsteered generation. `v` is a vector or `AR(text)`.
        A string prompt is sent as one user turn."""
        if self.target is None:
            raise CheckpointError("This NLA has no target model to steer.", "pass the target handle to NLA.load.")
        target = self.target
        layer = self.layer if layer is None else layer  # validated once, by steered_generations
        if not isinstance(prompt, (str, list, tuple, dict)):
            raise BadArgumentError(f"The prompt must be a text or a conversation, got a {type(prompt).__name__}.",
                                   "pass a user message as a string.")
        if isinstance(prompt, dict):
            prompt = [prompt]
        if isinstance(vector_or_text, str):
            if not vector_or_text.strip():
                raise EmptyInputError("The steering text is empty.", "pass a sentence or a vector.")
            vec = self.reconstruct([vector_or_text])[0]
        else:
            vec = self.check_vectors(vector_or_text)[0]
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        ids = encode(target, messages, add_generation_prompt=True)
        steered, plain, added_norm = steered_generations(
            target, ids, vec, layer, strength, n=n, max_new_tokens=max_new_tokens,
            temperature=temperature, adapter=target_adapter, seed=seed,
        )
        text = prompt if isinstance(prompt, str) else "\n".join(f"{m['role']}: {m['content']}" for m in prompt)
        return SteerResult(text, layer, strength, added_norm, steered, plain)


def identity_head(handle: ModelHandle) -> nn.Linear:
    """The AR head, initialised to identity (the released recipe calls this critical)."""
    head = nn.Linear(handle.d_model, handle.d_model, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.eye(handle.d_model))
    return head.to(handle.device)


@torch.no_grad()
def measure_resid_norm(handle: ModelHandle, layer: int) -> float:
    """Median L2 norm of `blocks.{layer}.resid_post` on ordinary text, skipping the first
    tokens (whose norms are atypical)."""
    ids = [encode(handle, t) for t in _NORM_PROBE]
    input_ids, mask = pad_batch(ids, handle.tokenizer.pad_token_id)
    with handle.use_adapter(None):
        resid = forward_to_layer(handle, input_ids, mask, layer)
    norms = [resid[i, min(3, len(r) - 1) : len(r)].float().norm(dim=-1) for i, r in enumerate(ids)]
    return float(torch.cat(norms).median())


def _load_head(path: Path, handle: ModelHandle) -> nn.Linear:
    if not path.exists():
        raise CheckpointError(f"No AR head at {path}.", "the AR folder must hold value_head.safetensors.")
    weight = load_safetensors(path, "weight")
    if tuple(weight.shape) != (handle.d_model, handle.d_model):
        raise CheckpointError(
            f"AR head {path} has shape {tuple(weight.shape)}, the model needs ({handle.d_model}, {handle.d_model}).",
            "use the head trained with this model.",
        )
    head = nn.Linear(handle.d_model, handle.d_model, bias=False)
    with torch.no_grad():
        head.weight.copy_(weight)
    return head.to(handle.device, handle.dtype)


def _save_mean(path: Path, mean: torch.Tensor | None) -> None:
    if mean is not None:
        save_file({"mean": mean.float().cpu().contiguous()}, str(path / _STATS_FILE))


def _load_mean(path: Path) -> torch.Tensor | None:
    f = path / _STATS_FILE
    return load_safetensors(f, "mean") if f.exists() else None


def _find_sibling_critic(av_dir: Path) -> Path:
    for sib in sorted(av_dir.parent.iterdir()):
        if sib != av_dir and (sib / "nla_meta.yaml").exists():
            try:
                if read_meta(sib).role in CRITIC_ROLES:
                    return sib
            except CheckpointError:
                continue
    raise CheckpointError(
        f"Found no AR (critic) folder beside {av_dir}.", "pass the AR folder with ar_path / --critic."
    )
