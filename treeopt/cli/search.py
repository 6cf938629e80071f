"""treeopt search: find the tree shape with the most tokens per step (or per second).

Fixed size (--budget N): the exact DP's best tree of N nodes (or at most N with --at-most).
No --budget and a latency table in the profile: the hardware-aware choice of size and height,
over every size up to --max-size or only the measured ones (--measured-sizes-only).
--method optuna: an Optuna search seeded with the DP's trees, for objectives the DP cannot
model (measured or replayed decoding); several workers may share one --storage, and a trial
whose worker was killed is marked failed (and its tree retried) by the next worker.
--family topk-per-level|uniform-per-level (or --engine sglang|eagle|vllm), with --budget: the
best tree a serving engine can draft, its F against the unconstrained optimum, and the
`treeopt export` command that writes the engine's settings.

Units: sizes count nodes, root included. Height: --max-levels L counts levels with the root
(Sequoia's max_depth; a chain of N nodes needs N levels), --max-depth D counts edges
(D = L - 1); the default is 12 levels. Draft cost: per-level (what treeopt's engine runs;
the default of every command) or sequoia.

Limits: --budget, --max-size and the height are at most MAX_TREE_NODES, the tree-size cap;
the default --max-size (the largest latency point) is clamped to it. Every output path (--out,
--picture, --table) is checked before the search runs: a known suffix, and no input or file of
another kind in the way.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from treeopt.cli import UserError
from treeopt.cli.args import add_height_arguments, height_levels, print_treeset
from treeopt.errors import TreeoptError
from treeopt.export import ENGINES
from treeopt.growmap import check_writable, save_growmap
from treeopt.limits import check_nodes
from treeopt.profile.model import contexts_of
from treeopt.search.api import (
    ReplaySettings,
    SearchSettings,
    load_profile,
    optuna_size_limit,
    optuna_tree,
    rank_table,
    search_tree,
)
from treeopt.search.family import (
    FAMILIES,
    FAMILY_ENGINES,
    TOPK,
    UNIFORM,
    family_meta,
    search_family,
)
from treeopt.search.hardware import DEFAULT_DRAFT_COST, DEFAULT_MAX_LEVELS, DRAFT_COSTS
from treeopt.search.optuna_search import OptunaSettings
from treeopt.treeset import check_writable as check_treeset, save_treeset
from treeopt.viz import SUFFIXES, draw_tree

OBJECTIVES = ("model", "replay", "engine")
METRICS = ("tokens", "speed")


def register(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "search", help="find the optimal tree shape for a profile (exact DP or Optuna)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    add_optuna_arguments(parser)
    add_family_arguments(parser)
    parser.set_defaults(func=run)
    return parser


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The DP's arguments (shared with ``--method optuna``)."""
    parser.add_argument("--method", choices=["dp", "optuna"], default="dp",
                        help="search method (default: dp, exact)")
    parser.add_argument("--profile", required=True, metavar="PROFILE",
                        help="acceptance profile: treeopt .json (may hold a latency table) or "
                             "Sequoia acceptance vector .pt [0, p1..pW, none]")
    parser.add_argument("--budget", type=int, metavar="N",
                        help="tree size in nodes, root included (fixed size; without it the "
                             "profile's latency table picks size and height)")
    add_height_arguments(parser, DEFAULT_MAX_LEVELS, "the tree")
    parser.add_argument("--at-most", action="store_true",
                        help="with --budget: best tree of at most N nodes instead of exactly N")
    parser.add_argument("--no-depth-aware", action="store_true",
                        help="ignore per-depth acceptance rows; use the single rank profile")
    parser.add_argument("--draft-cost", choices=DRAFT_COSTS, default=DEFAULT_DRAFT_COST,
                        help="draft cost model: per-level = sum of t_draft(nodes a level "
                             "expands), what treeopt's engine runs (scored on the DP's trees); "
                             "sequoia = levels x t_draft(1), Sequoia's (searched exactly) "
                             "(default %(default)s)")
    parser.add_argument("--max-size", type=int, metavar="N",
                        help="largest size the hardware-aware sweep considers (default: the "
                             "largest measured latency point, at most MAX_TREE_NODES)")
    parser.add_argument("--measured-sizes-only", action="store_true",
                        help="choose the tree size among the latency table's measured sizes "
                             "only, as Sequoia's valid_budget does, instead of every size up "
                             "to --max-size (whose costs are interpolated between them)")
    parser.add_argument("--context", type=int, metavar="N",
                        help="price every cost at N cached tokens (a latency table measured at "
                             "several contexts is interpolated between them). Default: the "
                             "table's context; with several, one tree per context range, "
                             "written as a tree set (.json) that decoding applies per prompt")
    parser.add_argument("--out", metavar="PATH",
                        help="growmap to write, .pt (Sequoia) or .json (default: "
                             "growmaps/<profile>-dp-n<size>.pt); a tree set .json (default "
                             "growmaps/<profile>-dp-treeset.json) when the latency table has "
                             "several contexts and neither --budget nor --context is given")
    parser.add_argument("--picture", metavar="PATH",
                        help="also draw the tree (.png/.svg/.pdf/.dot)")
    parser.add_argument("--table", metavar="CSV",
                        help="also write F*(m, l) for every size m and level limit l as CSV")


