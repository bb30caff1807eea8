"""What the training stages share: the stage result and loop (progress bar, JSONL record,
resumable checkpoints), the run's model check and precision, the trainable tensors of a role,
creating / saving / loading the NLA being trained, deterministic batches, and the run's
dataset, explanations and training-set mean."""

from __future__ import annotations

import contextlib
import copy
import json
import random
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import torch
from safetensors.torch import load_file

from ..checkpoint import ACTOR_TEMPLATE, CRITIC_TEMPLATE, NLAMeta
from ..errors import CheckpointError, NLAError
from ..metrics import mean_baseline, normalized_mse
from ..models import ModelHandle, handle_from, is_embedded
from ..nla import AR_ADAPTER, AV_ADAPTER, NLA, default_layer, identity_head
from .config import TrainConfig
from .dataset import STATS_FILE, ActivationDataset
from .run import Run

__all__ = [
    "EXPL_FILE", "STATE_FILE", "StageResult", "StageLoop", "progress_bar", "run_layer", "check_model", "autocast",
    "adapter_params", "trainable", "new_nla", "save_nla", "load_nla", "save_state", "load_state", "batch_indices",
    "stage_dataset", "train_mean", "load_explanations", "split_with_text", "finished_result",
    "fve_with_mean", "heldout_sample",
]

EXPL_FILE = "explanations.parquet"
STATE_FILE = "trainer_state.pt"


class StageResult(dict):
    """What a stage returns (also written to the stage's summary.json)."""


def progress_bar(total: int, desc: str, initial: int = 0, enabled: bool = True):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, disable=not enabled, dynamic_ncols=True, leave=True)


def run_layer(handle: ModelHandle, config: TrainConfig) -> int:
    return default_layer(handle.n_layers) if config.layer is None else handle.check_layer(config.layer)


def check_model(run: Run, handle: ModelHandle) -> None:
    want = run.config.model
    if not ((is_embedded(want) and is_embedded(handle.name)) or want == handle.name):
        raise NLAError(
            f"Run {run.root} trains {want or 'the embedded model'!r}, but the loaded model is {handle.name!r}.",
            "load the run's model (omit --model, or pass the one in its config.yaml).",
        )


# ---- precision and trainable tensors ------------------------------------------------------


def _native_bf16() -> bool:
    if torch.cuda.is_available():
        return True
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def autocast(config: TrainConfig) -> contextlib.AbstractContextManager:
    """The training forwards' precision (`config.autocast`)."""
    on = config.autocast == "bf16" or (config.autocast == "auto" and _native_bf16())
    return torch.autocast("cuda" if torch.cuda.is_available() else "cpu", dtype=torch.bfloat16, enabled=on)


def adapter_params(handle: ModelHandle, adapter: str | None) -> list[torch.nn.Parameter]:
    """The trainable tensors of a role: its LoRA weights, or every weight (full fine-tune)."""
    if adapter is None:
        return list(handle.model.parameters())
    tag = f".{adapter}."
    params = [p for n, p in handle.model.named_parameters() if tag in n]
    if not params:
        raise CheckpointError(f"Adapter {adapter!r} has no parameters on {handle.name}.", "re-create the run's adapters.")
    return params


@contextlib.contextmanager
def trainable(handle: ModelHandle, adapter: str | None):
    """Make sure the role's weights record gradients in the body (PEFT toggles requires_grad
    when switching adapters; loaded adapters may come in inference mode)."""
    with handle.use_adapter(adapter):
        params = adapter_params(handle, adapter)
        old = [p.requires_grad for p in params]
        for p in params:
            p.requires_grad_(True)
        try:
            yield
        finally:
            for p, o in zip(params, old):
                p.requires_grad_(o)


# ---- the NLA being trained and its checkpoints --------------------------------------------


def _lora_config(config: TrainConfig, layers: list[int] | None):
    from peft import LoraConfig

    lc = config.lora
    return LoraConfig(r=lc.rank, lora_alpha=lc.alpha, lora_dropout=lc.dropout, target_modules=list(lc.targets),
                      layers_to_transform=layers, bias="none")


