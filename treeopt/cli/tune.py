"""``treeopt tune``: profile a pair, search the best tree for this machine, save everything.

  treeopt tune --target smollm2 --draft early-exit:4 --dataset spec_bench --out-dir runs/ee4

Steps: acceptance profile (teacher-forced along the target's own continuations) -> latency
profile (target tree forwards and draft levels, on this device) -> hardware-aware DP choice of
size and depth (optionally refined with Optuna, ``--optuna-trials``) -> ``profile.json``,
``tree.pt`` (Sequoia-compatible growmap), ``tree.json``, ``tree.png`` and ``summary.json`` in
``--out-dir``. Without a GPU the defaults are small (a few minutes on a laptop CPU for
SmolLM2-135M) and the output says which defaults were used. Re-running with ``--resume``
continues an interrupted acceptance profile.
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
    describe_acceptance,
    describe_latency,
    measure_acceptance,
)

CPU_LATENCY = dict(tokens="1,2,4,8,16,32", context=128, repeats=3, warmup=1)
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
    lat.add_argument("--context", type=int, help="cached prefix length (default 128 CPU, 256 GPU)")
    lat.add_argument("--repeats", type=int, help="timed runs per point (default 3 CPU, 10 GPU)")
    lat.add_argument("--warmup", type=int, help="untimed runs per point (default 1 CPU, 3 GPU)")
    s = parser.add_argument_group("search")
    s.add_argument("--max-size", type=int, help="largest tree considered (default: the largest "
                                                "timed size)")
    s.add_argument("--max-depth", type=int, default=12,
                   help="depth limit in levels counting the root (default %(default)s)")
    s.add_argument("--draft-cost", choices=["sequoia", "per-level"], default="per-level",
                   help="draft cost model (default %(default)s)")
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
    from treeopt.growmap import save_growmap
    from treeopt.profile import Profile
    from treeopt.profile.acceptance import reliable_table
    from treeopt.profile.latency import measure_latency, parse_tokens, write_latency
    from treeopt.search.dp import solve
    from treeopt.search.hardware import choose, empty_step_rate, predict
    from treeopt.cli.profile import load_models

    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    profile_path = out_dir / "profile.json"
    if profile_path.exists() and not args.resume:
        raise UserError(f"{profile_path} exists; pass --resume to continue it or choose another "
                        "--out-dir")
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

    table = reliable_table(profile)
    max_size = args.max_size or max(tokens)
    dp = solve(table, max_size, args.max_depth)
    empty = empty_step_rate(profile)
    choice = choose(table, latency, max_size, args.max_depth, args.draft_cost, table=dp,
                    empty_rate=empty)
    tree, method = choice.tree, "dp + hardware-aware"
    pred = predict(tree, table, latency, args.draft_cost, empty)
    optuna_note = None
    if args.optuna_trials > 0:
        from treeopt.search.optuna_search import ModelObjective, resolve_storage, run_search
        from treeopt.shapes import chain

        res = run_search(ModelObjective(table, latency, "speed", args.draft_cost, empty),
                         width=profile.width, max_size=max_size, levels=args.max_depth,
                         n_trials=args.optuna_trials, seeds=[tree, chain(min(max_size, 4))],
                         baseline=tree, seed=args.seed, study_name="tune",
                         storage=resolve_storage(None, out_dir / "optuna.db"))
        optuna_note = (f"optuna ({res.trials} trials): best {res.value:.2f} tokens/s vs DP "
                       f"{res.baseline_value:.2f}")
        if res.value > res.baseline_value:
            tree, method = res.tree, "optuna (seeded with the DP choice)"
            pred = predict(tree, table, latency, args.draft_cost, empty)

    meta = {"method": method, "profile": profile_path.name, "target": args.target,
            "draft": args.draft, "expected_tokens": pred.expected_tokens,
            "predicted_step_ms": pred.step_ms, "predicted_tokens_per_s": pred.tokens_per_s,
            "predicted_speedup": pred.speedup, "draft_cost": args.draft_cost,
            "depth": choice.depth, "depth_convention": "levels incl. root",
            "depth_rows_used": len(table),
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
    if optuna_note:
        print(optuna_note)
    print(f"files: {profile_path}, {growmap_pt}, {growmap_json}"
          + (f", {picture}" if picture else "") + f", {out_dir / 'summary.json'}")
    return 0
