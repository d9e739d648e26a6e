"""A small decoder-only language model that *is* a transformers model: Qwen3-MoE (``Qwen3MoeForCausalLM``) whose
sparse blocks are replaced by moekit :class:`~moekit.MoE` layers for training, and written back with
:func:`moekit.convert.to_hf` for saving, so the checkpoint is a standard Qwen3-MoE folder that plain transformers
loads and generates from. The dense baseline is ``Qwen3ForCausalLM`` with the same attention and an FFN as wide as the
k active experts together (the same active parameters per token, bar the router).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..balance.specs import SwitchLoss
from ..experts.bank import SwiGLU
from ..layer import MoE
from ..routers.topk import TopK

KINDS = ("moe", "dense")


@dataclass(frozen=True, kw_only=True)
class LMConfig:
    """Sizes of the language model.

    Args:
        vocab_size: tokenizer vocabulary.
        dim: model width (hidden_size).
        layers: decoder blocks.
        heads, kv_heads: attention heads and key/value heads (grouped-query attention).
        num_experts: routed experts per MoE layer (E).
        k: experts per token.
        expert_hidden: hidden size of one expert (``moe_intermediate_size``); the dense baseline's FFN is
            ``k * expert_hidden`` wide.
        max_len: context length (``max_position_embeddings``).
        aux_coef: weight of the Switch load-balancing loss (the exportable top-k router).
    """

    vocab_size: int
    dim: int = 128
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    num_experts: int = 8
    k: int = 2
    expert_hidden: int = 256
    max_len: int = 512
    aux_coef: float = 0.01

    def __post_init__(self) -> None:
        if self.dim % self.heads or self.heads % self.kv_heads:
            raise ValueError(f"LMConfig: heads={self.heads} must divide dim={self.dim} and kv_heads={self.kv_heads} "
                             "must divide heads")
        if not 1 <= self.k <= self.num_experts:
            raise ValueError(f"LMConfig: k must be in [1, num_experts={self.num_experts}], got {self.k}")

    def hf_config(self, kind: str) -> Any:
        """The transformers config of the MoE model (``kind="moe"``) or of the dense baseline (``"dense"``)."""
        from transformers import Qwen3Config, Qwen3MoeConfig

        common = dict(vocab_size=self.vocab_size, hidden_size=self.dim, num_hidden_layers=self.layers,
                      num_attention_heads=self.heads, num_key_value_heads=self.kv_heads,
                      head_dim=self.dim // self.heads, max_position_embeddings=self.max_len,
                      tie_word_embeddings=True, bos_token_id=0, eos_token_id=0, pad_token_id=0)
        if kind == "moe":
            return Qwen3MoeConfig(**common, intermediate_size=self.k * self.expert_hidden,
                                  moe_intermediate_size=self.expert_hidden, num_experts=self.num_experts,
                                  num_experts_per_tok=self.k, norm_topk_prob=True, decoder_sparse_step=1,
                                  mlp_only_layers=[], output_router_logits=False, router_aux_loss_coef=0.0)
        if kind == "dense":
            return Qwen3Config(**common, intermediate_size=self.k * self.expert_hidden)
        raise ValueError(f"LMConfig.hf_config: unknown kind {kind!r}; valid: {', '.join(KINDS)}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class MoEBlock(nn.Module):
    """Stands where a ``Qwen3MoeSparseMoeBlock`` was: ``(B, T, D) -> (B, T, D)`` through a moekit layer.

    Routers with gating residuals (MoE++) get the previous MoE layer's routing logits: the blocks of one model share
    ``chain`` (a one-slot list); the first block (``first=True``) starts a new forward pass.
    """

    def __init__(self, moe: MoE, chain: list | None = None, first: bool = False) -> None:
        super().__init__()
        self.moe = moe
        self.chain = chain
        self.first = first

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.chain is None:
            return self.moe(hidden_states)
        prev = None if self.first else self.chain[0]
        out = self.moe.forward_with_aux(hidden_states, prev_logits=prev)
        self.chain[0] = out.assignment.logits_TE
        return out.y


class LM:
    """A transformers causal LM plus, for the MoE kind, the moekit layers standing in its sparse blocks.

    ``model`` is what is trained and called (``model(input_ids=..., labels=...)``, ``model.generate``);
    :meth:`save_hf` writes a plain transformers checkpoint.
    """

    def __init__(self, cfg: LMConfig, kind: str, model: nn.Module, originals: list[nn.Module],
                 exportable: bool) -> None:
        self.cfg, self.kind, self.model = cfg, kind, model
        self._originals = originals  # the HF sparse blocks (not submodules: neither trained nor saved twice)
        self.exportable = exportable

    @property
    def moe_layers(self) -> list[MoE]:
        return [layer.mlp.moe for layer in self.model.model.layers] if self.kind == "moe" else []

    @contextlib.contextmanager
    def hf_view(self):
        """Inside: the model holds its original transformers blocks, holding the moekit weights (``to_hf``)."""
        if self.kind == "dense":
            yield self.model
            return
        if not self.exportable:
            raise ValueError("LM.hf_view: this MoE's router has no Qwen3-MoE equivalent (only the top-k softmax "
                             "router with renormalised weights and no correction bias exports)")
        from ..convert.hf import to_hf

        layers = self.model.model.layers
        adapters = [layer.mlp for layer in layers]
        try:
            for layer, block, adapter in zip(layers, self._originals, adapters):
                to_hf(adapter.moe, block)
                layer.mlp = block
            yield self.model
        finally:
            for layer, adapter in zip(layers, adapters):
                layer.mlp = adapter

    def save_hf(self, path: str | os.PathLike, tokenizer: Any = None) -> Path:
        """A standard transformers checkpoint (config.json + model.safetensors [+ tokenizer]) in ``path``."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        with self.hf_view() as m:
            m.save_pretrained(path)
        if tokenizer is not None:
            tokenizer.save_pretrained(path)
        return path

    def num_params(self) -> dict[str, int]:
        """Total and active-per-token parameters (embeddings counted once; tied with the LM head)."""
        total = sum(p.numel() for p in self.model.parameters())
        active = total
        for moe in self.moe_layers:
            bank = sum(p.numel() for p in moe.experts.parameters())
            active -= bank - bank * self.cfg.k // moe.num_experts
        return {"total": total, "active": active}