def _fresh_adapter(handle: ModelHandle, name: str, cfg) -> None:
    handle.delete_adapter(name)
    handle.add_adapter(name, cfg)


def new_nla(handle: ModelHandle, config: TrainConfig, layer: int, injection_scale: float, mean: torch.Tensor | None) -> NLA:
    """An untrained NLA with fresh LoRA adapters (identity at start) and an identity AR head,
    or full copies of the model for `finetune: full`."""
    meta = NLAMeta.build(
        handle.tokenizer, d_model=handle.d_model, layer=layer, injection_scale=injection_scale,
        base_model=handle.name, actor_template=config.actor_template or ACTOR_TEMPLATE,
        critic_template=config.critic_template or CRITIC_TEMPLATE, trained=False,
    )
    if config.finetune == "full":
        av = handle_from(copy.deepcopy(handle.hf_model), handle.tokenizer, handle.name)
        ar = handle_from(copy.deepcopy(handle.hf_model), handle.tokenizer, handle.name)
        return NLA(meta, av=av, ar=ar, target=handle, head=identity_head(handle), mean=mean, source="training")
    _fresh_adapter(handle, AV_ADAPTER, _lora_config(config, None))
    start = min(layer, int(config.lora.ar_from_fraction * layer))
    _fresh_adapter(handle, AR_ADAPTER, _lora_config(config, list(range(start, layer + 1))))
    return NLA(meta, av=handle, ar=handle, target=handle, head=identity_head(handle),
               av_adapter=AV_ADAPTER, ar_adapter=AR_ADAPTER, mean=mean, source="training")


def save_nla(nla: NLA, folder: Path) -> Path:
    """Write an NLA checkpoint folder atomically (tmp + rename): the adapter layout, or for a
    full fine-tune the released layout with the training-set mean in `av/`."""
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if nla.av_adapter is not None:
        nla.save(tmp)
    else:
        nla.export_released(tmp, with_mean=True)
    if folder.exists():
        shutil.rmtree(folder)
    tmp.replace(folder)
    return folder


def load_nla(folder: Path, handle: ModelHandle) -> NLA:
    """Read what `save_nla` wrote (the released layout of a full fine-tune reads the mean from `av/`)."""
    if (folder / "nla_meta.yaml").exists():
        return NLA.load(folder, handle)
    return NLA.load(folder / "av", handle, ar_path=folder / "ar")  # full fine-tune layout


def save_state(stage_dir: Path, nla: NLA, state: dict) -> None:
    ckpt = stage_dir / "ckpt"
    save_nla(nla, ckpt)
    tmp = ckpt / (STATE_FILE + ".tmp")
    torch.save(state, tmp)
    tmp.replace(ckpt / STATE_FILE)


def load_state(stage_dir: Path, config_hash: str) -> dict | None:
    f = stage_dir / "ckpt" / STATE_FILE
    if not f.exists():
        return None
    state = torch.load(f, weights_only=False)
    if state.get("config_hash") != config_hash:
        raise NLAError(
            f"The checkpoint in {stage_dir} was written with a different config "
            f"(hash {state.get('config_hash')} vs {config_hash}).",
            "resume with the run's stored config, or delete that stage folder to restart the stage.",
        )
    return state


# ---- the stage loop -----------------------------------------------------------------------


