"""Worker functions for the expert-parallel tests. They run inside processes started by
``moekit.parallel.spawn_local`` (gloo on localhost), so they live in an importable module, and each spawn runs
several checks to keep the number of process start-ups small.

The reference is always the single-process layer (itself tested against the per-token loop in
test_layer_reference.py) on the *global* batch, i.e. every rank's micro-batch concatenated in rank order.
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
from torch import nn

from moekit.convert.unit_gate import UnitGate
from moekit.experts import AoEExperts
from moekit.routers import AoE, ExpertChoice, MoEPP, TopP
from moekit import MLP, AuxFree, Capacity, Dropless, MoE, SwiGLU, SwitchLoss, TopK, aux_loss, update_balance_bias
from moekit.parallel import (
    CollectiveError,
    apply_expert_parallel,
    broadcast_parameters,
    build_groups,
    dense_parameters,
    expert_parameters,
    expert_shard,
    load_sharded,
    reduce_expert_gradients,
    reduce_gradients,
    save_sharded,
    shard_experts,
    update_balance_bias_distributed,
    wrap_ddp,
)

from _dispatch_probe import EXPECTED_LOG, RecordingDispatcher

TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
D = 8


def assert_close(a, b, tol, what):
    err = (a - b).abs().max().item() if a.numel() else 0.0
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    assert err <= tol, f"rank {dist.get_rank()}: {what}: max abs error {err:.3g} > {tol}"


def make_layer(case: dict) -> MoE:
    experts = (
        SwiGLU(hidden_dim=8) if case.get("experts", "swiglu") == "swiglu"
        else MLP(hidden_dim=12, activation="gelu")
    )
    layer = MoE(
        D, case.get("E", 8),
        router=case.get("router") or TopK(k=case.get("k", 2), score=case.get("score", "softmax"),
                                           router_bias=case.get("skew", False)),
        experts=experts,
        shared_experts=SwiGLU(hidden_dim=4) if case.get("shared") else None,
        shared_gate=bool(case.get("shared")),
        dispatch=case.get("dispatch", Dropless()),
        balance=case.get("balance", ()),
    )
    with torch.no_grad():
        for b in (getattr(layer.experts, "b_in", None), getattr(layer.experts, "b2_ED", None)):
            if b is not None:
                b.normal_()  # non-zero biases, so that their routing to local experts is exercised
        if case.get("skew"):  # every token's first choice is expert 0: ranks > 0 receive little or nothing
            layer.router.gate.bias[0] = 50.0
    return layer.to(case.get("dtype", torch.float32))


def _grad(p):
    return p.grad if p.grad is not None else torch.zeros_like(p)


def check_layer_equivalence(case: dict, ep_group, world_group, B: int = 2, S: int = 5) -> None:
    """The EP layer's output, input gradient, dense gradients (summed over ranks) and expert gradients equal the
    single-process layer on the global batch. ``case["chunked"]``: the reference runs per rank-chunk (capacity
    applied per rank, the documented semantics of non-per-sequence capacity in EP)."""
    dtype = case.get("dtype", torch.float32)
    tol = TOL[dtype]
    W, rank = dist.get_world_size(ep_group), dist.get_rank(ep_group)
    torch.manual_seed(case.get("seed", 0))
    ref = make_layer(case)
    ep = shard_experts(copy.deepcopy(ref), ep_group)
    assert ep.experts.num_experts == ref.num_experts // W
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(W * B, S, D, generator=gen, dtype=dtype)
    gy = torch.randn(W * B, S, D, generator=gen, dtype=dtype)
    lo, hi = rank * B, (rank + 1) * B

    xr = x.clone().requires_grad_()
    chunks = [slice(c * B, (c + 1) * B) for c in range(W)] if case.get("chunked") else [slice(0, W * B)]
    outs = [ref.forward_with_aux(xr[c]) for c in chunks]
    y_ref = torch.cat([o.y for o in outs])
    sum((o.y * gy[c]).sum() for o, c in zip(outs, chunks)).backward()
    kept_ref = sum(o.stats.tokens_per_expert_E for o in outs)
    routed_ref = sum(o.stats.routed_per_expert_E for o in outs)

    xl = x[lo:hi].clone().requires_grad_()
    out = ep.forward_with_aux(xl)
    (out.y * gy[lo:hi]).sum().backward()

    assert_close(out.y, y_ref[lo:hi], tol, f"{case} output")
    assert_close(xl.grad, xr.grad[lo:hi], tol, f"{case} input grad")
    ref_params = dict(ref.named_parameters())
    for name, p in dense_parameters(ep):
        g = _grad(p).clone()
        dist.all_reduce(g, group=ep_group)  # each rank holds the gradient of its own tokens
        assert_close(g, _grad(ref_params[name]), tol, f"{case} grad {name}")
    s = expert_shard(ep)
    names = set()
    for name, p in expert_parameters(ep):
        names.add(name)
        assert_close(_grad(p), _grad(ref_params[name])[s.start:s.stop], tol, f"{case} grad {name}")
    assert names == {n for n, _ in expert_parameters(ref)}
    # routing statistics: per global expert, summed over ranks, as in the single-process layer
    kept, routed = out.stats.tokens_per_expert_E.clone(), out.stats.routed_per_expert_E.clone()
    dist.all_reduce(kept, group=ep_group)
    dist.all_reduce(routed, group=ep_group)
    assert torch.equal(kept, kept_ref) and torch.equal(routed, routed_ref), f"{case} stats"


CASES_2 = [
    dict(dtype=torch.float64, k=2, shared=True),
    dict(dtype=torch.float64, k=1, score="sigmoid", experts="mlp"),
    dict(dtype=torch.float64, k=2, dispatch=Capacity(factor=0.75, per_sequence=True)),
    dict(dtype=torch.float64, k=2, dispatch=Capacity(factor=0.75, per_sequence=True, drop="score"), experts="mlp"),
    dict(dtype=torch.float64, k=2, dispatch=Capacity(factor=1.0), chunked=True),
    dict(dtype=torch.float64, k=1, E=4, skew=True, shared=True),
    dict(dtype=torch.float32, k=2, shared=True),  # grouped_mm expert path
    dict(dtype=torch.float32, k=3, E=4, dispatch=Capacity(factor=1.0, per_sequence=True)),
    # the router weight on the expert input (Llama 4): scaled before the all-to-all, summed unweighted after it
    dict(dtype=torch.float64, k=2, score="sigmoid", dispatch=Dropless(weight_at="input"), shared=True),
    dict(dtype=torch.float64, k=2, dispatch=Capacity(factor=0.75, per_sequence=True, weight_at="input")),
    # other routers of the core: MoE++ (compute-free experts stay on the token's rank), top-p, and expert choice
    # (experts choose among the tokens of each rank's call, so the reference runs per rank-chunk)
    dict(dtype=torch.float64, router=MoEPP(k=2, router_hidden_mult=None), shared=True),
    dict(dtype=torch.float64, router=TopP(), experts="mlp"),
    dict(dtype=torch.float64, router=ExpertChoice(capacity_factor=1.0), chunked=True),
]


def worker_ep2(rank: int, world: int) -> None:
    groups = build_groups(ep_size=world)
    for case in CASES_2:
        check_layer_equivalence(case, groups.ep, groups.world)
    # E not divisible by the EP size: a clear error
    try:
        shard_experts(MoE(D, 3, router=TopK(k=1)), groups.ep)
    except ValueError as e:
        assert "3 experts cannot be split evenly" in str(e), e
    else:
        raise AssertionError("expected a ValueError for 3 experts over 2 ranks")
    try:
        shard_experts(MoE(D, 4, router=AoE(), experts=AoEExperts()), groups.ep)
    except ValueError as e:
        assert "cannot be sharded" in str(e), e
    else:
        raise AssertionError("expected a ValueError for a router that reads the expert weights")
    check_same_layer_path(groups.ep)
    check_aux_free_bias(groups)
    checks_fsdp_2(groups)
    # an EP model (dispatcher and global-batch loss hold process groups) can be deep-copied, e.g. for an EMA
    torch.manual_seed(0)
    ep = apply_expert_parallel(make_layer(dict(balance=(SwitchLoss(coef=0.1),))), groups, global_balance=True)
    twin = copy.deepcopy(ep)
    x = torch.randn(2, 3, D)
    a, b = ep.forward_with_aux(x), twin.forward_with_aux(x)
    assert torch.equal(a.y, b.y) and torch.equal(a.aux_loss, b.aux_loss)
    assert twin.experts.w_in is not ep.experts.w_in


def check_same_layer_path(ep_group) -> None:
    """The layer drives the expert-parallel dispatcher exactly as the local one (the same calls, the same plan and
    handle objects, an unchanged plan), and the one plan type means the same thing in both: this rank's pairs and
    their accounting are the local plan's; ``counts_E`` are the rows this rank's bank receives."""
    W, rank = dist.get_world_size(ep_group), dist.get_rank(ep_group)
    for case in (dict(k=2), dict(k=1, E=4, skew=True), dict(k=2, dispatch=Capacity(factor=0.75, per_sequence=True))):
        torch.manual_seed(0)
        ref = make_layer(case)
        ep = shard_experts(copy.deepcopy(ref), ep_group)
        ref.dispatcher, ep.dispatcher = RecordingDispatcher(ref.dispatcher), RecordingDispatcher(ep.dispatcher)
        x = torch.randn(W, 2, 5, D, generator=torch.Generator().manual_seed(1))[rank]
        for layer in (ref, ep):
            layer(x).sum().backward()
            assert layer.dispatcher.log == EXPECTED_LOG, (case, layer.dispatcher.log)
        p_loc, p_ep = ref.dispatcher._plan, ep.dispatcher._plan
        assert type(p_loc) is type(p_ep) and p_loc.exchange is None and p_ep.exchange is not None
        for f in ("token_N", "weight_N", "routed_E", "kept_E", "num_tokens"):
            a, b = getattr(p_loc, f), getattr(p_ep, f)
            assert (torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b), (case, f)
        kept_all = p_ep.kept_E.clone()
        dist.all_reduce(kept_all, group=ep_group)
        L = ep.experts.num_experts
        assert torch.equal(p_ep.counts_E, kept_all[rank * L:(rank + 1) * L]), case
        assert torch.equal(p_ep.expert_N, torch.repeat_interleave(torch.arange(L), p_ep.counts_E)), case
    # UnitGate declares what it wraps: a UnitGate(TopK) layer shards, a UnitGate(AoE) one does not
    shard_experts(MoE(D, 4, router=UnitGate(router=TopK(k=1))), ep_group)
    try:
        shard_experts(MoE(D, 4, router=UnitGate(router=AoE()), experts=AoEExperts()), ep_group)
    except ValueError as e:
        assert "cannot be sharded" in str(e), e
    else:
        raise AssertionError("expected a ValueError for UnitGate(AoE)")


def check_aux_free_bias(groups) -> None:
    """The aux-free bias moves by the global loads and stays identical on every rank (= single process)."""
    torch.manual_seed(3)
    case = dict(dtype=torch.float64, k=2, balance=(AuxFree(rate=0.1),))
    ref = make_layer(case).train()
    ep = shard_experts(copy.deepcopy(ref), groups.ep).train()
    W, r = groups.world_size, groups.rank
    gen = torch.Generator().manual_seed(5)
    for _ in range(3):
        x = torch.randn(W * 2, 6, D, generator=gen, dtype=torch.float64)
        ref(x)
        ep(x[2 * r: 2 * r + 2])
        ref.update_bias()
        update_balance_bias_distributed(ep, groups.world)
    assert ep.router.bias_E.abs().sum() > 0
    assert_close(ep.router.bias_E, ref.router.bias_E, 1e-12, "aux-free bias")


# ---------------------------------------------------------------------------------------------------------------
# training: EP x DP equals single-process training


class Toy(nn.Module):
    def __init__(self, dispatch=None, skew: bool = False) -> None:
        super().__init__()
        self.inp = nn.Linear(D, D)
        self.moe = MoE(
            D, 8, router=TopK(k=2, router_bias=skew), experts=SwiGLU(hidden_dim=8), shared_experts=SwiGLU(hidden_dim=8),
            dispatch=dispatch or Dropless(), balance=(SwitchLoss(coef=0.1), AuxFree(rate=0.01)),
        )
        self.out = nn.Linear(D, 1)
        if skew:  # every token picks experts 0 and 1: the EP ranks holding experts 4..7 receive no rows at all
            with torch.no_grad():
                self.moe.router.gate.bias[:2] = 50.0

    def forward(self, x):
        h = self.inp(x)
        return self.out(h + self.moe(h))


def _train_data(steps, W, B, S, dtype):
    gen = torch.Generator().manual_seed(11)
    return [(torch.randn(W * B, S, D, generator=gen, dtype=dtype), torch.randn(W * B, S, 1, generator=gen, dtype=dtype))
            for _ in range(steps)]


def _step(model, opt, x, y):
    opt.zero_grad()
    loss = nn.functional.mse_loss(model(x), y) + aux_loss(model)
    loss.backward()
    return loss


def check_training(groups, *, dtype, opt_name, use_ddp, steps=4, B=2, S=4, save_to=None) -> None:
    tol = {torch.float64: 1e-10, torch.float32: 2e-5}[dtype]
    W, rank = groups.world_size, groups.rank
    make_opt = {
        "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.01),
        "sgd": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
    }[opt_name]
    torch.manual_seed(7)
    ref = Toy().to(dtype).train()
    model = apply_expert_parallel(copy.deepcopy(ref), groups, global_balance=True)
    net = wrap_ddp(model, groups) if use_ddp else model
    ref_opt, opt = make_opt(ref.parameters()), make_opt(model.parameters())
    for x, y in _train_data(steps, W, B, S, dtype):
        ref_loss = _step(ref, ref_opt, x, y)
        ref_opt.step()
        update_balance_bias(ref)
        sl = slice(rank * B, (rank + 1) * B)
        loss = _step(net, opt, x[sl], y[sl])
        if use_ddp:
            reduce_expert_gradients(model, groups)
        else:
            reduce_gradients(model, groups)
        opt.step()
        update_balance_bias_distributed(model, groups.world)
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        assert_close(mean_loss / W, ref_loss.detach(), tol, f"training loss ({opt_name}, ddp={use_ddp})")
    ref_params = dict(ref.named_parameters())
    s = expert_shard(model.moe)
    for name, p in expert_parameters(model):
        assert_close(p.detach(), ref_params[name].detach()[s.start:s.stop], tol, f"trained {name}")
    for name, p in dense_parameters(model):
        assert_close(p.detach(), ref_params[name].detach(), tol, f"trained {name}")
    assert_close(model.moe.router.bias_E, ref.moe.router.bias_E, tol, "trained aux-free bias")
    if save_to is not None:  # EP 2 x DP 2: one replica of each shard writes; a plain model loads it
        save_sharded(net, save_to, groups)
        plain = load_sharded(Toy().to(dtype), save_to)
        trained = dict(model.named_parameters())
        for name, p in dense_parameters(plain):
            assert torch.equal(p, trained[name]), f"reloaded {name}"
        for name, p in expert_parameters(plain):
            assert_close(p.detach(), ref_params[name].detach(), tol, f"reloaded {name}")


def check_broadcast(groups) -> None:
    """broadcast_parameters makes dense weights equal to global rank 0's and shards equal to their DP rank 0's."""
    torch.manual_seed(100 + groups.rank)  # different weights on every rank
    model = apply_expert_parallel(Toy(), groups, check_values=False)  # the weights are made equal below
    broadcast_parameters(model, groups)
    for _, p in list(dense_parameters(model)) + list(expert_parameters(model)):
        group = groups.world if any(p is q for _, q in dense_parameters(model)) else groups.dp
        lo, hi = p.detach().clone(), p.detach().clone()
        dist.all_reduce(lo, op=dist.ReduceOp.MIN, group=group)
        dist.all_reduce(hi, op=dist.ReduceOp.MAX, group=group)
        assert torch.equal(lo, hi), "replicas differ after broadcast_parameters"


def check_global_batch_loss(groups) -> None:
    """Mean over ranks of the global-batch Switch loss (and of its router gradient) equals the single-process
    Switch loss on the concatenated batch; the micro-batch loss does not (so the check can fail)."""
    W, rank = groups.world_size, groups.rank
    torch.manual_seed(9)
    ref = make_layer(dict(dtype=torch.float64, k=2, balance=(SwitchLoss(coef=1.0),)))
    micro = apply_expert_parallel(copy.deepcopy(ref), groups)
    glob = apply_expert_parallel(copy.deepcopy(ref), groups, global_balance=True)
    gen = torch.Generator().manual_seed(2)
    sizes = [2 + r for r in range(W)]  # uneven micro-batches: the P normalisation must still make it exact
    x = torch.randn(sum(sizes), 3, D, generator=gen, dtype=torch.float64)
    lo = sum(sizes[:rank])
    xl = x[lo: lo + sizes[rank]]
    ref_loss = ref.forward_with_aux(x).losses["switch"]
    ref_loss.backward()
    losses = {}
    for name, layer in (("micro", micro), ("global", glob)):
        l = layer.forward_with_aux(xl).losses["switch"]
        (l / W).backward()  # what DP gradient averaging optimises
        g = layer.router.gate.weight.grad.clone()
        dist.all_reduce(g)
        t = l.detach().clone()
        dist.all_reduce(t)
        losses[name] = (t / W, g)
    assert_close(losses["global"][0], ref_loss.detach(), 1e-12, "global-batch loss")
    assert_close(losses["global"][1], ref.router.gate.weight.grad, 1e-12, "global-batch loss router grad")
    assert (losses["micro"][0] - ref_loss).abs() > 1e-6, "micro-batch loss unexpectedly equals the global one"


def check_checkpoint_reshard(groups4, path) -> None:
    """Saved at EP=4 (over the 4 ranks), loaded at EP=2 and EP=1 (a plain layer): bitwise identical weights and the
    same outputs (float64; different EP sizes group the rows differently, so outputs agree to rounding)."""
    rank = groups4.rank
    torch.manual_seed(21)
    case = dict(dtype=torch.float64, k=2, shared=True, experts="mlp", E=8)
    ref = make_layer(case).eval()
    ref_params = dict(ref.named_parameters())
    ep4 = shard_experts(copy.deepcopy(ref), groups4.ep).eval()
    save_sharded(ep4, path, groups4)
    x = torch.randn(4 * 2, 3, D, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    mine = slice(2 * rank, 2 * rank + 2)
    with torch.no_grad():
        y_ref = ref(x)
        y4 = ep4(x[mine])
    torch.manual_seed(1234)  # fresh, different weights: everything must come from the checkpoint
    groups2 = build_groups(ep_size=2)
    ep2 = shard_experts(make_layer(case), groups2.ep).eval()
    load_sharded(ep2, path)
    fresh1 = make_layer(case).eval()
    load_sharded(fresh1, path)
    for model in (ep2, fresh1):
        s = expert_shard(model)
        for name, p in model.named_parameters():
            want = ref_params[name][s.start:s.stop] if ".experts." in f".{name}" else ref_params[name]
            assert torch.equal(p, want), f"{name} after loading at EP={s.size}"
    with torch.no_grad():
        y2 = ep2(x[mine])  # rank = 2 * dp_rank + ep_rank, so this rank's rows are the same as at EP=4
        y1 = fresh1(x)
    assert torch.equal(y1, y_ref), "EP=1 output after loading the EP=4 checkpoint"
    assert_close(y4, y_ref[mine], 1e-12, "EP=4 output")
    assert_close(y2, y4, 1e-12, "EP=2 output after loading the EP=4 checkpoint")


def worker_4(rank: int, world: int, ckpt_path: str, dcp_root: str, hf_root: str) -> None:
    g4 = build_groups(ep_size=4)
    for case in (dict(dtype=torch.float32, k=2, shared=True),
                 dict(dtype=torch.float64, k=2, experts="mlp", dispatch=Capacity(factor=0.5, per_sequence=True))):
        check_layer_equivalence(case, g4.ep, g4.world)
    try:
        shard_experts(MoE(D, 6, router=TopK(k=1)), g4.ep)
    except ValueError as e:
        assert "6 experts cannot be split evenly" in str(e)
    else:
        raise AssertionError("expected a ValueError")
    check_checkpoint_reshard(g4, ckpt_path)
    g22 = build_groups(ep_size=2)  # 2 EP ranks x 2 DP replicas
    check_layer_equivalence(dict(dtype=torch.float64, k=2, shared=True), g22.ep, g22.world)
    check_global_batch_loss(g22)
    check_training(g22, dtype=torch.float64, opt_name="adamw", use_ddp=False)
    check_training(g22, dtype=torch.float32, opt_name="sgd", use_ddp=True, save_to=ckpt_path + "_ep2dp2")
    check_broadcast(g22)
    checks_fsdp_4(g22, dcp_root, hf_root)


# ---------------------------------------------------------------------------------------------------------------
# faults


def fault_worker(rank: int, world: int, port: int, mode: str, timeout_s: float, queue) -> None:
    import datetime
    import os
    import time

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))
    groups = build_groups(ep_size=world)  # inherits the world's timeout
    assert groups.timeout_s == timeout_s, groups.timeout_s
    torch.manual_seed(0)
    layer = shard_experts(MoE(D, 4, router=TopK(k=2), experts=SwiGLU(hidden_dim=8)), groups.ep)
    x = torch.randn(2, 3, D)
    layer(x)  # one healthy step
    dist.barrier()
    if rank == 1:
        if mode == "killed":
            os._exit(3)
        time.sleep(120)  # hung; the parent kills us
        os._exit(0)
    t0 = time.monotonic()
    try:
        layer(x)
        queue.put(("no error", "", time.monotonic() - t0))
    except CollectiveError as e:
        queue.put(("CollectiveError", str(e), time.monotonic() - t0))
    except Exception as e:  # noqa: BLE001 - reported to the test
        queue.put((type(e).__name__, str(e), time.monotonic() - t0))
    queue.close()
    queue.join_thread()  # flush the report before the hard exit
    os._exit(0)  # no process-group teardown: the peer is gone


# ---------------------------------------------------------------------------------------------------------------
# EP x FSDP2: training equals one process; distributed checkpoints reshard across meshes; consistency checks


def full(p):
    """A parameter's global value (an FSDP2 DTensor is gathered)."""
    p = p.detach()
    return p.full_tensor() if hasattr(p, "full_tensor") else p


