"""MoEfication: split each dense FFN of a pretrained model into E experts by *clustering its neurons*, and give
every MoE layer a router fitted to calibration activations (Zhang et al. 2022, "MoEfication"; Qiu et al. 2024,
"Emergent Mixture-of-Experts").

A SwiGLU FFN is a sum over its F hidden neurons, ``y = sum_f w2[:, f] * silu(w1[f] x) * (w3[f] x)``, so any partition
of the neurons into E groups of F/E gives E experts whose outputs *add up* to the dense FFN: with every expert active
and unit combine weights (``UnitGate(TopK(k=E))``) the MoE is exact. With top-k of E it is an approximation, and its
quality depends on which neurons share an expert (neurons that fire together should) and on how well the router
guesses, per token, which experts matter.

Partitions (``method``):

- ``"cluster"``: balanced k-means on each neuron's feature vector, every cluster exactly F/E neurons. The features
  are the neuron's |activation| over the calibration tokens (co-activation; ``features="activations"``) or its
  unit-normalised gate weight row ``w1[f]`` (``features="weights"``, no data needed: what ``init="cluster"`` of
  :func:`moekit.convert.upcycle.upcycle_` uses).
- ``"contiguous"``: neurons ``[e F/E, (e+1) F/E)`` (``init="split"``), the baseline.
- ``"random"``: a seeded random permutation cut into E groups.

Routers (``router_fit``):

- ``"regression"``: a linear map fitted by ridge regression from the FFN input ``x`` to each expert's contribution
  ``|| W2_e h_e(x) ||`` on the calibration tokens; top-k of its predictions picks the experts (softmax is monotone, so
  the ranking of the router's logits is the ranking of the predictions).
- ``"centroid"``: expert e's router row is the mean of its neurons' gate rows ``w1[f]`` (no data needed).

    handle = moefy_(model, calib_ids_BT, MoefyConfig(num_experts=8, k=2))   # in place; revert(model) undoes it
    handle = set_top_k_(model, 4)                                            # same experts, another k

:func:`finetune_` runs a short router-only or full fine-tune with the LM loss plus the MoE aux losses.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..layer import MoE, aux_loss
from ..routers.topk import TopK
from ..stats import _moe_layers
from .ffn_forms import DenseWeights
from .unit_gate import UnitGate

METHODS = ("cluster", "contiguous", "random")
FEATURES = ("activations", "weights")
ROUTER_FITS = ("regression", "centroid")


@dataclass(frozen=True, kw_only=True)
class MoefyConfig:
    """How to MoEfy a model.

    Args:
        num_experts: experts per FFN (E); must divide the FFN hidden size.
        k: experts each token uses (k=E is exact).
        method: neuron partition, ``"cluster"``, ``"contiguous"`` or ``"random"``.
        features: clustering features, ``"activations"`` (calibration co-activation) or ``"weights"``.
        router_fit: ``"regression"`` (ridge on calibration activations) or ``"centroid"`` (mean gate row).
        ridge: L2 penalty of the regression router, relative to the mean diagonal of ``X^T X``; None chooses it on
            held-out calibration tokens.
        kmeans_iters: balanced k-means iterations.
        layers: which FFNs (as ``UpcycleConfig.layers``; None = every block).
        max_calib_tokens: at most this many calibration tokens per layer are kept (memory bound).
        seed: k-means initialisation and the random partition.
    """

    num_experts: int
    k: int = 1
    method: str = "cluster"
    features: str = "activations"
    router_fit: str = "regression"
    ridge: float | None = None
    kmeans_iters: int = 20
    layers: Any = None
    max_calib_tokens: int = 4096
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_experts < 1:
            raise ValueError(f"MoefyConfig: num_experts must be >= 1, got {self.num_experts}")
        if not 1 <= self.k <= self.num_experts:
            raise ValueError(f"MoefyConfig: k must be in [1, num_experts={self.num_experts}], got {self.k}")
        for name, allowed in (("method", METHODS), ("features", FEATURES), ("router_fit", ROUTER_FITS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"MoefyConfig: unknown {name} {getattr(self, name)!r}; valid: {', '.join(allowed)}")
        if self.ridge is not None and self.ridge < 0:
            raise ValueError(f"MoefyConfig: ridge must be >= 0, got {self.ridge}")
        if self.kmeans_iters < 0 or self.max_calib_tokens < 1:
            raise ValueError("MoefyConfig: kmeans_iters must be >= 0 and max_calib_tokens >= 1")


# --- balanced k-means ------------------------------------------------------------------------------------------


def balanced_assign(dist_FE: Tensor) -> Tensor:
    """Assign each of F points to one of E clusters, exactly F/E per cluster (``cluster_F``, long).

    Rounds of proposals: every unassigned point proposes to its nearest cluster that still has room, and each
    cluster accepts its closest proposers up to its room. Each round fills at least one cluster or assigns every
    point, so there are at most E rounds."""
    F_, E = dist_FE.shape
    if F_ % E:
        raise ValueError(f"balanced_assign: {E} clusters do not divide {F_} points")
    d = dist_FE.detach().to(torch.float64)
    cluster = torch.full((F_,), -1, dtype=torch.long)
    room = torch.full((E,), F_ // E, dtype=torch.long)
    while True:
        free = (cluster < 0).nonzero().squeeze(1)
        if free.numel() == 0:
            return cluster
        dd = d[free].clone()
        dd[:, room == 0] = float("inf")
        best_d, best = dd.min(1)
        for e in best.unique().tolist():
            cand = free[best == e]
            take = cand[torch.argsort(best_d[best == e], stable=True)[: int(room[e])]]
            cluster[take] = e
            room[e] -= take.numel()


def _sq_dist(x_FX: Tensor, c_EX: Tensor) -> Tensor:
    """Squared Euclidean distances ``(F, E)`` by one matrix product (much cheaper than ``torch.cdist`` here)."""
    return ((x_FX * x_FX).sum(1, keepdim=True) - 2.0 * x_FX @ c_EX.T + (c_EX * c_EX).sum(1)).clamp_min(0.0)


def balanced_kmeans(x_FX: Tensor, num_clusters: int, *, iters: int = 20, seed: int = 0) -> Tensor:
    """Balanced k-means: F points (rows of ``x_FX``) into ``num_clusters`` clusters of exactly F / num_clusters.
    k-means++ seeding, then alternate a balanced assignment (:func:`balanced_assign`) and centroid means until the
    assignment stops changing. Returns ``cluster_F``."""
    x = x_FX.detach().to("cpu", torch.float64)
    F_, E = x.shape[0], num_clusters
    if E < 1 or F_ % E:
        raise ValueError(f"balanced_kmeans: num_clusters={num_clusters} must divide the number of points {F_}")
    if E == 1:
        return torch.zeros(F_, dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)
    centers = [x[int(torch.randint(F_, (1,), generator=gen))]]
    d2 = _sq_dist(x, centers[0][None]).squeeze(1)
    for _ in range(1, E):  # k-means++: next centre drawn with probability proportional to squared distance
        p = d2 / d2.sum() if float(d2.sum()) > 0 else torch.full_like(d2, 1.0 / F_)
        c = x[int(torch.multinomial(p, 1, generator=gen))]
        centers.append(c)
        d2 = torch.minimum(d2, ((x - c) ** 2).sum(1))
    c_EX = torch.stack(centers)
    cluster = balanced_assign(_sq_dist(x, c_EX))
    for _ in range(iters):
        c_EX = torch.zeros_like(c_EX).index_add_(0, cluster, x) / (F_ // E)
        new = balanced_assign(_sq_dist(x, c_EX))
        if torch.equal(new, cluster):
            break
        cluster = new
    return cluster


def partition(cluster_F: Tensor, num_experts: int) -> Tensor:
    """``neurons_EG``: row e lists (ascending) the F/E neurons of expert e, from a balanced ``cluster_F``."""
    counts = torch.bincount(cluster_F, minlength=num_experts)
    if not bool((counts == counts[0]).all()) or counts.numel() != num_experts:
        raise ValueError(f"partition: clusters are not balanced (sizes {counts.tolist()})")
    order = torch.argsort(cluster_F * cluster_F.numel() + torch.arange(cluster_F.numel()))
    return order.reshape(num_experts, -1)


# --- features of the neurons -----------------------------------------------------------------------------------


def hidden_activations(dw: DenseWeights, x_TD: Tensor) -> Tensor:
    """The dense FFN's hidden activations ``h_TF`` (what ``w2`` multiplies), float32."""
    from ..experts.activations import ACTIVATIONS

    x = x_TD.to(torch.float32)
    pre = x @ dw.w1_FD.float().T + (0 if dw.b1_F is None else dw.b1_F.float())
    h = ACTIVATIONS.get(dw.activation)(pre)
    if dw.w3_FD is not None:
        h = h * (x @ dw.w3_FD.float().T + (0 if dw.b3_F is None else dw.b3_F.float()))
    return h


