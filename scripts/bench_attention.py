"""Tree attention vs per-branch attention on CPU with the default grid; prints the table.

Usage: python scripts/bench_attention.py [--out DIR] [extra `treeopt bench attention` options]
"""

import sys

import torch

from treeopt.cli import main

if __name__ == "__main__":
    torch.set_num_threads(1)
    sys.exit(main(["bench", "attention", "--device", "cpu", *sys.argv[1:]]))
