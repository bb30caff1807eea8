"""The NLA checkpoint shipped inside the package for the embedded default model."""

from __future__ import annotations

from pathlib import Path

from .models import EMBEDDED_MODEL, is_embedded

__all__ = ["default_checkpoint", "SHIPPED_DIR"]

SHIPPED_DIR = Path(__file__).resolve().parent / "checkpoints"
_SHIPPED = {EMBEDDED_MODEL: "smollm2-135m-instruct-L20"}


def default_checkpoint(model: str | None = None) -> Path | None:
    """The shipped NLA folder for `model` (None: the embedded default), or None when the
    package ships none for it (or the folder is incomplete)."""
    if not is_embedded(model):
        return None
    folder = SHIPPED_DIR / _SHIPPED[EMBEDDED_MODEL]
    return folder if (folder / "nla_meta.yaml").exists() and (folder / "av").is_dir() and (folder / "ar").is_dir() else None
