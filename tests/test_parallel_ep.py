"""Expert parallelism on gloo: 2 and 4 local processes against the single-process layer.

Tolerances (absolute, unit-scale inputs): float64 <= 1e-10, float32 <= 1e-5 for one layer's outputs and gradients;
training (4 optimizer steps, EP=2 x DP=2): float64 AdamW <= 1e-10, float32 SGD+momentum under DDP <= 2e-5.
The checks themselves are in _parallel_workers.py (several per spawn, to pay the process start-up once).
"""

import pytest
import torch

from moekit import MoE, TopK
from moekit.parallel import group_layout, spawn_local

import _parallel_workers as W


def test_ep2_layer_equals_single_process_all_modes():
    """EP=2: dropless, capacity (per-sequence, by position and by score; per-rank), shared experts with gate,
    SwiGLU and biased MLP experts, k=1..3, sigmoid scores, a skewed router that starves a rank, float64 and
    float32; E not divisible by the EP size; aux-free bias identical across ranks. EP2 x FSDP2 training (float64
    AdamW <= 1e-10, float32 SGD <= 1e-5) equals one process; ranks that differ in k, expert size, seed, dispatch,
    E or dim raise a ConsistencyError naming the field and the ranks, on every rank."""
    spawn_local(W.worker_ep2, 2, timeout_s=60)


def test_ep4_layer_training_global_balance_and_checkpoint(tmp_path):
    """EP=4 equivalence; checkpoint saved at EP=4 loads at EP=2 and EP=1; EP=2 x DP=2: layer equivalence,
    global-batch balance loss, and 4 training steps (manual reduction and DDP) equal single-process training.
    EP2 x FSDP2 (dp=2) training equals one process and is saved with DCP (model + AdamW state); it resumes at EP4,
    EP1 x FSDP4 and EP2 x HSDP2 (in the workers) and in this process with the single-process losses of the next
    two steps (float64, <= 1e-10); parameter + optimizer bytes per rank drop under FSDP2 as computed; a sharded
    Mixtral-like model consolidates here and exports to HF with to_hf."""
    dcp_root, hf_root = tmp_path / "dcp", tmp_path / "hf"
    spawn_local(W.worker_4, 4, str(tmp_path / "ckpt"), str(dcp_root), str(hf_root), timeout_s=90)
    W.check_single_process_resume(dcp_root)
    W.check_hf_export(hf_root)
    from moekit.io import read_checkpoint

    ck = read_checkpoint(tmp_path / "ckpt")  # one committed save, every file's checksum verified
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["manifest.json", f"save-{ck.save_id}"]
    assert sorted(ck.files) == [
        "dense.safetensors",
        "experts-00000-of-00004.safetensors", "experts-00001-of-00004.safetensors",
        "experts-00002-of-00004.safetensors", "experts-00003-of-00004.safetensors",
    ]


def test_group_layout():
    assert group_layout(4, 2) == ([[0, 1], [2, 3]], [[0, 2], [1, 3]])
    assert group_layout(4, 4) == ([[0, 1, 2, 3]], [[0], [1], [2], [3]])
    assert group_layout(2, 1) == ([[0], [1]], [[0, 1]])
    with pytest.raises(ValueError, match="must be >= 1 and divide the world size 6"):
        group_layout(6, 4)


def test_checkpoint_single_process_roundtrip(tmp_path):
    """No process group: save at EP=1 and load into a fresh layer."""
    from moekit.parallel import load_sharded, save_sharded

    torch.manual_seed(0)
    a = MoE(8, 4, router=TopK(k=2))
    save_sharded(a, tmp_path / "c")
    torch.manual_seed(1)
    b = load_sharded(MoE(8, 4, router=TopK(k=2)), tmp_path / "c")
    x = torch.randn(3, 8)
    assert torch.equal(a(x), b(x))
    with pytest.raises(FileNotFoundError, match="no meta.json"):
        load_sharded(b, tmp_path / "missing")
    with pytest.raises(ValueError, match="has 4 experts in the checkpoint, 8 in the model"):
        load_sharded(MoE(8, 8, router=TopK(k=2)), tmp_path / "c")