def neuron_features(dw: DenseWeights, features: str, x_TD: Tensor | None = None) -> Tensor:
    """Per-neuron clustering features ``(F, X)``: unit gate rows (``"weights"``) or the unit-normalised |activation|
    profile over the calibration tokens ``x_TD`` (``"activations"``)."""
    if features == "weights":
        w = dw.w1_FD.detach().float()
        return w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)
    if features != "activations":
        raise ValueError(f"neuron_features: unknown features {features!r}; valid: {', '.join(FEATURES)}")
    if x_TD is None or x_TD.shape[0] == 0:
        raise ValueError("neuron_features: features='activations' needs calibration inputs x_TD")
    a = hidden_activations(dw, x_TD).abs().T  # (F, T)
    return a / a.norm(dim=1, keepdim=True).clamp_min(1e-12)


def neuron_partition(dw: DenseWeights, num_experts: int, method: str, *, features: str = "weights",
                     x_TD: Tensor | None = None, iters: int = 20, seed: int = 0) -> Tensor:
    """``neurons_EG`` of one FFN for ``method`` (see the module docstring)."""
    F_ = dw.hidden_dim
    if F_ % num_experts:
        raise ValueError(f"moefy: num_experts={num_experts} must divide the FFN hidden size {F_}")
    if method == "contiguous":
        return torch.arange(F_).reshape(num_experts, -1)
    if method == "random":
        perm = torch.randperm(F_, generator=torch.Generator().manual_seed(seed))
        return perm.reshape(num_experts, -1).sort(dim=1).values
    if method == "cluster":
        cluster = balanced_kmeans(neuron_features(dw, features, x_TD), num_experts, iters=iters, seed=seed)
        return partition(cluster, num_experts)
    raise ValueError(f"moefy: unknown method {method!r}; valid: {', '.join(METHODS)}")