def make_opt(name, params):
    return {
        "adamw": lambda: torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01),
        "sgd": lambda: torch.optim.SGD(params, lr=0.1, momentum=0.9),
    }[name]()


def fsdp_model(groups, dense, experts, dtype, seed=7, skew=False):
    """Toy built with ``seed``, expert-parallel over ``groups.ep``, then FSDP2 (``dense``, ``experts`` modes)."""
    from moekit.parallel import apply_fsdp

    torch.manual_seed(seed)
    model = apply_expert_parallel(Toy(skew=skew).to(dtype).train(), groups, global_balance=True)
    plan = apply_fsdp(model, groups, dense=dense, experts=experts)
    return model, plan


def train_steps(model, plan, opt, groups, data, B):
    """Train on ``data`` (global batches); returns the mean-over-ranks loss of each step."""
    losses = []
    sl = slice(groups.rank * B, (groups.rank + 1) * B)
    for x, y in data:
        loss = _step(model, opt, x[sl], y[sl])
        plan.reduce_gradients()
        opt.step()
        update_balance_bias_distributed(model, groups.world)
        t = loss.detach().clone()
        dist.all_reduce(t)
        losses.append(t / groups.world_size)
    return losses


def reference_run(dtype, opt_name, data, skew=False):
    """Single-process training of the same Toy on the global batches; (model, per-step losses)."""
    torch.manual_seed(7)
    ref = Toy(skew=skew).to(dtype).train()
    opt = make_opt(opt_name, ref.parameters())
    losses = []
    for x, y in data:
        losses.append(_step(ref, opt, x, y).detach())
        opt.step()
        update_balance_bias(ref)
    return ref, losses


