"""``treeopt search``: find the tree shape with the most tokens per step (or per second).

Fixed size (``--budget N``): the exact DP's best tree of N nodes (or at most N with
``--at-most``). No ``--budget`` and a latency table in the profile: the hardware-aware choice
of size and depth (``treeopt.search.hardware``). ``--method optuna`` hands over to
``treeopt.search.optuna_search`` when that module is installed.

Limits: --budget, --max-size and --max-depth are at most MAX_TREE_NODES (treeopt.limits); the
default --max-size (the largest latency point) is clamped to it. Every output path (--out,
--picture, --table) is checked before the search runs: a known suffix, and no input or file of
another kind in the way.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
from pathlib import Path

from treeopt.cli import UserError
from treeopt.limits import MAX_TREE_LEVELS, MAX_TREE_NODES, check_nodes

DEFAULT_MAX_DEPTH = 12
DEFAULT_MAX_SIZE = 128
OPTUNA_MODULE = "treeopt.search.optuna_search"

DEPTH_HELP = ("depth limit in LEVELS COUNTING THE ROOT, as Sequoia's max_depth: trees get at "
              "most D-1 edges, a chain of N nodes needs D = N (default %(default)s)")


def register(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "search", help="find the optimal tree shape for a profile (exact DP)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    if importlib.util.find_spec(OPTUNA_MODULE) is not None:
        module = importlib.import_module(OPTUNA_MODULE)
        if hasattr(module, "add_arguments"):
            module.add_arguments(parser)
    parser.set_defaults(func=run)
    return parser


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The DP's arguments (``--method optuna`` adds its own through its module's hook)."""
    parser.add_argument("--method", choices=["dp", "optuna"], default="dp",
                        help="search method (default: dp, exact)")
    parser.add_argument("--profile", required=True, metavar="PROFILE",
                        help="acceptance profile: treeopt .json (may hold a latency table) or "
                             "Sequoia acceptance vector .pt [0, p1..pW, none]")
    parser.add_argument("--budget", type=int, metavar="N",
                        help="tree size in nodes, root included (fixed size; without it the "
                             "profile's latency table picks size and depth)")
    parser.add_argument("--max-depth", type=int, default=DEFAULT_MAX_DEPTH, metavar="D",
                        help=DEPTH_HELP)
    parser.add_argument("--at-most", action="store_true",
                        help="with --budget: best tree of at most N nodes instead of exactly N")
    parser.add_argument("--no-depth-aware", action="store_true",
                        help="ignore per-depth acceptance rows; use the single rank profile")
    parser.add_argument("--draft-cost", choices=["sequoia", "per-level"], default="sequoia",
                        help="draft cost model: sequoia = levels x t_draft(1) (exact search); "
                             "per-level = sum of t_draft(level width) (scored on DP trees)")
    parser.add_argument("--max-size", type=int, metavar="N",
                        help="largest size the hardware-aware sweep considers (default: the "
                             f"largest measured latency point, else {DEFAULT_MAX_SIZE})")
    parser.add_argument("--out", metavar="PATH",
                        help="growmap to write, .pt (Sequoia) or .json (default: "
                             "growmaps/<profile>-dp-n<size>.pt)")
    parser.add_argument("--picture", metavar="PATH",
                        help="also draw the tree (.png/.svg/.pdf/.dot)")
    parser.add_argument("--table", metavar="CSV",
                        help="also write F*(m, l) for every size m and level limit l as CSV")


def check_limits(args: argparse.Namespace) -> None:
    """The numbers the user typed, against the one tree-size cap (before any work)."""
    if args.budget is not None:
        if args.budget < 1:
            raise UserError(f"--budget must be at least 1 node (the root), got {args.budget}")
        check_nodes(args.budget, "--budget", UserError)
    if args.max_size is not None:
        if args.max_size < 1:
            raise UserError(f"--max-size must be at least 1, got {args.max_size}")
        check_nodes(args.max_size, "--max-size", UserError)
    if args.max_depth < 1:
        raise UserError(f"--max-depth must be at least 1 level (the root), got {args.max_depth}")
    if args.max_depth > MAX_TREE_LEVELS:
        raise UserError(f"--max-depth = {args.max_depth} exceeds the limit of "
                        f"{MAX_TREE_LEVELS} levels (a tree of at most {MAX_TREE_NODES} nodes, "
                        "MAX_TREE_NODES, has no more)")


def check_outputs(args: argparse.Namespace) -> None:
    """Every output path, before the search: known suffixes, no input overwritten, no file
    of another kind replaced (the growmap check lives in ``treeopt.growmap``)."""
    from treeopt.growmap import check_writable
    from treeopt.viz import SUFFIXES

    inputs = {_same(args.profile): "--profile"}
    outs = []
    if args.out:
        outs.append(("--out", args.out))
    if args.picture:
        if Path(args.picture).suffix.lower() not in SUFFIXES:
            raise UserError(f"--picture {args.picture}: unknown picture format "
                            f"{Path(args.picture).suffix!r}; use one of {', '.join(SUFFIXES)}")
        outs.append(("--picture", args.picture))
    if args.table:
        if Path(args.table).suffix.lower() != ".csv":
            raise UserError(f"--table {args.table}: the table is CSV; give a .csv path")
        outs.append(("--table", args.table))
    for flag, path in outs:
        key = _same(path)
        if key in inputs:
            raise UserError(f"{flag} {path} is also {inputs[key]}; refusing to overwrite it")
        inputs[key] = flag
    if args.out:
        check_writable(args.out)


