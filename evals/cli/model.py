"""`nla model info`, `nla activations`, `nla verbalize`, `nla steer`, `nla perf`."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer

from nla_core.errors import BadVectorError, EmptyInputError

from .common import console, escape, out, print_json

if TYPE_CHECKING:
    import torch

    from nla_core import NLA, ModelHandle

__all__ = ["register", "load_nla_for_cli", "read_vector_file"]

UNTRAINED_NOTE = (
    "UNTRAINED verbalizer: no trained NLA checkpoint is loaded, so these explanations are what the "
    "plain model writes with the vector injected. They carry no reliable meaning."
)

ModelOpt = typer.Option(None, "--model", "-m", help="HF model name or local path (default: the embedded SmolLM2-135M-Instruct).")


def load_model(name: str | None = None) -> ModelHandle:
    """`nla_core.load_model`, imported on first use (torch loads here, not at `nla --help`)."""
    from nla_core import load_model as _load

    return _load(name)


def load_nla_for_cli(
    handle: ModelHandle, checkpoint: Path | None, critic: Path | None, layer: int | None
) -> NLA:
    """The NLA named on the command line, else the shipped one, else an untrained one."""
    from nla_core import load_nla_for

    return load_nla_for(handle, checkpoint, ar_path=critic, layer=layer)


def read_vector_file(path: Path) -> torch.Tensor:
    """The one vector in a .safetensors, .pt, .npy or .json file (`nla_core.nla.read_vector_file`:
    a file with two tensors or two rows is refused, naming what it holds)."""
    from nla_core.steering import read_vector_file as _read

    return _read(path)


def info(model: str | None = ModelOpt, as_json: bool = typer.Option(False, "--json")) -> None:
    """Architecture, size, default NLA layer and checkpoint of a model."""
    from nla_core import default_checkpoint
    from nla_core.models import cache_dir
    from nla_core.nla import default_layer

    h = load_model(model)
    n_params = sum(p.numel() for p in h.hf_model.parameters())
    ckpt = default_checkpoint(h.name)
    data = {
        "name": h.name,
        "architecture": type(h.hf_model).__name__,
        "n_layers": h.n_layers,
        "d_model": h.d_model,
        "vocab_size": len(h.tokenizer),
        "parameters": n_params,
        "dtype": str(h.dtype).replace("torch.", ""),
        "device": str(h.device),
        "default_nla_layer": default_layer(h.n_layers),
        "activation_site": f"blocks.{default_layer(h.n_layers)}.resid_post",
        "nla_checkpoint": str(ckpt) if ckpt else None,
        "cache_dir": str(cache_dir()),
    }
    if as_json:
        print_json(data)
        return
    for k, v in data.items():
        out.print(f"[bold]{k:>18}[/]  {escape(str(v))}")
    if ckpt is None:
        out.print("[yellow]no trained NLA checkpoint: `nla verbalize` runs an untrained verbalizer[/]")

def activations(
    text: str = typer.Argument(..., help="Text to run through the model."),
    layer: int | None = typer.Option(None, "--layer", "-l", help="Block index K (default: 2/3 depth)."),
    positions: str | None = typer.Option(None, "--positions", "-p",
                                         help="Comma-separated token positions (negative from the end); default all."),
    chat: bool = typer.Option(False, "--chat", help="Send TEXT as a user turn through the chat template."),
    save: Path | None = typer.Option(None, "--save", help="Write the vectors to this .safetensors file."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON with the full vectors."),
    model: str | None = ModelOpt,
) -> None:
    """Residual stream after block K (`blocks.K.resid_post`) at chosen positions."""
    from nla_core import read_activations
    from nla_core.nla import default_layer

    h = load_model(model)
    layer = default_layer(h.n_layers) if layer is None else layer
    pos = _parse_positions(positions)
    item = [{"role": "user", "content": text}] if chat else text
    acts = read_activations(h, [item], layer, positions=pos, add_generation_prompt=chat)
    vecs, idx, toks = acts.vectors[0], acts.positions[0], acts.tokens[0]
    if save is not None:
        from safetensors.torch import save_file

        save_file({"activations": vecs.contiguous()}, str(save))
        console.print(f"saved {tuple(vecs.shape)} to {escape(str(save))}")
    if as_json:
        print_json({
            "model": h.name, "layer": layer, "site": acts.site,
            "positions": [{"position": p, "token": toks[p], "norm": float(v.norm()), "vector": v.tolist()}
                          for p, v in zip(idx, vecs)],
        })
        return
    out.print(f"[bold]{acts.site}[/] of {escape(h.name)}, {len(toks)} tokens")
    for p, v in zip(idx, vecs):
        head = ", ".join(f"{x:+.2f}" for x in v[:6].tolist())
        out.print(escape(f"{p:>5} {toks[p]!r:>16}  norm {float(v.norm()):8.2f}  [{head}, ...]"))

def verbalize(
    text: str = typer.Argument(..., help="Text whose activation to explain."),
    position: int = typer.Option(-1, "--position", "-p", help="Token position (negative from the end)."),
    layer: int | None = typer.Option(None, "--layer", "-l", help="Block index (must match the checkpoint)."),
    checkpoint: Path | None = typer.Option(None, "--checkpoint", "-c",
                                           help="NLA checkpoint folder (ours, or a released AV folder)."),
    critic: Path | None = typer.Option(None, "--critic", help="Released AR folder, when not beside the AV folder."),
    samples: int = typer.Option(1, "--samples", "-n", min=1, max=16, help="Explanations to sample."),
    best_of: int = typer.Option(1, "--best-of", min=1, max=16,
                                help="Candidates per explanation; the AR keeps the one that reconstructs best."),
    max_new_tokens: int = typer.Option(96, "--max-new-tokens", min=1, max=512),
    chat: bool = typer.Option(False, "--chat", help="Send TEXT as a user turn through the chat template."),
    as_json: bool = typer.Option(False, "--json"),
    model: str | None = ModelOpt,
) -> None:
    """Explain the activation at one token in words, and score the explanation by
    reconstructing the activation from it."""
    import torch

    from nla_core import read_activations

    h = load_model(model)
    nla = load_nla_for_cli(h, checkpoint, critic, layer)
    item = [{"role": "user", "content": text}] if chat else text
    acts = read_activations(h, [item], nla.layer, positions=[position], add_generation_prompt=chat)
    vec = acts.vectors[0]
    p = acts.positions[0][0]
    verbs = nla.verbalize(vec, n_samples=samples, max_new_tokens=max_new_tokens, best_of=best_of)
    recon = nla.reconstruct_explanations([v.text for v in verbs])
    cos = torch.nn.functional.cosine_similarity(recon, vec.expand_as(recon), dim=-1)
    data = {
        "model": h.name, "nla": nla.source, "trained": nla.trained, "layer": nla.layer,
        "site": acts.site, "position": p, "token": acts.tokens[0][p],
        "explanations": [
            {"text": v.text, "has_tag": v.has_tag, "reconstruction_cosine": round(float(c), 4)}
            for v, c in zip(verbs, cos)
        ],
    }
    if not nla.trained:
        data["note"] = UNTRAINED_NOTE
    if as_json:
        print_json(data)
        return
    if not nla.trained:
        console.print(f"[bold yellow]{UNTRAINED_NOTE}[/]")
    out.print(f"[bold]{acts.site}[/] at position {p} ({escape(repr(acts.tokens[0][p]))}), NLA: {escape(str(nla.source))}")
    for i, e in enumerate(data["explanations"]):
        out.print(escape(f"[{i}] (reconstruction cosine {e['reconstruction_cosine']:+.3f}) {e['text']}"))

def steer(
    prompt: str = typer.Argument(..., help="User message to answer."),
    with_: str = typer.Option(..., "--with", "-w",
                              help="A sentence (reconstructed into a vector by the AR) "
                                   "or a vector file (.safetensors/.pt/.npy/.json)."),
    strength: float = typer.Option(0.3, "--strength", "-s",
                                   help="Added norm as a multiple of the prompt's median residual norm."),
    layer: int | None = typer.Option(None, "--layer", "-l", help="Block to steer after (default: the NLA's layer)."),
    max_new_tokens: int = typer.Option(48, "--max-new-tokens", min=1, max=512),
    n: int = typer.Option(1, "--n", min=1, max=16, help="Generations per side."),
    temperature: float = typer.Option(0.0, "--temperature", min=0.0),
    checkpoint: Path | None = typer.Option(None, "--checkpoint", "-c"),
    critic: Path | None = typer.Option(None, "--critic"),
    as_json: bool = typer.Option(False, "--json"),
    model: str | None = ModelOpt,
) -> None:
    """Generate with a vector (or a sentence's reconstruction) added to the residual stream,
    beside the unsteered generation."""
    h = load_model(model)
    nla = load_nla_for_cli(h, checkpoint, critic, None)
    if not prompt.strip():
        raise EmptyInputError("The prompt is empty.", "pass a user message.")
    candidate = Path(with_)
    vector = read_vector_file(candidate) if candidate.suffix.lower() in {".safetensors", ".pt", ".npy", ".json"} else with_
    r = nla.steer(prompt, vector, layer=layer, strength=strength, max_new_tokens=max_new_tokens,
                  n=n, temperature=temperature)
    data = {"prompt": r.prompt, "layer": r.layer, "strength": r.strength, "added_norm": r.added_norm,
            "steered_with": with_, "ar_trained": nla.trained, "steered": r.steered, "unsteered": r.unsteered}
    if as_json:
        print_json(data)
        return
    if not nla.trained and isinstance(vector, str):
        console.print("[yellow]The sentence was turned into a vector by an UNTRAINED reconstructor.[/]")
    out.print(f"[bold]steered[/] (block {r.layer}, strength {r.strength}, added norm {r.added_norm:.1f}):")
    for s in r.steered:
        out.print(f"  {escape(s)}")
    out.print("[bold]unsteered[/]:")
    for s in r.unsteered:
        out.print(f"  {escape(s)}")

def perf(
    quick: bool = typer.Option(False, "--quick", help="Fewer repeats (a smoke run)."),
    threads: int | None = typer.Option(None, "--threads", min=1,
                                       help="torch threads (default: torch's; a bench worker uses 1)."),
    model: str | None = ModelOpt,
) -> None:
    """Measure, in one run: early-exit activation reads vs a full forward; batched vs
    one-by-one verbalization; the generation engine; decode time per token by rows per batch;
    memory of target+AV+AR with shared weights vs three copies; the bf16 AV update."""
    import torch

    from nla_core.perf import run_perf

    if threads is not None:
        torch.set_num_threads(threads)
    run_perf(model, quick=quick, printer=out.print)


def register(app: typer.Typer) -> None:
    model_app = typer.Typer(help="Inspect the target model.", no_args_is_help=True)
    app.add_typer(model_app, name="model")
    model_app.command("info")(info)
    app.command("activations")(activations)
    app.command("verbalize")(verbalize)
    app.command("steer")(steer)
    app.command("perf")(perf)


def _parse_positions(spec: str | None) -> list[int] | None:
    if spec is None or not spec.strip():
        return None
    try:
        return [int(x) for x in spec.split(",") if x.strip()]
    except ValueError as exc:
        raise BadVectorError(f"--positions {spec!r} is not a comma-separated list of integers.",
                             "e.g. --positions 0,5,-1") from exc