def check_fsdp_training(groups, *, dense, experts, dtype, opt_name, steps=3, B=2, save_to=None, skew=False):
    tol = TOL[dtype]
    data = _train_data(steps + 1, groups.world_size, B, 4, dtype)
    ref, ref_losses = reference_run(dtype, opt_name, data[:steps], skew=skew)
    model, plan = fsdp_model(groups, dense, experts, dtype, skew=skew)
    opt = make_opt(opt_name, model.parameters())
    losses = train_steps(model, plan, opt, groups, data[:steps], B)
    what = (f"EP{groups.ep_size} x DP{groups.dp_size} dense={dense} experts={plan.experts} {dtype} {opt_name}"
            + (" skewed" if skew else ""))
    for i, (a, b) in enumerate(zip(losses, ref_losses)):
        assert_close(a, b, tol, f"{what}: loss of step {i + 1}")
    ref_params = dict(ref.named_parameters())
    s = expert_shard(model.moe)
    for name, p in expert_parameters(model):
        assert_close(full(p), ref_params[name].detach()[s.start:s.stop], tol, f"{what}: trained {name}")
    for name, p in dense_parameters(model):
        assert_close(full(p), ref_params[name].detach(), tol, f"{what}: trained {name}")
    assert_close(model.moe.router.bias_E, ref.moe.router.bias_E, tol, f"{what}: aux-free bias")
    if save_to is not None:
        from moekit.parallel import save_dcp

        save_dcp(model, opt, save_to, groups, step=steps, extra={"note": what})
        # saving leaves the model and its optimizer as they were: the next step is the single-process one
        next_loss = train_steps(model, plan, opt, groups, data[steps:], B)[0]
        assert_close(next_loss, reference_run(dtype, opt_name, data)[1][steps], tol, f"{what}: step after saving")
    return model, opt


