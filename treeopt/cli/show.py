"""``treeopt show``: summarise a tree, print it in other tools' formats, or draw it.

The tree is a growmap file (.pt from treeopt or Sequoia, or .json) or any shape spec
(chain:8, kary:2x3, chains:4x5, specinfer:1,1,3,1, mc_sim_7b_63, greedy:64 with --profile, ...).
Always prints one summary line (size, depth, width, leaves, and F = expected tokens per step
when a profile is given). For a growmap file whose metadata records how it was made, the
line ends with what was recorded: the profile it was searched or scored with, the expected
tokens per step under that profile, and the method and budget (a recorded F is the one under
the recorded profile; with --profile both are shown).

examples:
  treeopt show growmaps/best.pt --profile profiles/sequoia-reference.json --out tree.png
  treeopt show mc_sim_7b_63 --format parents
  treeopt show growmaps/best.pt --format choices      # paste into Medusa/EAGLE configs
"""

from __future__ import annotations

import argparse
import json

from treeopt.cli import UserError
from treeopt.growmap import load_growmap
from treeopt.search.api import load_profile, rank_table
from treeopt.shapes import describe, from_name, is_file_spec
from treeopt.viz import SUFFIXES, draw_tree, tree_summary

FORMATS = ("summary", "choices", "parents", "paths", "successors")


def register(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "show", help="summarise, print or draw a tree (growmap file or shape spec)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("tree", metavar="GROWMAP",
                        help="growmap file (.pt/.json) or shape spec such as chain:8")
    parser.add_argument("--out", metavar="PATH",
                        help="draw the tree to PATH: .png, .svg, .pdf, or .dot (graphviz text)")
    parser.add_argument("--profile", metavar="PROFILE",
                        help="acceptance profile (.json or Sequoia .pt): adds F to the summary "
                             "and colours nodes by the probability of being reached")
    parser.add_argument("--title", help="title line for the picture (default: the tree's name)")
    parser.add_argument("--format", choices=FORMATS, default="summary",
                        help="also print the tree: choices = Medusa/EAGLE rank paths (0-based), "
                             "parents = parent array, paths = one node per line with depth, "
                             "rank path and P(reached), successors = Sequoia's Successors "
                             "(default: summary only)")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    if args.out and "." + args.out.lower().rsplit(".", 1)[-1] not in SUFFIXES:
        raise UserError(f"--out {args.out}: use a .png, .svg, .pdf or .dot file")
    # the rank table `treeopt search` and `compare` use for this profile
    table = rank_table(load_profile(args.profile)) if args.profile else None
    meta: dict = {}
    if is_file_spec(args.tree):
        tree, meta = load_growmap(args.tree)
    else:
        tree = from_name(args.tree, table)
    name = describe(args.tree)
    print(f"{name}: {tree_summary(tree, table)}{recorded(meta)}")
    if args.format == "choices":
        print(json.dumps(tree.to_choices()))
    elif args.format == "parents":
        print(json.dumps(tree.to_parents()))
    elif args.format == "successors":
        print(json.dumps(tree.to_successors()))
    elif args.format == "paths":
        probs = tree.path_probs(table) if table is not None else None
        header = f"{'node':>5} {'depth':>5}  path"
        print(header + ("  P(reached)" if probs is not None else ""))
        paths = [()] + tree.to_paths()
        for n, path in enumerate(paths):
            line = f"{n:>5} {tree.depths[n]:>5}  {list(path)}"
            print(line + (f"  {probs[n]:.6f}" if probs is not None else ""))
    if args.out:
        path = draw_tree(tree, args.out, profile=table, title=args.title or name)
        print(f"wrote {path}")
    return 0


def recorded(meta: dict) -> str:
    """``"; recorded: F = 3.4753 tokens/step under p.json (dp, budget 64)"`` from a growmap's
    metadata, or "" when it records none of that. Only plain values are shown (the loader
    has checked the metadata is plain and small); anything odd is skipped, never an error."""
    if not isinstance(meta, dict):
        return ""
    parts = []
    f = meta.get("expected_tokens")
    prof = meta.get("profile")
    if _number(f):
        parts.append(f"F = {float(f):.4f} tokens/step")
    if isinstance(prof, str) and prof:
        parts.append(f"under {_short(prof)}" if parts else f"profile {_short(prof)}")
    how = []
    if isinstance(meta.get("method"), str):
        how.append(_short(meta["method"]))
    if _number(meta.get("budget")):
        how.append(f"budget {meta['budget']}")
    if _number(meta.get("predicted_speedup")):
        how.append(f"predicted speed-up {float(meta['predicted_speedup']):.2f}x")
    if how:
        parts.append(f"({', '.join(how)})")
    return f"; recorded: {' '.join(parts)}" if parts else ""


def _number(x) -> bool:
    import math

    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return False
    try:
        return math.isfinite(float(x))
    except OverflowError:
        return False


def _short(text: str) -> str:
    text = " ".join(text.split())  # one line, whatever the file holds
    return text if len(text) <= 80 else text[:77] + "..."