# --- writing the experts and the router ------------------------------------------------------------------------


def permuted(dw: DenseWeights, neurons_EG: Tensor) -> DenseWeights:
    """The same FFN with its hidden neurons reordered so that expert e's neurons are the e-th contiguous slice."""
    order = neurons_EG.reshape(-1).to(dw.w1_FD.device)
    rows = lambda t: None if t is None else t.detach()[order]
    return dataclasses.replace(dw, w1_FD=rows(dw.w1_FD), w3_FD=rows(dw.w3_FD), b1_F=rows(dw.b1_F),
                               b3_F=rows(dw.b3_F), w2_DF=dw.w2_DF.detach()[:, order])


def write_experts_(moe: MoE, dw: DenseWeights, neurons_EG: Tensor) -> None:
    """Expert e of ``moe`` <- neurons ``neurons_EG[e]`` of the dense FFN (the split init on permuted neurons)."""
    from .upcycle import UpcycleConfig, _init_split

    E = neurons_EG.shape[0]
    if moe.num_experts != E or moe.experts.hidden_dim * E != dw.hidden_dim:
        raise ValueError(f"moefy: the layer has E={moe.num_experts}, F={moe.experts.hidden_dim}; the partition "
                         f"needs E={E}, F={dw.hidden_dim // E}")
    cfg = UpcycleConfig(num_experts=E, router=TopK(k=1), init="split")
    _init_split(moe.experts, permuted(dw, neurons_EG), cfg, torch.Generator())


def router_gate(moe: MoE) -> nn.Linear:
    """The linear map whose outputs are the router's logits (inside any wrappers)."""
    r = moe.router
    while not hasattr(r, "gate") and hasattr(r, "inner"):
        r = r.inner
    gate = getattr(r, "gate", None)
    if not isinstance(gate, nn.Linear) or gate.out_features != moe.num_experts:
        raise TypeError(f"moefy: the router {type(moe.router).__name__} has no linear gate with "
                        f"{moe.num_experts} outputs (use TopK or UnitGate(TopK))")
    return gate


