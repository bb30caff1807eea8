"""The NLA checkpoint shipped inside the package for the embedded default model."""

from __future__ import annotations

from pathlib import Path

from .errors import CheckpointError
from .models import EMBEDDED_MODEL, ModelHandle, is_embedded
from .nla import NLA

__all__ = ["default_checkpoint", "load_nla_for", "SHIPPED_DIR"]

SHIPPED_DIR = Path(__file__).resolve().parent / "checkpoints"
_SHIPPED = {EMBEDDED_MODEL: "smollm2-135m-instruct-L24"}


def default_checkpoint(model: str | None = None) -> Path | None:
    """The shipped NLA folder for `model` (None: the embedded default), or None when the
    package ships none for it (or the folder is incomplete)."""
    if not is_embedded(model):
        return None
    folder = SHIPPED_DIR / _SHIPPED[EMBEDDED_MODEL]
    return folder if (folder / "nla_meta.yaml").exists() and (folder / "av").is_dir() and (folder / "ar").is_dir() else None


def load_nla_for(
    handle: ModelHandle,
    checkpoint: str | Path | None = None,
    *,
    ar_path: str | Path | None = None,
    layer: int | None = None,
) -> NLA:
    """The NLA at `checkpoint`, else the one shipped for `handle`'s model, else an untrained
    one at `layer` (which says so). A checkpoint reading another block than `layer` is refused."""
    if checkpoint is None:
        checkpoint = default_checkpoint(handle.name)
    if checkpoint is None:
        return NLA.untrained(handle, layer)
    nla = NLA.load(checkpoint, handle, ar_path=ar_path)
    if layer is not None and layer != nla.layer:
        raise CheckpointError(
            f"The NLA at {checkpoint} reads block {nla.layer}, not block {layer}.",
            f"drop --layer or pass --layer {nla.layer}.",
        )
    return nla
