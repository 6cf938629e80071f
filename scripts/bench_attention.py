"""Tree attention vs per-branch attention on CPU with the default grid; prints the table.

Usage: python scripts/bench_attention.py [--tiny] [--out DIR] [extra `treeopt bench attention`
options]. ``--tiny`` runs a seconds-long grid (batch 1, context 8, trees of 4 and 8 nodes, 2
heads of dimension 4, 2 repeats) that checks the script works; options given after it win.
"""

from __future__ import annotations

import sys

TINY = ["--batch", "1", "--context", "8", "--tree-sizes", "4,8", "--heads", "2",
        "--head-dim", "4", "--repeats", "2", "--warmup", "1"]


def main(argv=None) -> int:
    import torch

    from treeopt.cli import main as cli

    args = list(sys.argv[1:] if argv is None else argv)
    if "--tiny" in args:
        args.remove("--tiny")
        args = TINY + args
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return cli(["bench", "attention", "--device", "cpu", *args])
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    sys.exit(main())
