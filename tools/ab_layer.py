"""A/B the moekit layer at two source trees, interleaved in one process (the no-regression check for refactors).

    python tools/ab_layer.py OLD_SRC NEW_SRC [--repeats 15] [--threads 2]

Each tree's ``moekit`` is imported in turn under its own name (the modules of the first are moved aside before the
second is imported), both layers are built from the same seed, their outputs are checked equal, and then both are
timed with the same harness (``moekit.bench.timing.interleaved`` from NEW_SRC: cache sweep, rotating order) on the
``moekit bench`` shapes, forward and forward+backward. Prints new/old time ratios (median and IQR).
"""

from __future__ import annotations

import argparse
import importlib
import sys

import torch


def _load(src: str):
    for name in [m for m in sys.modules if m == "moekit" or m.startswith("moekit.")]:
        del sys.modules[name]
    sys.path.insert(0, src)
    try:
        mk = importlib.import_module("moekit")
        for sub in ("moekit.layer", "moekit.routers", "moekit.experts", "moekit.bench.timing",
                    "moekit.bench.layer_bench"):
            importlib.import_module(sub)
        mods = {m: sys.modules[m] for m in sys.modules if m == "moekit" or m.startswith("moekit.")}
    finally:
        sys.path.remove(src)
    return mk, mods


def _aten_ops(fn) -> int:
    """aten ops one call runs (profiler events whose name starts with ``aten::``, nested ones included)."""
    from torch.profiler import profile

    fn()
    with profile() as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key.startswith("aten::"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("old")
    p.add_argument("new")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--shapes", nargs="*", default=None)
    p.add_argument("--ops", action="store_true", help="count the aten ops of one call instead of timing")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    trees = {}
    for tag, src in (("old", a.old), ("new", a.new)):
        mk, mods = _load(src)
        trees[tag] = mods
    importlib.import_module("moekit.allocator").tune_glibc_malloc()  # as ``moekit bench`` does by default
    bench = trees["new"]["moekit.bench.layer_bench"]
    timing = trees["new"]["moekit.bench.timing"]
    shapes = a.shapes or list(bench.SHAPES)
    print(f"torch {torch.__version__}, {a.threads} threads, {a.repeats} repeats")
    print("| shape | mode | new/old median | IQR |")
    print("|---|---|---|---|")
    for shape in (bench.SHAPES[n] for n in shapes):
        layers = {}
        for tag, mods in trees.items():
            torch.manual_seed(0)
            MoE = mods["moekit.layer"].MoE
            TopK = mods["moekit.routers"].TopK
            SwiGLU = mods["moekit.experts"].SwiGLU
            layers[tag] = MoE(shape.D, shape.E, router=TopK(k=shape.k), experts=SwiGLU(hidden_dim=shape.F))
        x_TD = torch.randn(shape.T, shape.D)
        with torch.no_grad():
            diff = (layers["old"](x_TD) - layers["new"](x_TD)).abs().max().item()
        assert diff <= 1e-5, f"{shape.name}: old and new layers disagree by {diff}"
        modes = ("fwd",) if shape.decode else ("fwd", "fwd+bwd")
        for mode in modes:
            make = bench._fwd if mode == "fwd" else bench._fwd_bwd
            fns = {tag: make(m, x_TD) for tag, m in layers.items()}
            if a.ops:
                counts = {tag: _aten_ops(fn) for tag, fn in fns.items()}
                print(f"| {shape.name} | {mode} | aten ops: old {counts['old']}, new {counts['new']} | |", flush=True)
                continue
            res = timing.interleaved(fns, "old", a.repeats)
            lo, hi = res["new"].ratio_iqr
            print(f"| {shape.name} | {mode} | {res['new'].ratio:.3f} | {lo:.3f}-{hi:.3f} |", flush=True)


if __name__ == "__main__":
    main()
