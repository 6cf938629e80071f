"""How well does a profile predict decoding? Predicted F(tree) vs measured tokens per step.

Profiles SmolLM2-135M ("smollm2") with an early-exit self-draft on some Spec-Bench prompts
(``treeopt.profile.acceptance.profile_acceptance``: teacher-forced, greedy, along the target's
own continuations), builds the DP tree for that profile at each --sizes budget, decodes OTHER
Spec-Bench prompts with the engine and each tree (``treeopt.evaluate.runner.run_eval``, plain
decoding alongside), and prints the predicted expected tokens per step (depth-aware profile and
flat rank profile, and the tree replayed on the profile prompts' traces) against the measured
tokens per verification step (the engine's ``tokens_per_step``: committed tokens / target
forwards, prefill excluded), with the standard error over steps.

    python scripts/bench_prediction.py                       # defaults: a few minutes on CPU
    python scripts/bench_prediction.py --draft early-exit:8 --profile-prompts 16 --sizes 8,32
    python scripts/bench_prediction.py --tiny                # tiny random models: seconds
"""

from __future__ import annotations

import argparse
import math
import sys
import time


def parse_args(argv=None):
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
    ap.add_argument("--tiny", action="store_true",
                    help="tiny random models (a 2-layer target, a 1-layer draft model) and "
                         "random token-id prompts instead of --target/--draft/--dataset: "
                         "checks the script works in seconds")
    return ap.parse_args(argv)


def tiny_setup(args):
    """(target, drafter, eos ids, profile prompts, eval prompts) of tiny random models."""
    import torch

    from treeopt.datasets import Prompt
    from treeopt.drafters.model import ModelDrafter
    from treeopt.testing import tiny_pair

    target, draft = tiny_pair("llama", vocab_size=96)
    gen = torch.Generator().manual_seed(args.seed)
    ids = [torch.randint(3, 96, (10,), generator=gen).tolist()
           for _ in range(args.profile_prompts + args.eval_prompts)]
    evals = [Prompt(str(i), "tiny", "", token_ids=tuple(x))
             for i, x in enumerate(ids[args.profile_prompts:])]
    return target, ModelDrafter(draft), [], ids[:args.profile_prompts], evals


def real_setup(args):
    """(target, drafter, eos ids, profile prompts, eval prompts) from the specs; the two prompt
    sets are disjoint draws of the dataset."""
    from treeopt.api import encode_prompts, load_pair
    from treeopt.datasets import Prompt, split_prompts
    from treeopt.models.loading import eos_ids, resolve_device

    pair = load_pair(args.target, args.draft, device=resolve_device(args.device))
    eos = eos_ids(pair.tokenizer, pair.target)
    prof_prompts, eval_prompts = split_prompts(args.dataset, args.profile_prompts,
                                               args.eval_prompts, args.seed)
    prof_ids = encode_prompts(pair.tokenizer, prof_prompts, True)
    eval_ids = encode_prompts(pair.tokenizer, eval_prompts, True)
    evals = [Prompt(p.id, p.category, p.text, token_ids=tuple(ids))
             for p, ids in zip(eval_prompts, eval_ids)]
    return pair.target, pair.drafter, eos, prof_ids, evals


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from treeopt.evaluate.methods import dp_method
    from treeopt.evaluate.runner import EvalConfig, run_eval
    from treeopt.profile.acceptance import AcceptanceRun, profile_acceptance
    from treeopt.profile.model import reliable_table
    from treeopt.search.optuna_search import replay_steps

    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        t0 = time.perf_counter()
        target, drafter, eos, prof_ids, evals = (tiny_setup if args.tiny else real_setup)(args)
        run = AcceptanceRun(width=args.width, depth=args.depth,
                            max_new_tokens=args.max_new_tokens, seed=args.seed,
                            draft="tiny" if args.tiny else args.draft,
                            target="tiny" if args.tiny else args.target,
                            dataset=None if args.tiny else args.dataset)
        traces: list[list[int]] = []
        profile = profile_acceptance(target, drafter, prof_ids, run,
                                     eos_token_id=eos[0] if eos else None, traces=traces)
        t_prof = time.perf_counter() - t0
        name = "tiny + tiny" if args.tiny else f"{args.target} + {args.draft}"
        print(f"pair {name}; profile on {len(prof_ids)} prompts "
              f"({profile.meta['positions']} positions, {profile.meta['steps']} walk steps, "
              f"{t_prof:.0f} s), evaluation on {len(evals)} other prompts, "
              f"{args.max_new_tokens} new tokens each, greedy")
        print(f"profile: {profile.summary(ranks=4)}")
        for d, row in enumerate(profile.by_depth or []):
            n = sum(profile.depth_counts[d]) + profile.depth_none[d]
            print(f"  depth {d}: p1..p4 = {' '.join(f'{x:.3f}' for x in row[:4])}, "
                  f"sum {sum(row):.3f} (n={n})")

        depth_table = reliable_table(profile)  # depth rows with >= 50 steps
        flat_table = profile.table(depth_aware=False)
        sizes = [int(s) for s in args.sizes.split(",")]
        methods = [dp_method(depth_table, size, args.levels) for size in sizes]
        t1 = time.perf_counter()
        res = run_eval(target, drafter, evals, methods,
                       config=EvalConfig(max_new_tokens=args.max_new_tokens, seed=args.seed,
                                         stop_at_eos=True),
                       profile=depth_table, progress=False,
                       meta={"target": run.target, "draft": run.draft,
                             "dataset": run.dataset})
        t_eval = time.perf_counter() - t1
    finally:
        torch.set_num_threads(threads)

    rows, summary = res.rows, res.summary
    cats = set(summary["category"])
    summary = summary[summary["category"] == ("all" if len(cats) > 1 else next(iter(cats)))]
    by_name = {r["method"]: r for r in summary.to_dict("records")}
    print(f"{'size':>4} {'depth':>5} {'F depth-aware':>13} {'F flat p':>9} {'replay':>7} "
          f"{'measured':>9} {'+-SE':>6} {'error':>7} {'steps':>5} {'s':>5} {'speedup':>7}")
    for m in methods:
        tree, r = m.tree, by_name[m.name]
        # Tokens each step committed: its accepted draft tokens plus the bonus.
        per_step = [a + 1 for steps in rows[rows["method"] == m.name]["accepted_per_step"]
                    for a in steps]
        measured = r["tokens_per_step"]
        mean = sum(per_step) / len(per_step)
        var = sum((x - mean) ** 2 for x in per_step) / max(1, len(per_step) - 1)
        se = math.sqrt(var / len(per_step))
        f_depth = tree.expected_tokens(depth_table)
        f_flat = tree.expected_tokens(flat_table)
        replayed = [x for t in traces for x in replay_steps(tree, t)]
        f_replay = sum(replayed) / len(replayed) if replayed else math.nan
        err = (f_depth - measured) / measured
        print(f"{tree.size:>4} {tree.depth:>5} {f_depth:>13.4f} {f_flat:>9.4f} {f_replay:>7.4f} "
              f"{measured:>9.4f} {se:>6.3f} {100 * err:>6.1f}% {len(per_step):>5} "
              f"{r['seconds']:>5.0f} {r['speedup']:>6.2f}x")
    print("error = (F depth-aware - measured) / measured; replay = the tree replayed on the "
          "profile prompts' traces; s = decoding seconds of the tree; speedup over plain "
          "decoding on the same prompts")
    print(f"evaluation {t_eval:.0f} s; total {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
