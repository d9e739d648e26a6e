"""Training loops and measurements for ``moekit compare``.

Every run of a task uses the same model size, seed, data order, optimiser and step budget; only the FFN / adapter
routing changes. Numbers are measured on the held-out split after training:

- ``loss`` (LM: validation cross-entropy in nats per byte; digits: test cross-entropy) and ``accuracy`` (digits);
- ``ffn_mflops_per_token``: forward multiply-add x 2 of the routed layers per token, from the *measured* routing:
  expert matmuls for the pairs actually computed (each expert's hidden size), plus the router's weights (a linear
  router costs one multiply-add per weight). Compute-free experts (MoE++ zero/copy/constant) count 0. SMEAR adds
  its merge (E multiply-adds per parameter of one expert, per example);
- ``experts_per_token``: computed (token, expert) pairs per token, averaged over layers (SMEAR: 1 merged expert);
- ``max_over_mean``: max expert load over mean expert load, averaged over layers (1.0 = perfect balance);
- ``wall_s`` / ``cpu_s``: training wall time and process CPU time (LM: no evaluation; digits: with the periodic
  test-accuracy evaluations).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..layer import MoE, update_balance_bias
from ..models.flops import expert_pair_flops_E, moe_router_flops
from ..routers.smoe_dropout import advance_smoe_dropout
from ..routers.thor import thor_consistency_loss
from ..merging import reinforce_loss, set_step
from ..spec import spec_from_dict
from ..stats import track_routing
from .data import DomainData, TextData
from .models import AdapterNet, TinyLM, moe_factory
from .presets import DigitsPreset, LMPreset


@dataclass(frozen=True)
class LMConfig:
    dim: int = 64
    layers: int = 2
    heads: int = 4
    seq: int = 64
    batch: int = 16
    num_experts: int = 8
    expert_hidden: int = 64
    steps: int = 300
    lr: float = 3e-3
    warmup: int = 30
    eval_batches: int = 16
    log_every: int = 10
    thor_alpha: float = 1.0
    seed: int = 0


@dataclass(frozen=True)
class DigitsConfig:
    dim: int = 64
    layers: int = 2
    expert_hidden: int = 16
    steps: int = 1500
    batch: int = 128
    lr: float = 1e-3
    expert_dropout: float = 0.1
    eval_every: int = 100
    seed: int = 0


@dataclass
class RunResult:
    task: str
    name: str
    note: str
    loss: float
    accuracy: float | None
    ffn_mflops_per_token: float
    experts_per_token: float
    max_over_mean: float
    wall_s: float
    cpu_s: float  # process CPU time of training: less sensitive than wall time to other jobs on a shared machine
    params: int
    curve: list = field(default_factory=list)  # [(step, train loss)] or [(step, test accuracy)]
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def _lr_lambda(warmup: int) -> Callable[[int], float]:
    return lambda step: min(1.0, (step + 1) / max(1, warmup))


# ---------------------------------------------------------------------------------------------------------- LM
def _router_flops(router: nn.Module) -> float:
    """A SMEAR router's matrices (one multiply-add per weight per token). MoE layers use their router spec's
    ``flops_per_token`` instead (:func:`moekit.models.flops.moe_router_flops`)."""
    mats = [t for _, t in list(router.named_parameters()) + list(router.named_buffers()) if t.dim() >= 2 and t.is_floating_point()]
    return 2.0 * sum(t.numel() for t in mats)


def _experts_spec(preset: LMPreset, hidden: int):
    from ..experts.bank import MLP

    if preset.experts is None:
        return MLP(hidden_dim=hidden, activation="gelu"), {}
    name, kw = preset.experts
    kw = dict(kw)
    extra_balance_kw = {}
    if name == "hetero":  # sizes as multiples of the homogeneous expert size; P-penalty needs the same sizes
        dims = tuple(max(1, round(m * hidden)) for m in kw.pop("hidden_mults"))
        kw.update(hidden_dims=dims, activation="gelu", glu=False)
        extra_balance_kw = {"size_penalty": {"hidden_dims": dims}}
    elif name == "aoe":
        kw.setdefault("hidden_dim", hidden)
        kw.setdefault("activation", "gelu")
    return spec_from_dict("experts", {"type": name, **kw}), extra_balance_kw


def build_lm(preset: LMPreset, cfg: LMConfig, vocab: int) -> TinyLM:
    hidden = int(cfg.expert_hidden * preset.hidden_mult)
    if preset.router is None:
        from ..experts.bank import MLP

        factory = lambda i: MLP(hidden_dim=hidden, activation="gelu").build_dense(cfg.dim)
        return TinyLM(vocab, cfg.dim, cfg.layers, cfg.heads, cfg.seq, factory)
    experts, balance_kw = _experts_spec(preset, hidden)
    router = preset.router_spec().for_step_budget(cfg.steps)  # e.g. SMoE-Dropout's k schedule spans the run
    balance = tuple(
        spec_from_dict("balance", {"type": n, **kw, **balance_kw.get(n, {})}) for n, kw in preset.balance
    )
    factory = moe_factory(cfg.dim, cfg.num_experts, hidden, router, balance, experts=experts)
    return TinyLM(vocab, cfg.dim, cfg.layers, cfg.heads, cfg.seq, factory)


@torch.no_grad()
def _eval_lm(model: TinyLM, data: TextData, cfg: LMConfig) -> tuple[float, dict]:
    model.eval()
    gen = torch.Generator().manual_seed(1234)
    total = 0.0
    with track_routing(model) as stats:
        for _ in range(cfg.eval_batches):
            x, y = data.batch("val", cfg.batch, cfg.seq, gen)
            logits, _ = model(x)
            total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1)))
    model.train()
    return total / cfg.eval_batches, stats


def _lm_costs(model: TinyLM, stats: dict) -> tuple[float, float, float, dict]:
    flops, epts, loads, per_layer = 0.0, [], [], {}
    for name, m in model.named_modules():
        if isinstance(m, MoE):
            s = stats[name]
            pair_E = expert_pair_flops_E(m.config.experts, m.dim, m.num_experts)
            f = float((s.tokens_per_expert_E.double() * pair_E).sum()) / s.num_tokens
            f += moe_router_flops(m)
            flops += f
            epts.append(s.experts_per_token)
            loads.append(s.max_over_mean)
            per_layer[name] = {"experts_per_token": s.experts_per_token, "max_over_mean": s.max_over_mean,
                               "tokens_per_expert": s.tokens_per_expert_E.tolist()}
        elif name.endswith(".ffn"):  # dense FFN
            flops += 2.0 * sum(p.numel() for p in m.parameters() if p.dim() >= 2)
    if not epts:
        return flops, 1.0, 1.0, per_layer
    return flops, sum(epts) / len(epts), sum(loads) / len(loads), per_layer


def train_lm(preset: LMPreset, cfg: LMConfig, data: TextData, tick: Callable[[], None] = lambda: None) -> RunResult:
    torch.manual_seed(cfg.seed)
    model = build_lm(preset, cfg, data.vocab)
    spec = preset.router_spec()
    two_passes = spec is not None and spec.consistency_passes == 2
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg.warmup))
    gen = torch.Generator().manual_seed(cfg.seed)
    curve, running = [], []
    t0, c0 = time.perf_counter(), time.process_time()
    for step in range(cfg.steps):
        x, y = data.batch("train", cfg.batch, cfg.seq, gen)
        logits, aux = model(x)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        total = loss + aux
        if two_passes:  # THOR: a second stochastic pass and the symmetric-KL consistency term
            logits2, aux2 = model(x)
            loss2 = F.cross_entropy(logits2.reshape(-1, logits2.shape[-1]), y.reshape(-1))
            total = loss + loss2 + aux + aux2 + thor_consistency_loss(logits, logits2, alpha=cfg.thor_alpha)
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        update_balance_bias(model)  # aux-free bias step after the optimiser step (no-op for other layers)
        advance_smoe_dropout(model)  # SMoE-Dropout's k schedule (no-op for other routers)
        running.append(float(loss.detach()))
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            curve.append((step + 1, sum(running) / len(running)))
            running = []
        tick()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    val_loss, stats = _eval_lm(model, data, cfg)
    flops, ept, load, per_layer = _lm_costs(model, stats)
    return RunResult(
        task="lm", name=preset.name, note=preset.note, loss=val_loss, accuracy=None,
        ffn_mflops_per_token=flops / 1e6, experts_per_token=ept, max_over_mean=load, wall_s=wall, cpu_s=cpu,
        params=sum(p.numel() for p in model.parameters()), curve=curve, extra={"layers": per_layer},
    )


# ------------------------------------------------------------------------------------------------------ digits
def build_digits(preset: DigitsPreset, cfg: DigitsConfig, num_domains: int) -> AdapterNet:
    E = 1 if preset.single else num_domains
    hidden = cfg.expert_hidden * (num_domains if preset.wide else 1)
    rate = cfg.expert_dropout if preset.expert_dropout else 0.0
    # compress the authors' ST-Gumbel schedule (tau 10 -> 0.5) into this step budget
    decay = math.log(10.0 / 0.5) / max(1, cfg.steps)
    return AdapterNet(64, cfg.dim, cfg.layers, E, hidden, routing=preset.routing, expert_dropout=rate,
                      tau_decay=decay)


def _nmi(a: Tensor, b: Tensor) -> float:
    """Normalised mutual information (arithmetic mean normalisation) of two label vectors."""
    n = a.numel()
    joint = torch.zeros(int(a.max()) + 1, int(b.max()) + 1, dtype=torch.float64)
    joint.index_put_((a, b), torch.ones(n, dtype=torch.float64), accumulate=True)
    p = joint / n
    pa, pb = p.sum(1), p.sum(0)
    nz = p > 0
    mi = float((p[nz] * (p[nz] / (pa[:, None] * pb[None, :])[nz]).log()).sum())
    ha = float(-(pa[pa > 0] * pa[pa > 0].log()).sum())
    hb = float(-(pb[pb > 0] * pb[pb > 0].log()).sum())
    return 0.0 if ha + hb == 0 else 2 * mi / (ha + hb)


@torch.no_grad()
def _eval_digits(model: AdapterNet, data: DomainData, task_needed: bool) -> tuple[float, float, list]:
    model.eval()
    task = data.d_test if task_needed else None
    logits = model(data.x_test, task=task)
    routes = [a.last for a in model.adapters]
    model.train()
    loss = float(F.cross_entropy(logits, data.y_test))
    acc = float((logits.argmax(-1) == data.y_test).double().mean())
    return loss, acc, routes


def train_digits(preset: DigitsPreset, cfg: DigitsConfig, data: DomainData,
                 tick: Callable[[], None] = lambda: None) -> RunResult:
    torch.manual_seed(cfg.seed)
    D = len(data.domains)
    model = build_digits(preset, cfg, D)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed)
    task_needed = preset.routing == "tag"
    n = data.x_train.shape[0]
    curve = []
    t0, c0 = time.perf_counter(), time.process_time()
    for step in range(cfg.steps):
        idx = torch.randint(0, n, (cfg.batch,), generator=gen)
        task = (torch.zeros_like(idx) if preset.single else data.d_train[idx]) if task_needed else None
        set_step(model, step)
        logits = model(data.x_train[idx], task=task)
        per_example = F.cross_entropy(logits, data.y_train[idx], reduction="none")
        loss = per_example.mean() + reinforce_loss(model, per_example)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            curve.append((step + 1, _eval_digits(model, _as_single(data) if preset.single else data, task_needed)[1]))
        tick()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0  # includes the periodic evaluations (cheap)
    test_data = _as_single(data) if preset.single else data
    loss, acc, routes = _eval_digits(model, test_data, task_needed)

    flops, epts, loads, nmis = 0.0, [], [], []
    for layer, r in zip(model.adapters, routes):
        E, c = layer.num_experts, layer.config.routing
        if c == "ensemble":
            flops += E * layer.expert_flops_per_token() + _router_flops(layer.router)
            epts.append(float(E))
        else:
            flops += layer.expert_flops_per_token()
            if c == "smear":
                flops += layer.merge_flops_per_example()
            if layer.router is not None:
                flops += _router_flops(layer.router)
            epts.append(1.0)
        chosen = r.expert_B if r.expert_B is not None else r.probs_BE.argmax(-1)
        load = torch.bincount(chosen, minlength=E).double()
        loads.append(float(load.max() / load.mean()))
        nmis.append(_nmi(chosen, data.d_test) if E > 1 else 0.0)
    return RunResult(
        task="digits", name=preset.name, note=preset.note, loss=loss, accuracy=acc,
        ffn_mflops_per_token=flops / 1e6, experts_per_token=sum(epts) / len(epts),
        max_over_mean=sum(loads) / len(loads), wall_s=wall, cpu_s=cpu,
        params=sum(p.numel() for p in params), curve=curve,
        extra={"routing_domain_nmi": sum(nmis) / len(nmis), "domains": list(data.domains)},
    )


def _as_single(data: DomainData) -> DomainData:
    """Domain ids all zero (the one-adapter baselines route every example to expert 0)."""
    return DomainData(data.x_train, data.y_train, torch.zeros_like(data.d_train), data.x_test, data.y_test,
                      torch.zeros_like(data.d_test), data.domains)
