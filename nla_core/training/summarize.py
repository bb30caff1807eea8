"""Warm-start explanations: a short summary of what the model is likely tracking at each
activation's position.

* `ClaudeSummarizer`: Claude writes it (when `ANTHROPIC_API_KEY` is set), with a thread pool,
  retries with backoff, an on-disk cache keyed by prompt (only complete answers are cached: an
  empty one or one cut off at `max_tokens` is used once and asked again next time), and a cost
  estimate before it starts.
* `OfflineSummarizer`: runs here with no network. It writes 2-3 short snippets (topic words, the
  kind of text and where in it we are, the current word and the model's own next-token guesses)
  from keyword statistics, so it does not copy runs of the context verbatim.

`copy_stats` measures the copying the paper warns about: the longest run of context tokens that
reappears in the explanation, and the share of the explanation's word trigrams found in the
context.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ..checkpoint import EXPLANATION_CLOSE, EXPLANATION_OPEN, extract_explanation
from ..errors import NLAError

__all__ = [
    "OfflineSummarizer", "ClaudeSummarizer", "SummaryRequest", "copy_stats", "longest_common_run",
    "trigram_copy_rate", "estimate_cost", "make_summarizer", "CLAUDE_PRICES",
]

SummaryRequest = dict  # a dataset row: context, token, role, genre, next_tokens (topic, category)

_STOP = set("""a an the and or but if then so of to in on at by for with from as is are was were be been being
it its this that these those there here i you he she we they me him her us them my your his our their what which
who whom whose when where why how not no yes do does did done have has had can could will would shall should may
might must just also very really more most some any all each every other such than too into out up down over
under again once about after before while because until both few many much own same only s t don now im ive id
let lets get got make made like one two three use used using well way want need know think sure thanks thank
please hello hi okay ok""".split())
_WORD = re.compile(r"[A-Za-z][A-Za-z'\-]+")
_SPECIAL = re.compile(r"<\|[^|>]+\|>|<start_of_turn>|<end_of_turn>|<\|[a-z_]+\|>")


_TURN_START = r"(<\|im_start\|>|<start_of_turn>|<\|start_header_id\|>)"
_SYSTEM_TURN = re.compile(_TURN_START + r"\s*system.*?(<\|im_end\|>|<end_of_turn>|<\|eot_id\|>|$)", re.S)
_ROLE_WORD = re.compile(_TURN_START + r"\s*(user|assistant|model)\b(<\|end_header_id\|>)?")


def _clean(context: str) -> str:
    """The context without chat markup: no system turn, no role names, no special tokens."""
    return _SPECIAL.sub(" ", _ROLE_WORD.sub(" ", _SYSTEM_TURN.sub(" ", context)))


def _describe_token(tok: str) -> str:
    s = tok.strip()
    if not s:
        return "a line break" if "\n" in tok else "a space"
    names = {",": "a comma", ".": "a full stop", ":": "a colon", ";": "a semicolon", "?": "a question mark",
             "!": "an exclamation mark", "(": "an open bracket", ")": "a closing bracket", "'": "a quote",
             '"': "a quote mark", "-": "a dash", "=": "an equals sign"}
    if s in names:
        return names[s]
    if s.isdigit():
        return f"the number {s}"
    return f'"{s}"'


def _kind(row: SummaryRequest, text: str) -> str:
    role, genre = row.get("role") or "", row.get("genre") or ""
    codey = sum(text.count(c) for c in "(){}=;_") > max(6, len(text) // 40)
    if role == "assistant":
        base = "assistant reply"
        if codey:
            base += " with code"
        elif re.search(r"\n\s*(\d+\.|-|\*)\s", text):
            base += ", a list"
        return base
    if role == "user":
        return "user question in a chat"
    if genre and genre not in {"chat", "text"}:
        return f"{genre} text"
    return "code" if codey else "prose"


class OfflineSummarizer:
    """Template summaries built from word statistics of the context (no network, no model).

    The snippets reorder and select single words (topic words by frequency, recent content
    words) and describe the current token; the model's own next-token guesses come from the
    dataset (`next_tokens`). Long verbatim runs never appear by construction."""

    name = "offline"

    def __init__(self, max_words: int = 30, seed: int = 0, tokenizer: Any = None, max_tokens: int | None = None):
        self.max_words = max_words
        self.rng = random.Random(seed)
        self.tokenizer, self.max_tokens = tokenizer, max_tokens

    def _fits(self, text: str) -> bool:
        if self.tokenizer is None or self.max_tokens is None:
            return True
        return len(self.tokenizer.encode(text, add_special_tokens=False)) <= self.max_tokens

    def summarize_one(self, row: SummaryRequest) -> str:
        text = _clean(row.get("context", ""))
        words = [w.lower() for w in _WORD.findall(text)]
        content = [w for w in words if w not in _STOP and len(w) > 2]
        counts = Counter(content)
        topic = [w for w, _ in counts.most_common(4)]
        recent: list[str] = []
        for w in reversed(content[-12:]):
            if w not in recent and w not in topic[:2]:
                recent.append(w)
            if len(recent) == 3:
                break
        guesses = [g for g in (row.get("next_tokens") or []) if g.strip()][:2]
        kind = _kind(row, text)
        parts = [f"{'An' if kind[0] in 'aeiou' else 'A'} {kind}."]
        if row.get("topic"):
            # The document was written about a known topic: name it (and what it is a kind of)
            # first, where the token budget never cuts it.
            cat = row.get("category") or ""
            parts.insert(0, f"Topic: {row['topic']}" + (f", a kind of {cat}." if cat and cat != row["topic"] else "."))
        elif topic:
            parts.append("Topic: " + ", ".join(topic[:3]) + ".")
        if guesses:
            parts.append("Next: " + " or ".join(_describe_token(g) for g in guesses) + ".")
        # The current token last: the AR reads the state after the explanation, and a small
        # model keeps the most recent words best.
        # Ends on the current token itself (bare, as it reads in the text).
        cur = row.get("token", "").strip() or _describe_token(row.get("token", ""))
        parts.append((f"After {', '.join(recent[:2])}, now at: " if recent else "Now at: ") + cur)
        # Too long: drop the least local snippet first, but never a known topic.
        drop = 1 if row.get("topic") else 0
        while len(parts) > drop + 1 and (len(" ".join(parts).split()) > self.max_words or not self._fits(" ".join(parts))):
            parts.pop(drop)
        return " ".join(" ".join(parts).split()[-self.max_words :])

    def summarize(self, rows: Sequence[SummaryRequest], progress: Callable[[int], None] | None = None) -> list[str]:
        out = []
        for r in rows:
            out.append(self.summarize_one(r))
            if progress:
                progress(1)
        return out


# ---- Claude -------------------------------------------------------------------------------

# USD per million tokens (input, output); unknown models use the most expensive row.
CLAUDE_PRICES = {
    "claude-haiku-4-5": (1.0, 5.0),
    "claude-sonnet-4-6": (3.0, 15.0),
    "claude-sonnet-4-5": (3.0, 15.0),
    "claude-opus-4-5": (5.0, 25.0),
}

_CLAUDE_PROMPT = """Below is a passage seen by a small language model, up to one position (the last token, marked ⟦like this⟧).
Write what the model is most likely representing at that position to predict the next tokens: 2-3 short snippets (topic and kind of text; where we are in it and what was just said; what probably comes next).
Rules: at most {max_words} words in total; do not quote the passage (single words are fine, phrases are not); answer only inside <explanation></explanation> tags.

