"""Verification rules compared on the same drafts: expected accepted tokens per step of
sequoia, traversal (and block on chains) for DP trees and a chain, against the token-level
DP's prediction, with each rule's own cost per step.

A thin wrapper over ``treeopt.evaluate.rule_gain.measure_rules``. Per temperature: an
acceptance profile (teacher-forced, sequoia, on --profile-prompts Spec-Bench prompts) gives
the DP trees of the --sizes budgets and their predicted tokens per step F (depth-aware); then
OTHER prompts are decoded with each tree (sampled, seed = --seed + prompt index, driven by
sequoia) and at every step each rule's exact expected accepted tokens on that step's drafted
tree are computed (a paired comparison on identical drafts) and each rule's ``accept`` is
timed on it.

    OMP_WAIT_POLICY=PASSIVE python scripts/bench_rules.py          # SmolLM2 + early-exit:4
    python scripts/bench_rules.py --tiny                            # tiny random models

Targets (issue "traversal"): traversal >= 1.03x sequoia's accepted tokens per step on a
branching tree of 16-32 nodes at temperature 1.0, block >= 1.03x token level on a 5-node
chain; each rule's own cost below 2 % of a step.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: steady CPU timings


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="smollm2")
    ap.add_argument("--draft", default="early-exit:4")
    ap.add_argument("--dataset", default="spec_bench")
    ap.add_argument("--profile-prompts", type=int, default=8)
    ap.add_argument("--eval-prompts", type=int, default=6)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--temperatures", default="1.0,0.7")
    ap.add_argument("--sizes", default="16,32", help="DP tree budgets (nodes, root included)")
    ap.add_argument("--levels", type=int, default=6, help="DP depth limit, levels incl. root")
    ap.add_argument("--chain", type=int, default=5, help="chain size (nodes; 0 = none)")
    ap.add_argument("--width", type=int, default=8)
    ap.add_argument("--depth", type=int, default=4, help="per-depth profile rows")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--cost-only", metavar="VOCAB", type=int,
                    help="only time the rules on synthetic steps over VOCAB tokens for each "
                         "--cost-tree (no model, no profile)")
    ap.add_argument("--cost-tree", action="append", default=None,
                    help="shape spec timed by --cost-only (repeatable; default kary:4x2, "
                         "specinfer:6,2,1 and chain:5)")
    ap.add_argument("--tiny", action="store_true",
                    help="tiny random models and token-id prompts: checks the script in seconds")
    return ap.parse_args(argv)


def setup(args):
    """(target, drafter, eos ids, profile prompt ids, eval prompt ids)."""
    if args.tiny:
        import torch

        from treeopt.drafters.model import ModelDrafter
        from treeopt.testing import tiny_pair

        target, draft = tiny_pair("llama", vocab_size=96)
        gen = torch.Generator().manual_seed(args.seed)
        ids = [torch.randint(3, 96, (10,), generator=gen).tolist()
               for _ in range(args.profile_prompts + args.eval_prompts)]
        return target, ModelDrafter(draft), [], ids[:args.profile_prompts], \
            ids[args.profile_prompts:]
    from treeopt.api import encode_prompts, load_pair
    from treeopt.datasets import split_prompts
    from treeopt.models.loading import eos_ids, resolve_device

    pair = load_pair(args.target, args.draft, device=resolve_device(args.device))
    prof, evals = split_prompts(args.dataset, args.profile_prompts, args.eval_prompts,
                                args.seed)
    return (pair.target, pair.drafter, eos_ids(pair.tokenizer, pair.target),
            encode_prompts(pair.tokenizer, prof, True), encode_prompts(pair.tokenizer, evals,
                                                                       True))


def cost_only(args) -> int:
    """The rules' own time on synthetic steps (``time_rules``), per --cost-tree."""
    import torch

    from treeopt.evaluate.rule_gain import time_rules
    from treeopt.shapes import from_name

    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        for spec in args.cost_tree or ["kary:4x2", "specinfer:6,2,1", "chain:5"]:
            tree = from_name(spec)
            rules = ["sequoia", "traversal"] + (["block"] if tree.width == 1 else [])
            cost = time_rules(tree, rules, vocab=args.cost_only)
            print(f"{spec}: {tree.size} nodes, depth {tree.depth}, vocabulary {args.cost_only}, "
                  f"{torch.get_num_threads()} threads, minimum of 40: " +
                  ", ".join(f"{r} {ms:.2f} ms" for r, ms in cost.items()))
    finally:
        torch.set_num_threads(threads)
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.cost_only:
        return cost_only(args)
    import torch

    from treeopt.decode.sampling import Sampling
    from treeopt.evaluate.methods import dp_method
    from treeopt.evaluate.rule_gain import measure_rules, time_rules
    from treeopt.profile.acceptance import AcceptanceRun, profile_acceptance
    from treeopt.profile.model import reliable_table
    from treeopt.shapes import chain

    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        t0 = time.perf_counter()
        target, drafter, eos, prof_ids, eval_ids = setup(args)
        name = "tiny + tiny" if args.tiny else f"{args.target} + {args.draft}"
        print(f"pair {name}; {len(eval_ids)} eval prompts x {args.max_new_tokens} new tokens, "
              f"profile on {len(prof_ids)} other prompts; {torch.get_num_threads()} threads, "
              f"{next(target.parameters()).dtype}")
        print(f"{'T':>4} {'tree':>10} {'n':>3} {'d':>2} {'rule':>9} {'tok/step':>8} {'+-SE':>6} "
              f"{'DP F':>6} {'DP err':>7} {'gain':>7} {'+-SE':>6} {'rule ms':>7} "
              f"{'step ms':>7} {'share':>6} {'steps':>5}")
        trees_by_size = {}
        for temp in (float(t) for t in args.temperatures.split(",") if t.strip()):
            run = AcceptanceRun(width=args.width, depth=args.depth, sampling=Sampling(temp),
                                max_new_tokens=args.max_new_tokens, seed=args.seed,
                                draft=args.draft, target=args.target, dataset=args.dataset)
            profile = profile_acceptance(target, drafter, prof_ids, run,
                                         eos_token_id=eos[0] if eos else None)
            table = reliable_table(profile)
            trees = [(m.name, m.tree) for m in
                     (dp_method(table, int(s), args.levels) for s in args.sizes.split(","))]
            if args.chain > 1:
                trees.append((f"chain:{args.chain}", chain(args.chain)))
            for label, tree in trees:
                trees_by_size.setdefault(int(label.split(":")[1].split("x")[0]), tree)
                rules = ["sequoia", "traversal"] + (["block"] if tree.width == 1 else [])
                res = measure_rules(target, drafter.reshaped(tree), eval_ids, rules,
                                    temperature=temp, max_new_tokens=args.max_new_tokens,
                                    seed=args.seed, eos_token_id=eos or None)
                f = tree.expected_tokens(table)
                base = res.rules["sequoia"]
                for r in rules:
                    st = res.rules[r]
                    tau = st.tokens_per_step
                    gain, gse = st.gain_over(base)
                    share = res.rule_ms(r) / (res.step_ms + res.rule_ms(r))
                    rel = 100 * gain / base.tokens_per_step
                    print(f"{temp:>4.1f} {label:>10} {tree.size:>3} {tree.depth:>2} {r:>9} "
                          f"{tau:>8.4f} {st.standard_error():>6.3f} {f:>6.3f} "
                          f"{100 * (f - tau) / tau:>6.1f}% {rel:>6.2f}% "
                          f"{gse:>6.3f} {res.rule_ms(r):>7.2f} {res.step_ms:>7.1f} "
                          f"{100 * share:>5.2f}% {res.steps:>5}", flush=True)
        vocab = target.get_output_embeddings().weight.shape[0]
        for size in [int(s) for s in args.sizes.split(",")] + [args.chain]:
            if size > 1:
                tree = trees_by_size.get(size) or chain(size)
                cost = time_rules(tree, ["sequoia", "traversal"] +
                                  (["block"] if tree.width == 1 else []), vocab=vocab)
                print(f"rule cost, synthetic step on {tree.size} nodes (depth {tree.depth}), "
                      f"vocabulary {vocab}, nearly every node rejected, minimum of 40: " +
                      ", ".join(f"{r} {ms:.2f} ms" for r, ms in cost.items()))
    finally:
        torch.set_num_threads(threads)
    print("tok/step = 1 + exact expected accepted tokens given each step's draft, averaged over "
          "steps; DP err = (F - tok/step) / tok/step with F the token-level DP's depth-aware "
          "prediction; gain = paired difference over sequoia on the same drafts, relative to "
          "sequoia's tok/step (+-SE in tokens); rule ms = median time of the rule's accept() per "
          "step; step ms = median draft + verify time per step; share = rule ms / (step ms + "
          "rule ms)")
    print(f"total {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