def check_resume(groups, root, *, dense, experts, saved_steps=3, more=2, B=2):
    """Load the EP2 x FSDP2 checkpoint at this mesh (fresh, differently seeded model) and train ``more`` steps:
    the losses equal the single-process run's (the second one depends on the restored optimizer state)."""
    from moekit.parallel import load_dcp

    dtype = torch.float64
    data = _train_data(saved_steps + more, groups.world_size, B, 4, dtype)
    _, ref_losses = reference_run(dtype, "adamw", data)
    model, plan = fsdp_model(groups, dense, experts, dtype, seed=1234)
    opt = make_opt("adamw", model.parameters())
    manifest = load_dcp(model, opt, root, groups)
    assert manifest["step"] == saved_steps and manifest["mesh"] == {"world": 4, "ep": 2, "dp": 2}, manifest
    losses = train_steps(model, plan, opt, groups, data[saved_steps:], B)
    for i, (a, b) in enumerate(zip(losses, ref_losses[saved_steps:])):
        assert_close(a, b, 1e-10, f"resumed at EP{groups.ep_size} x DP{groups.dp_size} dense={dense}: "
                                  f"loss of step {saved_steps + i + 1}")


class HFToy(nn.Module):
    """A Mixtral-compatible MoE (softmax top-2 with renormalisation, SwiGLU, dropless): exportable with to_hf."""

    def __init__(self) -> None:
        super().__init__()
        self.moe = MoE(D, 4, router=TopK(k=2, normalize=True, fp32=False, score_dtype="float32"),
                       experts=SwiGLU(hidden_dim=8))

    def forward(self, x):
        return self.moe(x)


