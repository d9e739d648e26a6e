"""Saving and loading upcycled models: identical outputs in this process and in a fresh one, atomic files, and
clear errors when the checkpoint does not match the model."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from upcycle_models import tiny

from moekit import TopK
from moekit.convert.unit_gate import UnitGate
from moekit.io import CheckpointError, read_checkpoint
from moekit.convert.upcycle import UpcycleConfig, get_upcycle, revert, upcycle_
from moekit.convert.upcycle_io import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    LegacyCheckpointWarning,
    UpcycleCheckpointError,
    load_upcycled,
    read_upcycle_meta,
    save_upcycled,
)

CFG = UpcycleConfig(num_experts=4, router=UnitGate(router=TopK(k=1)), noise=0.05, layers=[1])


def _trained(arch: str):
    """An upcycled model whose weights moved away from the dense ones (so a load that silently kept fresh weights
    would be caught)."""
    model, inputs = tiny(arch)
    upcycle_(model, CFG)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return model, inputs


@pytest.mark.parametrize("arch", ["gpt2", "bert"])  # GPT-2 has tied input/output embeddings
def test_save_and_reload_identical_outputs(tmp_path, arch):
    model, inputs = _trained(arch)
    with torch.no_grad():
        ref = model(**inputs).logits
    save_upcycled(model, tmp_path)
    ck = read_checkpoint(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["manifest.json", f"save-{ck.save_id}"]  # nothing else left behind
    assert sorted(ck.files) == [WEIGHTS_NAME, CONFIG_NAME]
    meta = read_upcycle_meta(tmp_path)
    assert meta["upcycle"]["layers"] == get_upcycle(model).sites and meta["model_class"] == type(model).__name__

    rebuilt = load_upcycled(tmp_path)  # from the saved Hugging Face config
    fresh, _ = tiny(arch)  # or onto a dense model of the same architecture
    fresh.load_state_dict({k: torch.zeros_like(v) for k, v in fresh.state_dict().items()})
    loaded = load_upcycled(tmp_path, model=fresh)
    assert loaded is fresh
    with torch.no_grad():
        assert torch.equal(rebuilt(**inputs).logits, ref)
        assert torch.equal(fresh(**inputs).logits, ref)
    assert get_upcycle(fresh).config == get_upcycle(rebuilt).config


def test_reload_in_a_fresh_process(tmp_path):
    model, inputs = _trained("llama")
    with torch.no_grad():
        ref = model(**inputs).logits
    save_upcycled(model, tmp_path / "ckpt")
    torch.save(inputs["input_ids"], tmp_path / "ids.pt")
    code = (
        "import sys, torch\n"
        "from moekit.convert.upcycle_io import load_upcycled\n"
        "m = load_upcycled(sys.argv[1])\n"
        "with torch.no_grad(): torch.save(m(input_ids=torch.load(sys.argv[2])).logits, sys.argv[3])\n"
    )
    subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "ckpt"), str(tmp_path / "ids.pt"), str(tmp_path / "out.pt")],
        check=True, timeout=300,
    )
    assert torch.equal(torch.load(tmp_path / "out.pt"), ref)


def test_save_overwrites_and_needs_an_upcycled_model(tmp_path):
    model, _ = tiny("distilbert")
    with pytest.raises(ValueError, match="not upcycled"):
        save_upcycled(model, tmp_path)
    upcycle_(model, CFG)
    first = read_upcycle_meta(save_upcycled(model, tmp_path))["save_id"]
    second = read_upcycle_meta(save_upcycled(model, tmp_path))["save_id"]
    assert first != second and sorted(os.listdir(tmp_path)) == ["manifest.json", f"save-{read_checkpoint(tmp_path).save_id}"]


def test_filter_function_is_saved_as_module_names(tmp_path):
    model, inputs = tiny("gpt2")
    upcycle_(model, UpcycleConfig(num_experts=2, layers=lambda name, m: name.endswith("0.mlp")))
    save_upcycled(model, tmp_path)
    assert read_upcycle_meta(tmp_path)["upcycle"]["layers"] == ["transformer.h.0.mlp"]
    with torch.no_grad():
        assert torch.equal(load_upcycled(tmp_path)(**inputs).logits, model(**inputs).logits)


def test_mismatched_checkpoints_are_refused(tmp_path):
    model, _ = _trained("bert")
    save_upcycled(model, tmp_path)

    other, _ = tiny("bert")  # already upcycled, but differently
    upcycle_(other, UpcycleConfig(num_experts=2, layers=[1]))
    with pytest.raises(UpcycleCheckpointError, match="already upcycled with a different config"):
        load_upcycled(tmp_path, model=other)

    import transformers as tf  # a bigger FFN: the transform applies, the sizes do not match

    wide = tf.BertForSequenceClassification(tf.BertConfig(vocab_size=61, hidden_size=32, num_hidden_layers=2,
                                                          num_attention_heads=2, intermediate_size=128, num_labels=3))
    with pytest.raises(UpcycleCheckpointError, match="MoE layer sizes differ"):
        load_upcycled(tmp_path, model=wide)
    assert get_upcycle(wide) is None  # a failed load leaves the dense model as it was

    shallow = tf.BertForSequenceClassification(tf.BertConfig(vocab_size=61, hidden_size=32, num_hidden_layers=1,
                                                             num_attention_heads=2, intermediate_size=64, num_labels=3))
    with pytest.raises(UpcycleCheckpointError, match="does not fit this model"):
        load_upcycled(tmp_path, model=shallow)

    gpt2, _ = tiny("gpt2")
    with pytest.raises(UpcycleCheckpointError, match="saved from BertForSequenceClassification"):
        load_upcycled(tmp_path, model=gpt2)

    fewer_labels = tf.BertForSequenceClassification(tf.BertConfig(vocab_size=61, hidden_size=32, num_hidden_layers=2,
                                                                  num_attention_heads=2, intermediate_size=64,
                                                                  num_labels=2))
    with pytest.raises(UpcycleCheckpointError, match="weights do not match"):
        load_upcycled(tmp_path, model=fewer_labels)
    assert get_upcycle(fewer_labels) is None


def _cur(folder, name):
    return read_checkpoint(folder, verify=False).path(name)


def test_files_from_different_saves_or_versions_are_refused(tmp_path):
    model, _ = _trained("bert")
    save_upcycled(model, tmp_path / "a")
    save_upcycled(model, tmp_path / "b")
    os.replace(_cur(tmp_path / "b", CONFIG_NAME), _cur(tmp_path / "a", CONFIG_NAME))
    with pytest.raises(CheckpointError, match="upcycle.json does not match its sha256 checksum"):
        load_upcycled(tmp_path / "a")
    with pytest.raises(UpcycleCheckpointError, match="different saves"):  # without checksums: the save ids
        load_upcycled(tmp_path / "a", verify=False)

    # the legacy layout (no manifest): loads with a warning, still checks save ids and versions
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    save_upcycled(model, tmp_path / "c")
    ck = read_checkpoint(tmp_path / "c")
    for name in (WEIGHTS_NAME, CONFIG_NAME):
        os.replace(ck.path(name), legacy / name)
    with pytest.warns(LegacyCheckpointWarning):
        load_upcycled(legacy)
    meta = json.loads((legacy / CONFIG_NAME).read_text())
    (legacy / CONFIG_NAME).write_text(json.dumps(dict(meta, version=99)))
    with pytest.warns(LegacyCheckpointWarning), pytest.raises(UpcycleCheckpointError, match="version 99 is not supported"):
        load_upcycled(legacy)
    with pytest.raises(FileNotFoundError, match="not an upcycled checkpoint"):
        load_upcycled(tmp_path / "missing")
    revert(model)
