"""Expert pruning and merging from calibration statistics, writing a checkpoint plain transformers loads (same
architecture, fewer experts per layer, router rows removed or merged, the config's expert count updated).

Methods (``METHODS``), each choosing per layer which experts survive, and how:
- ``frequency``: keep the most routed experts.
- ``reap``: keep the highest REAP scores (mean router weight x expert output norm over routed tokens).
- ``naee``: NAEE-style per-layer subset search: greedily drop the expert whose removal least increases the layer's
  output reconstruction error on the calibration inputs (the router re-routes among the survivors).
- ``merge``: MC-SMoE-style: the most frequent experts become group leaders, every other expert joins the leader
  whose router row is most similar; members' hidden neurons are permuted to match the leader (Hungarian matching on
  the gate/up weights), then weights are averaged by routing frequency; the leader's router row is kept.
- ``hc-smoe``: HC-SMoE variant: hierarchical (average-linkage) clustering of experts by their mean calibration
  output, frequency-weighted averaging within a cluster (no alignment), router row of the most frequent member.
"""

from __future__ import annotations

import os

import torch

from .calibrate import LayerCalib, calibrate, expert_forward
from .layout import expert_params

EXPERT_COUNT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")


def parse_keep(keep: str | float | int, E: int) -> int:
    """Experts to keep per layer: "50%" of E, a fraction in (0, 1), or a count."""
    try:
        if isinstance(keep, str) and keep.strip().endswith("%"):
            n = round(E * float(keep.strip()[:-1]) / 100)
        elif isinstance(keep, float) and 0 < keep < 1:
            n = round(E * keep)
        else:
            n = int(keep)
    except ValueError:
        raise ValueError(f"keep={keep!r}: expected a percentage like '50%', a fraction or a count") from None
    if not 1 <= n <= E:
        raise ValueError(f"keep={keep!r} gives {n} experts; expected between 1 and the {E} experts per layer")
    return n


def _router(model, path):
    parent = model.get_submodule(path.rsplit(".", 1)[0])
    for name in ("gate", "router"):
        r = getattr(parent, name, None)
        if r is not None and isinstance(getattr(r, "weight", None), torch.Tensor):
            return r
    raise ValueError(f"no router ('gate' / 'router' with a weight) next to {path}")


def _expert_outputs(module, c: LayerCalib) -> torch.Tensor:
    """Every expert's output on every calibration input, ``[E, T, D]`` (computed once per layer for NAEE)."""
    return torch.stack([expert_forward(module, e, c.x_TD).float() for e in range(module.num_experts)])


def _moe_output(module, router, c: LayerCalib, keep: list[int], y_ETD: torch.Tensor | None = None) -> torch.Tensor:
    """The experts module's output when only ``keep`` survive: top-k over the survivors' router logits (softmax
    renormalised among the chosen), each chosen expert's own output (from ``y_ETD`` when given)."""
    logits = torch.nn.functional.linear(c.x_TD.to(router.weight.dtype), router.weight[keep])
    k = min(c.idx_TK.shape[1], len(keep))
    top, pos = logits.topk(k, dim=-1)
    w = torch.softmax(top.float(), dim=-1)
    if y_ETD is not None:
        e_TK = torch.as_tensor(keep)[pos]
        picked_TKD = y_ETD[e_TK, torch.arange(e_TK.shape[0])[:, None]]
        return (w[..., None].double() * picked_TKD.double()).sum(1)
    out = torch.zeros_like(c.x_TD, dtype=torch.float64)
    for j, e in enumerate(keep):
        tok, slot = (pos == j).nonzero(as_tuple=True)
        if tok.numel():
            out.index_add_(0, tok, w[tok, slot, None].double() * expert_forward(module, e, c.x_TD[tok]).double())
    return out