def checks_fsdp_2(g) -> None:
    """2 ranks: EP2 x FSDP (dp=1) training; every consistency mismatch kind."""
    check_fsdp_training(g, dense="fsdp", experts="fsdp", dtype=torch.float64, opt_name="adamw")
    check_fsdp_training(g, dense="fsdp", experts="fsdp", dtype=torch.float32, opt_name="sgd")
    check_mismatches(g)


def check_mismatches(groups) -> None:
    """Rank 1 builds a different model: every rank raises ConsistencyError naming the field and the ranks, at once
    (well within the timeout) instead of training silently or dying in a transport error."""
    import time

    from moekit.parallel import ConsistencyError

    base = dict(E=4, k=2, hidden=8, dim=D, dispatch=Dropless(), seed=0)
    kinds = {
        "k": (dict(k=1), "moe.router.k: 2 on rank [0]; 1 on rank [1]"),
        "expert size": (dict(hidden=12), "moe.experts.hidden_dim: 8 on rank [0]; 12 on rank [1]"),
        "seed": (dict(seed=1), "moe.router.gate.weight (values): "),
        "dispatch": (dict(dispatch=Capacity(factor=1.0)), "moe.dispatch.type: 'dropless' on rank [0]; 'capacity' on rank [1]"),
        "E": (dict(E=8), "moe.num_experts: 4 on rank [0]; 8 on rank [1]"),
        "dim": (dict(dim=D + 4), f"moe.dim: {D} on rank [0]; {D + 4} on rank [1]"),
    }
    for kind, (change, expected) in kinds.items():
        cfg = dict(base, **(change if groups.rank == 1 else {}))
        torch.manual_seed(cfg["seed"])
        model = nn.Sequential()
        model.add_module("moe", MoE(cfg["dim"], cfg["E"], router=TopK(k=cfg["k"]),
                                    experts=SwiGLU(hidden_dim=cfg["hidden"]), dispatch=cfg["dispatch"]))
        t0 = time.monotonic()
        try:
            apply_expert_parallel(model, groups)
        except ConsistencyError as e:
            assert expected in str(e), f"{kind}: {e}"
            assert f"rank {groups.rank} reporting" in str(e), str(e)
            if kind == "seed":
                assert "same torch.manual_seed" in str(e), str(e)
        else:
            raise AssertionError(f"rank {groups.rank}: no ConsistencyError for a different {kind}")
        assert time.monotonic() - t0 < 10.0, f"{kind}: the check took {time.monotonic() - t0:.1f} s"
    # the same seed given explicitly: seeds that differ are named even with the value check off
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("moe", MoE(D, 4, router=TopK(k=2)))
    try:
        apply_expert_parallel(model, groups, seed=groups.rank, check_values=False)
    except ConsistencyError as e:
        assert "seed: 0 on rank [0]; 1 on rank [1]" in str(e), str(e)
    else:
        raise AssertionError("no ConsistencyError for different seeds")
    # equal models pass, and the layer still works afterwards
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("moe", MoE(D, 4, router=TopK(k=2)))
    apply_expert_parallel(model, groups, seed=0)
    model(torch.randn(2, 3, D))


