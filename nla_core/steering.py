"""Steering: add a direction to a model's residual stream after one block and generate, next to
the unsteered generation. Needs no NLA: `NLA.steer` (a vector or AR(text)) and `Target.steer`
(an organism's implant added to both runs) both call `steered_generations`. Both runs use row
hooks, so the generation engine batches them with other audits' calls.

Also the bounds every generating call checks (`int_arg`, `float_arg`, `MAX_NEW_TOKENS`,
`MAX_SAMPLES`) and `read_vector_file` (a steering vector saved to a file).
"""

from __future__ import annotations

import contextlib
import math
import numbers
from pathlib import Path

import torch
from safetensors.torch import load_file

from .activations import forward_to_layer
from .errors import BadArgumentError, BadVectorError, EmptyInputError
from .generation import RowHooks, generate_ids
from .hooks import add_to_resid
from .models import ModelHandle

__all__ = ["steered_generations", "read_vector_file", "MAX_STEER_STRENGTH", "MAX_NEW_TOKENS", "MAX_SAMPLES",
           "int_arg", "float_arg"]


# Steering adds `strength * ||resid||` (the prompt's median residual norm at the layer). Past ten
# times the residual itself the model only emits noise, and huge values overflow to inf/nan and
# came back as empty replies with exit code 0 (issue 15), so the added vector is checked after
# scaling: finite, and its norm at most MAX_STEER_STRENGTH times the residual norm.
MAX_STEER_STRENGTH = 10.0
MAX_NEW_TOKENS = 1024  # longest generation any NLA call asks for
MAX_SAMPLES = 64  # explanations (or steered generations) per input


def int_arg(value, name: str, lo: int, hi: int) -> int:
    """`value` as an int in lo..hi, else `BadArgumentError` (bools and floats are refused)."""
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or not lo <= int(value) <= hi:
        got = repr(value) if isinstance(value, (int, float)) else f"a {type(value).__name__}"
        raise BadArgumentError(f"{name} must be an integer from {lo} to {hi}, got {got}.", f"pass {name}={lo}..{hi}.")
    return int(value)