def expert_contributions(dw: DenseWeights, neurons_EG: Tensor, x_TD: Tensor) -> Tensor:
    """``c_TE``: the norm of each expert's share of the dense output, ``|| W2[:, G_e] h_TF[:, G_e] ||``."""
    h = hidden_activations(dw, x_TD)
    w2 = dw.w2_DF.detach().float()
    return torch.stack([(h[:, g] @ w2[:, g].T).norm(dim=1) for g in neurons_EG], dim=1)


def _ridge(X: Tensor, Y: Tensor, lam_rel: float, intercept: bool) -> tuple[Tensor, Tensor]:
    """Ridge solution ``(W_DE, b_E)`` of ``Y ~ X W + b``; the penalty is ``lam_rel`` times the mean diagonal of the
    (centred) Gram matrix, so it does not depend on the scale of ``X``."""
    mx = X.mean(0) if intercept else torch.zeros(X.shape[1], dtype=X.dtype)
    my = Y.mean(0) if intercept else torch.zeros(Y.shape[1], dtype=Y.dtype)
    Xc, Yc = X - mx, Y - my
    G = Xc.T @ Xc
    lam = lam_rel * float(G.diagonal().mean())
    W = torch.linalg.solve(G + lam * torch.eye(G.shape[0], dtype=G.dtype), Xc.T @ Yc)
    return W, my - mx @ W


def _fit_scores(pred: Tensor, Y: Tensor) -> dict[str, float]:
    r2 = 1.0 - float(((pred - Y) ** 2).sum() / ((Y - Y.mean(0)) ** 2).sum().clamp_min(1e-30))
    return {"r2": r2, "top1_agreement": float((pred.argmax(1) == Y.argmax(1)).double().mean())}


@torch.no_grad()
def fit_router_(moe: MoE, dw: DenseWeights, neurons_EG: Tensor, how: str = "regression",
                x_TD: Tensor | None = None, ridge: float | None = None) -> dict[str, float]:
    """Set the router of ``moe`` (see ``router_fit`` in the module docstring).

    ``ridge``: the relative L2 penalty; None picks it from {1e-4, 1e-3, 1e-2, 1e-1, 1} by R^2 on every 5th
    calibration token held out. Returns diagnostics measured on those held-out tokens (a fit on the other 4/5):
    R^2 of the predicted contributions and the fraction of tokens whose largest contribution is the router's first
    choice; the router itself is then refitted on every token."""
    gate = router_gate(moe)
    if how == "centroid":
        w = dw.w1_FD.detach().float()
        gate.weight.copy_(torch.stack([w[g].mean(0) for g in neurons_EG]).to(gate.weight))
        if gate.bias is not None:
            gate.bias.zero_()
        return {}
    if how != "regression":
        raise ValueError(f"fit_router_: unknown router fit {how!r}; valid: {', '.join(ROUTER_FITS)}")
    if x_TD is None or x_TD.shape[0] < 5:
        raise ValueError("fit_router_: router_fit='regression' needs at least 5 calibration inputs x_TD")
    X = x_TD.detach().to("cpu", torch.float64)
    Y = expert_contributions(dw, neurons_EG, x_TD).to("cpu", torch.float64)
    bias = gate.bias is not None
    held = torch.arange(X.shape[0]) % 5 == 4
    best: tuple[float, float, dict[str, float]] | None = None
    for lam in ([ridge] if ridge is not None else [1e-4, 1e-3, 1e-2, 1e-1, 1.0]):
        W, b = _ridge(X[~held], Y[~held], lam, bias)
        scores = _fit_scores(X[held] @ W + b, Y[held])
        if best is None or scores["r2"] > best[0]:
            best = (scores["r2"], lam, scores)
    _, lam, scores = best
    W, b = _ridge(X, Y, lam, bias)
    gate.weight.copy_(W.T.to(gate.weight))
    if bias:
        gate.bias.copy_(b.to(gate.bias))
    return {**scores, "ridge": lam}


# --- the whole model -------------------------------------------------------------------------------------------