<passage>
{context}
</passage>"""  # noqa: E501  (the prompt's lines are kept as sent)


def _claude_prompt(row: SummaryRequest, max_words: int) -> str:
    ctx = row.get("context", "")
    tok = row.get("token", "")
    if tok and ctx.endswith(tok):
        ctx = ctx[: len(ctx) - len(tok)] + f"⟦{tok}⟧"
    return _CLAUDE_PROMPT.format(context=ctx, max_words=max_words)


def estimate_cost(rows: Sequence[SummaryRequest], model: str, max_words: int = 30, max_tokens: int = 120) -> dict:
    """A rough estimate before spending anything: ~4 characters per input token, the output
    at its cap."""
    prices = CLAUDE_PRICES.get(model, max(CLAUDE_PRICES.values()))
    tin = sum(len(_claude_prompt(r, max_words)) // 4 for r in rows)
    tout = len(rows) * max_tokens
    usd = tin / 1e6 * prices[0] + tout / 1e6 * prices[1]
    return {"model": model, "requests": len(rows), "input_tokens": tin, "max_output_tokens": tout,
            "usd_upper_bound": round(usd, 4)}


class ClaudeSummarizer:
    """Claude writes the summaries. `client` is an `anthropic.Anthropic` (or any object with
    `.messages.create(...)`, e.g. a fake in tests); answers are cached on disk by prompt hash."""

    def __init__(
        self,
        client: Any = None,
        *,
        model: str = "claude-haiku-4-5",
        cache_dir: str | Path | None = None,
        concurrency: int = 8,
        max_retries: int = 5,
        backoff: float = 1.0,
        max_words: int = 30,
        max_tokens: int = 120,
    ):
        if client is None:
            if not os.environ.get("ANTHROPIC_API_KEY"):
                raise NLAError("The Claude summariser needs ANTHROPIC_API_KEY.", "set it, or use summarizer: offline.")
            import anthropic

            client = anthropic.Anthropic()
        self.client, self.model = client, model
        self.name = f"claude:{model}"
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.concurrency, self.max_retries, self.backoff = concurrency, max_retries, backoff
        self.max_words, self.max_tokens = max_words, max_tokens
        self.usage = {"input_tokens": 0, "output_tokens": 0, "requests": 0, "cache_hits": 0, "retries": 0}
        self._lock = threading.Lock()

    def _key(self, prompt: str) -> str:
        return hashlib.sha256(f"{self.model}\n{self.max_tokens}\n{prompt}".encode()).hexdigest()

    def _cached(self, key: str) -> str | None:
        if self.cache_dir is None:
            return None
        f = self.cache_dir / f"{key[:2]}/{key}.json"
        if f.exists():
            try:
                entry = json.loads(f.read_text())
                text = entry["text"]
            except (json.JSONDecodeError, KeyError, TypeError):
                return None
            # an empty or cut-off answer cached by an older version is not an answer
            if not isinstance(text, str) or not text.strip() or entry.get("stop_reason") == "max_tokens":
                return None
            return text
        return None

    def _store(self, key: str, text: str, stop_reason: str | None = None) -> None:
        if self.cache_dir is None or not complete_answer(text, stop_reason):
            return
        f = self.cache_dir / f"{key[:2]}/{key}.json"
        f.parent.mkdir(parents=True, exist_ok=True)
        tmp = f.with_suffix(f".{threading.get_ident()}.tmp")
        tmp.write_text(json.dumps({"model": self.model, "text": text, "stop_reason": stop_reason}))
        tmp.replace(f)

    def _call(self, prompt: str) -> str:
        return self._call_full(prompt)[0]

    def _call_full(self, prompt: str) -> tuple[str, str | None]:
        """(text, stop_reason) of one answer, with retries."""
        last: Exception | None = None
        for attempt in range(self.max_retries + 1):
            try:
                resp = self.client.messages.create(
                    model=self.model, max_tokens=self.max_tokens,
                    messages=[{"role": "user", "content": prompt}],
                )
                text = "".join(getattr(b, "text", "") or "" for b in resp.content or []
                               if getattr(b, "type", "text") == "text")
                usage = getattr(resp, "usage", None)
                with self._lock:
                    self.usage["requests"] += 1
                    if usage is not None:
                        self.usage["input_tokens"] += int(getattr(usage, "input_tokens", 0) or 0)
                        self.usage["output_tokens"] += int(getattr(usage, "output_tokens", 0) or 0)
                return text, getattr(resp, "stop_reason", None)
            except Exception as exc:  # network, rate limit, overload: retried with backoff
                if _is_permanent(exc):
                    raise NLAError(f"Claude refused the request: {exc}", "check ANTHROPIC_API_KEY and the model name.") from exc
                last = exc
                with self._lock:
                    self.usage["retries"] += 1
                if attempt < self.max_retries:
                    time.sleep(self.backoff * (2 ** attempt) * (0.5 + random.random()))
        raise NLAError(f"Claude failed after {self.max_retries + 1} attempts: {last}",
                       "try again later; finished answers are cached.")

    def summarize_one(self, row: SummaryRequest) -> str:
        prompt = _claude_prompt(row, self.max_words)
        key = self._key(prompt)
        text = self._cached(key)
        if text is None:
            text, stop = self._call_full(prompt)
            self._store(key, text, stop)
        else:
            with self._lock:
                self.usage["cache_hits"] += 1
        body = extract_explanation(text)
        body = body if body is not None else text.replace(EXPLANATION_OPEN, "").replace(EXPLANATION_CLOSE, "")
        return " ".join(body.split()[: self.max_words * 2])

    def estimate(self, rows: Sequence[SummaryRequest]) -> dict:
        todo = [r for r in rows if self._cached(self._key(_claude_prompt(r, self.max_words))) is None]
        est = estimate_cost(todo, self.model, self.max_words, self.max_tokens)
        est["cached"] = len(rows) - len(todo)
        return est

    def summarize(self, rows: Sequence[SummaryRequest], progress: Callable[[int], None] | None = None) -> list[str]:
        def one(r):
            out = self.summarize_one(r)
            if progress:
                progress(1)
            return out

        with ThreadPoolExecutor(max_workers=max(1, self.concurrency)) as pool:
            return list(pool.map(one, rows))


def complete_answer(text: str, stop_reason: str | None) -> bool:
    """Worth caching: not empty, and not cut off at `max_tokens`."""
    return bool(text and text.strip()) and stop_reason != "max_tokens"


def _is_permanent(exc: Exception) -> bool:
    status = getattr(exc, "status_code", None)
    return status in (400, 401, 403, 404)


def make_summarizer(kind: str, *, model: str, cache_dir: Path, concurrency: int, max_words: int = 30,
                    tokenizer: Any = None, max_tokens: int | None = None):
    """`auto` picks Claude when ANTHROPIC_API_KEY is set, else the offline summariser."""
    if kind == "claude" or (kind == "auto" and os.environ.get("ANTHROPIC_API_KEY")):
        return ClaudeSummarizer(model=model, cache_dir=cache_dir, concurrency=concurrency, max_words=max_words)
    return OfflineSummarizer(max_words=max_words, tokenizer=tokenizer, max_tokens=max_tokens)


# ---- copying ------------------------------------------------------------------------------


def longest_common_run(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest run of tokens of `a` that appears contiguously in `b`."""
    best = 0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0] * (len(b) + 1)
        for j, y in enumerate(b):
            if x == y:
                cur[j + 1] = prev[j] + 1
                if cur[j + 1] > best:
                    best = cur[j + 1]
        prev = cur
    return best