def _naee(module, router, c: LayerCalib, n_keep: int) -> list[int]:
    """Greedy backward elimination on the layer's output reconstruction error (expert outputs computed once)."""
    keep = list(range(module.num_experts))
    y_ETD = _expert_outputs(module, c)
    target = _moe_output(module, router, c, keep, y_ETD)
    while len(keep) > n_keep:
        errs = []
        for e in keep:
            trial = [x for x in keep if x != e]
            errs.append(((_moe_output(module, router, c, trial, y_ETD) - target) ** 2).sum().item())
        keep.pop(min(range(len(keep)), key=errs.__getitem__))
    return keep


def select_experts(method: str, module, router, c: LayerCalib, n_keep: int) -> list[int]:
    if method == "frequency":
        score = c.freq_E
    elif method == "reap":
        score = c.reap_E
    elif method == "naee":
        return sorted(_naee(module, router, c, n_keep))
    else:
        raise ValueError(f"method={method!r}: expected one of {METHODS}")
    return sorted(score.argsort(descending=True)[:n_keep].tolist())


def _permutation(leader_HD: torch.Tensor, member_HD: torch.Tensor) -> torch.Tensor:
    """Permutation p of member's hidden neurons maximising sum_i <leader_i, member_p(i)> (Hungarian)."""
    from scipy.optimize import linear_sum_assignment

    cost = -(leader_HD.double() @ member_HD.double().T).numpy()
    _, cols = linear_sum_assignment(cost)
    return torch.as_tensor(cols)


def _neuron_view(module, w: dict[str, torch.Tensor]) -> tuple[torch.Tensor, callable]:
    """Per-neuron feature rows [I, *] of one expert (gate and up rows, down columns) and the function that applies a
    neuron permutation to the expert's tensors."""
    t, cat = getattr(module, "is_transposed", False), getattr(module, "is_concatenated", True)
    gu = w.get("gate_up_proj", w.get("up_proj"))
    gu_ = gu.T if t else gu                        # [2I or I, D]
    down_ = w["down_proj"].T if not t else w["down_proj"]  # [I, D]
    I = down_.shape[0]
    gated = "gate_up_proj" in w

    def rows(x):  # [2I, D] -> (gate [I, D], up [I, D]) in either layout
        return (x[:I], x[I:]) if cat else (x[0::2], x[1::2])

    feats = torch.cat([*(rows(gu_) if gated else (gu_,)), down_], dim=1)

    def apply(p):
        out = dict(w)
        if gated:
            g, u = rows(gu_)
            g, u = g[p], u[p]
            new = torch.cat([g, u]) if cat else torch.stack([g, u], 1).flatten(0, 1)
            out["gate_up_proj"] = new.T.contiguous() if t else new
            if "gate_up_proj_bias" in w:
                b = w["gate_up_proj_bias"]
                bg, bu = (b[:I], b[I:]) if cat else (b[0::2], b[1::2])
                out["gate_up_proj_bias"] = torch.cat([bg[p], bu[p]]) if cat else torch.stack([bg[p], bu[p]], 1).flatten()
        else:
            out["up_proj"] = (gu_[p].T.contiguous() if t else gu_[p])
            if "up_proj_bias" in w:
                out["up_proj_bias"] = w["up_proj_bias"][p]
        d = down_[p]
        out["down_proj"] = d if t else d.T.contiguous()
        return out

    return feats, apply


def merge_groups(method: str, module, router, c: LayerCalib, n_keep: int) -> list[list[int]]:
    """Groups of experts to merge; group[0] is the member whose router row is kept."""
    E = module.num_experts
    if method == "merge":
        leaders = c.freq_E.argsort(descending=True)[:n_keep].tolist()
        r = torch.nn.functional.normalize(router.weight.detach().double(), dim=-1)
        groups = {L: [L] for L in leaders}
        for e in range(E):
            if e not in groups:
                groups[max(leaders, key=lambda L: float(r[e] @ r[L]))].append(e)
        return list(groups.values())
    if method == "hc-smoe":
        from scipy.cluster.hierarchy import fcluster, linkage

        feats = c.mean_out_ED.numpy()
        labels = fcluster(linkage(feats, method="average", metric="euclidean"), t=n_keep, criterion="maxclust")
        groups = {}
        for e, lab in enumerate(labels.tolist()):
            groups.setdefault(lab, []).append(e)
        return [sorted(g, key=lambda e: -float(c.freq_E[e])) for g in groups.values()]
    raise ValueError(f"method={method!r}: expected one of {METHODS}")


