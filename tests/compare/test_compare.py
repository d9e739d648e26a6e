"""``moekit compare``: a quick smoke run of every configuration, plus the accounting it reports.

The measured numbers of a real run are in docs/compare.md; here only the plumbing and the formulas are checked
(exact integer/float equalities where the quantity is exact)."""

import json
import math

import pytest
import torch

from moekit.cli import main
from moekit.compare import DIGITS_PRESETS, LMConfig, lm_choices
from moekit.compare.data import digits_domains, stdlib_text, text_data
from moekit.compare.runner import _nmi, build_lm, train_lm


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()  # the CLI sets 1 thread (shared CPUs); restore for other tests
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_quick_run_writes_table_json_and_plot(tmp_path):
    assert main(["compare", "--quick", "--no-progress", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "compare.json").read_text())
    runnable, skipped = lm_choices()
    names = {(r["task"], r["name"]) for r in report["results"]}
    assert names == {("lm", n) for n in runnable} | {("digits", n) for n in DIGITS_PRESETS}
    for r in report["results"]:
        assert math.isfinite(r["loss"]) and r["ffn_mflops_per_token"] > 0 and r["max_over_mean"] >= 1.0 - 1e-9
    md = (tmp_path / "compare.md").read_text()
    assert "| top2 |" in md and "| smear |" in md and "| tag |" in md
    assert (tmp_path / "compare.png").stat().st_size > 0
    assert report["skipped"] == skipped


def test_unknown_run_name_lists_valid_ones(tmp_path):
    with pytest.raises(SystemExit, match="valid: .*top2"):
        main(["compare", "--quick", "--routers", "nope", "--out", str(tmp_path)])


def test_lm_accounting_for_top2():
    """experts/token and FLOPs of top-2 are exact: 2 pairs per token, each 2 matmuls of D x F, plus D x E router."""
    torch.manual_seed(0)
    cfg = LMConfig(dim=16, heads=2, seq=8, batch=2, expert_hidden=8, num_experts=4, steps=2, warmup=1, eval_batches=1)
    data = text_data(20_000)
    r = train_lm(lm_choices()[0]["top2"], cfg, data)
    assert r.experts_per_token == 2.0
    per_layer = 2 * (2 * 2 * 16 * 8) + 2 * 16 * 4
    assert r.ffn_mflops_per_token * 1e6 == pytest.approx(cfg.layers * per_layer, rel=1e-12)
    dense = build_lm(lm_choices()[0]["dense"], cfg, 256)
    assert dense.blocks[0].ffn.hidden_dim == 2 * cfg.expert_hidden


def test_data_ships_with_installed_packages():
    text = stdlib_text(10_000)
    assert len(text) == 10_000 and b"def " in text
    dd = digits_domains(num_domains=6)
    n_img = 1797
    assert dd.x_train.shape[1] == 64 and len(dd.domains) == 6
    assert dd.x_train.shape[0] + dd.x_test.shape[0] == 6 * n_img
    assert torch.equal(torch.bincount(dd.d_test), torch.full((6,), dd.x_test.shape[0] // 6))
    # split by image: a test image is in no training domain (here: its inverted copy is not in the inverted domain;
    # a split by (image, domain) pair would leave ~75% of them there). The digits set has a few exact duplicates.
    te, tr_inv = dd.x_test[dd.d_test == 0], dd.x_train[dd.d_train == 1]
    seen = (torch.cdist(1.0 - te, tr_inv).min(dim=1).values < 1e-6).double().mean()
    assert seen < 0.05
    with pytest.raises(ValueError, match="num_domains"):
        digits_domains(num_domains=7)


def test_nmi():
    a = torch.tensor([0, 0, 1, 1, 2, 2])
    assert _nmi(a, a) == pytest.approx(1.0)
    assert _nmi(a, torch.tensor([5, 5, 3, 3, 4, 4])) == pytest.approx(1.0)  # a relabelling
    assert _nmi(torch.tensor([0, 1, 0, 1]), torch.tensor([0, 0, 1, 1])) == pytest.approx(0.0, abs=1e-12)