def float_arg(value, name: str, lo: float, hi: float) -> float:
    """`value` as a finite float in lo..hi, else `BadArgumentError`."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if ok:
        value = float(value)
    if not ok or not math.isfinite(value) or not lo <= value <= hi:
        got = repr(value) if ok else f"a {type(value).__name__}"
        raise BadArgumentError(f"{name} must be a number from {lo:g} to {hi:g}, got {got}.", f"pass {name} in {lo:g}..{hi:g}.")
    return value


def steered_generations(
    handle: ModelHandle,
    ids: list[int],
    vector: torch.Tensor,
    layer: int,
    strength: float,
    *,
    n: int = 1,
    max_new_tokens: int = 48,
    temperature: float = 0.0,
    adapter: str | None = None,
    implant: RowHooks | None = None,
    seed: int = 0,
) -> tuple[list[str], list[str], float]:
    """(steered, unsteered, added norm) continuations of prompt `ids`. The added vector is
    `strength * unit(vector) * median ||resid||` of the prompt at `layer`, at every position.
    `implant` (row hooks with one payload, for the prompt) is the caller's own context (an
    organism's implant), added to both runs.

    Refused with `BadVectorError`: a vector that is not finite, is zero, has the wrong width or
    whose norm overflows float32, and an added vector that is not finite or whose norm exceeds
    `MAX_STEER_STRENGTH` times the residual norm (|strength| <= 10). The layer is validated here,
    once (`LayerOutOfRangeError`): callers pass it as given."""
    layer = handle.check_layer(layer)
    if not isinstance(strength, numbers.Real) or isinstance(strength, bool):
        raise BadArgumentError(f"The steering strength must be a number, got a {type(strength).__name__}.",
                               f"pass a strength between -{MAX_STEER_STRENGTH:g} and {MAX_STEER_STRENGTH:g}.")
    strength = float(strength)
    if not math.isfinite(strength):
        raise BadVectorError(f"Steering strength {strength} is not finite.",
                             f"pass a strength between -{MAX_STEER_STRENGTH:g} and {MAX_STEER_STRENGTH:g}.")
    n = int_arg(n, "n", 1, MAX_SAMPLES)
    max_new_tokens = int_arg(max_new_tokens, "max_new_tokens", 1, MAX_NEW_TOKENS)
    temperature = float_arg(temperature, "temperature", 0.0, 5.0)
    if not ids:
        raise EmptyInputError("The prompt to steer has no tokens.", "pass a non-empty prompt.")
    if not isinstance(vector, torch.Tensor):
        raise BadVectorError(f"The steering vector must be a tensor, got a {type(vector).__name__}.",
                             "pass a vector read from this model or reconstructed from text.")
    vec = vector.detach().float().flatten().cpu()
    if vec.numel() != handle.d_model or not torch.isfinite(vec).all() or vec.norm() == 0:
        raise BadVectorError(
            f"The steering vector must be finite, non-zero and of width {handle.d_model}.",
            "pass a vector read from this model or reconstructed from text.",
        )
    if not torch.isfinite(vec.norm()):
        raise BadVectorError("The steering vector is too large: its norm overflows float32.",
                             "pass a vector read from this model or reconstructed from text (its scale does not matter).")
    own = implant or RowHooks(None, [None], lambda payloads: contextlib.nullcontext())
    with torch.no_grad(), handle.use_adapter(adapter), own([0]):
        resid = forward_to_layer(handle, torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long), layer)
    scale = float(resid[0].float().norm(dim=-1).median())
    added = (strength * scale) * (vec / vec.norm())
    # Checked after scaling: strength * scale can overflow even when each is finite.
    added_norm = float(added.norm())
    if not (math.isfinite(scale) and scale > 0) or not torch.isfinite(added).all() or not math.isfinite(added_norm):
        raise BadVectorError(
            f"The added steering vector is not finite (strength {strength:g} times the residual norm at block {layer}).",
            f"pass a strength between -{MAX_STEER_STRENGTH:g} and {MAX_STEER_STRENGTH:g}.",
        )
    if added_norm > MAX_STEER_STRENGTH * scale * (1 + 1e-6):
        raise BadVectorError(
            # no norms in the text: a Target passes it on, and its prompt's norm includes hidden tokens
            f"The added steering vector's norm exceeds {MAX_STEER_STRENGTH:g} times the residual norm at block "
            f"{layer}: strength {strength:g} is too large.",
            f"pass a strength between -{MAX_STEER_STRENGTH:g} and {MAX_STEER_STRENGTH:g} (0.3 is gentle, 1 strong).",
        )
    added = added.to(handle.device)
    gen = dict(max_new_tokens=max_new_tokens, temperature=temperature, adapter=adapter, seed=seed)
    plain = generate_ids(handle, [ids] * n, hooks=RowHooks(own.key, [own.payloads[0]] * n, own.enter), **gen)
    steered = generate_ids(handle, [ids] * n, hooks=_steered_rows(handle, layer, added, n, own), **gen)
    return [g.text for g in steered], [g.text for g in plain], added_norm


def _steered_rows(handle: ModelHandle, layer: int, added: torch.Tensor, n: int, own: RowHooks) -> RowHooks:
    """Row hooks for `n` rows that add `added` [d] after block `layer`, on top of the caller's
    own row hooks. Rows of other calls (payload None) are left alone."""

    @contextlib.contextmanager
    def enter(payloads):
        mine = [p is not None for p in payloads]
        rows = torch.stack([p[1] if p is not None else torch.zeros_like(added) for p in payloads])  # [batch, d]
        with own.enter([p[0] if p is not None else None for p in payloads]):
            with add_to_resid(handle.layers, layer, rows) if any(mine) else contextlib.nullcontext():
                yield

    return RowHooks(("steered", layer, own.key), [(own.payloads[0], added)] * n, enter)


def read_vector_file(path: str | Path) -> torch.Tensor:
    """The one vector [d] in a .safetensors, .pt, .npy or .json (a list of numbers) file. A file
    must hold exactly one tensor of one vector ([d] or [1, d]): a second tensor or a second row
    would otherwise be dropped silently, so both are refused, naming what was found."""
    path = Path(path)
    if not path.is_file():
        raise BadVectorError(f"Vector file {path} does not exist.", "pass an existing file or a sentence.")
    suffix = path.suffix.lower()
    if suffix not in (".safetensors", ".pt", ".npy", ".json"):
        raise BadVectorError(f"Unknown vector file type {suffix!r}.", "use .safetensors, .pt, .npy or .json.")
    one = "save exactly one tensor holding one vector"
    loaded: object  # a tensor, or a dict of them; checked below
    try:
        if suffix == ".safetensors":
            loaded = load_file(str(path))
        elif suffix == ".pt":
            loaded = torch.load(str(path), map_location="cpu", weights_only=True)
        elif suffix == ".npy":
            import numpy as np

            loaded = torch.from_numpy(np.load(str(path), allow_pickle=False))
        else:
            import json

            loaded = torch.tensor(json.loads(path.read_text()), dtype=torch.float32)
    except Exception as exc:  # noqa: BLE001 - any unreadable file: say which, without a traceback
        raise BadVectorError(f"Could not read a vector from {path} ({type(exc).__name__}).",
                             "check that the file is a complete tensor file of numbers.") from None
    if isinstance(loaded, dict):
        keys = ", ".join(map(str, list(loaded)[:8])) + (" ..." if len(loaded) > 8 else "")
        if len(loaded) != 1:
            raise BadVectorError(f"{path} holds {len(loaded)} tensors ({keys or 'none'}); a steering file needs exactly one.",
                                 one + ".")
        loaded = next(iter(loaded.values()))
    if not isinstance(loaded, torch.Tensor):
        raise BadVectorError(f"{path} does not hold a tensor (it holds a {type(loaded).__name__}).", one + ".")
    if loaded.dim() == 2 and loaded.shape[0] == 1:
        loaded = loaded[0]
    if loaded.dim() != 1 or loaded.numel() == 0:
        raise BadVectorError(f"{path} holds a tensor of shape {tuple(loaded.shape)}, not one vector.",
                             one + " (shape [d] or [1, d]).")
    if not (loaded.is_floating_point() or loaded.dtype in (torch.int8, torch.int16, torch.int32, torch.int64)):
        raise BadVectorError(f"{path} holds a tensor of {loaded.dtype}, not numbers.", one + ".")
    return loaded.float()