def checks_fsdp_4(g22, root: str, hf_root: str) -> None:
    """4 ranks: EP2 x FSDP2 (dp=2) training saved with DCP; resumed at EP4 (FSDP over the world), EP1 x FSDP4
    (experts FSDP-sharded over 4) and EP2 x DP2 HSDP with replicated experts; a Mixtral-like model for the export."""
    from moekit.parallel import apply_fsdp, memory_per_rank, save_dcp

    model, opt = check_fsdp_training(g22, dense="fsdp", experts="fsdp", dtype=torch.float64, opt_name="adamw",
                                     save_to=root)
    # memory per rank: FSDP2 holds a quarter of the dense and half of the (EP-halved) expert bytes of plain DP
    mem = memory_per_rank(model, opt)
    torch.manual_seed(7)
    plain = apply_expert_parallel(Toy().to(torch.float64), g22)
    popt = torch.optim.AdamW(plain.parameters())
    _step(plain, popt, *_train_data(1, 4, 2, 4, torch.float64)[0])  # creates the optimizer state
    reduce_gradients(plain, g22)
    popt.step()
    base = memory_per_rank(plain, popt)
    assert mem["param_bytes"] < base["param_bytes"] and mem["optim_bytes"] < base["optim_bytes"], (mem, base)
    dense_total = sum(p.numel() for _, p in dense_parameters(plain)) * 8
    expert_local = sum(p.numel() for _, p in expert_parameters(plain)) * 8
    assert base["param_bytes"] == dense_total + expert_local, base
    assert abs(mem["param_bytes"] - (dense_total / 4 + expert_local / 2)) <= 8 * 16, (mem, dense_total, expert_local)
    # a skewed router starves EP rank 1: its FSDP expert units see no rows, and still reduce-scatter in step
    check_fsdp_training(g22, dense="hsdp", experts="fsdp", dtype=torch.float32, opt_name="sgd", steps=2, skew=True)
    check_resume(build_groups(ep_size=4), root, dense="fsdp", experts="fsdp")
    check_resume(build_groups(ep_size=1), root, dense="fsdp", experts="fsdp")
    check_resume(g22, root, dense="hsdp", experts="replicate")
    # the Mixtral-like model, sharded EP2 x FSDP2, saved without optimizer
    torch.manual_seed(5)
    hf = apply_expert_parallel(HFToy().to(torch.float64), g22)
    apply_fsdp(hf, g22)
    save_dcp(hf, None, hf_root, g22, step=0)


