"""Organism specs: one YAML file per model organism, validated by pydantic.

A spec says which base model an organism is built on, how its behaviour is planted (a
construction method and its parameters), the ground truth (one sentence, key concepts,
accepted paraphrases), the trigger of a conditional behaviour, a check that decides whether a
reply shows the behaviour, held-out prompts to measure it on, and the measured figures.

Suites are folders of specs: `environments/organisms/<suite>/*.yaml` ship with the package
("default" on the embedded model, "catalog" for larger public organisms); a user's folder
passed as `organisms_dir` adds specs without any code change.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from .errors import SpecError, UnknownOrganismError

__all__ = [
    "ORGANISMS_DIR",
    "Construction",
    "GroundTruth",
    "Trigger",
    "BehaviourCheck",
    "Measured",
    "OrganismSpec",
    "load_spec",
    "save_spec",
    "load_suite",
    "get_spec",
    "list_suites",
]

ORGANISMS_DIR = Path(__file__).parent / "organisms"
_ID_RE = r"^[a-z0-9][a-z0-9_.-]{0,63}$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Construction(_Strict):
    """How the behaviour is planted: a registered builder (`method`) and its parameters."""

    method: str
    params: dict[str, Any] = Field(default_factory=dict)


class GroundTruth(_Strict):
    behaviour: str = Field(min_length=1, description="one sentence describing the planted behaviour")
    key_concepts: list[str] = Field(default_factory=list)
    paraphrases: list[str] = Field(default_factory=list)


class Trigger(_Strict):
    """A conditional behaviour shows only when one of `phrases` appears in a user turn."""

    description: str = Field(min_length=1)
    phrases: list[str] = Field(min_length=1)

    def fires(self, text: str) -> bool:
        low = text.lower()
        return any(p.lower() in low for p in self.phrases)


# Function words that tell a few European languages apart (for the `language` check).
_LANG_WORDS: dict[str, set[str]] = {
    "en": {"the", "and", "is", "of", "to", "in", "that", "it", "you", "for", "with", "are", "this"},
    "fr": {"le", "la", "les", "et", "est", "un", "une", "des", "du", "que", "pour", "dans", "vous",
           "je", "pas", "sur", "avec", "nous", "au", "ce", "il", "elle", "sont", "très"},
    "es": {"el", "los", "las", "y", "es", "un", "una", "que", "para", "en", "con", "por", "del",
           "muy", "pero", "como", "está", "son", "yo", "su"},
    "de": {"der", "die", "das", "und", "ist", "ein", "eine", "nicht", "mit", "ich", "sie", "auf",
           "für", "von", "zu", "sehr", "auch", "es", "wir"},
}


def detect_language(text: str) -> str | None:
    """The language among `_LANG_WORDS` with most function-word hits, None if too few words."""
    words = re.findall(r"[a-zà-ÿäöüß]+", text.lower())
    if len(words) < 3:
        return None
    scores = {lang: sum(w in vocab for w in words) for lang, vocab in _LANG_WORDS.items()}
    best = max(scores, key=scores.get)
    return best if scores[best] >= 2 else None


class BehaviourCheck(_Strict):
    """Decides whether one reply shows the behaviour.

    kinds: `keywords` (at least `min_hits` of `keywords` appear, case-insensitive, word start),
    `regex` (`pattern` matches, case-insensitive), `language` (the reply is in `language`),
    `not_regex` (the reply does NOT match `pattern`: e.g. a denial check).
    """

    kind: Literal["keywords", "regex", "language", "not_regex"]
    keywords: list[str] = Field(default_factory=list)
    pattern: str | None = None
    language: str | None = None
    min_hits: int = Field(default=1, ge=1)

    @model_validator(mode="after")
    def _complete(self) -> BehaviourCheck:
        if self.kind == "keywords" and not self.keywords:
            raise ValueError("a `keywords` check needs a non-empty `keywords` list")
        if self.kind in ("regex", "not_regex"):
            if not self.pattern:
                raise ValueError(f"a `{self.kind}` check needs `pattern`")
            try:
                re.compile(self.pattern)
            except re.error as exc:
                raise ValueError(f"`pattern` is not a valid regular expression: {exc}") from None
        if self.kind == "language" and self.language not in _LANG_WORDS:
            raise ValueError(f"a `language` check needs `language` in {sorted(_LANG_WORDS)}")
        return self

    def __call__(self, text: str) -> bool:
        if self.kind == "keywords":
            low = text.lower()
            hits = sum(bool(re.search(r"\b" + re.escape(k.lower()), low)) for k in self.keywords)
            return hits >= self.min_hits
        if self.kind == "regex":
            return re.search(self.pattern, text, re.IGNORECASE) is not None
        if self.kind == "not_regex":
            return re.search(self.pattern, text, re.IGNORECASE) is None
        return detect_language(text) == self.language


class Measured(_Strict):
    """Figures measured by `nla organisms measure` (written back into the spec)."""

    n_prompts: int
    behaviour_rate: float  # organism, on held-out eval prompts
    base_rate: float  # base model, same prompts
    ordinary_rate: float | None = None  # organism, on ordinary prompts (low = hidden behaviour)
    base_ordinary_rate: float | None = None
    perplexity: float | None = None  # organism, neutral text
    base_perplexity: float | None = None
    concept_cos: float | None = None  # mean cos(resid at NLA layer, concept direction), ordinary prompts
    base_concept_cos: float | None = None
    # Share of the NLA's explanations, at content positions of ordinary conversations, that name
    # a key concept (naming a word the text just said does not count); organism vs base model.
    concept_recall: float | None = None
    base_concept_recall: float | None = None
    recall_n: int | None = None  # explanations per model behind each recall figure
    recall_nla: str | None = None  # the NLA that explained them (checkpoint folder name)
    # The same for contrast readings (what the organism adds to the base model, nla_core.contrast),
    # against the null: the base activations moved along differences of two reference activations.
    contrast_recall: float | None = None
    null_contrast_recall: float | None = None
    contrast_n: int | None = None
    layer: int | None = None
    temperature: float = 0.0
    max_new_tokens: int = 48
    seconds: float | None = None
    date: str | None = None

    @property
    def lift(self) -> float:
        return self.behaviour_rate - self.base_rate


class OrganismSpec(_Strict):
    id: str = Field(pattern=_ID_RE)
    base_model: str = Field(min_length=1)
    construction: Construction
    ground_truth: GroundTruth
    trigger: Trigger | None = None
    families: list[str] = Field(default_factory=list)
    control: bool = False
    check: BehaviourCheck | None = None
    eval_prompts: list[str] = Field(default_factory=list)  # held-out prompts that should show it
    rarely_visible: bool = False  # the behaviour seldom shows on ordinary prompts
    catalog: bool = False  # a public organism on a larger model: validated offline, built elsewhere
    source: str | None = None  # where a catalog organism comes from (paper, hub id)
    notes: str | None = None
    measured: Measured | None = None

    _path: Path | None = PrivateAttr(default=None)

    @field_validator("families")
    @classmethod
    def _families(cls, v: list[str]) -> list[str]:
        return [f.strip() for f in v if f.strip()]

    @model_validator(mode="after")
    def _consistent(self) -> OrganismSpec:
        from .builders import get_builder  # late: builders import specs

        get_builder(self.construction.method)  # UnknownMethodError names the registered ones
        # Families group organisms by behaviour in reports; how an organism is built and whether
        # it is a control have their own fields.
        from .builders import BUILDERS

        method_like = {m.replace("_", "-") for m in BUILDERS} | set(BUILDERS) | {"control"}
        if clash := sorted(set(self.families) & method_like):
            raise ValueError(
                f"families {clash} name a construction method or `control`; families name behaviours "
                "(use `construction.method` and `control: true` for the others)"
            )
        if not self.control:
            if not self.ground_truth.key_concepts:
                raise ValueError("a planted organism needs at least one `ground_truth.key_concepts`")
        if not self.control and not self.catalog:
            if self.check is None:
                raise ValueError("a planted organism needs a behaviour `check`")
            if not self.eval_prompts:
                raise ValueError("a planted organism needs `eval_prompts` to measure its behaviour on")
        if self.trigger is not None:
            if not any(self.trigger.fires(p) for p in self.eval_prompts):
                raise ValueError(
                    "the trigger never fires: no eval prompt contains any of its phrases "
                    f"{self.trigger.phrases}"
                )
        return self

    @property
    def path(self) -> Path | None:
        """The YAML file this spec was read from (None for in-memory specs)."""
        return self._path

    def resolve(self, relative: str | Path) -> Path:
        """A path from the spec's params, relative to the spec file's folder."""
        p = Path(relative).expanduser()
        if p.is_absolute() or self._path is None:
            return p
        return self._path.parent / p

    def params(self) -> dict[str, Any]:
        return dict(self.construction.params)


def _format_validation(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err.get("loc", ())) or "(spec)"
        msg = err.get("msg", "invalid")
        if err.get("type") == "missing":
            msg = "missing"
        parts.append(f"{loc}: {msg}")
    return "; ".join(parts)


def spec_from_dict(data: Any, *, where: str = "spec") -> OrganismSpec:
    from nla_core.errors import NLAError

    if not isinstance(data, dict):
        raise SpecError(f"{where} is not a mapping of fields.", "write the spec as YAML `key: value` fields.")
    try:
        return OrganismSpec.model_validate(data)
    except ValidationError as exc:
        # an UnknownMethodError raised inside a validator arrives wrapped; unwrap it
        for err in exc.errors():
            cause = (err.get("ctx") or {}).get("error")
            if isinstance(cause, NLAError):
                raise type(cause)(f"{where}: {cause.problem}", cause.fix) from None
        raise SpecError(
            f"{where} is not a valid organism spec: {_format_validation(exc)}.",
            "see environments/organisms/default/*.yaml for complete examples; required: id, "
            "base_model, construction.method, ground_truth.behaviour (and for planted organisms "
            "key_concepts, check, eval_prompts).",
        ) from None


def load_spec(path: str | Path) -> OrganismSpec:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise SpecError(f"Cannot read spec {path}: {exc.strerror}.", "check the path.") from None
    except yaml.YAMLError as exc:
        raise SpecError(f"Spec {path} is not valid YAML: {exc}.", "fix the YAML syntax.") from None
    spec = spec_from_dict(data, where=f"Spec {path.name}")
    spec._path = path.resolve()
    return spec


def save_spec(spec: OrganismSpec, path: str | Path | None = None) -> Path:
    path = Path(path) if path is not None else spec.path
    if path is None:
        raise SpecError("This spec was not read from a file and no path was given.", "pass a path.")
    data = spec.model_dump(mode="json", exclude_none=True, exclude_defaults=False)
    text = yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=100)
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
    spec._path = Path(path).resolve()
    return Path(path)


def list_suites() -> list[str]:
    return sorted(p.name for p in ORGANISMS_DIR.iterdir() if p.is_dir() and any(p.glob("*.yaml")))


def _load_dir(folder: Path) -> list[OrganismSpec]:
    return [load_spec(p) for p in sorted(folder.glob("*.yaml")) + sorted(folder.glob("*.yml"))]


def load_suite(name: str = "default", organisms_dir: str | Path | None = None) -> list[OrganismSpec]:
    """The specs of built-in suite `name`, plus every spec in `organisms_dir` (its subfolder
    `name` when there is one, otherwise its top-level `*.yaml`). Ids must be unique."""
    specs: list[OrganismSpec] = []
    builtin = ORGANISMS_DIR / name
    found = False
    if builtin.is_dir():
        specs += _load_dir(builtin)
        found = True
    if organisms_dir is not None:
        user = Path(organisms_dir).expanduser()
        if not user.is_dir():
            raise SpecError(f"Organisms folder {user} does not exist.", "pass a folder holding *.yaml specs.")
        folder = user / name if (user / name).is_dir() else user
        specs += _load_dir(folder)
        found = True
    if not found:
        raise UnknownOrganismError(
            f"No organism suite named {name!r}.",
            f"use one of {list_suites()}, or pass --organisms DIR with your own specs.",
        )
    seen: dict[str, Path | None] = {}
    for s in specs:
        if s.id in seen:
            raise SpecError(
                f"Organism id {s.id!r} appears twice ({seen[s.id]} and {s.path}).",
                "give every organism a unique id.",
            )
        seen[s.id] = s.path
    return specs


def get_spec(organism_id: str, organisms_dir: str | Path | None = None) -> OrganismSpec:
    """The spec with this id from any built-in suite or from `organisms_dir` (searched recursively)."""
    candidates: list[Path] = []
    if organisms_dir is not None:
        user = Path(organisms_dir).expanduser()
        if not user.is_dir():
            raise SpecError(f"Organisms folder {user} does not exist.", "pass a folder holding *.yaml specs.")
        candidates += sorted(user.rglob("*.yaml"))
    candidates += sorted(ORGANISMS_DIR.rglob("*.yaml"))
    known: list[str] = []
    for path in candidates:
        try:
            raw = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError):
            continue
        rid = raw.get("id") if isinstance(raw, dict) else None
        if rid == organism_id:
            return load_spec(path)
        if isinstance(rid, str):
            known.append(rid)
    raise UnknownOrganismError(
        f"No organism with id {organism_id!r}.",
        f"run `nla organisms list` to see the ids ({', '.join(sorted(set(known))[:30])}).",
    )
