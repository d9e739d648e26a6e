"""Bad input fails before any generation, naming the file / tensor / argument."""

from __future__ import annotations

import json
import os

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from offload_models import save_tiny  # noqa: E402

from moekit.offload import CheckpointError, load_offloaded, parse_budget  # noqa: E402


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("q3")
    save_tiny("qwen3_moe", d)
    return d


def _copy(src, dst):
    for f in os.listdir(src):
        (dst / f).write_bytes((src / f).read_bytes())
    return dst


def test_budget_smaller_than_one_expert(ckpt):
    with pytest.raises(ValueError, match=r"expert_budget=100 is 100 bytes, smaller than one expert \(6144 bytes"):
        load_offloaded(ckpt, 100)
    with pytest.raises(ValueError, match="expert_budget='0.1%'"):
        load_offloaded(ckpt, "0.1%")


@pytest.mark.parametrize("bad", ["abc", "150%", "-3%", True, [1]])
def test_budget_syntax(bad):
    with pytest.raises(ValueError, match="expert_budget="):
        parse_budget(bad, 1000, 10)


def test_budget_units():
    assert parse_budget("25%", 1000, 10) == 250
    assert parse_budget("2KiB", 10**6, 10) == 2048
    assert parse_budget(4096, 10**6, 10) == 4096


def test_missing_expert_tensor_named(ckpt, tmp_path):
    from safetensors.torch import load_file, save_file

    d = _copy(ckpt, tmp_path)
    sd = load_file(str(d / "model.safetensors"))
    del sd["model.layers.1.mlp.experts.5.up_proj.weight"]
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"lacks expert tensor 'model.layers.1.mlp.experts.5.up_proj.weight'"):
        load_offloaded(d, "50%")


def test_truncated_shard_named(ckpt, tmp_path):
    d = _copy(ckpt, tmp_path)
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=r"model.safetensors, tensor '[^']+': bytes .* the shard is truncated"):
        load_offloaded(d, "50%")


def test_unreadable_and_garbage_shard(ckpt, tmp_path):
    d = _copy(ckpt, tmp_path)
    (d / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(CheckpointError, match=r"model.safetensors: header is not valid"):
        load_offloaded(d, "50%")
    (d / "model.safetensors").write_bytes(b"abc")
    with pytest.raises(CheckpointError, match=r"model.safetensors is too short"):
        load_offloaded(d, "50%")


def test_index_lists_absent_tensor(ckpt, tmp_path):
    d = _copy(ckpt, tmp_path)
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"model.layers.0.mlp.experts.9.up_proj.weight": "model-00002.safetensors"}}))
    with pytest.raises(CheckpointError, match=r"'model.layers.0.mlp.experts.9.up_proj.weight' is listed in .*index"):
        load_offloaded(d, "50%")


def test_not_a_dir_and_no_shards(tmp_path):
    with pytest.raises(CheckpointError, match="is not a directory"):
        load_offloaded(tmp_path / "nope", "50%")
    with pytest.raises(CheckpointError, match=r"holds no \*.safetensors shard"):
        load_offloaded(tmp_path, "50%")


def test_bad_options(ckpt):
    with pytest.raises(ValueError, match="quant='int3'"):
        load_offloaded(ckpt, "50%", quant="int3")
    with pytest.raises(ValueError, match="policy='fifo'"):
        load_offloaded(ckpt, "50%", policy="fifo")
    with pytest.raises(ValueError, match="inner='nope'"):
        load_offloaded(ckpt, "50%", inner="nope")
    with pytest.raises(ValueError, match=r"pin: expert \(7, 0\) does not exist"):
        load_offloaded(ckpt, "50%", pin=[(7, 0)])
    with pytest.raises(ValueError, match="pinned experts need"):
        load_offloaded(ckpt, "10%", pin=[(0, e) for e in range(8)])
    with torch.no_grad():
        om = load_offloaded(ckpt, "50%")
        assert om.model(torch.tensor([[5, 6]])).logits.shape == (1, 2, 97)