@torch.no_grad()
def collect_ffn_inputs(model: nn.Module, sites: list, batches: Iterable[Tensor], max_tokens: int) -> dict[str, Tensor]:
    """Run the (dense) model on ``batches`` of input ids and keep up to ``max_tokens`` rows of each FFN's input."""
    got: dict[str, list[Tensor]] = {s.name: [] for s in sites}
    counts = {s.name: 0 for s in sites}

    def hook(name: str):
        def f(_m: nn.Module, args: tuple) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1])
            room = max_tokens - counts[name]
            if room > 0:
                got[name].append(x[:room].to("cpu", torch.float32))
                counts[name] += min(room, x.shape[0])
        return f

    handles = [s.module.register_forward_pre_hook(hook(s.name)) for s in sites]
    was = model.training
    model.eval()
    try:
        for ids in batches:
            model(input_ids=ids)
            if all(c >= max_tokens for c in counts.values()):
                break
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    return {n: torch.cat(v) if v else torch.zeros(0) for n, v in got.items()}


@dataclass
class MoefyReport:
    """What :func:`moefy_` did: per layer the partition and router fit, and the time of each phase (seconds)."""

    config: MoefyConfig
    neurons: dict[str, Tensor]
    router_fit: dict[str, dict[str, float]]
    seconds: dict[str, float]

    def summary(self) -> dict[str, Any]:
        fits = [f for f in self.router_fit.values() if f]
        mean = lambda key: sum(f[key] for f in fits) / len(fits) if fits else float("nan")
        return {"layers": len(self.neurons), "router_r2": mean("r2"), "router_top1": mean("top1_agreement"),
                "phase_seconds": dict(self.seconds)}


def _batches(calib: Tensor | Iterable[Tensor]) -> Iterable[Tensor]:
    if isinstance(calib, Tensor):
        return [calib] if calib.dim() == 2 else [calib[None]]
    return calib


def moefy_(model: nn.Module, calib: Tensor | Iterable[Tensor] | dict[str, Tensor] | None, cfg: MoefyConfig):
    """MoEfy ``model`` in place: every selected dense FFN becomes an MoE of ``cfg.num_experts`` neuron groups with
    ``UnitGate(TopK(k=cfg.k, router_bias=True))`` routing and a fitted router (the bias holds the fit's intercept).
    ``calib``: input ids (B, T) or an iterable of such batches, run through the dense model first (needed unless
    ``features="weights"`` and ``router_fit="centroid"``), or the FFN inputs already collected by
    :func:`collect_ffn_inputs` (a dict keyed by FFN module name), to reuse one calibration pass.

    Returns the upcycle handle (``revert(model)`` restores the dense FFNs); its ``moefy`` attribute is the
    :class:`MoefyReport`.
    """
    from .upcycle import UpcycleConfig, select_sites, upcycle_

    needs_data = cfg.router_fit == "regression" or (cfg.method == "cluster" and cfg.features == "activations")
    if needs_data and calib is None:
        raise ValueError(f"moefy_: method={cfg.method!r}, features={cfg.features!r}, router_fit={cfg.router_fit!r} "
                         "needs calibration input ids (calib)")
    seconds: dict[str, float] = {}
    sites = select_sites(model, cfg.layers)
    t0 = time.perf_counter()
    if isinstance(calib, dict):
        missing = [s.name for s in sites if s.name not in calib]
        if missing:
            raise ValueError(f"moefy_: the collected FFN inputs lack {missing[:3]}")
        xs = {s.name: calib[s.name][: cfg.max_calib_tokens] for s in sites}
    else:
        xs = collect_ffn_inputs(model, sites, _batches(calib), cfg.max_calib_tokens) if needs_data else {}
    seconds["calibrate"] = time.perf_counter() - t0
    dense = {s.name: s.weights() for s in sites}  # views of the dense parameters, kept alive by the handle

    t0 = time.perf_counter()
    neurons = {n: neuron_partition(dw, cfg.num_experts, cfg.method, features=cfg.features, x_TD=xs.get(n),
                                   iters=cfg.kmeans_iters, seed=cfg.seed + i)
               for i, (n, dw) in enumerate(dense.items())}
    seconds["partition"] = time.perf_counter() - t0

    router = UnitGate(router=TopK(k=cfg.k, router_bias=True))
    ucfg = UpcycleConfig(num_experts=cfg.num_experts, router=router, init="split",
                         layers=[s.name for s in sites], balance=(), seed=cfg.seed)
    handle = upcycle_(model, ucfg)
    t0 = time.perf_counter()
    fits = {}
    for name, moe in handle.moe_layers().items():
        write_experts_(moe, dense[name], neurons[name])
        fits[name] = fit_router_(moe, dense[name], neurons[name], cfg.router_fit, xs.get(name), cfg.ridge)
    seconds["build"] = time.perf_counter() - t0
    handle.moefy = MoefyReport(cfg, neurons, fits, seconds)
    return handle


