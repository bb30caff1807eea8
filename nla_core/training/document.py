"""`Document`: one text or chat transcript of a training corpus (the corpus sources and the
WordNet topic documents both build them; the activation dataset reads them)."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["Document"]


@dataclass
class Document:
    doc_id: str
    source: str  # "chat", "text", a file name, "hf:...", "wordnet"
    genre: str = ""
    text: str | None = None
    messages: list[dict] | None = None  # a chat transcript
    meta: dict = field(default_factory=dict)

    @property
    def is_chat(self) -> bool:
        return self.messages is not None

    @property
    def content(self) -> list[dict] | str:
        """What the model reads: the chat transcript, else the text."""
        if self.messages is not None:
            return self.messages
        return self.text or ""
