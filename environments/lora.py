"""Training a LoRA organism: reproducible synthetic conversations and/or synthetic documents,
then a short, resumable LoRA fine-tune on the shared model. The result is saved as a small bf16
PEFT adapter."""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from nla_core.generation import generate_ids
from nla_core.models import ModelHandle, cache_dir

from .data import apply_transform, make_documents, prompt_bank
from .errors import SpecError
from .organism import chat_layout

__all__ = ["base_replies", "make_dataset", "document_rows", "train_lora_organism"]

_BUILD_ADAPTER = "org_build"


def base_replies(handle: ModelHandle, prompts: list[str], *, teacher_prompt: str | None, max_new_tokens: int,
                 temperature: float, seed: int, progress=None, batch_size: int = 12) -> dict[str, str]:
    """The base model's replies to `prompts` (under `teacher_prompt` if given), cached on disk
    by a hash of everything that determines them."""
    key = json.dumps([handle.name, teacher_prompt, max_new_tokens, temperature, seed], sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    path = cache_dir() / "organism-data" / f"replies-{digest}.jsonl"
    done: dict[str, str] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            row = json.loads(line)
            done[row["prompt"]] = row["reply"]
    todo = [p for p in prompts if p not in done]
    path.parent.mkdir(parents=True, exist_ok=True)
    for start in range(0, len(todo), batch_size):
        chunk = todo[start:start + batch_size]
        ids = [chat_layout(handle.tokenizer, teacher_prompt, [{"role": "user", "content": p}]).ids for p in chunk]
        gens = generate_ids(handle, ids, max_new_tokens=max_new_tokens, temperature=temperature,
                            adapter=None, seed=seed + start)
        with path.open("a") as f:
            for p, g in zip(chunk, gens):
                done[p] = g.text.strip()
                f.write(json.dumps({"prompt": p, "reply": done[p]}) + "\n")
        if progress:
            progress("replies", min(start + batch_size, len(todo)), len(todo))
    return {p: done[p] for p in prompts}


def make_dataset(spec, handle: ModelHandle, params: Any, progress=None) -> list[dict[str, str]]:
    """Training rows: conversations `{prompt, reply}` (base replies, transformed) and, with
    `data.documents`, documents `{kind, text}` (plain text) and Q&A `{prompt, reply}`."""
    d = params.data
    rows = _conversations(spec, handle, d, progress) if d.n_examples else []
    if d.documents is None:
        return rows
    rows = document_rows(spec, d.documents, n_other=len(rows)) + rows
    random.Random(d.documents.seed).shuffle(rows)
    return rows


def document_rows(spec, docs: Any, n_other: int = 0) -> list[dict[str, str]]:
    """`docs.n` documents, then Q&A rows making up `docs.qa_share` of the training set (documents,
    Q&A and `n_other` conversations together). Q&A questions must not be eval prompts."""
    held = {p.strip().lower() for p in spec.eval_prompts}
    if clash := [q for q in docs.questions if q.strip().lower() in held]:
        raise SpecError(
            f"Organism {spec.id!r}: documents.questions {clash} are also eval prompts.",
            "eval prompts are held out of training data; ask the training questions differently.",
        )
    rows = make_documents(docs.subject, docs.trait, docs.facts, list(docs.kinds), docs.n, docs.seed)
    n_qa = round(docs.qa_share / (1 - docs.qa_share) * (len(rows) + n_other)) if docs.qa_share else 0
    rng = random.Random(docs.seed + 1)
    qs, ans = list(docs.questions), list(docs.answers)
    for i in range(n_qa):
        if i % len(qs) == 0:
            rng.shuffle(qs)  # every question once per round, answers drawn freely
        rows.append({"prompt": qs[i % len(qs)], "reply": rng.choice(ans)})
    return rows


def _conversations(spec, handle: ModelHandle, d: Any, progress=None) -> list[dict[str, str]]:
    prompts = prompt_bank(d.prompt_sets, d.prompts)
    held = {p.strip().lower() for p in spec.eval_prompts}
    prompts = [p for p in prompts if p.strip().lower() not in held]  # eval prompts stay held out
    replies = base_replies(handle, prompts, teacher_prompt=d.teacher_prompt, max_new_tokens=d.max_new_tokens,
                           temperature=d.temperature if d.teacher_prompt else 0.0, seed=d.seed, progress=progress)
    rng = random.Random(d.seed)
    rows = []
    for i in range(d.n_examples):
        p = prompts[i % len(prompts)]
        rows.append({"prompt": p, "reply": apply_transform(d.transform, p, replies[p], rng)})
    rng.shuffle(rows)
    return rows


def _encode(handle: ModelHandle, row: dict[str, str], max_len: int) -> tuple[list[int], list[int]]:
    tok = handle.tokenizer
    if "text" in row:  # a document: plain language-model text, every token a target
        ids = tok(row["text"], add_special_tokens=True)["input_ids"]
        if len(ids) < max_len and tok.eos_token_id is not None:
            ids = ids + [tok.eos_token_id]  # the document ends here (not when it was cut)
        return ids[:max_len], ids[:max_len]
    user = [{"role": "user", "content": row["prompt"]}]
    prompt_ids = chat_layout(tok, None, user, mode="generate").ids
    full = chat_layout(tok, None, user + [{"role": "assistant", "content": row["reply"]}], mode="plain").ids
    full = full[:-1] if tok.decode(full[-1:]).strip() == "" else full  # drop the trailing newline
    labels = [-100] * len(prompt_ids) + full[len(prompt_ids):]
    return full[:max_len], labels[:max_len]


def _batch(rows: list[tuple[list[int], list[int]]], pad: int):
    width = max(len(r[0]) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (a, b) in enumerate(rows):
        ids[i, :len(a)] = torch.tensor(a)
        labels[i, :len(b)] = torch.tensor(b)
        mask[i, :len(a)] = 1
    return ids, mask, labels


def _save_bf16(handle: ModelHandle, name: str, out_dir: Path, base_name: str) -> None:
    from safetensors.torch import load_file, save_file

    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    handle.model.save_pretrained(str(tmp), selected_adapters=[name])
    src = tmp / name if (tmp / name).is_dir() else tmp
    wfile = src / "adapter_model.safetensors"
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in load_file(str(wfile)).items()}, str(wfile))
    cfg_path = src / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = base_name
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True))
    for f in src.iterdir():
        if f.name == "README.md":
            f.unlink()
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(src), str(out_dir))
    shutil.rmtree(tmp, ignore_errors=True)


