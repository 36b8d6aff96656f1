"""The zoo matrix: every zoo workload × torch-cpu, fp16, bf16, tvm-llvm through spawned workers.

Writes docs/zoo-matrix.md and docs/zoo-matrix.json. Usage: python benchmarks/zoo.py [--only a,b] [--targets ...]
(the same as `tapml zoo --matrix -o docs`).
"""

import sys

from tapml.cli import main

if __name__ == "__main__":
    sys.exit(main(["zoo", "--matrix", "-o", "docs", *sys.argv[1:]]))
