"""from_hf / swap_hf_moe with share=False keeps a mixed-precision block's dtypes, as share=True does.

transformers loads DeepSeek-V3 in float16/bfloat16 with its router weight kept in float32
(``_keep_in_fp32_modules_strict`` = ``gate.weight``); a copying swap used to cast that weight to the experts' dtype (found by transformers'
``test_keep_in_fp32_modules`` run on swapped models, tools/hf_model_tests). Tolerance: the copy and the shared swap
compute with the same tensors and dtypes, so their outputs are bit-identical.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from moekit.convert import from_hf  # noqa: E402


@torch.no_grad()
def test_copy_keeps_a_float32_router_in_a_float16_block():
    cfg = transformers.DeepseekV3Config(vocab_size=97, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                        num_key_value_heads=2, intermediate_size=48, moe_intermediate_size=16,
                                        n_routed_experts=8, n_shared_experts=1, n_group=2, topk_group=1,
                                        num_experts_per_tok=2, first_k_dense_replace=0, q_lora_rank=None,
                                        kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16)
    torch.manual_seed(0)
    block = transformers.models.deepseek_v3.modeling_deepseek_v3.DeepseekV3MoE(cfg).eval()
    for p in block.parameters():
        p.normal_(0, 0.2)
    block.half()
    block.gate.weight = torch.nn.Parameter(block.gate.weight.float())  # what HF's fp32 rule does at load
    block.gate.e_score_correction_bias = block.gate.e_score_correction_bias.float()
    copied, shared = from_hf(block, share=False), from_hf(block, share=True)
    assert copied.router.gate.weight.dtype == torch.float32 and copied.router.bias_E.dtype == torch.float32
    assert copied.router.gate.weight.data_ptr() != block.gate.weight.data_ptr()  # a copy, not the HF tensor
    assert copied.experts.w2_EDF.dtype == torch.float16
    x = torch.randn(2, 5, 32).half()
    assert torch.equal(copied(x), shared(x))