def add_optuna_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``--method optuna`` (``treeopt.pipeline.optuna_tree``)."""
    g = parser.add_argument_group("optuna (--method optuna)")
    g.add_argument("--objective", choices=OBJECTIVES, default="model",
                   help="model: profile's F or predicted tokens/s; replay: recorded greedy "
                        "traces of held-out prompts; engine: measured decoding (default model)")
    g.add_argument("--metric", choices=METRICS,
                   help="tokens (per step) or speed (tokens/s; predicted from the profile's "
                        "latency for model/replay, measured for engine). Default: speed when "
                        "latency is known or with engine, else tokens")
    g.add_argument("--trials", type=int, default=None,
                   help="trials this process finishes, complete or pruned; failed ones are "
                        "replaced (default 200; 20 for engine)")
    g.add_argument("--timeout", type=float, help="stop starting trials after this many seconds")
    g.add_argument("--study-name", help="study to create or continue (default: from the "
                                        "output file name)")
    g.add_argument("--storage", help="Optuna storage URL or SQLite file path, shared by "
                                     "workers (default: <out>.optuna.db beside the "
                                     "growmap)")
    g.add_argument("--seed", type=int, default=0, help="sampler seed (give each worker its own)")
    g.add_argument("--worker", help="label recorded on this process's trials")
    g.add_argument("--target", help="replay/engine: target model spec")
    g.add_argument("--draft", help="replay/engine: draft model spec (e.g. early-exit:4)")
    g.add_argument("--dataset", default="spec_bench",
                   help="replay/engine: prompt set (default %(default)s)")
    g.add_argument("--prompts", type=int, default=8,
                   help="replay/engine: held-out prompts (default %(default)s)")
    g.add_argument("--max-new-tokens", type=int, default=64,
                   help="replay/engine: tokens per prompt (default %(default)s)")
    g.add_argument("--temperature", type=float, default=0.0,
                   help="replay/engine: sampling temperature (replay is exact at 0)")
    g.add_argument("--device", default="auto", help="replay/engine: auto, cpu or cuda")


def check_limits(args: argparse.Namespace) -> int:
    """The numbers the user typed, against the one tree-size cap (before any work); returns
    the level limit."""
    if args.budget is not None:
        if args.budget < 1:
            raise UserError(f"--budget must be at least 1 node (the root), got {args.budget}")
        check_nodes(args.budget, "--budget", UserError)
    if args.max_size is not None:
        if args.max_size < 1:
            raise UserError(f"--max-size must be at least 1, got {args.max_size}")
        check_nodes(args.max_size, "--max-size", UserError)
    if args.measured_sizes_only and args.budget is not None:
        raise UserError("--measured-sizes-only picks the size from the latency table; drop it "
                        "or drop --budget")
    return height_levels(args)


def check_outputs(args: argparse.Namespace, treeset: bool = False) -> None:
    """Every output path, before the search: known suffixes, no input overwritten, no file
    of another kind replaced (the growmap check lives in ``treeopt.growmap``, the tree-set
    check, with ``treeset``, in ``treeopt.treeset``)."""

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
    if args.out and treeset:
        check_treeset(args.out)
    elif args.out:
        check_writable(args.out)


def wants_treeset(args: argparse.Namespace) -> bool:
    """A hardware-aware DP search (no --budget, no --context) on a profile whose latency was
    measured at several contexts: the result is a tree set."""
    if args.method != "dp" or args.budget is not None or getattr(args, "context", None) \
            is not None or getattr(args, "family", None) or getattr(args, "engine", None):
        return False

    try:
        latency = load_profile(args.profile).latency
        return latency is not None and len(contexts_of(latency)) > 1
    except TreeoptError:
        return False  # the search reports it


def _same(path: str | Path) -> str:
    """A key equal for two spellings of the same file."""
    return str(Path(path).expanduser().resolve())


def _default_out(args: argparse.Namespace, name: str) -> Path:
    out = Path("growmaps") / name
    if _same(out) == _same(args.profile):
        raise UserError(f"the default output {out} is the --profile file; give --out")
    return out


def run(args: argparse.Namespace) -> int:
    levels = check_limits(args)
    if getattr(args, "context", None) is not None and args.context < 0:
        raise UserError(f"--context counts cached tokens: at least 0, got {args.context}")
    check_outputs(args, wants_treeset(args))
    if args.family or args.engine:
        return run_family(args, levels)
    if args.method == "optuna":
        return run_optuna(args, levels)

    found = search_tree(args.profile, budget=args.budget, at_most=args.at_most,
                        context=getattr(args, "context", None),
                        search=SearchSettings(max_levels=levels, max_size=args.max_size,
                                              draft_cost=args.draft_cost,
                                              depth_aware=not args.no_depth_aware,
                                              measured_sizes_only=args.measured_sizes_only))
    tree = found.tree
    if found.treeset is not None:
        out = Path(args.out) if args.out else _default_out(
            args, f"{Path(args.profile).stem}-dp-treeset.json")
        saved = save_treeset(found.treeset, out)
    else:
        out = Path(args.out) if args.out else _default_out(
            args, f"{Path(args.profile).stem}-dp-n{tree.size}.pt")
        saved = found.save(out)

    mode = found.mode
    if found.choice is not None:
        sizes = "measured sizes" if args.measured_sizes_only else f"sizes 1..{found.max_size}"
        mode = f"{mode} ({sizes}, levels 1..{found.max_levels})"
    print(f"search dp, {mode}: size {tree.size}, {height(tree.depth, found.max_levels)}, "
          f"width {tree.width}, {'depth-aware' if len(found.rank_table) > 1 else 'rank'} "
          "profile")
    print(f"expected tokens per step: {found.expected_tokens:.6f}")
    pred = found.prediction
    if pred is not None:
        print(f"predicted step {pred.step_ms:.3f} ms (draft {pred.draft_ms:.3f} + verify "
              f"{pred.verify_ms:.3f}), {pred.tokens_per_s:.1f} tokens/s, speed-up "
              f"{pred.speedup:.2f}x over plain decoding ({pred.plain_ms:.3f} ms/token; "
              f"draft cost {found.draft_cost})")
    if found.choice is not None:
        print("candidates (best height per size):  size levels depth   F      step_ms  tok/s  "
              "speedup")
        for c in found.choice.candidates:
            mark = " *" if c["size"] == tree.size and c["levels"] == found.choice.levels else ""
            print(f"  {c['size']:>33} {c['levels']:>6} {c['depth']:>5} {c['F']:7.4f} "
                  f"{c['step_ms']:8.3f} {c['tokens_per_s']:7.1f} {c['speedup']:6.2f}{mark}")
    for note in found.notes:
        print(f"note: {note}")
    if found.treeset is not None:
        print_treeset(found.treeset)
    print(f"{'treeset' if found.treeset is not None else 'growmap'}: {saved}")
    if args.table:
        print(f"table: {write_table(found.table.values, args.table)}")
    if args.picture:
        pic = draw_tree(tree, args.picture, profile=found.rank_table,
                        title=f"treeopt search dp: {Path(args.profile).name}")
        print(f"picture: {pic}")
    return 0


def height(depth: int, max_levels: int) -> str:
    """``"depth 7 edges (8 levels; limit 12 levels = depth 11)"``: a tree's height and the
    limit it was searched under, in both units."""
    def n(count: int, unit: str) -> str:
        return f"{count} {unit}" + ("s" if count != 1 else "")

    return (f"depth {n(depth, 'edge')} ({n(depth + 1, 'level')}; limit "
            f"{n(max_levels, 'level')} = depth {max_levels - 1})")


def run_optuna(args: argparse.Namespace, levels: int) -> int:
    profile = load_profile(args.profile)
    size = optuna_size_limit(profile, args.budget, args.max_size)
    out = Path(args.out) if args.out else _default_out(
        args, f"{Path(args.profile).stem}-optuna-{args.objective}-n{size}.json")
    storage = args.storage or str(out.with_suffix(".optuna.db"))
    name = args.study_name or f"treeopt-{out.stem}"
    found = optuna_tree(
        profile, objective=args.objective, metric=args.metric, budget=args.budget,
        search=SearchSettings(max_size=args.max_size, max_levels=levels,
                              draft_cost=args.draft_cost, depth_aware=not args.no_depth_aware),
        optuna_settings=OptunaSettings(trials=args.trials, timeout=args.timeout,
                                       study_name=name, storage=storage, seed=args.seed,
                                       worker=args.worker),
        replay=ReplaySettings(target=args.target, draft=args.draft, dataset=args.dataset,
                              prompts=args.prompts, max_new_tokens=args.max_new_tokens,
                              temperature=args.temperature, device=args.device),
        progress=True)
    found.meta["profile"] = str(args.profile)
    saved = found.save(out)
    result = found.optuna
    metric = result.metric
    unit = "tokens/step" if metric == "tokens" else "tokens/s"
    kind = {"model": "predicted", "replay": "replayed", "engine": "measured"}[args.objective]
    print(f"search optuna ({args.objective}, {metric}): {result.trials} trials in study "
          f"{name!r} ({result.complete} complete, {result.pruned} pruned)")
    for label, tree, value in (("best:", result.tree, result.value),
                               ("dp:  ", result.baseline, result.baseline_value)):
        print(f"{label} size {tree.size}, {height(tree.depth, found.max_levels)}, width "
              f"{tree.width}, {kind} {value:.4f} {unit}")
    print(f"growmap: {saved}")
    print(f"storage: {result.storage}")
    if args.picture:
        print(f"picture: {draw_tree(result.tree, args.picture, profile=found.rank_table)}")
    return 0


def write_table(values, path: str | Path) -> Path:
    """CSV of ``values[m, l]`` (F*(m, l)): one row per size m >= 1, one column per level
    limit l >= 1 (root counted); empty cells where no tree exists."""
    import math

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = ["size," + ",".join(f"levels_{l}" for l in range(1, values.shape[1]))]
    for m in range(1, values.shape[0]):
        cells = ("" if math.isinf(v) else f"{v:.9g}" for v in values[m, 1:])
        rows.append(f"{m}," + ",".join(cells))
    path.write_text("\n".join(rows) + "\n")
    return path


def add_family_arguments(parser: argparse.ArgumentParser) -> None:
    """``treeopt search``'s ``--family`` and ``--engine`` (:func:`run_family`)."""
    g = parser.add_argument_group("engine families (--family / --engine, with --budget)")
    g.add_argument("--family", choices=FAMILIES,
                   help="best tree within a family an engine drafts, against the "
                        "unconstrained optimum: topk-per-level = EAGLE-2 / SGLang's top-k "
                        "beam (knobs top_k, steps, nodes); uniform-per-level = vLLM's tree "
                        "drafter (every node of a level gets the same number of children)")
    g.add_argument("--engine", choices=ENGINES,
                   help="engine to export to next (vllm, sglang, eagle); alone it picks its "
                        "family (vllm: uniform-per-level, else topk-per-level)")


