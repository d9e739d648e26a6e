"""An experts module whose weights stay on disk: it fetches the routed experts through the cache and runs an
experts implementation function on a proxy that holds only those experts.

It replaces an HF experts module (any class decorated with ``use_experts_implementation``) in its parent and keeps
the original, now weightless, module as the proxy's template for every non-weight attribute. Nothing is copied on a
cache hit:

- eager implementations (the class's own forward) index ``weights[e]``; the proxy gets, per weight name, a list of
  length ``num_experts`` holding the cached tensors of the touched experts (None elsewhere), so the routing indices
  are used as they are (no remapping) and one call computes the layer;
- any other implementation (moekit's, transformers' grouped_mm...) wants stacked ``[n, ...]`` tensors; it is called
  once per touched expert on a one-expert proxy whose weights are ``cached.unsqueeze(0)`` views, with that expert's
  tokens, and the outputs are summed in ascending expert order (the eager accumulation order). Only one expert needs
  to be resident at a time.

Routing bookkeeping for small calls (decoding: ``T * K <= SMALL_ROUTING``) is done in Python on one host copy of the
indices instead of a handful of tensor ops. With no lossy option the arithmetic per expert is the fully loaded
module's, so outputs match it (bit-identically for eager when the touched experts fit in one working group: always
in decoding, in prefill when they fit ``working_bytes``).
"""

from __future__ import annotations

import torch

from .proxy import ExpertsProxy

# At most this many (token, slot) pairs: expert ids and routing counts from one ``tolist()`` in Python.
SMALL_ROUTING = 64


class OffloadedExperts(torch.nn.Module):
    def __init__(self, template: torch.nn.Module, layer: int, runtime, inner, next_layer: int | None,
                 zero_copy: bool = False):
        super().__init__()
        object.__setattr__(self, "_template", template)  # not a submodule: its (meta) weights stay out of the model
        self.layer, self.next_layer = layer, next_layer
        self.num_experts = template.num_experts
        object.__setattr__(self, "runtime", runtime)
        self.inner = inner
        self.zero_copy = zero_copy  # inner only indexes weights[e] (eager): sparse per-expert lists, one call
        self._params = list(runtime.sources[layer].params)
        self._idx0 = torch.zeros(1, 1, dtype=torch.long)  # the one-expert proxy's routing index for a single token

    def extra_repr(self) -> str:
        return f"layer={self.layer}, num_experts={self.num_experts}, template={type(self._template).__name__}"

    @torch.no_grad()
    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        rt, E = self.runtime, self.num_experts
        if rt.prefetcher is not None and self.next_layer is not None:
            rt.prefetcher.submit(self.next_layer, hidden_states)
        if top_k_index.numel() <= SMALL_ROUTING:
            rows = top_k_index.tolist()
            flat = [e for r in rows for e in r] if top_k_index.dim() == 2 else list(rows)
            ids_all = sorted(set(flat))
        else:
            rows = flat = None
            ids_all = torch.unique(top_k_index).tolist()
        if ids_all and (ids_all[-1] >= E or ids_all[0] < 0):
            raise NotImplementedError(f"layer {self.layer}: routed expert ids {ids_all} fall outside [0, {E}); "
                                      f"experts outside the module (zero-computation experts) are not offloadable")
        rt.observe(self.layer, top_k_index, ids_all, flat)
        if not self.zero_copy:
            return self._per_expert(ids_all, rows, hidden_states, top_k_index, top_k_weights)
        group_size = max(1, rt.working_bytes // rt.expert_bytes(self.layer))
        if len(ids_all) <= group_size:
            return self._eager(ids_all, hidden_states, top_k_index, top_k_weights)
        out = torch.zeros_like(hidden_states)
        for start in range(0, len(ids_all), group_size):  # prefill touching more than the working set: in groups
            ids = ids_all[start:start + group_size]
            member = torch.zeros(E, dtype=torch.bool, device=top_k_index.device)
            member[ids] = True
            in_group_TK = member[top_k_index]
            tok = in_group_TK.any(-1).nonzero().squeeze(-1)
            idx = torch.where(in_group_TK[tok], top_k_index[tok], ids[0])
            w = torch.where(in_group_TK[tok], top_k_weights[tok], torch.zeros((), dtype=top_k_weights.dtype))
            out.index_add_(0, tok, self._eager(ids, hidden_states[tok], idx, w).to(out.dtype))
        return out

    def _eager(self, ids, x, idx, w):
        rt, layer = self.runtime, self.layer
        weights = {p: [None] * self.num_experts for p in self._params}
        for e in ids:
            for p, t in rt.expert_tensors(layer, e).items():
                weights[p][e] = t
        return self.inner(ExpertsProxy(self._template, weights, self.num_experts), x, idx, w)

    def _one(self, e, x, idx, w):
        t = self.runtime.expert_tensors(self.layer, e)
        proxy = ExpertsProxy(self._template, {p: v.unsqueeze(0) for p, v in t.items()}, 1)
        return self.inner(proxy, x, idx, w)

    def _per_expert(self, ids, rows, x, idx, w):
        out = torch.zeros_like(x)
        if rows is not None and len(rows) == 1:  # one token (decoding): its slots straight from the host copy
            r = rows[0]
            for e in ids:
                k = r.index(e)
                out += self._one(e, x, self._idx0, w[:, k:k + 1]).to(out.dtype)
            return out
        T, K = idx.shape
        flat_N = idx.reshape(-1)
        order_N = flat_N.argsort(stable=True)
        counts = torch.bincount(flat_N, minlength=self.num_experts).tolist()
        tok_N = order_N // K
        x_ND, w_N1 = x[tok_N], w.reshape(-1)[order_N].unsqueeze(-1)
        zeros_N1 = torch.zeros_like(w_N1, dtype=idx.dtype)
        start = 0
        for e, c in enumerate(counts):
            if c:
                sl = slice(start, start + c)
                out.index_add_(0, tok_N[sl], self._one(e, x_ND[sl], zeros_N1[sl], w_N1[sl]).to(out.dtype))
                start += c
        return out