def build_lm(cfg: LMConfig, kind: str = "moe", *, router: Any = None, balance: Any = None, seed: int = 0) -> LM:
    """Build the MoE model (moekit layers in a Qwen3-MoE) or the dense baseline, initialised from ``seed``.

    ``router`` (default the Qwen3-MoE router: ``TopK(k, softmax, normalize=True)``, float32 scores) and
    ``balance`` (default ``SwitchLoss(cfg.aux_coef)``) may be any moekit specs; only the default router exports.
    """
    from transformers import Qwen3ForCausalLM, Qwen3MoeForCausalLM

    from ..convert.hf import from_hf

    torch.manual_seed(seed)
    if kind == "dense":
        return LM(cfg, kind, Qwen3ForCausalLM(cfg.hf_config("dense")), [], True)
    if kind != "moe":
        raise ValueError(f"build_lm: unknown kind {kind!r}; valid: {', '.join(KINDS)}")
    model = Qwen3MoeForCausalLM(cfg.hf_config("moe"))
    originals = []
    hf_router = TopK(k=cfg.k, score="softmax", normalize=True, fp32=False, score_dtype="float32")
    router = hf_router if router is None else router
    balance = (SwitchLoss(coef=cfg.aux_coef),) if balance is None else balance
    exportable = True
    chain = [None] if getattr(router, "gating_residual", False) else None
    for i, layer in enumerate(model.model.layers):
        block = layer.mlp
        ref = from_hf(block)  # the HF initialisation in moekit's layout
        # the first layer of a gating-residual router (MoE++) has no previous logits
        layer_router = dataclasses.replace(router, gating_residual=False) if chain is not None and i == 0 else router
        moe = MoE(cfg.dim, cfg.num_experts, router=layer_router, experts=SwiGLU(hidden_dim=cfg.expert_hidden),
                  balance=balance)
        missing, _ = moe.load_state_dict(ref.state_dict(), strict=False)
        exportable = exportable and not missing and _exports(moe, hf_router)
        originals.append(block)
        layer.mlp = MoEBlock(moe, chain, first=i == 0)
    return LM(cfg, kind, model, originals, exportable)


def _exports(moe: MoE, hf_router: TopK) -> bool:
    spec = getattr(moe.router, "spec", None)
    if not isinstance(spec, TopK):
        return False
    fields = ("k", "score", "normalize", "scale", "n_group", "topk_group", "correction_bias", "router_bias")
    return all(getattr(spec, f) == getattr(hf_router, f) for f in fields)