def moe_layers_of(model: nn.Module) -> list[MoE]:
    layers = [m for _, m in _moe_layers(model)]
    if not layers:
        raise ValueError("the model has no moekit MoE layers (moefy_ or upcycle_ it first)")
    return layers


def set_top_k_(model: nn.Module, k: int) -> None:
    """Make every MoE layer of ``model`` use ``k`` experts per token, keeping its weights (the router spec's ``k``
    is replaced in place on the built TopK routers)."""
    for moe in moe_layers_of(model):
        E = moe.num_experts
        if not 1 <= k <= E:
            raise ValueError(f"set_top_k_: k must be in [1, {E}], got {k}")
        r = moe.router
        while hasattr(r, "inner"):
            r = r.inner
        if not isinstance(getattr(r, "spec", None), TopK):
            raise TypeError(f"set_top_k_: the router {type(r).__name__} is not a TopK router")
        r.spec = dataclasses.replace(r.spec, k=k)


# --- fine-tuning -----------------------------------------------------------------------------------------------


def finetune_(model: nn.Module, batches: list[Any], *, steps: int, lr: float = 1e-4, router_only: bool = False,
              aux_coef: float = 0.0, params: Iterable[nn.Parameter] | None = None,
              loss_fn: Callable[[Any], Tensor] | None = None, clip: float | None = 1.0) -> list[float]:
    """A short fine-tune on next-token loss: the routers only (``router_only``), the given ``params``, or every
    parameter. Cycles through ``batches`` (input ids, or whatever ``loss_fn(batch)`` takes to return the LM loss;
    default ``model(input_ids=b, labels=b).loss``); returns the LM loss of every step. With ``UnitGate`` the router
    learns through the straight-through combine weights. ``clip``: gradient-norm clipping (None: off)."""
    if router_only and params is not None:
        raise ValueError("finetune_: pass either router_only=True or params, not both")
    if router_only:
        params = [p for moe in moe_layers_of(model) for p in moe.router.parameters()]
    elif params is None:
        params = list(model.parameters())
    params = list(params)
    if not params:
        raise ValueError("finetune_: nothing to train")
    if steps < 1:
        raise ValueError(f"finetune_: steps must be >= 1, got {steps}")
    if loss_fn is None:
        loss_fn = lambda ids: model(input_ids=ids, labels=ids).loss  # noqa: E731
    trainable = {id(p) for p in params}
    saved = {id(p): p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in trainable)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    losses = []
    try:
        for step in range(steps):
            lm_loss = loss_fn(batches[step % len(batches)])
            loss = lm_loss + aux_coef * aux_loss(model) if aux_coef else lm_loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(params, clip)
            opt.step()
            losses.append(float(lm_loss.detach()))
    finally:
        model.eval()
        for p in model.parameters():
            p.requires_grad_(saved[id(p)])
    return losses


# --- the UpcycleConfig(init="cluster") entry point -------------------------------------------------------------


@torch.no_grad()
def init_cluster_(moe: MoE, dw: DenseWeights, cfg: Any, gen: torch.Generator) -> None:
    """``upcycle_(model, UpcycleConfig(init="cluster", ...))``: experts from balanced k-means on the unit gate rows
    (no calibration data) and a centroid router. For a calibrated partition and a fitted router use :func:`moefy_`."""
    seed = int(torch.randint(2**31 - 1, (1,), generator=gen))
    neurons = neuron_partition(dw, cfg.num_experts, "cluster", features="weights", seed=seed)
    write_experts_(moe, dw, neurons)
    try:
        fit_router_(moe, dw, neurons, "centroid")
    except TypeError:  # a router without a linear gate keeps upcycle's random initialisation
        pass


__all__ = [
    "FEATURES", "METHODS", "MoefyConfig", "MoefyReport", "ROUTER_FITS", "balanced_assign", "balanced_kmeans",
    "collect_ffn_inputs", "expert_contributions", "finetune_", "fit_router_", "init_cluster_", "moefy_",
    "neuron_partition", "partition", "set_top_k_",
]
