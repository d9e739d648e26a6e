"""Script form of ``moekit bench`` (same arguments): python benchmarks/bench_layer.py --help"""

import sys

from moekit.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