def run_family(args: argparse.Namespace, levels: int) -> int:
    """``treeopt search --family F`` (or ``--engine E``): the best tree an engine can draft
    (``treeopt.search.family``), its F against the unconstrained DP optimum at the same
    budget, the growmap, and the export command to run next."""
    family = args.family or (UNIFORM if args.engine == "vllm" else TOPK)
    if args.method != "dp":
        raise UserError(f"--family searches its few parameters exactly; drop --method "
                        f"{args.method}")
    if args.budget is None:
        raise UserError("--family needs --budget N (the node budget both the family and the "
                        "unconstrained optimum get)")
    if args.budget < 2:
        raise UserError(f"--family needs a budget of at least 2 nodes (one drafted token), "
                        f"got {args.budget}")
    if args.table:
        raise UserError("--table writes the unconstrained DP's table; drop it with --family")
    engine = args.engine or FAMILY_ENGINES[family][0]
    profile = load_profile(args.profile)
    table = rank_table(profile, not args.no_depth_aware)
    found = search_family(table, family, args.budget, levels)
    tree = found.tree
    out = Path(args.out) if args.out else _default_out(
        args, f"{Path(args.profile).stem}-{family}-n{tree.size}.pt")
    saved = save_growmap(tree, out, family_meta(found, family, args.budget, levels,
                                                depth_aware=len(table) > 1,
                                                profile=args.profile))
    if family == TOPK:
        knobs = (f"top_k {found.params['top_k']}, steps {found.params['steps']}, "
                 f"nodes {found.params['nodes']}")
        who = "EAGLE-2 / SGLang top-k beam"
    else:
        knobs = "children per level " + ",".join(str(c) for c in found.params["expansion"])
        who = "vLLM, every node of a level the same number of children"
    print(f"search family {family} ({who}), budget {args.budget} nodes: best member {knobs}: "
          f"size {tree.size}, {height(tree.depth, found.max_levels)}, width {tree.width}")
    print(f"expected tokens per step: {found.expected_tokens:.6f} (family best)")
    print(f"unconstrained DP optimum, same budget and level limit: {found.optimum:.6f} "
          f"(size {found.optimum_tree.size}, depth {found.optimum_tree.depth})")
    print(f"restriction costs {100 * max(found.loss, 0.0):.2f}% of F "
          f"({max(found.optimum - found.expected_tokens, 0.0):.4f} tokens per step)")
    for note in found.notes:
        print(f"note: {note}")
    if engine not in FAMILY_ENGINES[family]:
        print(f"note: {engine} drafts the "
              f"{UNIFORM if engine == 'vllm' else TOPK} family, not {family}")
    print(f"growmap: {saved}")
    if args.picture:
        print(f"picture: {draw_tree(tree, args.picture, profile=table)}")
    extra = f" --profile {args.profile}" if engine != "vllm" else ""
    print(f"export: treeopt export {saved} --engine {engine}{extra}")
    return 0