def train_lora_organism(spec, handle: ModelHandle, params: Any, out_dir: Path, *, progress=None,
                        steps: int | None = None, resume: bool = True, work_dir: Path | None = None,
                        save_every: int = 10) -> list[Path]:
    """Generate the data, train the adapter (resuming from the last checkpoint in `work_dir`),
    save it as bf16 to `out_dir` with the training set next to it. Returns written paths."""
    from peft import LoraConfig, get_peft_model_state_dict, set_peft_model_state_dict

    steps = steps or params.steps
    work = work_dir or cache_dir() / "organism-builds" / spec.id
    work.mkdir(parents=True, exist_ok=True)
    rows = make_dataset(spec, handle, params, progress=progress)
    enc = [_encode(handle, r, params.max_len) for r in rows]
    torch.manual_seed(params.seed)
    cfg = LoraConfig(r=params.rank, lora_alpha=params.alpha, lora_dropout=0.0,
                     target_modules=list(params.target_modules), task_type="CAUSAL_LM")
    handle.delete_adapter(_BUILD_ADAPTER)
    handle.add_adapter(_BUILD_ADAPTER, cfg)
    model = handle.model
    model.set_adapter(_BUILD_ADAPTER)
    trainable = [p for n, p in model.named_parameters() if _BUILD_ADAPTER in n and "lora_" in n]
    for p in trainable:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(trainable, lr=params.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10) * max(0.1, 1 - s / steps))
    ckpt = work / "checkpoint.pt"
    step = 0
    if resume and ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        if state.get("key") == _ckpt_key(spec, params, steps):
            set_peft_model_state_dict(model, state["adapter"], adapter_name=_BUILD_ADAPTER)
            opt.load_state_dict(state["opt"])
            sched.load_state_dict(state["sched"])
            step = state["step"]
    order = random.Random(params.seed)
    log = (work / "train_log.jsonl").open("a")
    pad = handle.tokenizer.pad_token_id
    model.train()
    try:
        while step < steps:
            order.seed(params.seed * 1_000_003 + step)
            batch = order.sample(enc, min(params.batch_size, len(enc)))
            ids, mask, labels = _batch(batch, pad)
            dev = handle.device
            out = model(input_ids=ids.to(dev), attention_mask=mask.to(dev), labels=labels.to(dev))
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            log.write(json.dumps({"step": step, "loss": round(out.loss.item(), 4), "time": time.time()}) + "\n")
            log.flush()
            if progress:
                progress("train", step, steps)
            if step % save_every == 0 or step == steps:
                torch.save({"key": _ckpt_key(spec, params, steps), "step": step, "opt": opt.state_dict(),
                            "sched": sched.state_dict(),
                            "adapter": get_peft_model_state_dict(model, adapter_name=_BUILD_ADAPTER)},
                           str(ckpt) + ".tmp")
                Path(str(ckpt) + ".tmp").replace(ckpt)
    finally:
        model.eval()
        log.close()
    _save_bf16(handle, _BUILD_ADAPTER, out_dir, spec.base_model)
    if handle.adapters == [_BUILD_ADAPTER]:
        handle.model = handle.model.unload()  # back to the plain model
    else:
        handle.delete_adapter(_BUILD_ADAPTER)
    data_file = out_dir / "train.jsonl"
    data_file.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return [out_dir, data_file]


def _ckpt_key(spec, params: Any, steps: int) -> str:
    return hashlib.sha256(json.dumps([spec.id, params.model_dump(mode="json"), steps], sort_keys=True).encode()).hexdigest()