def trigram_copy_rate(explanation: str, context: str) -> float:
    """Share of the explanation's word trigrams that occur in the context (0 when it has none)."""
    ew = [w.lower() for w in _WORD.findall(explanation)]
    cw = [w.lower() for w in _WORD.findall(_clean(context))]
    grams = [tuple(ew[i : i + 3]) for i in range(len(ew) - 2)]
    if not grams:
        return 0.0
    ctx = {tuple(cw[i : i + 3]) for i in range(len(cw) - 2)}
    return sum(g in ctx for g in grams) / len(grams)


def copy_stats(explanations: Sequence[str], contexts: Sequence[str], tokenizer: Any) -> dict:
    """Copy rate of explanations against their contexts: mean trigram copy rate, mean and max
    longest common token run, and the share with a run of 8+ tokens (verbatim copying)."""
    runs, rates = [], []
    for e, c in zip(explanations, contexts):
        et = tokenizer.encode(e, add_special_tokens=False)
        ct = tokenizer.encode(_clean(c), add_special_tokens=False)
        runs.append(longest_common_run(et, ct))
        rates.append(trigram_copy_rate(e, c))
    n = max(1, len(runs))
    return {
        "trigram_copy_rate": sum(rates) / n,
        "mean_longest_run_tokens": sum(runs) / n,
        "max_longest_run_tokens": max(runs) if runs else 0,
        "share_run_ge_8": sum(r >= 8 for r in runs) / n,
        "n": len(runs),
    }
