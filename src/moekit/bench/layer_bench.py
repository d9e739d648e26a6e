"""MoE layer time over the dense-floor time (the protocol of docs/benchmarks.md).

For each shape: the dense floor (one SwiGLU FFN with k*F hidden units over all T tokens), moekit's layer, the obvious
per-expert loop, and the Hugging Face Mixtral and Qwen3-MoE blocks in each expert implementation that runs on CPU, all
timed interleaved in one process (a cache sweep before every timed call, rotating order: ``timing.interleaved``).
Decode shapes are memory-bound: their floor is the bytes of the experts actually touched, read once, over the best
memory bandwidth (the larger of a streaming read's and a copy's, ``memory_bandwidth``) measured in each repeat beside
the timed calls; a cold read of just those weights (``read-touched``) is timed beside them as a reference.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from ..experts.bank import DenseFFN, SwiGLU
from ..layer import MoE
from ..routers.topk import TopK
from ..hugepages import to_hugepages
from .timing import Timing, copy_bandwidth, interleaved, read_bandwidth


@dataclass(frozen=True)
class Shape:
    name: str
    T: int
    D: int
    F: int
    E: int
    k: int

    @property
    def decode(self) -> bool:
        return self.T <= 16


SHAPES = {
    s.name: s
    for s in (
        Shape("train-small", 4096, 512, 1024, 8, 2),
        Shape("train-large", 16384, 512, 1024, 8, 2),
        Shape("fine-grained", 4096, 512, 256, 64, 8),
        Shape("decode-1", 1, 1024, 2816, 8, 2),
        Shape("decode-8", 8, 1024, 2816, 8, 2),
    )
}
QUICK = {
    s.name: s
    for s in (
        Shape("quick-train", 256, 64, 128, 8, 2),
        Shape("quick-fine", 256, 64, 32, 16, 4),
        Shape("quick-decode", 4, 128, 256, 8, 2),
    )
}


def per_expert_loop(layer: MoE, x_TD: Tensor) -> Tensor:
    """The obvious implementation: route, then loop over experts with a mask (weights via ``unbind``)."""
    a = layer.router(x_TD)
    K = a.num_slots
    idx_TK = a.expert_N.view(K, -1).t()
    w_TK = a.weight_N.view(K, -1).t()
    out = torch.zeros_like(x_TD)
    bank = layer.experts
    Fh = bank.hidden_dim
    for e, (w13, w2) in enumerate(zip(bank.w13_E2FD.unbind(0), bank.w2_EDF.unbind(0))):
        w1, w3 = w13[:Fh], w13[Fh:]
        tok, slot = torch.where(idx_TK == e)
        if tok.numel() == 0:
            continue
        xe = x_TD[tok]
        ye = (bank.act(xe @ w1.T) * (xe @ w3.T)) @ w2.T
        out = out.index_add(0, tok, ye * w_TK[tok, slot, None])
    return out


def _init_(module: nn.Module) -> nn.Module:
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.02)
    return module


def hf_blocks(shape: Shape, allow_batched: bool) -> dict[str, nn.Module]:
    """HF Mixtral and Qwen3-MoE blocks from configs, one per CPU expert implementation. Empty if transformers is
    missing."""
    try:
        from transformers import MixtralConfig, Qwen3MoeConfig
        from transformers.utils import logging as hf_logging
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock
    except ImportError:
        return {}
    hf_logging.set_verbosity_error()  # standalone experts modules warn about the eager default
    impls = [None, "grouped_mm"] + (["batched_mm"] if allow_batched else [])
    out = {}
    for impl in impls:
        mc = MixtralConfig(hidden_size=shape.D, intermediate_size=shape.F, num_local_experts=shape.E,
                           num_experts_per_tok=shape.k)
        qc = Qwen3MoeConfig(hidden_size=shape.D, moe_intermediate_size=shape.F, num_experts=shape.E,
                            num_experts_per_tok=shape.k, norm_topk_prob=True)
        for cfg in (mc, qc):
            cfg._experts_implementation = impl
        tag = impl or "eager"
        out[f"hf-mixtral-{tag}"] = _init_(MixtralSparseMoeBlock(mc))
        out[f"hf-qwen3moe-{tag}"] = _init_(Qwen3MoeSparseMoeBlock(qc))
    return out


def _hf_call(block: nn.Module) -> Callable[[Tensor], Tensor]:
    def call(x_TD: Tensor) -> Tensor:
        y = block(x_TD.view(1, *x_TD.shape))
        return (y[0] if isinstance(y, tuple) else y).view_as(x_TD)

    return call


def _fwd(m: Callable[[Tensor], Tensor], x: Tensor) -> Callable[[], object]:
    def run():
        with torch.no_grad():
            return m(x)

    return run


def _fwd_bwd(m: Callable[[Tensor], Tensor], x: Tensor) -> Callable[[], object]:
    g = torch.randn_like(x)

    def run():
        xx = x.detach().requires_grad_(True)
        m(xx).backward(g)

    return run


def run_shape(shape: Shape, repeats: int, modes=("fwd", "fwd+bwd"), include_hf: bool = True,
              progress: Callable[[], None] | None = None, dtype: torch.dtype = torch.float32,
              compiled: bool = False, hugepages: bool = False) -> list[dict]:
    """One shape, every implementation interleaved. ``dtype``: parameters and inputs (float32 or bfloat16);
    ``compiled``: add ``torch.compile(moekit layer)`` (inductor, static shapes; compile time is not timed);
    ``hugepages``: every implementation's weights (moekit's, the dense floor's, each HF block's) moved onto
    transparent huge pages (:func:`moekit.hugepages.to_hugepages`), and the memory floor measured on huge-page
    buffers too."""
    torch.manual_seed(0)
    moe = MoE(shape.D, shape.E, router=TopK(k=shape.k), experts=SwiGLU(hidden_dim=shape.F)).to(dtype)
    x_TD = torch.randn(shape.T, shape.D, dtype=dtype)
    x_BSD = x_TD.view(1, shape.T, shape.D)
    impls: dict[str, Callable[[Tensor], Tensor]] = {"moekit": moe}
    if compiled:
        impls["moekit-compiled"] = torch.compile(moe)
    impls["per-expert-loop"] = lambda x: per_expert_loop(moe, x)
    if include_hf:
        # batched_mm copies the expert weights per token: only where that stays small (decode).
        blocks = hf_blocks(shape, allow_batched=shape.T * shape.k * 3 * shape.F * shape.D * 4 < 2**31)
        blocks = {name: b.to(dtype) for name, b in blocks.items()}
        if hugepages:
            for b in blocks.values():
                to_hugepages(b)
        impls.update({name: _hf_call(b) for name, b in blocks.items()})
    if hugepages:
        to_hugepages(moe)
    rows = []
    if shape.decode:
        # decode is inference: every module in eval mode; the layer then takes its fused one-call path
        # (moekit.fused_decode), and "moekit-composed" times the same layer's router/dispatch/experts path
        for m in (moe, *(blocks.values() if include_hf else ())):
            m.eval()
        impls = {"moekit": moe, "moekit-composed": lambda x: moe.forward_with_aux(x).y, **{
            n: f for n, f in impls.items() if n != "moekit"}}
        expert_bytes = 3 * shape.F * shape.D * x_TD.element_size()
        with torch.no_grad():
            touched_bytes = int(moe.router(x_TD).expert_N.unique().numel()) * expert_bytes
        seen: list[float] = []

        def memory_floor() -> float:
            # re-measured in every repeat, beside the timed calls: on a shared machine the bandwidth moves by 30%
            # within a run, and one figure taken at the start would move every ratio with it
            bw, _ = memory_bandwidth(repeats=3, hugepages=hugepages)
            seen.append(bw)
            return touched_bytes / bw

        fns = {name: _fwd(m, x_TD) for name, m in impls.items()}
        fns["read-touched"] = _read_touched(moe, x_TD)
        res = interleaved(fns, memory_floor, repeats, progress=progress)
        bw = statistics.median(seen)
        rows += _rows(shape, "fwd", res, floor_name=f"memory floor (per repeat, best of read and copy; median "
                                                     f"{bw / 1e9:.1f} GB/s, range {min(seen) / 1e9:.1f}-"
                                                     f"{max(seen) / 1e9:.1f})", dtype=dtype)
        return rows
    dense = DenseFFN(shape.D, shape.k * shape.F, SwiGLU()).to(dtype)
    if hugepages:
        to_hugepages(dense)
    all_impls = {"dense-floor": dense, **impls}
    del x_BSD
    for mode in modes:
        make = _fwd if mode == "fwd" else _fwd_bwd
        fns = {name: make(m, x_TD) for name, m in all_impls.items()}
        res = interleaved(fns, "dense-floor", repeats, progress=progress)
        rows += _rows(shape, mode, res, floor_name="dense-floor", dtype=dtype)
    return rows


def _read_touched(moe: MoE, x_TD: Tensor) -> Callable[[], object]:
    """A reference beside the floor: a streaming read (``sum``) of exactly the weights of the experts this input
    touches, under the same cache sweep, i.e. what reading those bytes costs cold, with no arithmetic."""
    with torch.no_grad():
        touched = moe.router(x_TD).expert_N.unique().tolist()
    bank = moe.experts
    weights = [w[e] for e in touched for w in (bank.w_in, bank.w2_EDF)]

    def run():
        for w in weights:
            w.sum()

    return run


def memory_bandwidth(repeats: int = 5, hugepages: bool = False) -> tuple[float, str]:
    """(bytes/s, description): the best of a streaming read (``sum``, bytes read / time) and a copy (bytes read +
    written / time), measured now. A decode step reads each touched expert's weights once and writes almost
    nothing, so the bound on it is the read bandwidth; the copy's figure counts the written bytes too, and where it
    is the larger (write-combining stores) it is the better demonstrated bandwidth. Taking the larger makes the
    floor the stricter one. ``hugepages``: measured on huge-page buffers (as the weights are, when the benchmark
    puts them there)."""
    read = read_bandwidth(repeats=repeats, hugepages=hugepages)
    copy = copy_bandwidth(repeats=repeats, hugepages=hugepages)
    best = max(read, copy)
    return best, f"{best / 1e9:.1f} GB/s: best of read {read / 1e9:.1f}, copy {copy / 1e9:.1f}"


def _rows(shape: Shape, mode: str, res: dict[str, Timing], floor_name: str,
          dtype: torch.dtype = torch.float32) -> list[dict]:
    out = []
    for name, t in res.items():
        out.append({
            "shape": shape.name, "T": shape.T, "D": shape.D, "F": shape.F, "E": shape.E, "k": shape.k,
            "mode": mode, "impl": name, "median_ms": 1e3 * t.median,
            "time_iqr_ms": [1e3 * v for v in t.time_iqr], "ratio": t.ratio, "ratio_iqr": list(t.ratio_iqr),
            "floor": floor_name, "repeats": len(t.times), "dtype": str(dtype).removeprefix("torch."),
            "threads": torch.get_num_threads(),
        })
    return out


def environment() -> dict:
    try:
        import transformers

        tf = transformers.__version__
    except ImportError:
        tf = None
    return {
        "machine": platform.machine(), "processor": platform.processor() or _cpu_name(), "python": sys.version.split()[0],
        "torch": torch.__version__, "transformers": tf, "threads": torch.get_num_threads(),
        "allocator": "tcmalloc" if "tcmalloc" in os.environ.get("LD_PRELOAD", "") else (
            "glibc (tuned thresholds)" if _glibc_tuned() else "glibc"),
    }


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def markdown(rows: list[dict]) -> str:
    lines = ["| shape | dtype | threads | mode | impl | median ms | ratio to floor | ratio IQR |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lo, hi = r["ratio_iqr"]
        lines.append(
            f"| {r['shape']} | {r.get('dtype', 'float32')} | {r.get('threads', '')} | {r['mode']} | {r['impl']} | "
            f"{r['median_ms']:.2f} | {r['ratio']:.3f} | {lo:.3f}-{hi:.3f} |"
        )
    return "\n".join(lines)


def summary(rows: list[dict]) -> str:
    """One line per (shape, dtype, threads, mode): moekit, its composed path (decode: the layer's parts op by op
    instead of the fused call), compiled moekit, the per-expert loop, the best Hugging
    Face block (named) and, at decode, the cold read of the touched weights alone, each as the median ratio to the
    floor (IQR)."""
    groups: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        key = (r["shape"], r.get("dtype", "float32"), r.get("threads", ""), r["mode"])
        groups.setdefault(key, {})[r["impl"]] = r

    def cell(r: dict | None) -> str:
        return "–" if r is None else f"{r['ratio']:.2f} ({r['ratio_iqr'][0]:.2f}-{r['ratio_iqr'][1]:.2f})"

    lines = ["| shape | dtype | threads | mode | floor ms | **moekit** | moekit composed | moekit compiled | "
             "per-expert loop | best HF | read of touched weights |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for (shape, dtype, threads, mode), impls in groups.items():
        hf = {n: r for n, r in impls.items() if n.startswith("hf-")}
        best = min(hf, key=lambda n: hf[n]["ratio"]) if hf else None
        mk = impls.get("moekit")
        floor = impls.get("dense-floor")
        floor_ms = f"{floor['median_ms']:.1f}" if floor else f"memory {mk['median_ms'] / mk['ratio']:.2f}" if mk else "–"
        lines.append(f"| {shape} | {dtype} | {threads} | {mode} | {floor_ms} | **{cell(mk)}** | "
                     f"{cell(impls.get('moekit-composed'))} | {cell(impls.get('moekit-compiled'))} | {cell(impls.get('per-expert-loop'))} | "
                     f"{cell(hf.get(best)) + ' ' + best.removeprefix('hf-') if best else '–'} | "
                     f"{cell(impls.get('read-touched'))} |")
    return "\n".join(lines)


def write_jsonl(path: str, rows: list[dict], env: dict, run: int) -> None:
    with open(path, "a") as f:
        for r in rows:
            f.write(json.dumps({**env, "run": run, **r}) + "\n")


def _glibc_tuned() -> bool:
    from ..allocator import glibc_malloc_tuned

    return glibc_malloc_tuned()
