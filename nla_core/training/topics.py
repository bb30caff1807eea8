"""Topic documents for NLA training and content evaluation, built offline from WordNet.

WordNet's database files ship in Debian's `wordnet-base` package (`/usr/share/wordnet`, the
format is `wndb(5)`; `NLA_AUDIT_WORDNET` points elsewhere). Each topic is one common concrete
noun (a lemma that occurs in the sense-tagged corpus, from a lexicographer file of things,
beings, substances, places, events and activities). Its document is written from the synset's
gloss, examples, hypernym and hyponyms, as an encyclopedia paragraph or as a chat turn that
asks about it. One document per topic, so splitting documents splits topics: a held-out topic
never occurs as a training topic.

Each document carries `meta["topic"]` (the lemma) and `meta["topic_terms"]` (the synset's
one-word lemmas), which the summariser names and the content metric (`content.py`) matches.
"""

from __future__ import annotations

import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import NLAError
from .document import Document

__all__ = ["Synset", "WordNet", "topic_document_ids", "topic_documents", "wordnet_dir"]

DEFAULT_WORDNET = Path("/usr/share/wordnet")

# Lexicographer file numbers (wndb(5), lexnames) of nouns that make good topics: things one
# can write a paragraph about. Abstract files (attributes, relations, quantities, time,
# cognition, communication) are left out: their glosses rarely describe a subject.
_TOPIC_LEXFILES = {
    4: "activity", 5: "animal", 6: "artifact", 8: "body part", 11: "event", 13: "food", 15: "place",
    17: "natural object", 18: "person", 19: "phenomenon", 20: "plant", 22: "process", 27: "substance",
}
# At least 4 letters: short nouns are the most ambiguous ("ass", "can", "cd").
_WORD = re.compile(r"^[a-z]{4,}$")


@dataclass
class Synset:
    offset: str
    lexfile: int
    lemmas: list[str]
    gloss: str
    pointers: list[tuple[str, str]] = field(default_factory=list)  # (symbol, offset) for nouns

    @property
    def definition(self) -> str:
        return self.gloss.split(";")[0].strip().strip('"').strip()

    @property
    def examples(self) -> list[str]:
        return [m.strip() for m in re.findall(r'"([^"]+)"', self.gloss)]

    def related(self, symbols: tuple[str, ...]) -> list[str]:
        return [off for sym, off in self.pointers if sym in symbols]


def wordnet_dir() -> Path:
    d = Path(os.environ.get("NLA_AUDIT_WORDNET", DEFAULT_WORDNET))
    if not (d / "data.noun").exists() or not (d / "index.noun").exists():
        raise NLAError(
            f"WordNet's database files (data.noun, index.noun) are not in {d}.",
            "install Debian's package: `apt-get install wordnet-base`, or set NLA_AUDIT_WORDNET to a folder holding them.",
        )
    return d


class WordNet:
    """The noun part of a WordNet database (data.noun + index.noun)."""

    def __init__(self, folder: Path | None = None):
        folder = folder or wordnet_dir()
        self.synsets: dict[str, Synset] = {}
        for line in (folder / "data.noun").read_text(encoding="latin-1").splitlines():
            if not line or line.startswith(" "):  # the licence header lines start with spaces
                continue
            head, _, gloss = line.partition(" | ")
            f = head.split()
            n_words = int(f[3], 16)
            lemmas = [f[4 + 2 * i] for i in range(n_words)]  # as written ("Moody", "lamp")
            k = 4 + 2 * n_words
            n_ptr = int(f[k])
            ptrs = [(f[k + 1 + 4 * i], f[k + 2 + 4 * i]) for i in range(n_ptr) if f[k + 3 + 4 * i] == "n"]
            self.synsets[f[0]] = Synset(f[0], int(f[1]), lemmas, gloss.strip(), ptrs)
        # lemma -> (offset of its most frequent sense, tagged-sense count)
        self.first_sense: dict[str, tuple[str, int]] = {}
        for line in (folder / "index.noun").read_text(encoding="latin-1").splitlines():
            if not line or line.startswith(" "):
                continue
            f = line.split()
            n_ptr = int(f[3])
            tagged = int(f[5 + n_ptr])
            self.first_sense[f[0]] = (f[6 + n_ptr], tagged)

    def topics(self) -> list[tuple[str, Synset]]:
        """(lemma, synset) for every topic-worthy lemma, in a fixed order: one-word lowercase
        lemmas whose most frequent sense is tagged at least once in the sense-tagged corpus and
        lies in a concrete lexicographer file."""
        by_synset: dict[str, list[str]] = {}
        for lemma, (off, tagged) in sorted(self.first_sense.items()):
            s = self.synsets.get(off)
            if tagged >= 1 and _WORD.match(lemma) and s is not None and s.lexfile in _TOPIC_LEXFILES:
                by_synset.setdefault(off, []).append(lemma)
        # One topic per synset (synonyms such as clown / buffoon are one topic, so a held-out
        # topic is never a training topic under another name), named by its first lemma.
        out = []
        for off, lemmas in by_synset.items():
            s = self.synsets[off]
            order = [x.lower() for x in s.lemmas]
            out.append((min(lemmas, key=lambda x: order.index(x) if x in order else len(order)), s))
        return sorted(out, key=lambda t: t[0])

    def name(self, offset: str) -> str:
        return self.synsets[offset].lemmas[0].replace("_", " ")


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _sentence(text: str) -> str:
    text = text.strip()
    return (text[0].upper() + text[1:] + ("" if text.endswith((".", "!", "?")) else ".")) if text else ""


