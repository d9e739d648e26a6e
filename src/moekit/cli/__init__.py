"""The ``moekit`` command. Each subcommand is a module in this package with ``add_arguments(parser)`` and
``run(args) -> int``; modules are imported only when their command runs, so ``moekit --help`` stays fast."""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help). Add a command by adding a module and a line here.
COMMANDS: dict[str, tuple[str, str]] = {
    "robustqa": ("moekit.cli.robustqa", "Robust QA recipe: Switch-upcycled MiniLM vs dense, in-domain and held-out domain"),
    "demo": ("moekit.cli.demo", "train a multi-task MoE ViT and a dense ViT on bundled digits; report accuracy, FLOPs, pathways"),
    "bench": ("moekit.cli.bench", "benchmark MoE layers against the dense floor and Hugging Face blocks"),
    "compare": ("moekit.cli.compare", "train one small model with several routers and tabulate quality, FLOPs, balance"),
    "train-ep": ("moekit.cli.train_ep", "train a small MoE with expert x data parallelism (run under torchrun)"),
    "train-lm": ("moekit.cli.train_lm", "train an MoE LM + dense baseline on Bible/Wikipedia/code; save as Qwen3-MoE"),
    "generate": ("moekit.cli.generate", "generate from an HF MoE checkpoint with experts on disk under a memory budget"),
    "compress": ("moekit.cli.compress", "prune or merge experts of an HF MoE checkpoint into a smaller checkpoint"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moekit", description="Mixture-of-Experts toolkit for PyTorch")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(_module=module)
        importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return int(importlib.import_module(args._module).run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
