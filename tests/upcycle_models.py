"""Tiny random Hugging Face models (no download) for the upcycling tests: one per supported architecture."""

from __future__ import annotations

import torch

V = 61  # vocabulary


def tiny(arch: str):
    """(model in eval mode, inputs dict) for ``arch``; D=32, F=64 (F=96 for GPT-2), 2 blocks."""
    import transformers as tf

    ids = torch.randint(0, V, (2, 7), generator=torch.Generator().manual_seed(1))
    text = {"input_ids": ids}
    enc = {"vocab_size": V, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
           "intermediate_size": 64}
    dec = {**enc, "num_key_value_heads": 1, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 0}
    if arch == "bert":
        model = tf.BertForSequenceClassification(tf.BertConfig(**enc, num_labels=3))
    elif arch == "roberta":
        model = tf.RobertaForSequenceClassification(tf.RobertaConfig(**enc, num_labels=3, pad_token_id=1))
    elif arch == "distilbert":
        model = tf.DistilBertForSequenceClassification(
            tf.DistilBertConfig(vocab_size=V, dim=32, n_layers=2, n_heads=2, hidden_dim=64, num_labels=3)
        )
    elif arch == "vit":
        cfg = tf.ViTConfig(image_size=8, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2,
                           num_attention_heads=2, intermediate_size=64, num_labels=3)
        model = tf.ViTForImageClassification(cfg)
        text = {"pixel_values": torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))}
    elif arch == "gpt2":
        model = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=2, n_inner=96,
                                                 n_positions=16, bos_token_id=0, eos_token_id=1))
    elif arch == "llama":
        model = tf.LlamaForCausalLM(tf.LlamaConfig(**dec))
    elif arch == "mistral":
        model = tf.MistralForCausalLM(tf.MistralConfig(**dec))
    elif arch == "qwen2":
        model = tf.Qwen2ForCausalLM(tf.Qwen2Config(**dec))
    else:
        raise KeyError(arch)
    return model.eval(), text


ARCHS = ("bert", "roberta", "distilbert", "vit", "gpt2", "llama", "mistral", "qwen2")
