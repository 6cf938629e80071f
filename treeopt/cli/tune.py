"""``treeopt tune``: profile a pair, search the best tree for this machine, save everything.

  treeopt tune --target smollm2 --draft early-exit:4 --dataset spec_bench --out-dir runs/ee4

Steps: acceptance profile (teacher-forced along the target's own continuations) -> latency
profile (target tree forwards and draft levels, on this device) -> hardware-aware DP choice of
size and depth (optionally refined with Optuna, ``--optuna-trials``) -> ``profile.json``,
``tree.pt`` (Sequoia-compatible growmap), ``tree.json``, ``tree.png`` and ``summary.json`` in
``--out-dir``. Without a GPU the defaults are small (a few minutes on a laptop CPU for
SmolLM2-135M) and the output says which defaults were used. Re-running with ``--resume``
continues an interrupted acceptance profile (Ctrl-C keeps what was measured and says so).

Latency is timed with the sizes interleaved, 10 timed runs per point on CPU too (a stable
median needs them); a noisy point (IQR above 25 % of its median) or a curve that falls as
the size grows is reported with what to do. The hardware-aware choice prices sizes at the
latency curve's non-decreasing envelope and says when the chosen size lies beyond the
measured sizes; ``--measured-sizes-only`` chooses among the measured sizes only.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from treeopt.cli import UserError
from treeopt.cli.profile import (
    add_acceptance_arguments,
    add_model_arguments,
    check_acceptance_args,
    check_latency_args,
    describe_acceptance,
    describe_latency,
    measure_acceptance,
    print_timing_warnings,
    resume_hint,
)

CPU_LATENCY = dict(tokens="1,2,4,8,16,32", context=128, repeats=10, warmup=2)
GPU_LATENCY = dict(tokens="1,2,4,8,16,32,64,128", context=256, repeats=10, warmup=3)


def register(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "tune", help="profile a pair, find its best tree on this machine, save it",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    add_acceptance_arguments(parser)
    parser.set_defaults(depth=4)
    parser.add_argument("--out-dir", required=True, metavar="DIR", help="where to write results")
    parser.add_argument("--resume", action="store_true",
                        help="continue the acceptance profile in --out-dir")
    lat = parser.add_argument_group("latency")
    lat.add_argument("--tokens", help=f"target tree sizes to time (default {CPU_LATENCY['tokens']}"
                                      f" on CPU, {GPU_LATENCY['tokens']} on GPU)")
    lat.add_argument("--context", type=int,
                     help=f"cached prefix length (default {CPU_LATENCY['context']} on CPU, "
                          f"{GPU_LATENCY['context']} on GPU)")
    lat.add_argument("--repeats", type=int,
                     help=f"timed runs per point, sizes interleaved (default "
                          f"{CPU_LATENCY['repeats']} on CPU, {GPU_LATENCY['repeats']} on GPU)")
    lat.add_argument("--warmup", type=int,
                     help=f"untimed runs per point (default {CPU_LATENCY['warmup']} on CPU, "
                          f"{GPU_LATENCY['warmup']} on GPU)")
    s = parser.add_argument_group("search")
    s.add_argument("--max-size", type=int, help="largest tree considered (default: the largest "
                                                "timed size)")
    s.add_argument("--max-depth", type=int, default=12,
                   help="depth limit in levels counting the root (default %(default)s)")
    s.add_argument("--draft-cost", choices=["sequoia", "per-level"], default="per-level",
                   help="draft cost model (default %(default)s)")
    s.add_argument("--measured-sizes-only", action="store_true",
                   help="choose the tree size among the timed sizes (--tokens) only, as "
                        "Sequoia's valid_budget does, instead of every size up to --max-size "
                        "(whose costs are interpolated between timed sizes)")
    s.add_argument("--optuna-trials", type=int, default=0, metavar="N",
                   help="refine the DP choice with N Optuna trials on predicted tokens/s "
                        "(default 0: DP only)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(func=run)
    return parser


def latency_settings(args, device) -> list[str]:
    """Fill unset latency options by device; return notes on the defaults used."""
    defaults = GPU_LATENCY if device.type == "cuda" else CPU_LATENCY
    notes = []
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
            notes.append(f"{key} {value}")
    return notes


def run(args: argparse.Namespace) -> int:
    from treeopt.profile.latency import parse_tokens

    out_dir = Path(args.out_dir)
    profile_path = out_dir / "profile.json"
    if profile_path.exists() and not args.resume:
        raise UserError(f"{profile_path} exists; pass --resume to continue it or choose another "
                        "--out-dir")
    check_acceptance_args(args)
    check_latency_args(args)
    if args.tokens is not None:
        parse_tokens(args.tokens)
    if args.max_size is not None and args.max_size < 1:
        raise UserError(f"--max-size must be >= 1, got {args.max_size}")
    if args.max_depth < 1:
        raise UserError(f"--max-depth must be >= 1 (levels, root counted), got {args.max_depth}")
    if args.optuna_trials < 0:
        raise UserError(f"--optuna-trials must be >= 0, got {args.optuna_trials}")
    storage = None
    if args.optuna_trials > 0:
        from treeopt.search.optuna_search import resolve_storage

        storage = resolve_storage(None, out_dir / "optuna.db")
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        return _run(args, out_dir, profile_path, storage)
    except KeyboardInterrupt:
        if profile_path.exists():
            raise KeyboardInterrupt(resume_hint(profile_path)) from None
        raise


def _run(args: argparse.Namespace, out_dir: Path, profile_path: Path, storage) -> int:
    from treeopt.growmap import save_growmap
    from treeopt.profile import Profile
    from treeopt.profile.acceptance import reliable_table
    from treeopt.profile.latency import measure_latency, parse_tokens, write_latency
    from treeopt.search.dp import solve
    from treeopt.search.hardware import choose, curve_notes, empty_step_rate, predict
    from treeopt.cli.profile import load_models

    t0 = time.perf_counter()
    pair, device = load_models(args)
    if pair.drafter is None:
        raise UserError("tune needs a --draft (e.g. early-exit:4 or ngram)")

    profile, notes = measure_acceptance(args, pair, device, profile_path,
                                        progress=not args.quiet)
    t_acc = time.perf_counter() - t0
    notes += latency_settings(args, device)
    tokens = parse_tokens(args.tokens)
    latency = measure_latency(pair.target, pair.drafter, tokens=tokens, context=args.context,
                              repeats=args.repeats, warmup=args.warmup,
                              names={"target": args.target, "draft": args.draft})
    write_latency(latency, profile_path)
    profile = Profile.load(profile_path)
    t_lat = time.perf_counter() - t0 - t_acc
    warnings = print_timing_warnings(latency)

    table = reliable_table(profile)
    max_size = args.max_size or max(tokens)
    dp = solve(table, max_size, args.max_depth)
    empty = empty_step_rate(profile)
    choice = choose(table, latency, max_size, args.max_depth, args.draft_cost, table=dp,
                    empty_rate=empty, measured_only=args.measured_sizes_only)
    tree, method = choice.tree, "dp + hardware-aware"
    pred = predict(tree, table, latency, args.draft_cost, empty)
    optuna_note = None
    if args.optuna_trials > 0:
        from treeopt.search.optuna_search import ModelObjective, run_search
        from treeopt.shapes import chain

        res = run_search(ModelObjective(table, latency, "speed", args.draft_cost, empty),
                         width=profile.width, max_size=max_size, levels=args.max_depth,
                         n_trials=args.optuna_trials, seeds=[tree, chain(min(max_size, 4))],
                         baseline=tree, seed=args.seed, study_name="tune",
                         storage=storage)
        optuna_note = (f"optuna ({res.trials} trials): best {res.value:.2f} tokens/s vs DP "
                       f"{res.baseline_value:.2f}")
        sizes = {int(t) for t in latency.target.tokens} | {1}
        if res.value > res.baseline_value and (not args.measured_sizes_only
                                               or res.tree.size in sizes):
            tree, method = res.tree, "optuna (seeded with the DP choice)"
            pred = predict(tree, table, latency, args.draft_cost, empty)
        elif res.value > res.baseline_value:
            optuna_note += f" (its size {res.tree.size} was not timed: kept the DP choice)"
    # extrapolation notes; a falling curve was reported with the timing warnings
    notes_tree = curve_notes(latency, tree, args.draft_cost, falls=False)

    meta = {"method": method, "profile": profile_path.name, "target": args.target,
            "draft": args.draft, "expected_tokens": pred.expected_tokens,
            "predicted_step_ms": pred.step_ms, "predicted_tokens_per_s": pred.tokens_per_s,
            "predicted_speedup": pred.speedup, "draft_cost": args.draft_cost,
            "depth": choice.depth, "depth_convention": "levels incl. root",
            "depth_rows_used": len(table), "measured_sizes_only": args.measured_sizes_only,
            "device": latency.meta.get("device")}
    growmap_pt = save_growmap(tree, out_dir / "tree.pt", meta)
    growmap_json = save_growmap(tree, out_dir / "tree.json", meta)
    picture = None
    try:
        from treeopt.viz import draw_tree

        picture = draw_tree(tree, out_dir / "tree.png", profile=profile,
                            title=f"{args.target} + {args.draft}: n={tree.size}")
    except (ImportError, ValueError) as exc:
        notes.append(f"no picture ({exc})")
    summary = {"target": args.target, "draft": args.draft, "dataset": str(args.dataset),
               "device": latency.meta.get("device"), "defaults": notes,
               "profile": profile_path.name, "growmap": growmap_pt.name,
               "tree": {"size": tree.size, "depth": tree.depth, "width": tree.width,
                        "parents": tree.to_parents()},
               "prediction": pred.to_dict(), "method": method,
               "measured_sizes_only": args.measured_sizes_only,
               "warnings": warnings + notes_tree,
               "seconds": {"acceptance": round(t_acc, 1), "latency": round(t_lat, 1),
                           "total": round(time.perf_counter() - t0, 1)}}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")

    if notes:
        print(f"defaults on {device.type} (smaller samples without a GPU): {'; '.join(notes)}")
    print(f"acceptance ({t_acc:.0f} s): {describe_acceptance(profile)}")
    print(f"{describe_latency(latency)}  ({t_lat:.0f} s)")
    print(f"best tree ({method}, draft cost {args.draft_cost}): size {tree.size}, depth "
          f"{tree.depth}, width {tree.width}; expected {pred.expected_tokens:.3f} tokens/step")
    print(f"predicted step {pred.step_ms:.2f} ms (draft {pred.draft_ms:.2f} + verify "
          f"{pred.verify_ms:.2f}), {pred.tokens_per_s:.1f} tokens/s, speed-up "
          f"{pred.speedup:.2f}x over plain decoding ({pred.plain_ms:.2f} ms/token)")
    if tree.size == 1 or pred.speedup < 1:
        print("note: on this hardware no tree is predicted to beat plain decoding for this pair "
              "(use plain decoding); a better draft or a GPU changes that")
    for note in notes_tree:
        print(f"note: {note}")
    if optuna_note:
        print(optuna_note)
    print(f"files: {profile_path}, {growmap_pt}, {growmap_json}"
          + (f", {picture}" if picture else "") + f", {out_dir / 'summary.json'}")
    return 0
