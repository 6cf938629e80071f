"""How well does a profile predict decoding? Predicted F(tree) vs measured tokens per step.

Profiles SmolLM2-135M ("smollm2") with an early-exit self-draft on some Spec-Bench prompts
(teacher-forced, greedy, along the target's own continuations), builds the DP tree for that
profile at each --sizes budget, decodes OTHER Spec-Bench prompts with the engine and each
tree, and prints the predicted expected tokens per step (depth-aware profile and flat rank
profile) against the measured tokens per verification step (the engine's ``tokens_per_step``:
committed tokens / target forwards, prefill excluded), with the standard error over steps.

    python scripts/bench_prediction.py                       # defaults: a few minutes on CPU
    python scripts/bench_prediction.py --draft early-exit:8 --profile-prompts 16 --sizes 8,32
"""

from __future__ import annotations

import argparse
import math
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="smollm2")
    ap.add_argument("--draft", default="early-exit:4")
    ap.add_argument("--dataset", default="spec_bench")
    ap.add_argument("--profile-prompts", type=int, default=16)
    ap.add_argument("--eval-prompts", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--width", type=int, default=8)
    ap.add_argument("--depth", type=int, default=4, help="per-depth rows measured")
    ap.add_argument("--sizes", default="6,16", help="DP tree budgets (nodes, root included)")
    ap.add_argument("--levels", type=int, default=6, help="DP depth limit, levels incl. root")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()

    import torch

    from treeopt.cli.profile import encode_prompts, split_prompts
    from treeopt.decode.api import eos_ids
    from treeopt.decode.engine import generate
    from treeopt.decode.models import load_pair, resolve_device
    from treeopt.profile.acceptance import (RankCounts, count_ranks, reliable_table,
                                            teacher_forced_ranks)
    from treeopt.search.dp import solve
    from treeopt.search.optuna_search import replay_steps

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    pair = load_pair(args.target, args.draft, device=resolve_device(args.device))
    eos = eos_ids(pair.tokenizer, pair.target)
    prof_prompts, eval_prompts = split_prompts(args.dataset, args.profile_prompts,
                                               args.eval_prompts, args.seed)
    prof_ids = encode_prompts(pair.tokenizer, prof_prompts, True)
    eval_ids = encode_prompts(pair.tokenizer, eval_prompts, True)
    counts = RankCounts(args.width, args.depth)
    traces = []
    for ids in prof_ids:  # what profile_acceptance does, keeping the per-position ranks
        ranks, start = teacher_forced_ranks(pair.target, pair.draft, ids, width=args.width,
                                            max_new_tokens=args.max_new_tokens,
                                            eos_token_id=eos[0] if eos else None)
        counts.add(count_ranks(ranks, args.width, args.depth, start))
        traces.append(ranks)
    profile = counts.to_profile({"positions": counts.positions,
                                 "steps": sum(counts.depth_counts[0]) + counts.depth_none[0]})
    t_prof = time.perf_counter() - t0
    print(f"pair {args.target} + {args.draft}; profile on {len(prof_ids)} prompts "
          f"({profile.meta['positions']} positions, {profile.meta['steps']} walk steps, "
          f"{t_prof:.0f} s), evaluation on {len(eval_ids)} other prompts, "
          f"{args.max_new_tokens} new tokens each, greedy")
    print(f"profile: {profile.summary(ranks=4)}")
    for d, row in enumerate(profile.by_depth or []):
        n = sum(profile.depth_counts[d]) + profile.depth_none[d]
        print(f"  depth {d}: p1..p4 = {' '.join(f'{x:.3f}' for x in row[:4])}, "
              f"sum {sum(row):.3f} (n={n})")

    depth_table = reliable_table(profile)  # depth rows with >= 50 steps
    flat_table = profile.table(depth_aware=False)
    sizes = [int(s) for s in args.sizes.split(",")]
    dp = solve(depth_table, max(sizes), args.levels)
    print(f"{'size':>4} {'depth':>5} {'F depth-aware':>13} {'F flat p':>9} {'replay':>7} "
          f"{'measured':>9} {'+-SE':>6} {'error':>7} {'steps':>5} {'s':>5}")
    for size in sizes:
        tree = dp.tree(size, args.levels, at_most=True)
        t1 = time.perf_counter()
        per_step: list[int] = []
        forwards = 0
        for ids in eval_ids:
            gen = generate(pair.target, pair.drafter.reshaped(tree), torch.tensor([ids]),
                           max_new_tokens=args.max_new_tokens, eos_token_id=eos or None)
            per_step += [s.tokens for s in gen.stats.steps]
            forwards += gen.stats.target_forwards
        measured = sum(per_step) / forwards
        mean = sum(per_step) / len(per_step)
        var = sum((x - mean) ** 2 for x in per_step) / max(1, len(per_step) - 1)
        se = math.sqrt(var / len(per_step))
        f_depth = tree.expected_tokens(depth_table)
        f_flat = tree.expected_tokens(flat_table)
        replayed = [x for t in traces for x in replay_steps(tree, t)]
        f_replay = sum(replayed) / len(replayed)
        err = (f_depth - measured) / measured
        print(f"{tree.size:>4} {tree.depth:>5} {f_depth:>13.4f} {f_flat:>9.4f} {f_replay:>7.4f} "
              f"{measured:>9.4f} "
              f"{se:>6.3f} {100 * err:>6.1f}% {len(per_step):>5} {time.perf_counter() - t1:>5.0f}")
    print("error = (F depth-aware - measured) / measured; replay = the tree replayed on the "
          "profile prompts' traces")
    print(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
