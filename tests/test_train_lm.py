"""moekit.lm: the Qwen3-MoE LM with moekit layers (exact HF export, identical greedy tokens after a plain
transformers reload), training with resumable checkpoints, per-domain evaluation, corpora and the CLI. Text comes
from the code itself (generated) and the Python standard library source, never from a download."""

from __future__ import annotations

import json
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from moekit.lm import corpora  # noqa: E402
from moekit.lm.compare import mean_ci, router_specs, summarize, welch_p  # noqa: E402
from moekit.lm.data import DomainData, build_domain_data  # noqa: E402
from moekit.lm.model import LMConfig, build_lm  # noqa: E402
from moekit.lm.tokenizer import train_bpe  # noqa: E402
from moekit.lm.train import MANIFEST, TrainConfig, evaluate, train_lm  # noqa: E402

TINY = LMConfig(vocab_size=320, dim=32, layers=2, heads=4, kv_heads=2, num_experts=4, k=2, expert_hidden=16,
                max_len=64)


def _texts() -> dict[str, str]:
    """Two small generated domains: counting prose and arithmetic code."""
    prose = " ".join(f"the {w} number {i} follows {i - 1}." for i in range(1, 400) for w in ["first", "next"][i % 2:])
    code = "\n".join(f"def f{i}(x):\n    return x * {i} + {i % 7}\n" for i in range(300))
    return {"prose": prose, "code": code}


@pytest.fixture(scope="module")
def tok_data():
    texts = _texts()
    tok = train_bpe(texts.values(), vocab_size=320)
    return tok, build_domain_data(tok, texts, block=16, val_fraction=0.1, max_val_blocks=4)


