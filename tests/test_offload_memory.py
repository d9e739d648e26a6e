"""Peak resident memory of offloaded generation stays within non-expert bytes + budget + 10%, measured in a fresh
subprocess (glibc's mmap threshold fixed at 64 KiB, as ``moekit generate`` sets it, so freed expert buffers go
back to the OS instead of fragmenting the heap; VmHWM growth over the RSS before loading; code paths warmed up on a tiny checkpoint first). The same
subprocess then loads the model fully to show the measurement sees the expert bytes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

SCRIPT = textwrap.dedent('''
    import json, sys, torch
    torch.set_num_threads(1)
    from transformers import AutoModelForCausalLM
    from moekit.offload import load_offloaded

    def kib(field):
        for line in open("/proc/self/status"):
            if line.startswith(field):
                return int(line.split()[1]) * 1024

    big, small, budget = sys.argv[1], sys.argv[2], sys.argv[3]
    ids = torch.randint(3, 97, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        w = load_offloaded(small, "50%")                      # warm up every code path on a tiny checkpoint
        w.model.generate(ids, max_new_tokens=3, do_sample=False)
        AutoModelForCausalLM.from_pretrained(small)
        del w
        base = kib("VmRSS")
        om = load_offloaded(big, budget)
        toks = om.model.generate(ids, max_new_tokens=8, do_sample=False)
        st = om.stats()
        peak_offload = kib("VmHWM")
        del om
        full = AutoModelForCausalLM.from_pretrained(big).eval()
        want = full.generate(ids, max_new_tokens=8, do_sample=False)
        peak_full = kib("VmHWM")
    print("RESULT " + json.dumps(dict(base=base, peak_offload=peak_offload, peak_full=peak_full, same=bool((toks == want).all()),
                                      non_expert=st["non_expert_bytes"], budget=st["budget_bytes"],
                                      experts=st["total_expert_bytes"], cache_peak=st["cache"]["peak_bytes"])))
''')


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    import torch
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    from offload_models import COMMON, save_tiny

    big = tmp_path_factory.mktemp("big")
    cfg = Qwen3MoeConfig(**{**COMMON, "hidden_size": 128, "num_hidden_layers": 4}, head_dim=32, moe_intermediate_size=256,
                         num_experts=32, num_experts_per_tok=2)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(big)
    small = tmp_path_factory.mktemp("small")
    save_tiny("qwen3_moe", small)
    return big, small


# One subprocess (slow on a shared CPU). At 50% (25 MiB) the bound holds as stated; measured by hand at 25% (19 MiB
# of a 6-layer model) a fixed ~2 MiB for activations, KV cache and logits came on top (it does not grow with the
# model's expert bytes).
@pytest.mark.slow
def test_peak_rss_within_non_expert_plus_budget(ckpts, budget="50%", slack=0):
    big, small = ckpts
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}
    p = subprocess.run([sys.executable, "-c", SCRIPT, str(big), str(small), budget], capture_output=True, text=True,
                       env=env, timeout=300)
    line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
    assert p.returncode == 0 and line, p.stderr[-2000:]
    r = json.loads(line[0][7:])
    grown = r["peak_offload"] - r["base"]
    allowed = 1.10 * (r["non_expert"] + r["budget"]) + slack
    assert r["same"]
    assert r["cache_peak"] <= r["budget"]
    assert grown <= allowed, (grown / 2**20, allowed / 2**20, r)
    # the measurement is sensitive: loading everything grows the peak by at least the expert bytes
    assert r["peak_full"] - r["base"] >= 0.9 * r["experts"]
