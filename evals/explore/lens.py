"""The NLA lens: read every token of a text (or a conversation) through the NLA, score each
round trip, and steer with a sentence.

Each token's activation at the NLA's layer is verbalized and the explanation reconstructed;
the token's colour is the round trip's FVE (1 - MSE / Var, Var from the training-set mean when
the checkpoint has one, else this text's tokens). Tokens are verbalized in batches and a job
reports its progress after each batch, because on 2 CPU cores the embedded model explains
about a token a second. The model loads on first use, and one model serves one job at a time.

With an organism picked, activations and steering go through a `Target`: its hidden system
prompt and adapters act, but only the visible tokens are shown."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable
from typing import Any

from nla_core.errors import NLAError

__all__ = ["Lens", "LensError"]


class LensError(NLAError):
    """Bad input to the lens (empty or too long text, an unknown organism, a bad strength)."""


def _default_loader() -> tuple[Any, Any]:
    from nla_core import load_model, load_nla_for

    handle = load_model()
    return handle, load_nla_for(handle)


class Lens:
    """`loader()` returns `(handle, nla)`; it runs once, on first use (default: the embedded
    model and its shipped NLA). `suite`/`organisms_dir` list the organisms one may pick."""

    def __init__(self, loader: Callable[[], tuple[Any, Any]] | None = None, *, suite: str = "default",
                 organisms_dir: str | None = None, batch_size: int = 8, max_tokens: int = 128,
                 explain_tokens: int = 48, steer_tokens: int = 48, keep_jobs: int = 32):
        self._loader = loader or _default_loader
        self.suite, self.organisms_dir = suite, organisms_dir
        self.batch_size, self.max_tokens = batch_size, max_tokens
        self.explain_tokens, self.steer_tokens = explain_tokens, steer_tokens
        self._model_lock = threading.Lock()  # one model: one job or steer at a time
        self._jobs: dict[str, dict] = {}
        self._jobs_lock = threading.Lock()
        self._ids = itertools.count(1)
        self._keep = keep_jobs
        self._loaded: tuple[Any, Any] | None = None
        self._targets: dict[str, Any] = {}
        self._specs: dict[str, Any] | None = None

    # ---- model and organisms --------------------------------------------------------------

    @property
    def loaded(self) -> bool:
        return self._loaded is not None

    @property
    def layer(self) -> int | None:
        """The NLA's block, once the model is loaded."""
        return self._loaded[1].layer if self._loaded is not None else None

    def _model(self) -> tuple[Any, Any]:
        if self._loaded is None:  # called under _model_lock
            self._loaded = self._loader()
        return self._loaded

    def _spec_map(self) -> dict[str, Any]:
        if self._specs is None:
            from environments import load_suite

            try:
                self._specs = {s.id: s for s in load_suite(self.suite, organisms_dir=self.organisms_dir)}
            except NLAError:
                self._specs = {}
        return self._specs

    def organisms(self) -> list[str]:
        return sorted(self._spec_map())

    def _target(self, organism: str) -> Any:
        if organism not in self._targets:
            from environments import build_target

            handle, nla = self._model()
            self._targets[organism] = build_target(self._spec_map()[organism], handle, alias="lens", layer=nla.layer)
        return self._targets[organism]

    # ---- input ---------------------------------------------------------------------------

    def _check(self, text: Any, messages: Any, organism: Any) -> tuple[Any, str | None]:
        if organism in ("", None):
            organism = None
        elif organism not in self._spec_map():
            raise LensError(f"Unknown organism {organism!r}.",
                            f"Pick one of: {', '.join(self.organisms()) or 'none available'}, or none.")
        if (text is None) == (messages is None):
            raise LensError("Give either a text or a conversation (messages), not both or neither.",
                            'POST {"text": "..."} or {"messages": [{"role": "user", "content": "..."}]}.')
        if text is not None:
            if not isinstance(text, str) or not text.strip():
                raise LensError("The text is empty.", "Type at least one word.")
            return text, organism
        if not isinstance(messages, list) or not messages:
            raise LensError("The conversation is empty.", "Give at least one user message.")
        out = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ("user", "assistant") or not isinstance(m.get("content"), str):
                raise LensError(f"Message {i + 1} is not a user or assistant message with text.",
                                'Each message is {"role": "user"|"assistant", "content": "..."}.')
            if not m["content"].strip():
                raise LensError(f"Message {i + 1} ({m['role']}) is empty.", "Write something in it, or leave it out.")
            out.append({"role": m["role"], "content": m["content"]})
        if out[0]["role"] != "user":
            raise LensError("The conversation must start with a user message.", "Put the user's turn first.")
        return out, organism

    # ---- jobs ----------------------------------------------------------------------------

    def start(self, text: str | None = None, messages: list | None = None, organism: str | None = None,
              *, wait: bool = False) -> str:
        """Queue a reading of `text` or `messages`; returns the job id (see `job`). Bad input
        raises `LensError` at once."""
        item, organism = self._check(text, messages, organism)
        jid = f"j{next(self._ids)}"
        job = {"id": jid, "status": "queued", "done": 0, "total": 0, "tokens": [], "error": None, "fix": None,
               "message": "", "organism": organism, "trained": None, "baseline": None, "started": time.time(),
               "seconds": None}
        with self._jobs_lock:
            self._jobs[jid] = job
            for old in list(self._jobs)[: max(0, len(self._jobs) - self._keep)]:
                del self._jobs[old]
        th = threading.Thread(target=self._run, args=(job, item, organism), daemon=True, name=f"lens-{jid}")
        th.start()
        if wait:
            th.join()
        return jid

    def job(self, jid: str) -> dict:
        with self._jobs_lock:
            job = self._jobs.get(jid)
            if job is None:
                raise LensError(f"No lens job {jid!r} (it finished long ago or never existed).", "Start a new reading.")
            return {**job, "tokens": [dict(t) for t in job["tokens"]]}

    def _run(self, job: dict, item: Any, organism: str | None) -> None:
        try:
            with self._model_lock:
                job["status"], job["message"] = "running", "loading the model" if not self.loaded else ""
                self._read(job, item, organism)
            job["status"], job["message"] = "done", ""
        except NLAError as exc:
            job.update(status="error", error=exc.problem, fix=exc.fix)
        except Exception as exc:  # noqa: BLE001 - reported to the page, not swallowed silently
            job.update(status="error", error=f"{type(exc).__name__}: {exc}", fix=None)
        finally:
            job["seconds"] = round(time.time() - job["started"], 2)

    def _read(self, job: dict, item: Any, organism: str | None) -> None:
        import torch

        from nla_core import mean_baseline, normalized_mse, read_activations

        handle, nla = self._model()
        job["message"], job["trained"] = "", bool(nla.trained)
        if organism is None:
            acts = read_activations(handle, [item], nla.layer)
        else:
            acts = self._target(organism).activations(item)
        vecs = acts.vectors[0].float()
        ids = list(acts.token_ids[0])
        pos = list(acts.positions[0])
        if len(pos) > self.max_tokens:
            raise LensError(f"The input has {len(pos)} tokens; the lens reads at most {self.max_tokens}.",
                            "Shorten the text (or start `nla explore` with a larger --max-tokens).")
        tok = handle.tokenizer
        # every key exists from the start: `job()` copies these dicts while this thread fills them
        job["tokens"] = [{"position": p, "token": tok.decode([ids[p]]), "explanation": None, "fve": None, "cos": None,
                          "has_tag": None} for p in pos]
        job["total"] = len(pos)
        mean = getattr(nla, "mean", None)
        # Var of the FVE: against the training mean when known, else this text's own tokens
        baseline = mean_baseline(vecs, mean) if mean is not None else (mean_baseline(vecs) if len(pos) > 1 else 0.0)
        job["baseline"] = "training set" if mean is not None else "this text"
        for start in range(0, len(pos), self.batch_size):
            chunk = vecs[start:start + self.batch_size]
            verbs = nla.verbalize(chunk, max_new_tokens=self.explain_tokens)
            texts = [v.text for v in verbs]
            recon = nla.reconstruct_explanations(texts)
            mse = normalized_mse(recon, chunk)
            cos = torch.nn.functional.cosine_similarity(recon.float(), chunk, dim=-1)
            for k, v in enumerate(verbs):
                t = job["tokens"][start + k]
                t.update(explanation=" ".join(v.text.split()) or "(empty)", has_tag=v.has_tag, cos=round(float(cos[k]), 4),
                         fve=round(1.0 - float(mse[k]) / baseline, 4) if baseline > 1e-12 else None)
            job["done"] = min(len(pos), start + len(verbs))

    # ---- steering ------------------------------------------------------------------------

    def steer(self, prompt: Any, text: Any, strength: Any = 0.3, organism: str | None = None) -> dict:
        """The replies to `prompt` without and with `text`'s reconstructed vector added."""
        if not isinstance(prompt, str) or not prompt.strip():
            raise LensError("The prompt to steer is empty.", "Type the user message to answer.")
        if not isinstance(text, str) or not text.strip():
            raise LensError("The steering sentence is empty.", "Type the idea to steer towards, e.g. 'the ocean'.")
        try:
            strength = float(strength)
        except (TypeError, ValueError):
            raise LensError(f"Strength {strength!r} is not a number.", "Use e.g. 0.3 (gentle) or 1 (strong).") from None
        if not -4.0 <= strength <= 4.0:
            raise LensError(f"Strength {strength} is out of range.", "Use a value between -4 and 4 (0.3 is gentle).")
        _, organism = self._check(prompt, None, organism)
        with self._model_lock:
            handle, nla = self._model()
            if organism is None:
                res = nla.steer(prompt, text, strength=strength, max_new_tokens=self.steer_tokens)
                steered, unsteered = res.steered[0], res.unsteered[0]
            else:
                vec = nla.reconstruct([text])[0]
                steered, unsteered = self._target(organism).steer(prompt, vec, strength=strength,
                                                                 max_new_tokens=self.steer_tokens)
        return {"prompt": prompt, "text": text, "strength": strength, "organism": organism, "layer": nla.layer,
                "steered": steered, "unsteered": unsteered, "trained": bool(nla.trained)}