def test_moe_export_reloads_in_plain_transformers_with_identical_logits_and_greedy_tokens(tmp_path):
    lm = build_lm(TINY, "moe", seed=1)
    assert lm.exportable
    with torch.no_grad():  # make the router non-trivial so routing matters
        for moe in lm.moe_layers:
            moe.router.gate.weight.normal_(0, 1.0)
    lm.model.eval()
    path = lm.save_hf(tmp_path / "hf")
    ref = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    assert type(ref).__name__ == "Qwen3MoeForCausalLM"
    assert not any(type(m).__module__.startswith("moekit") for m in ref.modules())
    x = torch.randint(0, 320, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (ref(input_ids=x).logits - lm.model(input_ids=x).logits).abs().max().item() <= 1e-5
        a = lm.model.generate(x[:1, :4], max_new_tokens=12, do_sample=False, pad_token_id=0)
        b = ref.generate(x[:1, :4], max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert torch.equal(a, b)
    # the moekit layers are back after the export
    assert type(lm.model.model.layers[0].mlp).__name__ == "MoEBlock"


def test_dense_baseline_has_the_same_active_parameters():
    moe, dense = build_lm(TINY, "moe"), build_lm(TINY, "dense")
    router = TINY.layers * TINY.dim * TINY.num_experts
    assert moe.num_params()["active"] - dense.num_params()["active"] == router
    assert moe.num_params()["total"] > dense.num_params()["total"]


def test_non_exportable_router_is_refused(tmp_path):
    router, balance = router_specs("expert_choice")
    lm = build_lm(TINY, "moe", router=router, balance=balance)
    assert not lm.exportable
    with pytest.raises(ValueError, match="no Qwen3-MoE equivalent"):
        lm.save_hf(tmp_path)


def test_moepp_gating_residual_chain_runs():
    router, balance = router_specs("moepp")
    lm = build_lm(TINY, "moe", router=router, balance=balance)
    out = lm.model(input_ids=torch.randint(0, 320, (2, 8)))
    assert out.logits.shape == (2, 8, 320)
    assert lm.model.model.layers[1].mlp.chain[0] is not None


def test_training_lowers_loss_and_resumes_exactly(tok_data, tmp_path, monkeypatch):
    tok, data = tok_data
    cfg = TrainConfig(steps=8, batch_size=4, lr=3e-3, warmup=2, ckpt_every=4)
    full = build_lm(TINY, "moe", seed=0)
    m_full = train_lm(full, data, cfg, tmp_path / "full", progress=False)
    assert m_full["finished"] and m_full["step"] == 8 and m_full["tokens"] == 8 * 4 * 16
    assert sum(m_full["loss"][-2:]) < sum(m_full["loss"][:2])
    # a wall-clock budget that is already spent: no step, not finished
    idle = train_lm(build_lm(TINY, "moe"), data, TrainConfig(**{**cfg.__dict__, "max_seconds": 0.0}),
                    tmp_path / "idle", progress=False)
    assert idle["step"] == 0 and not idle["finished"]
    # a run killed after its step-4 checkpoint, resumed in a fresh model with another init
    real_batch = DomainData.batch

    def killed_at_four(self, step, *a, **k):
        if step >= 4:
            raise KeyboardInterrupt
        return real_batch(self, step, *a, **k)

    monkeypatch.setattr(DomainData, "batch", killed_at_four)
    with pytest.raises(KeyboardInterrupt):
        train_lm(build_lm(TINY, "moe", seed=0), data, cfg, tmp_path / "killed", progress=False)
    monkeypatch.setattr(DomainData, "batch", real_batch)
    assert json.loads((tmp_path / "killed" / MANIFEST).read_text())["step"] == 4
    resumed = build_lm(TINY, "moe", seed=5)
    m_res = train_lm(resumed, data, cfg, tmp_path / "killed", progress=False)
    assert m_res["step"] == 8 and m_res["steps_this_call"] == 4
    assert m_res["loss"] == pytest.approx(m_full["loss"], abs=1e-4)
    for a, b in zip(full.model.parameters(), resumed.model.parameters()):
        assert torch.allclose(a, b, atol=1e-5)
    # another configuration in the same folder starts over instead of loading a mismatched checkpoint
    other = train_lm(build_lm(TINY, "moe"), data, TrainConfig(**{**cfg.__dict__, "lr": 1e-3}), tmp_path / "killed",
                     progress=False)
    assert other["steps_this_call"] == 8


def test_evaluate_reports_ppl_and_usage_per_domain(tok_data):
    _, data = tok_data
    lm = build_lm(TINY, "moe")
    r = evaluate(lm, data)
    assert set(r["ppl"]) == {"prose", "code"}
    assert all(1 < v < 10 * TINY.vocab_size for v in r["ppl"].values())
    assert len(r["usage"]) == TINY.layers
    for layer in r["usage"]:
        for shares in layer.values():
            assert len(shares) == TINY.num_experts and sum(shares) == pytest.approx(1.0)


def test_batches_are_deterministic_and_take_domain_turns(tok_data):
    _, data = tok_data
    a, da = data.batch(3, 4, seed=1)
    b, db = data.batch(3, 4, seed=1)
    assert torch.equal(a, b) and torch.equal(da, db)
    assert da.tolist() == [0, 1, 0, 1] and a.shape == (4, 17)
    assert not torch.equal(a, data.batch(4, 4, seed=1)[0])


def test_statistics():
    m, ci = mean_ci([1.0, 2.0, 3.0])
    assert m == 2.0 and ci == pytest.approx(4.303 * 1.0 / math.sqrt(3), rel=1e-3)
    assert welch_p([1, 2, 3], [4, 5, 6]) == pytest.approx(0.0213, abs=2e-3)  # scipy.stats.ttest_ind, Welch
    assert welch_p([1, 2, 3], [1, 2, 3]) == pytest.approx(1.0, abs=1e-3)
    s = summarize({"top2": [{"a": 10.0}, {"a": 11.0}], "x": [{"a": 20.0}, {"a": 21.0}]})
    assert s["x"]["a"]["p_vs_baseline"] < 0.05 and "p_vs_baseline" not in s["top2"]["a"]


def test_corpora_code_is_deterministic_and_splits_cover_text():
    files = corpora.stdlib_files(max_bytes=50_000)
    assert files == corpora.stdlib_files(max_bytes=50_000) and files
    assert not any("site-packages" in str(p) or "/test/" in str(p) for p in files)
    text = corpora.code_text(50_000)
    tr, va = corpora.split_text(text, (0.9, 0.1), blocks=10)
    assert len(tr) + len(va) == len(text) and 0.05 < len(va) / len(text) < 0.15
    with pytest.raises(ValueError, match="unknown domain"):
        corpora.load_domain("news")


def test_missing_corpus_names_the_package(monkeypatch):
    monkeypatch.setattr(corpora.shutil, "which", lambda name: None)
    corpora.bible_text.cache_clear()
    with pytest.raises(corpora.CorpusMissing, match="apt-get install bible-kjv"):
        corpora.bible_text()
    corpora.bible_text.cache_clear()
    monkeypatch.setattr(corpora.importlib.util, "find_spec", lambda name: None)
    corpora.wiki_articles.cache_clear()
    with pytest.raises(corpora.CorpusMissing, match="pip install --no-deps gensim"):
        corpora.wiki_articles()
    corpora.wiki_articles.cache_clear()


def test_clean_wikitext():
    raw = "{{Infobox|a={{b}}}}'''Anarchism''' is a [[political philosophy|philosophy]]<ref>x</ref> [[Category:X]]"
    assert corpora.clean_wikitext(raw) == "Anarchism is a philosophy"


def test_cli_quick_run_on_code(tmp_path):
    from moekit.cli import main

    rc = main(["train-lm", "--quick", "--domains", "code", "--out", str(tmp_path), "--no-progress", "--steps", "3"])
    assert rc == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary["hf_check"]) == {"moe", "dense"} and set(summary["runs"]) == {"moe", "dense"}
    assert all(c["identical"] for c in summary["hf_check"].values())
    for f in ("report.md", "loss.png", "expert_usage.png", "hf_moe/config.json", "hf_dense/config.json"):
        assert (tmp_path / f).exists()


def test_cli_compare_quick(tmp_path):
    from moekit.cli import main

    rc = main(["train-lm", "--quick", "--domains", "code", "--out", str(tmp_path), "--no-progress", "--steps", "2",
               "--compare", "top2,expert_choice", "--seeds", "2"])
    assert rc == 0
    res = json.loads((tmp_path / "compare.json").read_text())
    assert set(res["summary"]) == {"top2", "expert_choice"}
    assert len(res["summary"]["expert_choice"]["code"]["values"]) == 2
    assert "p_vs_baseline" in res["summary"]["expert_choice"]["code"]
    assert res["extra"]["top2"]["experts_per_token"] == pytest.approx(2.0)
    assert "95% CI" in (tmp_path / "compare.md").read_text() and "Holm" in (tmp_path / "compare.md").read_text()
    assert (tmp_path / "compare.png").exists() and len(res["extra"]["top2"]["runs"]) == 2
    with pytest.raises(SystemExit, match="unknown routers"):
        main(["train-lm", "--quick", "--domains", "code", "--out", str(tmp_path), "--compare", "top9"])


def test_holm_correction():
    from moekit.lm.compare import holm_reject

    # m = 3: 0.01 <= 0.05/3 rejected, 0.03 > 0.05/2 stops the procedure, so 0.04 is kept too
    assert holm_reject({"a": 0.01, "b": 0.03, "c": 0.04}) == {"a": True, "b": False, "c": False}
    assert holm_reject({"a": 0.01, "b": 0.02, "c": 0.04}) == {"a": True, "b": True, "c": True}
    assert holm_reject({"a": float("nan"), "b": 0.001}) == {"a": False, "b": True}


def test_anneal_by_time_ends_the_cosine_when_the_clock_runs_out():
    by_steps = TrainConfig(steps=100, lr=1.0, warmup=10, max_seconds=60.0)
    by_time = TrainConfig(steps=100, lr=1.0, warmup=10, max_seconds=60.0, anneal_by_time=True)
    assert by_steps.lr_at(20, elapsed=60.0) == pytest.approx(by_time.lr_at(20, elapsed=0.0))
    assert by_time.lr_at(20, elapsed=60.0) == pytest.approx(0.1)  # the floor: 10% of the peak
    assert by_time.lr_at(20, elapsed=30.0) == pytest.approx(0.1 + 0.9 * 0.5)  # half way through the time
    assert by_time.lr_at(5, elapsed=60.0) == pytest.approx(0.6)  # warm-up is by steps
