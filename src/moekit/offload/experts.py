"""An experts module whose weights stay on disk: it fetches the routed experts through the cache and runs an
experts implementation function on a proxy that holds only those experts.

It replaces an HF experts module (any class decorated with ``use_experts_implementation``) in its parent and keeps
the original, now weightless, module as the proxy's template for every non-weight attribute. With no lossy option the
arithmetic per expert is the same as the fully loaded module's, so outputs are bit-identical when the touched
experts fit in one working group (always in decoding; in prefill when they fit ``working_bytes``).
"""

from __future__ import annotations

import torch

from .proxy import ExpertsProxy
from .quant import maybe_dequantize


class OffloadedExperts(torch.nn.Module):
    def __init__(self, template: torch.nn.Module, layer: int, runtime, inner, next_layer: int | None,
                 zero_copy: bool = False):
        super().__init__()
        object.__setattr__(self, "_template", template)  # not a submodule: its (meta) weights stay out of the model
        self.layer, self.next_layer = layer, next_layer
        self.num_experts = template.num_experts
        object.__setattr__(self, "runtime", runtime)
        self.inner = inner
        # eager implementations only index ``weights[expert]``: a list of per-expert tensors serves them without
        # stacking (no copy); other implementations get stacked [n, ...] tensors
        self.zero_copy = zero_copy
        src = runtime.sources[layer]
        self._params = list(src.params)
        self._shapes = src.params

    def extra_repr(self) -> str:
        return f"layer={self.layer}, num_experts={self.num_experts}, template={type(self._template).__name__}"

    @torch.no_grad()
    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        rt, E = self.runtime, self.num_experts
        if rt.prefetcher is not None and self.next_layer is not None:
            rt.prefetcher.submit(self.next_layer, hidden_states)
        ids_all = torch.unique(top_k_index).tolist()
        if ids_all and (ids_all[-1] >= E or ids_all[0] < 0):
            raise NotImplementedError(f"layer {self.layer}: routed expert ids {ids_all} fall outside [0, {E}); "
                                      f"experts outside the module (zero-computation experts) are not offloadable")
        rt.observe(self.layer, top_k_index, ids_all)
        per = rt.expert_bytes(self.layer)
        group_size = max(1, rt.working_bytes // per)
        if len(ids_all) <= group_size:
            return self._run(ids_all, hidden_states, top_k_index, top_k_weights)
        out = torch.zeros_like(hidden_states)
        for start in range(0, len(ids_all), group_size):
            ids = ids_all[start:start + group_size]
            member = torch.zeros(E, dtype=torch.bool, device=top_k_index.device)
            member[ids] = True
            in_group_TK = member[top_k_index]
            tok = in_group_TK.any(-1).nonzero().squeeze(-1)
            idx = torch.where(in_group_TK[tok], top_k_index[tok], ids[0])
            w = torch.where(in_group_TK[tok], top_k_weights[tok], torch.zeros((), dtype=top_k_weights.dtype))
            out.index_add_(0, tok, self._run(ids, hidden_states[tok], idx, w).to(out.dtype))
        return out

    def _run(self, ids, x, idx, w):
        rt = self.runtime
        n = len(ids)
        if self.zero_copy:
            compact = {p: [None] * n for p in self._params}
            for j, e in enumerate(ids):
                for p, t in rt.expert(self.layer, e).items():
                    compact[p][j] = maybe_dequantize(t, rt.dtype)
            return self._call(ids, compact, x, idx, w)
        compact = {p: torch.empty((n, *self._shapes[p]), dtype=rt.dtype, device=x.device) for p in self._params}
        for j, e in enumerate(ids):  # copy in one at a time: an expert evicted meanwhile is freed at once
            for p, t in rt.expert(self.layer, e).items():
                compact[p][j].copy_(maybe_dequantize(t, rt.dtype))
        return self._call(ids, compact, x, idx, w)

    def _call(self, ids, compact, x, idx, w):
        n, E = len(ids), self.num_experts
        remap = torch.zeros(E, dtype=idx.dtype, device=idx.device)
        remap[torch.tensor(ids, device=idx.device)] = torch.arange(n, dtype=idx.dtype, device=idx.device)
        proxy = ExpertsProxy(self._template, compact, n)
        return self.inner(proxy, x, remap[idx], w)
