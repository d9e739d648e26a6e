"""``moekit demo --quick`` end to end: trains both models briefly, writes the report folder, prints the table."""

import json

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("safetensors")
pytest.importorskip("matplotlib")

from moekit.cli import main  # noqa: E402


def test_demo_quick_smoke(tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["demo", "--quick", "--jobs", "1", "--no-progress", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "MoE ViT" in printed and "dense ViT" in printed and "extracted pathway (left)" in printed
    for name in ("report.md", "summary.json", "history.json", "expert_usage.png", "training_curves.png"):
        assert (out / name).is_file(), name
    from moekit.io import read_checkpoint  # checkpoints: one verified save of weights, config and trainer state

    for run in ("moe", "dense"):
        assert sorted(read_checkpoint(out / "checkpoints" / run).files) == [
            "config.json", "model.safetensors", "trainer.safetensors"]
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["quality"]) == {"MoE ViT", "dense ViT", "MoE pathways", "MoE + Edge approx"}
    for model in summary["quality"].values():
        assert set(model) == {"left", "right", "seg"} and "miou" in model["seg"]
    # task-level routing: each extracted pathway reproduces the full model exactly and keeps half the experts
    for p in summary["pathways"]:
        assert p["agreement"] == 1.0 and p["max_abs_logit_diff"] == 0.0
        assert p["expert_params_fraction"] == 0.5
    cost = {r["what"]: r for r in summary["cost"]}
    one, path = cost["MoE ViT, one task (left)"], cost["extracted pathway (left)"]
    assert path["flops"] == one["flops"] and path["params"] < one["params"]
    assert cost["MoE ViT, all tasks (one pass per task)"]["flops"] > 2 * one["flops"]
    usage = summary["expert_usage"]
    assert len(usage["left"]) == 1 and abs(sum(usage["left"][0]) - 1.0) < 1e-9
    assert "![expert usage](expert_usage.png)" in (out / "report.md").read_text()


def test_demo_bad_arguments(tmp_path):
    with pytest.raises(SystemExit):
        main(["demo", "--quick", "--threads", "0", "--out", str(tmp_path)])
    with pytest.raises(SystemExit):
        main(["demo", "--router", "nope"])
