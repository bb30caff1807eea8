"""Builders of tiny random-initialised models for tests and examples (no hub, seconds).

They reuse the embedded model's tokenizer (real vocabulary and chat template) over random
weights with tiny widths, so every code path (chat templates, markers, PEFT) runs for real.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from .models import ModelHandle, embedded_model_dir, handle_from

__all__ = ["embedded_tokenizer", "tiny_handle", "TINY_ARCHS", "EchoNLA", "fingerprint"]

TINY_ARCHS = ("llama", "qwen2", "gemma3_text", "gemma3")
_TOKENIZER: Any = None


def embedded_tokenizer() -> Any:
    """The SmolLM2 tokenizer (cached per process)."""
    global _TOKENIZER
    if _TOKENIZER is None:
        from transformers import AutoTokenizer

        _TOKENIZER = AutoTokenizer.from_pretrained(str(embedded_model_dir()))
    return _TOKENIZER


def tiny_handle(arch: str = "llama", *, n_layers: int = 4, d_model: int = 64, seed: int = 0, device: str | None = None,
                **overrides: Any) -> ModelHandle:
    """A random `arch` causal LM with `n_layers` blocks of width `d_model`, wrapped in a handle,
    on `device` (default: `$NLA_AUDIT_TEST_DEVICE`, else the CPU; `NLA_AUDIT_TEST_DEVICE=cuda
    pytest ...` runs the tiny-model tests on a GPU).

    `gemma3` builds the multimodal wrapper (`Gemma3ForConditionalGeneration`) with a tiny
    vision tower, to exercise the nested decoder path.
    """
    import transformers as tf

    tok = embedded_tokenizer()
    torch.manual_seed(seed)
    common = dict(
        vocab_size=len(tok), hidden_size=d_model, intermediate_size=2 * d_model, num_hidden_layers=n_layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=d_model // 4, max_position_embeddings=512,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
    )
    common.update(overrides)
    model: tf.PreTrainedModel
    if arch == "llama":
        model = tf.LlamaForCausalLM(tf.LlamaConfig(**common, tie_word_embeddings=True))
    elif arch == "qwen2":
        model = tf.Qwen2ForCausalLM(tf.Qwen2Config(**common))
    elif arch == "gemma3_text":
        model = tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(**common, sliding_window=64))
    elif arch == "gemma3":
        text = tf.Gemma3TextConfig(**common, sliding_window=64).to_dict()
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      image_size=28, patch_size=14)
        cfg = tf.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                              image_token_index=tok.unk_token_id or 0)
        model = tf.Gemma3ForConditionalGeneration(cfg)
    else:
        raise ValueError(f"unknown tiny arch {arch!r}; choose from {TINY_ARCHS}")
    module: torch.nn.Module = model  # transformers' wrapped `to` confuses checkers (models.py)
    module.to(device or os.environ.get("NLA_AUDIT_TEST_DEVICE") or "cpu")
    return handle_from(model, tok, f"tiny-{arch}")


def fingerprint(v: torch.Tensor) -> str:
    """A short text that tells vectors apart: their first four entries."""
    return "vec " + " ".join(f"{x:+.4f}" for x in v[:4].tolist())


class EchoNLA:
    """An NLA whose explanation of each vector is its `fingerprint`, so a test can tell which
    activation was explained; everything else is the wrapped NLA's. Records every batch it sees."""

    def __init__(self, nla: Any):
        self._nla = nla
        self.seen: list[torch.Tensor] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._nla, name)

    def verbalize(self, vectors: Any, *, n_samples: int = 1, **_: Any) -> list[Any]:
        from .nla import Verbalization

        vecs = torch.as_tensor(vectors).float().reshape(-1, self._nla.d_model)
        self.seen.append(vecs.clone())
        return [Verbalization(index=i, sample=s, text=fingerprint(v), raw="", has_tag=True, n_tokens=1)
                for i, v in enumerate(vecs) for s in range(n_samples)]
