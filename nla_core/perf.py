"""`nla perf`: speed and memory ratios of the NLA core, each measured in one run."""

from __future__ import annotations

import copy
import gc
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

import torch

from .activations import encode, forward_to_layer, pad_batch, read_activations
from .models import load_model
from .nla import NLA, default_layer

if TYPE_CHECKING:
    from peft import PeftModel

__all__ = ["run_perf"]

_TEXT = (
    "The committee met on Tuesday to review the budget for the new library. After a long "
    "discussion about the cost of books, staff and heating, they agreed to open a small branch "
    "near the river, where families had asked for a quiet place to read and study after school. "
)


def _best_of(fn: Callable[[], object], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def _rss_mb() -> float:
    import psutil

    gc.collect()
    return psutil.Process().memory_info().rss / 2**20


def _param_mb(module: torch.nn.Module) -> float:
    return sum(p.numel() * p.element_size() for p in module.parameters()) / 2**20


def _engine_ratio(h, *, n_threads: int, new_tokens: int, printer: Callable[[str], None]) -> dict[str, float]:
    """`n_threads` clients (as concurrent audits) each make 3 sampled calls of 4 rows: one after
    another without an engine, then all at once through one `GenerationEngine`."""
    import threading

    from .generation import generate_ids
    from .serving import GenerationEngine

    prompts = [encode(h, [{"role": "user", "content": f"Tell me about subject number {i}."}], add_generation_prompt=True)
               for i in range(n_threads)]

    def client(i: int) -> None:
        for k in range(3):
            generate_ids(h, [prompts[i]] * 4, max_new_tokens=new_tokens, temperature=0.8, seed=10 * i + k)

    t = time.perf_counter()
    for i in range(n_threads):
        client(i)
    alone = time.perf_counter() - t
    with GenerationEngine(h) as engine:
        def served(i: int) -> None:
            with engine.client():
                client(i)

        threads = [threading.Thread(target=served, args=(i,)) for i in range(n_threads)]
        t = time.perf_counter()
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        batched = time.perf_counter() - t
        rows = engine.stats.rows_per_step
    printer(f"generation engine, {n_threads} threads x 3 calls of 4 rows x {new_tokens} tokens: one after another "
            f"{alone:.1f} s, batched {batched:.1f} s ({rows:.0f} rows per step) -> {alone / batched:.2f}x")
    return {"engine_alone_s": alone, "engine_batched_s": batched, "engine_speedup": alone / batched}


def _rows_sweep(h, *, sizes: tuple[int, ...], new_tokens: int, printer: Callable[[str], None]) -> dict[str, float]:
    """Time per decode step and per token at several rows per batch (sampled, one prompt): how
    much a fuller batch buys, which is what concurrent audits per worker are for."""
    from .generation import GenRow, decode_rows, row_seed

    ids = encode(h, [{"role": "user", "content": "Tell me about the weather in spring."}], add_generation_prompt=True)
    decode_rows(h, [GenRow(ids, 2, 0.0, 1.0, 0)], batch_size=1)  # warm-up
    out: dict[str, float] = {}
    parts = []
    for b in sizes:
        rows = [GenRow(list(ids), new_tokens, 0.8, 1.0, row_seed(0, i)) for i in range(b)]
        t = time.perf_counter()
        gens = decode_rows(h, rows, batch_size=b)
        dt = time.perf_counter() - t
        steps = max(g.n_tokens for g in gens)
        out[f"decode_ms_per_token_{b}_rows"] = 1000 * dt / max(1, sum(g.n_tokens for g in gens))
        parts.append(f"{b} rows {1000 * dt / max(1, steps):.0f} ms/step, {out[f'decode_ms_per_token_{b}_rows']:.1f} ms/token")
    first, last = sizes[0], sizes[-1]
    ratio = out[f"decode_ms_per_token_{first}_rows"] / out[f"decode_ms_per_token_{last}_rows"]
    out["decode_rows_speedup"] = ratio
    printer(f"decode, {new_tokens} sampled tokens: " + "; ".join(parts) + f" -> {ratio:.2f}x per token at {last} rows "
            f"vs {first}")
    return out


def run_perf(model: str | None = None, *, quick: bool = False, printer: Callable[[str], None] = print) -> dict:
    repeats = 1 if quick else 3
    rss0 = _rss_mb()
    h = load_model(model)
    layer = default_layer(h.n_layers)
    figures: dict[str, float] = {}
    printer(f"model {h.name}: {h.n_layers} blocks, d_model {h.d_model}, torch threads {torch.get_num_threads()}")

    # 1. early-exit read of blocks.K.resid_post vs the full forward pass (8 x 128 tokens)
    ids = encode(h, _TEXT * 4)[:128]
    input_ids, mask = pad_batch([ids] * 8, h.tokenizer.pad_token_id)
    with torch.no_grad():
        early = _best_of(lambda: forward_to_layer(h, input_ids, mask, layer), repeats)
        full = _best_of(lambda: h.model(input_ids=input_ids, attention_mask=mask, use_cache=False), repeats)
    figures.update(read_early_s=early, read_full_s=full, read_speedup=full / early)
    printer(f"activation read, 8x128 tokens, block {layer}: early exit {early:.3f} s, full forward "
            f"{full:.3f} s -> {full / early:.2f}x faster (ideal {h.n_layers / (layer + 1):.2f}x)")

    # 2. batched vs one-by-one verbalization
    nla = NLA.untrained(h, layer)
    n_vec, new_tokens = (4, 16) if quick else (8, 32)
    acts = read_activations(h, [_TEXT], layer, positions=list(range(10, 10 + n_vec))).stacked()
    kw = dict(max_new_tokens=new_tokens, temperature=0.8, seed=0)  # sampling: no early stop on EOS bias

    def batched():
        return nla.verbalize(acts, batch_size=n_vec, **kw)

    def one_by_one():
        return [nla.verbalize(acts[i], **kw) for i in range(n_vec)]

    t_b = _best_of(batched, 1)
    toks_b = sum(v.n_tokens for v in batched())
    t_1 = _best_of(one_by_one, 1)
    toks_1 = sum(v[0].n_tokens for v in one_by_one())
    figures.update(verbalize_batched_tok_s=toks_b / t_b, verbalize_single_tok_s=toks_1 / t_1)
    figures["verbalize_speedup"] = figures["verbalize_batched_tok_s"] / figures["verbalize_single_tok_s"]
    printer(f"verbalize {n_vec} vectors x {new_tokens} tokens: batched {toks_b / t_b:.1f} tok/s, one by one "
            f"{toks_1 / t_1:.1f} tok/s -> {figures['verbalize_speedup']:.2f}x")

    # 2b. the generation engine: N threads of small sampled calls, batched vs one after another
    figures.update(_engine_ratio(h, n_threads=4 if quick else 8, new_tokens=new_tokens, printer=printer))
    figures.update(_rows_sweep(h, sizes=(1, 4) if quick else (1, 8, 32, 64), new_tokens=new_tokens, printer=printer))

    # 3. memory: target + AV + AR over shared weights (two LoRA adapters) vs three copies
    from peft import LoraConfig

    lora: dict[str, Any] = dict(
        r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    rss_before = _rss_mb()
    h.add_adapter("perf_av", LoraConfig(**lora))
    h.add_adapter("perf_ar", LoraConfig(**lora))
    head = torch.nn.Linear(h.d_model, h.d_model, bias=False)
    shared_params = _param_mb(h.model) + _param_mb(head)
    rss_shared = _rss_mb() - rss0
    base = h.hf_model
    av_copy = copy.deepcopy(base)
    ar_copy = copy.deepcopy(base)
    del ar_copy.get_decoder().layers[layer + 1 :]  # the released AR keeps K+1 blocks
    separate_params = _param_mb(h.model) + _param_mb(av_copy) + _param_mb(ar_copy) + _param_mb(head)
    rss_separate = _rss_mb() - rss0
    figures.update(shared_param_mb=shared_params, separate_param_mb=separate_params,
                   shared_rss_mb=rss_shared, separate_rss_mb=rss_separate,
                   memory_ratio=separate_params / shared_params)
    printer(f"memory, target+AV+AR: shared weights {shared_params:.0f} MB of parameters "
            f"(process +{rss_shared:.0f} MB RSS), three copies {separate_params:.0f} MB "
            f"(+{rss_separate:.0f} MB RSS) -> {separate_params / shared_params:.2f}x less with sharing")
    del av_copy, ar_copy
    _ = rss_before

    # 4. the training forwards: one RL step's AV update (reference forward + policy forward
    # and backward, 16 sequences of the AV prompt + 32 tokens) in float32 vs bf16 autocast
    from .training import av_logprobs

    peft_model = cast("PeftModel", h.model)  # add_adapter wrapped the model in PEFT
    peft_model.delete_adapter("perf_ar")
    vecs = acts[:1].repeat(16, 1)
    completions = [ids[:32]] * 16

    def av_update(bf16: bool) -> None:
        with h.use_adapter("perf_av"), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            with torch.no_grad():
                av_logprobs(nla, vecs, completions, "perf_av", handle=h)
            logp, mask = av_logprobs(nla, vecs, completions, "perf_av", handle=h)
        (logp * mask).sum().backward()

    for p in h.model.parameters():
        p.requires_grad_(False)
    for n, p in h.model.named_parameters():
        if ".perf_av." in n:
            p.requires_grad_(True)
    f32 = _best_of(lambda: av_update(False), repeats)
    b16 = _best_of(lambda: av_update(True), repeats)
    figures.update(av_update_fp32_s=f32, av_update_bf16_s=b16, av_update_bf16_speedup=f32 / b16)
    printer(f"AV update of one RL step (16 x prompt+32 tokens, ref forward + forward/backward): float32 "
            f"{f32:.2f} s, bf16 autocast {b16:.2f} s -> {f32 / b16:.2f}x (training uses bf16 where the CPU has it)")
    peft_model.delete_adapter("perf_av")
    return figures
