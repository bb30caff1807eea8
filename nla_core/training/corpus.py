"""Text corpora for activation datasets.

Sources: local `.txt` / `.jsonl` files (or a folder of them), a HF dataset when the user is
online and opts in (`hf:NAME[:SPLIT]` with `NLA_AUDIT_ALLOW_DOWNLOAD=1`), and the offline
default, which needs nothing from a hub: chat transcripts that the target model writes itself
from a shipped list of varied user prompts, mixed with shipped texts of many genres.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from ..activations import encode
from ..errors import EmptyInputError, NLAError
from ..generation import generate_ids
from ..models import ModelHandle
from .config import CorpusConfig
from .document import Document
from .topics import topic_documents

__all__ = ["load_corpus", "shipped_prompts", "shipped_texts", "write_transcripts", "DATA_DIR"]

DATA_DIR = Path(__file__).resolve().parent.parent / "data"


def shipped_prompts() -> list[str]:
    lines = (DATA_DIR / "prompts.txt").read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]


def shipped_texts() -> list[Document]:
    docs = []
    for i, line in enumerate((DATA_DIR / "texts.jsonl").read_text().splitlines()):
        if line.strip():
            row = json.loads(line)
            docs.append(Document(f"text-{i:04d}", "text", row.get("genre", ""), text=row["text"]))
    return docs


def write_transcripts(
    handle: ModelHandle,
    prompts: list[str],
    cfg: CorpusConfig,
    path: Path,
    *,
    batch_size: int = 8,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
) -> list[Document]:
    """Chat transcripts written by the target (no adapter) for `prompts`, cached in `path`
    (JSONL, appended batch by batch, so a killed run keeps what it wrote)."""
    done: dict[str, Document] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill
            done[row["doc_id"]] = Document(**row)
    todo = [(f"chat-{i:05d}", p) for i, p in enumerate(prompts) if f"chat-{i:05d}" not in done]
    if progress and len(todo) < len(prompts):
        progress(len(prompts) - len(todo))  # already written by an earlier (killed) run
    path.parent.mkdir(parents=True, exist_ok=True)
    for start in range(0, len(todo), batch_size):
        chunk = todo[start : start + batch_size]
        ids = [encode(handle, [{"role": "user", "content": p}], add_generation_prompt=True) for _, p in chunk]
        gens = generate_ids(
            handle, ids, max_new_tokens=cfg.reply_tokens, temperature=cfg.reply_temperature,
            batch_size=batch_size, seed=seed + start,
        )
        with path.open("a") as f:
            for (doc_id, p), g in zip(chunk, gens):
                reply = g.text.strip() or "..."
                doc = Document(doc_id, "chat", "chat", messages=[
                    {"role": "user", "content": p}, {"role": "assistant", "content": reply}])
                done[doc_id] = doc
                f.write(json.dumps(asdict(doc)) + "\n")
        if progress:
            progress(len(chunk))
    return [done[f"chat-{i:05d}"] for i in range(len(prompts))]


def _read_local(path: Path) -> list[Document]:
    files = sorted(p for p in path.rglob("*") if p.suffix in {".txt", ".jsonl", ".md"}) if path.is_dir() else [path]
    docs: list[Document] = []
    for f in files:
        if f.suffix == ".jsonl":
            for j, line in enumerate(f.read_text().splitlines()):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise NLAError(f"{f}:{j + 1} is not valid JSON: {exc}", "write one JSON object per line.") from exc
                if isinstance(row, dict) and row.get("messages"):
                    docs.append(Document(f"{f.stem}-{j:05d}", f.name, row.get("genre", "chat"), messages=row["messages"]))
                elif isinstance(row, dict) and str(row.get("text", "")).strip():
                    docs.append(Document(f"{f.stem}-{j:05d}", f.name, row.get("genre", ""), text=row["text"]))
        else:
            # Paragraphs (blank-line separated) are documents.
            for j, para in enumerate(p.strip() for p in f.read_text().split("\n\n")):
                if para:
                    docs.append(Document(f"{f.stem}-{j:05d}", f.name, "", text=para))
    return docs


def _read_hf(spec: str, limit: int | None) -> list[Document]:
    if os.environ.get("NLA_AUDIT_ALLOW_DOWNLOAD", "") != "1":
        raise NLAError(
            f"Corpus {spec!r} is a HF dataset and downloads are off.",
            "set NLA_AUDIT_ALLOW_DOWNLOAD=1 (and be online), or use the offline corpus / a local file.",
        )
    try:
        import datasets
    except ImportError as exc:
        raise NLAError("The `datasets` package is not installed.", "pip install datasets") from exc
    name, _, split = spec[3:].partition(":")
    ds = datasets.load_dataset(name, split=split or "train", streaming=True)
    docs = []
    for j, row in enumerate(ds):
        if limit is not None and j >= limit:
            break
        if row.get("messages") or row.get("conversation"):
            msgs = [{"role": m["role"], "content": m["content"]} for m in (row.get("messages") or row["conversation"])]
            docs.append(Document(f"hf-{j:06d}", spec, "chat", messages=msgs))
        elif row.get("text"):
            docs.append(Document(f"hf-{j:06d}", spec, "", text=row["text"]))
    return docs


def load_corpus(
    cfg: CorpusConfig,
    handle: ModelHandle | None = None,
    *,
    cache: Path | None = None,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
) -> list[Document]:
    """The documents named by `cfg.source` (see the module doc)."""
    src = cfg.source
    if src == "offline":
        if handle is None or cache is None:
            raise NLAError("The offline corpus needs the target model to write its transcripts.", "pass a model handle.")
        prompts = shipped_prompts()[: cfg.n_chats]
        docs = write_transcripts(handle, prompts, cfg, cache, seed=seed, progress=progress) if prompts and cfg.n_chats > 0 else []
        if cfg.include_shipped_texts:
            docs += shipped_texts()
        if cfg.n_topics > 0:
            docs += topic_documents(cfg.n_topics, seed=seed, chat_share=cfg.topic_chat_share)
    elif src.startswith("hf:"):
        docs = _read_hf(src, cfg.max_docs)
    else:
        path = Path(src).expanduser()
        if not path.exists():
            raise NLAError(f"Corpus {src!r} is not 'offline', 'hf:NAME' or an existing file/folder.",
                           "pass a .txt/.jsonl file or folder, 'offline', or 'hf:NAME[:SPLIT]'.")
        docs = _read_local(path)
    if cfg.max_docs is not None:
        docs = docs[: cfg.max_docs]
    if not docs:
        raise EmptyInputError(f"The corpus {src!r} has no documents.", "point at files with non-blank text.")
    return docs
