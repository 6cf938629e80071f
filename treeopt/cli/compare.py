"""``treeopt compare``: expected tokens per step (and, with a latency table, predicted speed)
of several tree shapes under one profile.

Each SHAPE is a growmap file or a shape spec: chain:N (N nodes), kary:KxD, chains:KxL (K
independent chains of L draft tokens), specinfer:E1,E2,..., greedy:N[xD] (Medusa-style
greedy), dp:N[xD] (exact DP optimum of at most N nodes; D = depth in edges),
paths:[[0],[1],[0,0]], parents:[...], or a preset (mc_sim_7b_63). Columns: size (nodes, root included), depth (edges), F = expected
tokens per target forward (bonus token included), under the same rank table `treeopt
search` uses. When the profile holds a latency table: predicted step time = draft time +
t_target(size), tokens/s = 1000 F / step, and speed-up over plain decoding = t_target(1) F /
step (draft cost model: --draft-cost, per-level by default as in every command).

examples:
  treeopt compare --profile profiles/sequoia-reference-l40-7b.json
  treeopt compare --profile my.json chain:8 chains:4x4 dp:64 growmaps/best.pt --plot f.png
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from treeopt.cli import UserError
from treeopt.cli.args import add_height_arguments, height_levels
from treeopt.search.api import load_profile, rank_table
from treeopt.search.dp import depth_for_levels
from treeopt.search.hardware import DEFAULT_DRAFT_COST, DRAFT_COSTS, empty_step_rate, predict
from treeopt.shapes import describe, from_name
from treeopt.viz import expected_vs_size, plot_expected_vs_size

DEFAULT_SHAPES = ["chain:8", "chains:4x4", "kary:2x3", "specinfer:1,1,3,1,1,1,1,1",
                  "mc_sim_7b_63", "greedy:64", "dp:64"]
DEFAULT_MAX_SIZE = 128


def register(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "compare", help="compare tree shapes: tokens per step, predicted speed, plot",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("shapes", nargs="*", metavar="SHAPE",
                        help=f"growmap files or shape specs (default: {' '.join(DEFAULT_SHAPES)})")
    parser.add_argument("--profile", required=True, metavar="PROFILE",
                        help="acceptance profile (.json, may hold a latency table; or Sequoia "
                             "acceptance vector .pt)")
    parser.add_argument("--no-depth-aware", action="store_true",
                        help="ignore per-depth acceptance rows; use the single rank profile")
    parser.add_argument("--draft-cost", choices=DRAFT_COSTS, default=DEFAULT_DRAFT_COST,
                        help="draft cost model for predicted times: per-level = sum of "
                             "t_draft(nodes a level expands), what treeopt's engine runs; "
                             "sequoia = (depth+1) x t_draft(1) (default: %(default)s)")
    parser.add_argument("--plot", metavar="PATH",
                        help="also plot expected tokens per step vs tree size for the DP "
                             "optimum, Medusa greedy, chain, best KxL and k-ary trees, with "
                             "the compared shapes marked (.png/.svg/.pdf)")
    parser.add_argument("--max-size", type=int, default=None, metavar="N",
                        help="largest tree size on the plot (default: the largest compared "
                             f"shape, at least {DEFAULT_MAX_SIZE})")
    add_height_arguments(parser, None, "the plot's curves")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    levels = height_levels(args)
    profile = load_profile(args.profile)
    table = rank_table(profile, depth_aware=not args.no_depth_aware)
    specs = args.shapes or DEFAULT_SHAPES
    rows = []
    for spec in specs:
        tree = from_name(spec, table)
        rows.append(evaluate(describe(spec), tree, table, profile.latency, args.draft_cost,
                             empty_step_rate(profile)))
    print(format_table(rows, has_latency=profile.latency is not None))
    if profile.latency is None:
        print("(no latency table in the profile: run `treeopt profile` to add one for "
              "predicted speed)")
    if args.plot:
        largest = max(r["size"] for r in rows)
        max_size = args.max_size or max(DEFAULT_MAX_SIZE, largest)
        if max_size < 2:
            raise UserError("--max-size must be at least 2")
        depth = depth_for_levels(levels) if levels is not None else None
        sizes = plot_sizes(max_size)
        curves = expected_vs_size(table, sizes, max_depth=depth)
        points = {r["shape"]: (r["size"], r["expected_tokens"]) for r in rows
                  if r["size"] <= max_size}
        name = Path(args.profile).name
        path = plot_expected_vs_size(table, sizes, args.plot, max_depth=depth, curves=curves,
                                     points=points,
                                     title=f"Expected tokens per step vs tree size ({name})")
        print(f"wrote {path}")
    return 0


def evaluate(name: str, tree, table, latency, draft_cost: str = DEFAULT_DRAFT_COST,
             empty_rate: float = 0.0) -> dict:
    """One table row: shape, size, depth, expected tokens and, with latency, predictions."""
    row = {"shape": name, "size": tree.size, "depth": tree.depth,
           "expected_tokens": tree.expected_tokens(table)}
    if latency is not None:
        pred = predict(tree, table, latency, draft_cost=draft_cost, empty_rate=empty_rate)
        row.update(step_ms=pred.step_ms, tokens_per_s=pred.tokens_per_s, speedup=pred.speedup)
    return row


def format_table(rows: list[dict], has_latency: bool) -> str:
    cols = [("shape", "shape", "{}"), ("size", "size", "{}"), ("depth", "depth", "{}"),
            ("expected_tokens", "tokens/step", "{:.4f}")]
    if has_latency:
        cols += [("step_ms", "step ms", "{:.2f}"), ("tokens_per_s", "tokens/s", "{:.1f}"),
                 ("speedup", "speed-up", "{:.2f}x")]
    cells = [[fmt.format(r[key]) for key, _, fmt in cols] for r in rows]
    widths = [max(len(title), *(len(c[i]) for c in cells)) for i, (_, title, _) in enumerate(cols)]
    lines = ["  ".join(title.ljust(w) if i == 0 else title.rjust(w)
                       for i, ((_, title, _), w) in enumerate(zip(cols, widths)))]
    lines.append("  ".join("-" * w for w in widths))
    for c in cells:
        lines.append("  ".join(v.ljust(w) if i == 0 else v.rjust(w)
                               for i, (v, w) in enumerate(zip(c, widths))))
    return "\n".join(lines)


def plot_sizes(max_size: int, points: int = 40) -> list[int]:
    """About ``points`` sizes from 1 to ``max_size``, evenly spaced on a log axis."""
    step = math.log(max_size) / (points - 1)
    return sorted({max(1, min(max_size, round(math.exp(i * step)))) for i in range(points)}
                  | {max_size})