class StageLoop:
    """The scaffolding every training stage shares: the progress bar, a JSONL record and a
    resumable checkpoint every `save_every` steps, and on completion the final checkpoint and
    `summary.json` (a stage with a summary is done; re-running it is a no-op)."""

    def __init__(self, run: Run, stage: str, nla: NLA, *, steps: int, max_steps: int | None, start: int,
                 desc: str, progress: bool):
        self.run, self.stage, self.nla = run, stage, nla
        self.sdir, self.log = run.stage_dir(stage), run.log(stage)
        self.steps, self.step, self.start = steps, start, start
        self.total = steps if max_steps is None else min(steps, max_steps)
        self.bar = progress_bar(steps, desc, initial=start, enabled=progress)
        self.t_start = time.time()

    @property
    def running(self) -> bool:
        return self.step < self.total

    def done_step(self, record: dict, postfix: dict[str, str], state: Callable[[], dict]) -> None:
        """Count a finished step: log it, and checkpoint (`state()` with the step) when due."""
        self.step += 1
        self.bar.update(1)
        self.bar.set_postfix(**postfix)
        self.log.write(event="step", step=self.step, **record)
        if self.step % self.run.config.save_every == 0 or self.step == self.total:
            save_state(self.sdir, self.nla, {**state(), "step": self.step})

    def finish(self, on_complete: Callable[[StageResult], None] | None = None, **fields: Any) -> StageResult:
        self.bar.close()
        elapsed = time.time() - self.t_start
        result = StageResult(stage=self.stage, step=self.step,
                             steps_per_second=(self.step - self.start) / elapsed if self.step > self.start else None, **fields)
        if self.step >= self.steps:
            if on_complete is not None:
                on_complete(result)
            self.log.write(event="done", **result)
            save_nla(self.nla, self.run.final(self.stage))
            self.run.write_json(f"stages/{self.stage}/summary.json", result)
        return result


def finished_result(run: Run, stage: str) -> StageResult | None:
    """A finished stage's stored result (re-running it is a no-op), unless its `steps` was raised."""
    f = run.stage_dir(stage) / "summary.json"
    if run.is_done(stage) and f.exists():
        result = StageResult(json.loads(f.read_text()))
        if result.get("step", 0) >= getattr(run.config, stage).steps:
            return result  # else: `steps` was raised; continue from the checkpoint
    return None


def batch_indices(n: int, batch: int, step: int, seed: int) -> list[int]:
    """Deterministic batches for step `step`: epochs of seeded permutations (so resuming at a
    step reproduces the batches a straight run would have seen)."""
    per_epoch = max(1, n // batch) if n >= batch else 1
    epoch, k = divmod(step, per_epoch)
    perm = list(range(n))
    random.Random(seed * 1000003 + epoch).shuffle(perm)
    if n < batch:
        return [perm[i % n] for i in range(batch)]
    return perm[k * batch : (k + 1) * batch]


# ---- the run's data -----------------------------------------------------------------------


def stage_dataset(run: Run, handle: ModelHandle) -> ActivationDataset:
    ds = ActivationDataset.load(run.data_dir)
    ds.check(handle, run_layer(handle, run.config))
    return ds


def train_mean(run: Run) -> torch.Tensor:
    """The mean of the normalised training activations (`nla data build` wrote it)."""
    return load_file(str(run.data_dir / STATS_FILE))["mean"]


def load_explanations(run: Run) -> dict[int, str]:
    f = run.data_dir / EXPL_FILE
    if not f.exists():
        raise NLAError(f"No warm-start explanations in {run.data_dir}.", "run `nla data build` first.")
    t = pq.read_table(f).to_pydict()
    return dict(zip(t["act_id"], t["explanation"]))


def split_with_text(run: Run, ds: ActivationDataset, names: tuple[str, ...]) -> tuple[torch.Tensor, list[str], list[dict]]:
    expl = load_explanations(run)
    vecs, texts, rows = [], [], []
    for n in names:
        sp = ds.split(n)
        vecs.append(sp.vectors)
        rows += sp.rows
        texts += [expl[r["act_id"]] for r in sp.rows]
    return torch.cat(vecs), texts, rows


def heldout_sample(n: int, k: int) -> list[int]:
    """`k` indices spread evenly over a split of `n` rows. Rows come grouped by document, so
    the first `k` would cover only a few documents and make the held-out figures noisy."""
    if k >= n:
        return list(range(n))
    return sorted({round(i * (n - 1) / max(1, k - 1)) for i in range(k)})


def fve_with_mean(pred: torch.Tensor, gold: torch.Tensor, mean: torch.Tensor) -> float:
    """FVE of `pred` against `gold`, the baseline predicting the training-set `mean`."""
    return 1.0 - float(normalized_mse(pred, gold).mean()) / mean_baseline(gold, mean)