_QUESTIONS = (
    "What is {a}?", "Tell me about the {t}.", "Can you explain what {a} is?", "I keep hearing about the {t}. What is it?",
    "Write a short paragraph about the {t}.", "Describe {a} for a school project.", "What should I know about the {t}?",
)
_OPENERS = ("{A} is {d}.", "The {t}: {d}.", "{T} ({c}). {D}.", "In short, {a} is {d}.")


def _paragraph(wn: WordNet, lemma: str, s: Synset, rng: random.Random) -> str:
    t = lemma
    hyper = s.related(("@", "@i"))
    cat = wn.name(hyper[0]) if hyper else _TOPIC_LEXFILES[s.lexfile]
    d = s.definition
    parts = [rng.choice(_OPENERS).format(a=_a(t), A=_a(t).capitalize(), t=t, T=t.capitalize(), d=d, D=_sentence(d)[:-1], c=cat)]
    if hyper:
        parts.append(f"It is a kind of {cat}: {wn.synsets[hyper[0]].definition}.")
    parts += [_sentence(e) for e in s.examples[:2]]
    kinds = [wn.name(o) for o in s.related(("~", "~i"))]
    rng.shuffle(kinds)
    if len(kinds) >= 2:
        parts.append(f"Kinds of {t} include {', '.join(kinds[:3][:-1])} and {kinds[:3][-1]}.")
    for o in s.related(("~", "~i", "%p", "%s", "%m"))[:4]:
        sub = wn.synsets[o]
        if sub.definition and len(parts) < 7:
            parts.append(f"{_sentence(wn.name(o))[:-1]}: {sub.definition}.")
    parts += [_sentence(e) for e in s.examples[2:4]]
    return " ".join(p for p in parts if p)


def _sample_topics(wn: WordNet, n_topics: int, rng: random.Random) -> list[tuple[str, Synset]]:
    topics = wn.topics()
    return [topics[i] for i in sorted(rng.sample(range(len(topics)), min(n_topics, len(topics))))]


def topic_document_ids(n_topics: int, *, seed: int = 0, wordnet: WordNet | None = None) -> set[str]:
    """The ids of the documents `topic_documents(n_topics, seed=seed)` writes, without writing
    them: which topics a corpus contains."""
    if n_topics <= 0:
        return set()
    return {f"topic-{lemma}" for lemma, _ in _sample_topics(wordnet or WordNet(), n_topics, random.Random(seed))}


def topic_documents(n_topics: int, *, seed: int = 0, chat_share: float = 0.5, wordnet: WordNet | None = None) -> list[Document]:
    """`n_topics` topic documents (a seeded sample of the WordNet topics, or all of them when
    fewer), half as chats (a user question, the paragraph as the assistant's reply)."""
    if n_topics <= 0:
        return []
    wn = wordnet or WordNet()
    rng = random.Random(seed)
    docs = []
    for lemma, s in _sample_topics(wn, n_topics, rng):
        text = _paragraph(wn, lemma, s, rng)
        terms = sorted({w for w in (x.lower() for x in s.lemmas) if w.isalpha()} | {lemma})
        hyper = s.related(("@", "@i"))
        meta = {"topic": lemma, "topic_terms": terms, "category": wn.name(hyper[0]) if hyper else _TOPIC_LEXFILES[s.lexfile]}
        doc_id = f"topic-{lemma}"
        if rng.random() < chat_share:
            q = rng.choice(_QUESTIONS).format(a=_a(lemma), t=lemma)
            docs.append(Document(doc_id, "wordnet", "chat", messages=[
                {"role": "user", "content": q}, {"role": "assistant", "content": text}], meta=meta))
        else:
            docs.append(Document(doc_id, "wordnet", "encyclopedia", text=text, meta=meta))
    return docs