def _same(path: str | Path) -> str:
    """A key equal for two spellings of the same file."""
    return str(Path(path).expanduser().resolve())


def run(args: argparse.Namespace) -> int:
    check_limits(args)
    if args.method == "optuna":
        if importlib.util.find_spec(OPTUNA_MODULE) is None:
            raise UserError("the optuna method is not installed in this version; use --method dp")
        return int(importlib.import_module(OPTUNA_MODULE).run_cli(args) or 0)

    from treeopt.growmap import save_growmap
    from treeopt.profile import Profile
    from treeopt.search.dp import solve
    from treeopt.search.hardware import choose, empty_step_rate, predict

    check_outputs(args)
    profile = Profile.load(args.profile)
    table_p = profile.table(depth_aware=not args.no_depth_aware)
    depth_aware = len(table_p) > 1
    latency = profile.latency
    empty = empty_step_rate(profile)

    if args.budget is not None:
        table = solve(table_p, args.budget, args.max_depth)
        size = table.best_size(args.budget, args.max_depth) if args.at_most else args.budget
        tree = table.tree(size, args.max_depth)
        depth_limit = args.max_depth
        expected = table.value(size, depth_limit)
        pred = predict(tree, table_p, latency, args.draft_cost,
                       empty) if latency is not None else None
        mode = "fixed budget"
    else:
        if latency is None:
            raise UserError(f"{args.profile} has no latency table: give --budget N for a fixed "
                            "size, or add latency to the profile (treeopt profile)")
        # default: the largest measured point, clamped to the tree-size cap (a latency point
        # at 10^7 tokens must not make the sweep 10^7 nodes wide)
        max_size = args.max_size or min(max(
            [int(t) for t in latency.target.tokens] or [DEFAULT_MAX_SIZE]), MAX_TREE_NODES)
        table = solve(table_p, max_size, args.max_depth)
        choice = choose(table_p, latency, max_size, args.max_depth, args.draft_cost, table=table,
                        empty_rate=empty)
        size, depth_limit, tree = choice.size, choice.depth, choice.tree
        expected = choice.expected_tokens
        pred = predict(tree, table_p, latency, args.draft_cost, empty)
        mode = f"hardware-aware (sizes 1..{max_size}, levels 1..{args.max_depth})"

    out = Path(args.out) if args.out else (
        Path("growmaps") / f"{Path(args.profile).stem}-dp-n{size}.pt")
    if not args.out and _same(out) == _same(args.profile):
        raise UserError(f"the default output {out} is the --profile file; give --out")
    meta = {"method": "dp", "profile": str(args.profile), "expected_tokens": expected,
            "budget": size, "depth": depth_limit, "depth_convention": "levels incl. root",
            "tree_depth": tree.depth, "at_most": bool(args.at_most),
            "depth_aware": depth_aware, "mode": mode}
    if pred is not None:
        meta.update({"draft_cost": args.draft_cost, "predicted_step_ms": pred.step_ms,
                     "predicted_tokens_per_s": pred.tokens_per_s,
                     "predicted_speedup": pred.speedup})
    saved = save_growmap(tree, out, meta)

    print(f"search dp, {mode}: size {tree.size}, depth {tree.depth} edges "
          f"({tree.depth + 1} levels; limit {depth_limit}), width {tree.width}, "
          f"{'depth-aware' if depth_aware else 'rank'} profile")
    print(f"expected tokens per step: {expected:.6f}")
    if pred is not None:
        print(f"predicted step {pred.step_ms:.3f} ms (draft {pred.draft_ms:.3f} + verify "
              f"{pred.verify_ms:.3f}), {pred.tokens_per_s:.1f} tokens/s, speed-up "
              f"{pred.speedup:.2f}x over plain decoding ({pred.plain_ms:.3f} ms/token; "
              f"draft cost {args.draft_cost})")
    if args.budget is None:
        print("candidates (best depth per size):  size levels   F      step_ms  tok/s  speedup")
        for c in choice.candidates:
            mark = " *" if c["size"] == size and c["depth"] == depth_limit else ""
            print(f"  {c['size']:>33} {c['depth']:>6} {c['F']:7.4f} {c['step_ms']:8.3f} "
                  f"{c['tokens_per_s']:7.1f} {c['speedup']:6.2f}{mark}")
    print(f"growmap: {saved}")
    if args.table:
        print(f"table: {write_table(table.values, args.table)}")
    if args.picture:
        from treeopt.viz import draw_tree

        pic = draw_tree(tree, args.picture, profile=profile,
                        title=f"treeopt search dp: {Path(args.profile).name}")
        print(f"picture: {pic}")
    return 0


def write_table(values, path: str | Path) -> Path:
    """CSV of ``values[m, l]`` (F*(m, l)): one row per size m >= 1, one column per level
    limit l >= 1; empty cells where no tree exists."""
    import math

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = ["size," + ",".join(f"levels_{l}" for l in range(1, values.shape[1]))]
    for m in range(1, values.shape[0]):
        cells = ("" if math.isinf(v) else f"{v:.9g}" for v in values[m, 1:])
        rows.append(f"{m}," + ",".join(cells))
    path.write_text("\n".join(rows) + "\n")
    return path
