"""NLA training: full pipeline on a tiny random model (every stage, resume, FVE), GRPO and KL
math on hand-made numbers, the Claude summariser with a fake client, and bad input."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

from nla_core import NLA
from nla_core.errors import EmptyInputError, NLAError
from nla_core.training import (
    ActivationDataset,
    ClaudeSummarizer,
    ConfigChangedError,
    DatasetMismatchError,
    OfflineSummarizer,
    Run,
    TrainConfig,
    build_data,
    copy_stats,
    evaluate,
    group_advantages,
    grpo_loss,
    kl_k3,
    longest_common_run,
    preset,
    rewards_from_mse,
    shipped_texts,
    train_ar_warmstart,
    train_av_warmstart,
    train_rl,
    trigram_copy_rate,
)


def tiny_config(**corpus) -> TrainConfig:
    cfg = preset("tiny")
    cfg.model = "tiny-llama"
    for k, v in corpus.items():
        setattr(cfg.corpus, k, v)
    return cfg


# ---- the whole pipeline -------------------------------------------------------------------


def test_full_pipeline_with_resume(tiny, tmp_path):
    run = Run.open(tmp_path / "run", tiny_config())
    data = build_data(run, tiny, progress=False)
    meta = data["dataset"]
    assert meta["layer"] == 3 and meta["d_model"] == 64 and meta["model"] == "tiny-llama"
    assert all(meta["splits"][s]["documents"] >= 1 for s in ("ar_warm", "av_warm", "rl", "heldout"))
    assert (run.data_dir / "activations.parquet").exists() and (run.data_dir / "dataset.yaml").exists()
    ds = ActivationDataset.load(run.data_dir)
    assert all(r >= 10 for r in ds.table["position"].to_pylist())  # the first tokens are skipped
    # held-out documents appear in no training split
    docs = {s: {r["doc_id"] for r in ds.split(s).rows} for s in ("ar_warm", "av_warm", "rl", "heldout")}
    assert not docs["heldout"] & (docs["ar_warm"] | docs["av_warm"] | docs["rl"])
    assert data["explanations"]["copy"]["share_run_ge_8"] == 0.0

    # AR warm-start, stopped after one step ("killed"), then resumed
    first = train_ar_warmstart(run, tiny, progress=False, max_steps=1)
    assert first["step"] == 1 and not run.is_done("ar_warmstart")
    ar = train_ar_warmstart(run, tiny, progress=False)
    assert ar["step"] == 3 and run.is_done("ar_warmstart")
    steps = [r["step"] for r in run.log("ar_warmstart").read() if r.get("event") == "step"]
    assert steps == [1, 2, 3]  # nothing lost, nothing repeated
    assert math.isfinite(ar["untrained_heldout_fve"]) and math.isfinite(ar["heldout_fve_on_summaries"])

    av = train_av_warmstart(run, tiny, progress=False)
    assert av["step"] == 3 and run.is_done("av_warmstart")
    nll = [r["nll"] for r in run.log("av_warmstart").read() if r.get("event") == "step"]
    assert len(nll) == 3 and all(math.isfinite(x) for x in nll)

    train_rl(run, tiny, progress=False, max_steps=2)
    rl = train_rl(run, tiny, progress=False)
    assert rl["step"] == 3 and run.is_done("rl")
    recs = [r for r in run.log("rl").read() if r.get("event") == "step"]
    assert [r["step"] for r in recs] == [1, 2, 3]
    assert all(0 <= r["tag_fraction"] <= 1 and r["kl"] >= 0 for r in recs)
    assert set(rl["time_share"]) == {"generation", "scoring", "backward_av", "backward_ar"}

    rep = evaluate(run, tiny, progress=False)
    assert rep["stage"] == "rl" and rep["baseline_source"] == "training set"
    assert math.isfinite(rep["round_trip_fve"]) and math.isfinite(rep["ar_on_warmstart_summaries_fve"])
    assert 0 <= rep["tag_fraction"] <= 1 and rep["examples"]
    assert (run.root / "eval_rl.json").exists()
    rows = [json.loads(x) for x in (run.root / "eval_rl_rows.jsonl").read_text().splitlines()]
    assert len(rows) == rep["n_heldout"] and [r["explanation"] for r in rows[:1]] == [rep["examples"][0]["explanation"]]

    # the result is an ordinary NLA checkpoint with the training-set mean
    nla = NLA.load(run.final("rl"), tiny)
    assert nla.mean is not None and nla.mean.shape == (64,)
    rt = nla.round_trip(ds.split("heldout").vectors[:2], max_new_tokens=4)
    assert rt.baseline_source == "training set"

    # training longer: raising the last stage's steps continues it from its checkpoint ...
    longer = tiny_config()
    longer.rl.steps = 5
    run = Run.open(run.root, longer)
    assert train_rl(run, tiny, progress=False)["step"] == 5
    assert [r["step"] for r in run.log("rl").read() if r.get("event") == "step"] == [1, 2, 3, 4, 5]
    assert train_rl(run, tiny, progress=False)["step"] == 5  # done again: a no-op
    # ... but an earlier stage stays frozen (RL was trained on its result), and steps never shrink
    for section, n in (("av_warmstart", 9), ("rl", 4)):
        bad = tiny_config()
        bad.rl.steps = 5
        getattr(bad, section).steps = n
        with pytest.raises(ConfigChangedError, match=f"{section}.steps"):
            Run.open(run.root, bad)


def test_changed_config_on_resume_is_refused(tmp_path):
    run = Run.open(tmp_path / "run", tiny_config())
    # nothing started yet: a change is accepted (and recorded)
    changed = tiny_config()
    changed.rl.kl_coef = 0.5
    assert Run.open(tmp_path / "run", changed).config.rl.kl_coef == 0.5
    assert (run.root / "config_changes.jsonl").exists()
    # once the RL stage has a checkpoint, its fields are frozen ...
    (run.stage_dir("rl") / "ckpt").mkdir(parents=True)
    again = tiny_config()
    again.rl.kl_coef = 0.7
    with pytest.raises(ConfigChangedError) as exc:
        Run.open(tmp_path / "run", again)
    assert "rl.kl_coef" in str(exc.value) and "rl" in str(exc.value) and exc.value.fix
    # ... and once data exists, so is everything every stage depends on
    (run.data_dir).mkdir(parents=True, exist_ok=True)
    (run.data_dir / "dataset.yaml").write_text("kind: nla_activations\n")
    other = tiny_config()
    other.rl.kl_coef = 0.5
    other.corpus.positions_per_doc = 7
    with pytest.raises(ConfigChangedError, match="corpus.positions_per_doc"):
        Run.open(tmp_path / "run", other)
    # fields that never change results may change; a later stage's section too
    fine = tiny_config()
    fine.rl.kl_coef = 0.5
    fine.threads = 2
    fine.eval.n_heldout = 3
    fine.av_warmstart.steps = 9
    assert Run.open(tmp_path / "run", fine).config.av_warmstart.steps == 9
    # no config: the stored one
    assert Run.open(tmp_path / "run").config.av_warmstart.steps == 9


def test_config_file_roundtrip_and_bad_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text(preset("gpu").to_yaml())
    assert TrainConfig.from_file(f) == preset("gpu")
    f.write_text("preset: cpu\nrl: {group_size: 8, nonsense: 1}\n")
    with pytest.raises(NLAError):
        TrainConfig.from_file(f)
    f.write_text("preset: cpu\nrl: {group_size: 8}\n")
    cfg = TrainConfig.from_file(f)
    assert cfg.rl.group_size == 8 and cfg.rl.steps == preset("cpu").rl.steps


# ---- GRPO math ----------------------------------------------------------------------------


def test_group_advantages_hand_numbers():
    adv = group_advantages(torch.tensor([1.0, 3.0, 5.0, 5.0]), group_size=2)
    assert torch.allclose(adv, torch.tensor([-1.0, 1.0, 0.0, 0.0]), atol=1e-4)
    adv = group_advantages(torch.tensor([0.0, 0.0, 0.0, 4.0]), group_size=4)
    s = math.sqrt(3.0)  # mean 1, population std sqrt((1+1+1+9)/4)
    assert torch.allclose(adv, torch.tensor([-1 / s, -1 / s, -1 / s, 3 / s]), atol=1e-4)


def test_rewards_missing_tag_gets_penalty():
    r = rewards_from_mse(torch.tensor([0.5, 0.2, 3.0]), torch.tensor([True, False, True]), -2.0)
    assert torch.allclose(r, torch.tensor([-0.5, -2.0, -3.0]))


def test_kl_k3_hand_numbers():
    logp = torch.log(torch.tensor([0.5, 0.2]))
    ref = torch.log(torch.tensor([0.25, 0.2]))
    kl = kl_k3(logp, ref)
    # ratio ref/p = 0.5: 0.5 - ln 0.5 - 1 = 0.19315; identical -> 0
    assert torch.allclose(kl, torch.tensor([0.5 - math.log(0.5) - 1, 0.0]), atol=1e-5)


def test_grpo_loss_value_and_gradient():
    logp = torch.log(torch.tensor([[0.5, 0.4], [0.5, 0.1]])).requires_grad_(True)
    ref = torch.log(torch.tensor([[0.25, 0.4], [0.5, 0.1]]))
    adv = torch.tensor([1.0, -2.0])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    beta = 0.1
    loss, info = grpo_loss(logp, ref, adv, mask, beta)
    k = 0.5 - math.log(0.5) - 1
    # seq 0: mean over 2 tokens of (-1 + beta*[k, 0]); seq 1: one token (+2 + 0)
    expected = ((-1 + beta * k) + (-1)) / 2 / 2 + 2 / 2
    assert loss.item() == pytest.approx(expected, abs=1e-5)
    assert info["kl"] == pytest.approx((k / 2 + 0) / 2, abs=1e-5)
    loss.backward()
    # d/dlogp of -A*ratio = -A; of k3 = 1 - exp(ref - logp); weighted by 1/len/n_seq
    g = logp.grad
    assert g[0, 0].item() == pytest.approx((-1 + beta * (1 - 0.5)) / 2 / 2, abs=1e-5)
    assert g[0, 1].item() == pytest.approx(-1 / 2 / 2, abs=1e-5)
    assert g[1, 0].item() == pytest.approx(2 / 1 / 2, abs=1e-5)
    assert g[1, 1].item() == 0.0  # padding


# ---- summarisers --------------------------------------------------------------------------


def _rows():
    from nla_core.testing import embedded_tokenizer

    tok = embedded_tokenizer()
    rows = []
    for doc in shipped_texts()[:8]:
        ids = tok.encode(doc.text)
        p = min(40, len(ids) - 1)
        rows.append({"context": tok.decode(ids[: p + 1]), "token": tok.decode([ids[p]]), "role": "", "genre": doc.genre,
                     "next_tokens": [" the", ","]})
    return rows, tok


def test_offline_summarizer_does_not_copy():
    rows, tok = _rows()
    texts = OfflineSummarizer().summarize(rows)
    assert all(t and len(t.split()) <= 30 for t in texts)
    stats = copy_stats(texts, [r["context"] for r in rows], tok)
    assert stats["share_run_ge_8"] == 0.0 and stats["trigram_copy_rate"] < 0.2
    # the metric itself flags verbatim copying
    copied = copy_stats([r["context"][-200:] for r in rows], [r["context"] for r in rows], tok)
    assert copied["trigram_copy_rate"] > 0.9 and copied["share_run_ge_8"] == 1.0


def test_copy_metrics_hand_numbers():
    assert longest_common_run([1, 2, 3, 9], [0, 1, 2, 3, 4]) == 3
    assert longest_common_run([5], [1, 2]) == 0
    assert trigram_copy_rate("the cat sat on", "yesterday the cat sat down") == pytest.approx(0.5)


class FakeClient:
    """Stands in for anthropic.Anthropic: `.messages.create(...)`; fails the first `fail` calls."""

    def __init__(self, fail: int = 0, status: int | None = None):
        self.calls, self.fail, self.status = 0, fail, status
        self.messages = SimpleNamespace(create=self.create)

    def create(self, *, model, max_tokens, messages):
        self.calls += 1
        if self.calls <= self.fail:
            err = RuntimeError("overloaded")
            err.status_code = self.status
            raise err
        prompt = messages[0]["content"]
        assert "<passage>" in prompt and "⟦" in prompt
        return SimpleNamespace(
            content=[SimpleNamespace(type="text", text=f"<explanation>A recipe; measuring flour ({len(prompt)}).</explanation>")],
            usage=SimpleNamespace(input_tokens=100, output_tokens=12),
        )


def test_claude_summarizer_with_fake_client(tmp_path):
    rows, _ = _rows()
    client = FakeClient()
    s = ClaudeSummarizer(client, cache_dir=tmp_path / "cache", concurrency=4, backoff=0.0)
    est = s.estimate(rows)
    assert est["requests"] == len(rows) and est["usd_upper_bound"] > 0 and est["cached"] == 0
    out = s.summarize(rows)
    assert len(out) == len(rows) and all(t.startswith("A recipe; measuring flour") for t in out)
    assert client.calls == len(rows) and s.usage["input_tokens"] == 100 * len(rows)
    # a second summariser over the same cache calls nothing
    client2 = FakeClient()
    s2 = ClaudeSummarizer(client2, cache_dir=tmp_path / "cache", backoff=0.0)
    assert s2.estimate(rows)["cached"] == len(rows)
    assert s2.summarize(rows) == out and client2.calls == 0 and s2.usage["cache_hits"] == len(rows)


def test_claude_summarizer_retries_then_gives_up(tmp_path):
    rows, _ = _rows()
    flaky = FakeClient(fail=2)
    s = ClaudeSummarizer(flaky, max_retries=3, backoff=0.0, concurrency=1)
    assert s.summarize(rows[:1])[0].startswith("A recipe")
    assert s.usage["retries"] == 2
    with pytest.raises(NLAError):
        ClaudeSummarizer(FakeClient(fail=10), max_retries=1, backoff=0.0).summarize(rows[:1])
    bad_key = FakeClient(fail=10, status=401)
    with pytest.raises(NLAError):
        ClaudeSummarizer(bad_key, max_retries=5, backoff=0.0).summarize(rows[:1])
    assert bad_key.calls == 1  # permanent errors are not retried


def test_claude_needs_a_key(monkeypatch):
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    with pytest.raises(NLAError):
        ClaudeSummarizer()


def test_build_data_with_fake_claude(tiny, tmp_path):
    cfg = tiny_config()
    cfg.summarizer = "claude"
    run = Run.open(tmp_path / "run", cfg)
    client = FakeClient()
    seen = []
    res = build_data(run, tiny, progress=False, summarizer=ClaudeSummarizer(client, backoff=0.0),
                     confirm=lambda est: seen.append(est) or True)
    assert seen and seen[0]["requests"] == res["dataset"]["n_activations"]
    assert res["explanations"]["summarizer"].startswith("claude:") and client.calls == len(seen and ActivationDataset.load(run.data_dir))
    run2 = Run.open(tmp_path / "run2", cfg)
    with pytest.raises(NLAError, match="Stopped before calling Claude"):
        build_data(run2, tiny, progress=False, summarizer=ClaudeSummarizer(FakeClient()), confirm=lambda est: False)


# ---- bad input ----------------------------------------------------------------------------


def test_empty_and_tiny_corpus(tiny, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n   \n")
    run = Run.open(tmp_path / "r1", tiny_config(source=str(empty)))
    with pytest.raises(EmptyInputError):
        build_data(run, tiny, progress=False)
    short = tmp_path / "short.jsonl"
    short.write_text(json.dumps({"text": "Too short."}) + "\n")
    run = Run.open(tmp_path / "r2", tiny_config(source=str(short)))
    with pytest.raises(EmptyInputError, match="skipped first tokens"):
        build_data(run, tiny, progress=False)
    two = tmp_path / "two.txt"
    two.write_text(" ".join(["word"] * 40) + "\n\n" + " ".join(["other"] * 40))
    run = Run.open(tmp_path / "r3", tiny_config(source=str(two)))
    with pytest.raises(EmptyInputError, match="at least 4"):
        build_data(run, tiny, progress=False)
    run = Run.open(tmp_path / "r4", tiny_config(source=str(tmp_path / "missing.txt")))
    with pytest.raises(NLAError, match="not 'offline'"):
        build_data(run, tiny, progress=False)


def test_hf_corpus_needs_opt_in(tiny, tmp_path, monkeypatch):
    monkeypatch.delenv("NLA_AUDIT_ALLOW_DOWNLOAD", raising=False)
    run = Run.open(tmp_path / "r", tiny_config(source="hf:some/dataset"))
    with pytest.raises(NLAError, match="downloads are off"):
        build_data(run, tiny, progress=False)


def test_layer_and_model_mismatch(tiny, tmp_path):
    from nla_core.testing import tiny_handle

    cfg = tiny_config()
    run = Run.open(tmp_path / "run", cfg)
    build_data(run, tiny, progress=False)
    ds = ActivationDataset.load(run.data_dir)
    with pytest.raises(DatasetMismatchError, match="block 3"):
        ds.check(tiny, 2)
    other = tiny_handle("qwen2", d_model=32)
    with pytest.raises(DatasetMismatchError, match="tiny-qwen2"):
        ds.check(other, 3)
    # a run's stages refuse a different model too
    with pytest.raises(NLAError, match="tiny-qwen2"):
        train_ar_warmstart(run, other, progress=False)
    # a stage cannot start before the one it builds on
    with pytest.raises(NLAError, match="ar-warmstart"):
        train_av_warmstart(run, tiny, progress=False)
    # the dataset says layer 3; a run asking for layer 2 is refused at the stage
    cfg2 = tiny_config()
    cfg2.layer = 2
    (tmp_path / "run2").mkdir()
    run2 = Run.open(tmp_path / "run2", cfg2)
    import shutil

    shutil.copytree(run.data_dir, run2.data_dir)
    with pytest.raises(DatasetMismatchError):
        train_ar_warmstart(run2, tiny, progress=False)


def test_cli_errors_are_readable(tmp_path):
    from typer.testing import CliRunner

    from evals.cli import app

    runner = CliRunner()
    res = runner.invoke(app, ["train", "config", "--preset", "tiny"])
    assert res.exit_code == 0 and "group_size" in res.output
    res = runner.invoke(app, ["train", "config", "--preset", "huge"])
    # the CLI's one error path: two readable lines, exit code 2 (issue 15)
    assert res.exit_code == 2 and "error:" in res.output and "fix:" in res.output and "Traceback" not in res.output


def test_full_finetune_option(tiny, tmp_path):
    cfg = tiny_config()
    cfg.finetune = "full"
    cfg.ar_warmstart.steps = cfg.av_warmstart.steps = cfg.rl.steps = 1
    run = Run.open(tmp_path / "run", cfg)
    build_data(run, tiny, progress=False)
    train_ar_warmstart(run, tiny, progress=False)
    train_av_warmstart(run, tiny, progress=False)
    rl = train_rl(run, tiny, progress=False)
    assert rl["step"] == 1
    assert (run.final("rl") / "av" / "nla_meta.yaml").exists() and (run.final("rl") / "ar" / "value_head.safetensors").exists()
    rep = evaluate(run, tiny, progress=False)
    assert math.isfinite(rep["round_trip_fve"])


def test_heldout_sample_spreads_over_the_split():
    from nla_core.training.common import heldout_sample

    assert heldout_sample(5, 10) == [0, 1, 2, 3, 4]
    idx = heldout_sample(320, 32)
    assert len(idx) == 32 and idx[0] == 0 and idx[-1] == 319
    # rows come 16 per document: 32 evenly spread rows touch all 20 documents, the first 32 only 2
    assert len({i // 16 for i in idx}) == 20
    assert heldout_sample(7, 1) == [0]