def check_single_process_resume(root) -> None:
    """In the test process (no process group): the EP2 x FSDP2 checkpoint resumes with the single-process losses."""
    from moekit.parallel import load_dcp, read_latest

    manifest = read_latest(root)
    assert manifest["step"] == 3 and manifest["optimizer"] is True, manifest
    data = _train_data(5, 4, 2, 4, torch.float64)
    _, ref_losses = reference_run(torch.float64, "adamw", data)
    torch.manual_seed(1234)
    model = Toy().to(torch.float64).train()
    opt = make_opt("adamw", model.parameters())
    load_dcp(model, opt, root)
    for i, (x, y) in enumerate(data[3:]):
        loss = _step(model, opt, x, y).detach()
        opt.step()
        update_balance_bias(model)
        assert abs(float(loss - ref_losses[3 + i])) <= 1e-10, (i, float(loss), float(ref_losses[3 + i]))


def check_hf_export(hf_root) -> None:
    """Consolidate the EP2 x FSDP2 checkpoint of the Mixtral-like model in one process and export it with
    moekit.convert.to_hf: bitwise the same weights, and the HF block computes what the layer computes."""
    import transformers

    from moekit.convert import to_hf
    from moekit.parallel import consolidate

    torch.manual_seed(5)
    ref = HFToy().to(torch.float64)
    torch.manual_seed(99)
    plain = consolidate(hf_root, HFToy().to(torch.float64))
    for (n, a), (_, b) in zip(ref.state_dict().items(), plain.state_dict().items()):
        assert torch.equal(a, b), n
    cfg = transformers.MixtralConfig(hidden_size=D, intermediate_size=8, num_local_experts=4, num_experts_per_tok=2)
    block = to_hf(plain.moe, cfg)
    x = torch.randn(2, 3, D, dtype=torch.float64)
    with torch.no_grad():
        out = block(x)
        out = out[0] if isinstance(out, tuple) else out
        assert (out - ref(x)).abs().max() <= 1e-12
