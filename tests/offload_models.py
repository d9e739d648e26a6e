"""Tiny random HF MoE checkpoints for the offload tests (written with save_pretrained; nothing is downloaded)."""

from __future__ import annotations

import torch

COMMON = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=64, initializer_range=0.2, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def tiny_config(name: str):
    import transformers as t

    if name == "qwen3_moe":
        return t.Qwen3MoeConfig(**COMMON, head_dim=8, moe_intermediate_size=16, num_experts=8, num_experts_per_tok=2,
                                norm_topk_prob=True)
    if name == "mixtral":
        return t.MixtralConfig(**COMMON, intermediate_size=24, num_local_experts=6, num_experts_per_tok=2)
    if name == "deepseek_v3":
        return t.DeepseekV3Config(**{**COMMON, "num_hidden_layers": 3, "num_key_value_heads": 4}, intermediate_size=48, moe_intermediate_size=16,
                                  n_routed_experts=8, n_shared_experts=1, n_group=4, topk_group=2,
                                  num_experts_per_tok=2, routed_scaling_factor=2.0, first_k_dense_replace=1,
                                  q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
                                  v_head_dim=8)
    if name == "gpt_oss":
        return t.GptOssConfig(**COMMON, head_dim=8, intermediate_size=16, num_local_experts=6, num_experts_per_tok=2,
                              sliding_window=8, layer_types=["sliding_attention", "full_attention"])
    if name == "longcat_flash":  # 6 FFN experts + 2 zero-computation (identity) ids; MLA attention
        return t.LongcatFlashConfig(**{**COMMON, "hidden_size": 64}, num_layers=2, head_dim=8, ffn_hidden_size=64,
                                    expert_ffn_hidden_size=32, n_routed_experts=6, zero_expert_num=2, moe_topk=2,
                                    kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
                                    v_head_dim=16, routed_scaling_factor=1.5)
    raise AssertionError(name)


def save_tiny(name: str, path, seed: int = 0):
    """Build, randomise (incl. DeepSeek's score-correction bias and gpt-oss biases) and save; returns the model."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(name)).eval()
    with torch.no_grad():
        for n, p in list(model.named_parameters()) + list(model.named_buffers()):
            if "e_score_correction_bias" in n or n.endswith("_bias") or (n.endswith(".bias") and "router" in n):
                p.copy_(torch.randn(p.shape) * 0.1)
    model.save_pretrained(path)
    return model


ARCHS = ["qwen3_moe", "mixtral", "deepseek_v3", "gpt_oss"]
