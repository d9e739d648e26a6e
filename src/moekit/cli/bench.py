"""``moekit bench``: MoE layer time over the dense floor, in one run with the per-expert loop and the HF blocks."""

from __future__ import annotations

import os
import sys

from ._validate import out_file, positive_int

TCMALLOC = "/usr/lib/x86_64-linux-gnu/libtcmalloc.so.4"


def add_arguments(parser) -> None:
    parser.add_argument("--shapes", nargs="*", default=None,
                        help="shape names (default: all of train-small train-large fine-grained decode-1 decode-8)")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, few repeats (a smoke run)")
    parser.add_argument("--repeats", type=positive_int, default=None, help="timed repeats per implementation (default 15)")
    parser.add_argument("--runs", type=positive_int, default=1, help="run the whole table this many times (spread check)")
    parser.add_argument("--threads", type=positive_int, nargs="+", default=[2],
                        help="torch.set_num_threads; several values give a thread-scaling table (e.g. 1 2)")
    parser.add_argument("--dtype", nargs="+", default=["float32"], choices=["float32", "bfloat16"],
                        help="parameter and input dtype(s)")
    parser.add_argument("--compile", action="store_true",
                        help="also time torch.compile(moekit layer) (inductor; compile time not timed)")
    parser.add_argument("--no-hf", action="store_true", help="skip the Hugging Face blocks")
    parser.add_argument("--modes", nargs="*", default=["fwd", "fwd+bwd"], choices=["fwd", "fwd+bwd"])
    parser.add_argument("--out", type=out_file, default=None, help="append JSON lines here (default: print only)")
    parser.add_argument("--no-tcmalloc", action="store_true",
                        help="do not re-run under tcmalloc even if it is installed (glibc malloc makes floors noisy)")
    parser.add_argument("--no-tune-malloc", action="store_true",
                        help="leave glibc malloc's mmap/trim thresholds at their defaults (by default they are raised "
                             "with moekit.allocator.tune_glibc_malloc, so large buffers are reused instead of "
                             "page-faulted on every call)")
    parser.add_argument("--no-hugepages", action="store_true",
                        help="leave every implementation's weights on ordinary 4 KiB pages (by default they are moved "
                             "onto transparent huge pages with moekit.hugepages.to_hugepages where the kernel offers "
                             "them, and the memory floor is measured on huge pages too)")


def _maybe_reexec_with_tcmalloc(args) -> None:
    if args.no_tcmalloc or "tcmalloc" in os.environ.get("LD_PRELOAD", "") or not os.path.exists(TCMALLOC):
        return
    env = dict(os.environ, LD_PRELOAD=TCMALLOC)
    os.execve(sys.executable, [sys.executable, "-m", "moekit", *sys.argv[1:]], env)


def run(args) -> int:
    _maybe_reexec_with_tcmalloc(args)
    if not args.no_tune_malloc and "tcmalloc" not in os.environ.get("LD_PRELOAD", ""):
        from moekit.allocator import tune_glibc_malloc

        tune_glibc_malloc()
    import torch

    from moekit.bench import layer_bench as lb

    bad = [t for t in args.threads if t < 1]
    if bad or (args.repeats is not None and args.repeats < 1) or args.runs < 1:
        raise SystemExit(f"moekit bench: --threads, --repeats and --runs must be >= 1, got threads={args.threads}, "
                         f"repeats={args.repeats}, runs={args.runs}")
    torch.set_num_threads(args.threads[0])
    table = lb.QUICK if args.quick else lb.SHAPES
    names = args.shapes or list(table)
    unknown = [n for n in names if n not in table]
    if unknown:
        raise SystemExit(f"moekit bench: unknown shape(s) {unknown}; valid: {', '.join(table)}")
    repeats = args.repeats or (3 if args.quick else 15)
    from moekit import hugepages

    huge = not args.no_hugepages and hugepages.available()
    env = lb.environment()
    env["hugepages"] = f"weights on transparent huge pages (THP {hugepages.thp_mode()})" if huge else "off"
    print(f"moekit bench: torch {env['torch']}, transformers {env['transformers']}, threads {env['threads']}, "
          f"allocator {env['allocator']}, weights: {env['hugepages']}, cpu {env['processor']}")
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    for run_i in range(args.runs):
        rows = []
        for threads in args.threads:
            torch.set_num_threads(threads)
            for dtype in args.dtype:
                for name in names:
                    shape = table[name]
                    bar = tqdm(total=repeats * (1 if shape.decode else len(args.modes)),
                               desc=f"run {run_i + 1} {name} {dtype} {threads}t", leave=False,
                               file=sys.stderr) if tqdm else None
                    rows += lb.run_shape(shape, repeats, modes=tuple(args.modes), include_hf=not args.no_hf,
                                         progress=bar.update if bar else None, dtype=getattr(torch, dtype),
                                         compiled=args.compile, hugepages=huge)
                    if bar:
                        bar.close()
        print(f"\n## run {run_i + 1}\n")
        print(lb.markdown(rows))
        print(f"\n## run {run_i + 1}: summary (ratio to the floor, median (IQR))\n")
        print(lb.summary(rows))
        if args.out:
            lb.write_jsonl(args.out, rows, env, run_i + 1)
    return 0
