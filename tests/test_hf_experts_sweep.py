"""Every MoE architecture of the installed transformers, through moekit (see moekit.convert.hf_sweep).

One test per architecture whose modeling file uses ``@use_experts_implementation`` (discovered from the installed
sources: a new architecture shows up here by itself). Each builds a tiny float32 model on CPU and checks the experts
route ``experts_implementation="moekit"`` against ``"eager"``: logits (<= 1e-5), every parameter's gradient after one
backward pass (<= 1e-5 relative), greedy tokens identical. Where ``swap_hf_moe`` accepts the model, the swapped model
must match too (logits <= 1e-5, same tokens). An architecture that cannot be built is reported with its reason: it
fails unless it is listed in ``hf_sweep.NOT_ON_CPU`` (then it is skipped with that reason, shown by ``pytest -rs``).
"""

from __future__ import annotations

import pathlib

import pytest

pytest.importorskip("transformers")

from moekit.convert import hf_sweep  # noqa: E402

ARCHS = hf_sweep.discover()
# Hybrids whose linear-attention / Mamba layers run transformers' slow PyTorch reference kernels on CPU.
SLOW = {"bailing_hybrid", "glm5_next", "granitemoehybrid", "kimi_linear", "nemotron_h", "jamba", "qwen4_exp"}
DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "hf_architectures.md"


def test_discovery_finds_the_moe_architectures():
    assert len(ARCHS) >= 30, ARCHS
    for arch in ("mixtral", "qwen3_moe", "gpt_oss", "deepseek_v3", "nemotron_h", "muse_spark"):
        assert arch in ARCHS


def test_doc_table_lists_every_discovered_architecture():
    text = DOC.read_text(encoding="utf-8")
    missing = [a for a in ARCHS if f"| {a} |" not in text]
    assert not missing, f"docs/hf_architectures.md lacks rows for {missing}; regenerate with hf_sweep --doc"


@pytest.mark.parametrize("arch", [pytest.param(a, marks=pytest.mark.slow) if a in SLOW else a for a in ARCHS])
def test_architecture(arch):
    r = hf_sweep.run_arch(arch)
    line = (
        f"{arch}: {r.status} {r.reason} model={r.model_class} experts={r.experts_class} logits_err={r.logits_err} "
        f"grad_err={r.grad_err} tokens_same={r.tokens_same} swap={r.swap} swap_err={r.swap_err} ({r.seconds:.1f}s)"
    )
    print(line)
    if r.status == "not built":
        if arch in hf_sweep.NOT_ON_CPU:
            pytest.skip(f"{arch} not built on CPU: {r.reason}")
        pytest.fail(f"{arch} does not build from the derived tiny config: {r.reason} (fix hf_sweep.OVERRIDES)")
    assert r.experts_exact, line
    if r.swap == "ok" or r.swap.startswith("fail"):
        assert r.swap == "ok", line