@torch.no_grad()
def _merge_group(module, group: list[int], freq: torch.Tensor, align: bool) -> dict[str, torch.Tensor]:
    params = list(expert_params(module))
    ws = [{p: getattr(module, p)[e].detach().clone() for p in params} for e in group]
    if align and len(group) > 1:
        lead_feats, _ = _neuron_view(module, ws[0])
        for i in range(1, len(ws)):
            feats, apply = _neuron_view(module, ws[i])
            ws[i] = apply(_permutation(lead_feats, feats))
    f = freq[group].double() + 1e-6
    f = f / f.sum()
    return {p: sum(float(f[i]) * ws[i][p].double() for i in range(len(ws))).to(ws[0][p].dtype) for p in params}


@torch.no_grad()
def shrink_layer(model, path: str, module, groups: list[list[int]], merged: list[dict] | None) -> None:
    """Replace ``module``'s stacked weights by one expert per group (merged weights or the group's first expert),
    and keep router rows of each group's first member."""
    keep = [g[0] for g in groups]
    for p in expert_params(module):
        old = getattr(module, p)
        new = torch.stack([m[p] for m in merged]) if merged is not None else old.detach()[keep].clone()
        setattr(module, p, torch.nn.Parameter(new, requires_grad=old.requires_grad))
    module.num_experts = len(keep)
    router = _router(model, path)
    E_old = router.weight.shape[0]
    for name, t in list(router.named_parameters(recurse=False)) + list(router.named_buffers(recurse=False)):
        if t.dim() >= 1 and t.shape[0] == E_old:
            v = t.detach()[keep].clone()
            if isinstance(t, torch.nn.Parameter):
                setattr(router, name, torch.nn.Parameter(v, requires_grad=t.requires_grad))
            else:
                router.register_buffer(name, v)
    for attr in ("num_experts", "n_routed_experts"):
        if hasattr(router, attr):
            setattr(router, attr, len(keep))


METHODS = ("frequency", "reap", "naee", "merge", "hc-smoe")


@torch.no_grad()
def compress_model(model, token_batches: list[torch.Tensor], method: str, keep, max_tokens: int = 2048) -> dict:
    """Prune or merge ``model``'s experts in place; returns the kept experts per layer."""
    if method not in METHODS:
        raise ValueError(f"method={method!r}: expected one of {METHODS}")
    calib = calibrate(model, token_batches, max_tokens)
    from .loader import find_experts_modules

    mods = dict(find_experts_modules(model))
    E = next(iter(mods.values())).num_experts
    n_keep = parse_keep(keep, E)
    top_k = getattr(model.config, "num_experts_per_tok", 1)
    if n_keep < top_k:
        raise ValueError(f"keep={keep!r} leaves {n_keep} experts per layer, fewer than num_experts_per_tok={top_k}")
    report = {}
    for c in calib:
        m, router = mods[c.path], _router(model, c.path)
        if method in ("merge", "hc-smoe"):
            groups = merge_groups(method, m, router, c, n_keep)
            merged = [_merge_group(m, g, c.freq_E, align=(method == "merge")) for g in groups]
        else:
            groups, merged = [[e] for e in select_experts(method, m, router, c, n_keep)], None
        shrink_layer(model, c.path, m, groups, merged)
        report[c.path] = groups
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    for key in EXPERT_COUNT_KEYS:
        if getattr(cfg, key, None) == E:
            setattr(cfg, key, n_keep)
    return report


def save_compressed(model, out_dir: str | os.PathLike) -> None:
    model.save_pretrained(out_dir)
