"""Dynamic per-step trees: what the per-step choice costs, and whether it pays on a real pair.

(a) Choice time (always; no model forward). For budgets 8, 16, 32, 64, 128 nodes it grows
many random candidate trees exactly as ``treeopt.drafters.dynamic`` does per step (frontier
choice, tree masks, token gathers, child values: ``--topk`` children per fed node, ``--topk``
fed nodes per level, ``--depth`` levels) from random draft confidences, then chooses the kept
tree and builds the step's Proposal: for ``dynamic`` (top-budget by path probability) and for
``dynamic-dp`` (calibrated acceptance, then the exact prefix scan of F(n) / cost(n) under a
latency table). It prints the median and 90th-percentile microseconds per step; the issue asks
for under 1 ms up to 64 nodes.

(b) ``--real``: SmolLM2-135M-Instruct with its early-exit:4 draft on held-out Spec-Bench
prompts, greedy, every method interleaved prompt by prompt by ``treeopt.evaluate``'s runner
(the runner of ``treeopt eval``; outputs checked token for token against plain decoding):
plain decoding, the static DP tree of the same budget and depth (``dp:BxD`` from the shipped
profile ``--profile``), ``dynamic``, ``dynamic-dp`` (calibrated here on other Spec-Bench
prompts, the shipped profile's latency copied in) and any other drafter given with
``--method SPEC`` (egag, cascades, ...). Prompts: Spec-Bench drawn in one fixed order
(``--seed``): the first ``--profile-prompts`` are the ones the shipped profile was measured
on, the next ``--calib`` calibrate ``dynamic-dp``, the next ``--n`` are evaluated, so no
evaluated prompt informed any tree. Reported per method: tokens per step, mean tree size,
tokens/s, speed-up over plain decoding with its spread over prompts, and the draft / verify /
other milliseconds per step that explain it.

    OMP_WAIT_POLICY=PASSIVE python scripts/bench_adaptive.py            # (a) only
    OMP_WAIT_POLICY=PASSIVE python scripts/bench_adaptive.py --real --n 24 --out runs/adaptive \\
        --method "egag:draft=early-exit:4,gamma_min=1,gamma_max=6,ema=0.5"
    python scripts/bench_adaptive.py --tiny --out /tmp/adaptive          # seconds, tiny models
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path

from treeopt.decode.sampling import Sampling

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: steady CPU timings

BUDGETS = (8, 16, 32, 64, 128)
SHIPPED_PROFILE = "profiles/smollm2-ee4-cpu.json"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budgets", default=",".join(map(str, BUDGETS)),
                    help="(a) budgets in nodes, root included (default %(default)s)")
    ap.add_argument("--steps", type=int, default=300, help="(a) random steps per budget")
    ap.add_argument("--topk", type=int, default=8, help="children per fed node and fed nodes "
                                                        "per level (default %(default)s)")
    ap.add_argument("--depth", type=int, default=6, help="depth limit in edges (default "
                                                         "%(default)s)")
    ap.add_argument("--real", action="store_true", help="(b) SmolLM2 + early-exit:4 decoding")
    ap.add_argument("--tiny", action="store_true", help="(b) on tiny random models (seconds)")
    ap.add_argument("--target", default="smollm2")
    ap.add_argument("--draft", default="early-exit:4")
    ap.add_argument("--profile", default=None,
                    help=f"acceptance + latency profile of the pair (default {SHIPPED_PROFILE})")
    ap.add_argument("--profile-prompts", type=int, default=8,
                    help="Spec-Bench prompts (draw order, --seed) the profile was measured on: "
                         "never evaluated (default %(default)s, as the shipped profile)")
    ap.add_argument("--budget", type=int, default=16, help="(b) tree budget in nodes")
    ap.add_argument("--tree-depth", type=int, default=4, help="(b) depth limit in edges")
    ap.add_argument("--tree-topk", type=int, default=4, help="(b) topk of the dynamic trees")
    ap.add_argument("--method", dest="methods", action="append", default=[],
                    help="(b) another drafter spec to compare (repeatable)")
    ap.add_argument("--n", type=int, default=16, help="(b) evaluated prompts")
    ap.add_argument("--calib", type=int, default=16, help="(b) calibration prompts")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", help="(b) results folder (treeopt eval files, calibration.json)")
    ap.add_argument("--resume", action="store_true", help="(b) continue an interrupted run")
    return ap.parse_args(argv)


# ---------------------------------------------------------------------------- (a)
def random_draft(rng, depth: int, topk: int):
    """Stand-ins for one step's draft outputs, drawn before the clock starts: per level,
    (topk, topk) sorted confidences (Dirichlet rows: a few likely tokens) and child tokens."""
    import numpy as np
    import torch

    conf = rng.dirichlet(np.full(topk + 1, 0.3), size=(depth, topk))[..., :topk]
    conf = torch.from_numpy(-np.sort(-conf, axis=-1))
    return conf, torch.from_numpy(rng.integers(0, 49152, size=(depth, topk, topk)))


def random_step(drafter, draft, depth: int, topk: int, cost: bool):
    """One step of the dynamic drafter without the model: ``draft`` (random_draft) stands
    in for the draft's probabilities; everything else is the drafter's own code."""
    import numpy as np
    import torch

    from treeopt.drafters.dynamic import Expansion

    confs, kids = draft
    tree = Expansion(depth, topk, drafter.budget, torch.tensor(0))
    ids = np.zeros(1, dtype=np.int64)
    for d in range(depth):
        if d > 0:
            ids = tree.frontier(d)
            if ids.size == 0:
                break
            _mask = torch.from_numpy(tree.feed(ids))  # as propose: the level's mask and
            _fed = tree.tokens[torch.from_numpy(ids)]  # tokens, then (model forward skipped)
        e = ids.size
        tree.add_children(ids, kids[d, :e], drafter.factors(confs[d, :e]), False)
    step = drafter.last_draft_ms if cost else None
    kept = tree.select(drafter.budget, None if step is None else step + drafter.verify_ms)
    return drafter.build_proposal(tree, kept, [], depth), tree.n


def choice_times(budgets, steps: int, depth: int, topk: int, seed: int = 0) -> list[dict]:
    """Per budget: median / p90 microseconds of one step's choice work for dynamic and
    dynamic-dp, and the mean number of candidates."""
    import numpy as np

    from treeopt.drafters.dynamic import DynamicDrafter
    from treeopt.profile.calibration import from_samples
    from treeopt.profile.model import Latency, LatencyCurve

    rng = np.random.default_rng(seed)
    conf = rng.random(5000)
    latency = Latency(LatencyCurve([1, 2, 4, 8, 16, 32, 64, 128],
                                   [52, 57, 85, 101, 111, 131, 172, 265]),
                      LatencyCurve([1, 2, 4, 8, 16], [13, 14, 21, 25, 28]))
    cal = from_samples(conf, rng.random(5000) < conf, bins=10, latency=latency)
    out = []
    for budget in budgets:
        row = {"budget": budget}
        for name, calibration in (("dynamic", None), ("dynamic-dp", cal)):
            drafter = DynamicDrafter(None, budget=budget, depth=depth, topk=topk,
                                     calibration=calibration)
            drafter.last_draft_ms = 40.0
            times, sizes, cands = [], [], []
            for i in range(steps + 10):
                draft = random_draft(rng, depth, topk)
                t0 = time.perf_counter()
                prop, n = random_step(drafter, draft, depth, topk, calibration is not None)
                dt = time.perf_counter() - t0
                if i >= 10:  # warm-up excluded
                    times.append(dt * 1e6)
                    sizes.append(prop.tree.size)
                    cands.append(n)
            times.sort()
            row[name] = (statistics.median(times), times[int(0.9 * (len(times) - 1))])
            row[f"{name}_nodes"] = statistics.mean(sizes)
            row["candidates"] = statistics.mean(cands)
        out.append(row)
    return out


def print_choice_times(rows, depth: int, topk: int) -> None:
    print(f"(a) per-step tree choice, no model forward: depth {depth}, topk {topk}; "
          "microseconds per step, median (p90)")
    print(f"{'budget':>6} {'candidates':>10} {'dynamic':>16} {'dynamic-dp':>16} "
          f"{'dp nodes':>8}  <1ms")
    for r in rows:
        a, b = r["dynamic"], r["dynamic-dp"]
        ok = "yes" if max(a[0], b[0]) < 1000 else "NO"
        print(f"{r['budget']:>6} {r['candidates']:>10.0f} {a[0]:>8.0f} ({a[1]:>5.0f}) "
              f"{b[0]:>8.0f} ({b[1]:>5.0f}) {r['dynamic-dp_nodes']:>8.1f}  {ok}")


# ---------------------------------------------------------------------------- (b)
def split_prompts(args):
    """(calibration prompts, evaluated prompts): consecutive slices of one Spec-Bench draw,
    after the prompts the profile was measured on."""
    from treeopt.datasets import load_prompts, select

    every = load_prompts("spec_bench")
    skip, c, n = args.profile_prompts, args.calib, args.n
    drawn = select(every, n=skip + c + n, seed=args.seed, order="draw")
    return drawn[skip:skip + c], drawn[skip + c:skip + c + n]


def tiny_setup(args):
    """(target, draft spec, tokenizer None, profile, calibration prompts, evaluated prompts)
    on tiny random models."""
    import torch

    from treeopt.datasets import Prompt
    from treeopt.profile import Profile
    from treeopt.profile.model import Latency, LatencyCurve
    from treeopt.testing import tiny_causal_lm

    target = tiny_causal_lm("llama", vocab_size=96, hidden_size=32, num_layers=3, seed=4)
    with torch.no_grad():
        target.model.norm.weight.mul_(6.0)
    g = torch.Generator().manual_seed(args.seed)
    ids = [torch.randint(3, 96, (6,), generator=g).tolist() for _ in range(args.calib + args.n)]
    latency = Latency(LatencyCurve([1, 4, 16, 64], [1.0, 1.2, 1.6, 3.0]),
                      LatencyCurve([1, 4, 16], [0.4, 0.5, 0.7]))
    profile = Profile([0.4, 0.15, 0.08, 0.05], latency=latency)
    prompts = [Prompt(str(i), "tiny", "", token_ids=tuple(x)) for i, x in enumerate(ids)]
    return target, "early-exit:2", None, profile, prompts[:args.calib], prompts[args.calib:]


def real_setup(args):
    from treeopt.api import load_pair
    from treeopt.cli.args import set_threads
    from treeopt.profile import Profile

    set_threads(args.threads)
    pair = load_pair(args.target, args.draft, device="cpu")
    profile = Profile.load(args.profile or default_profile())
    calib, bench = split_prompts(args)
    return pair.target, args.draft, pair.tokenizer, profile, calib, bench


def default_profile() -> str:
    if Path(SHIPPED_PROFILE).is_file():
        return SHIPPED_PROFILE
    return str(Path(__file__).resolve().parent.parent / SHIPPED_PROFILE)


def ensure_calibration(path: Path, target, draft_spec: str, tokenizer, profile, prompts,
                       args) -> Path:
    """Measure the dynamic-dp calibration on the calibration prompts (kept in ``path`` and
    reused when it is there), with the profile's latency copied in."""
    from treeopt.api import Pair
    from treeopt.decode.drafter import build_drafter
    from treeopt.profile.calibrate import calibrate_pair
    from treeopt.profile.calibration import Calibration

    if path.is_file():
        print(f"calibration: reusing {path}: {Calibration.load(path).summary()}")
        return path
    drafter = build_drafter(draft_spec, target=target, tokenizer=tokenizer)
    pair = Pair(target, drafter.model, tokenizer, "tiny" if args.tiny else args.target,
                draft_spec, drafter)
    t0 = time.perf_counter()
    cal = calibrate_pair(pair, prompts, topk=max(args.tree_topk, 8),
                         max_new_tokens=args.max_new_tokens, latency=profile.latency)
    cal.save(path)
    print(f"calibration: {len(prompts)} prompts, {time.perf_counter() - t0:.0f} s: "
          f"{cal.summary()}")
    print(cal.table())
    return path


def methods_for(args, profile, calibration: Path):
    from treeopt.evaluate.methods import ar_method, drafter_method, tree_method

    b, d, k = args.budget, args.tree_depth, args.tree_topk
    draft = args.draft if not args.tiny else "early-exit:2"
    specs = [f"dynamic:draft={draft},budget={b},depth={d},topk={k}",
             f"dynamic-dp:draft={draft},budget={b},depth={d},topk={k},profile=({calibration})"]
    return ([ar_method(), tree_method(f"dp:{b}x{d}", profile)]
            + [drafter_method(s) for s in specs + list(args.methods)])


def run_real(args) -> int:
    from treeopt.evaluate.runner import EvalConfig, run_eval

    out = Path(args.out or "runs/bench-adaptive")
    out.mkdir(parents=True, exist_ok=True)
    if args.tiny:
        target, draft, tokenizer, profile, calib, bench = tiny_setup(args)
    else:
        target, draft, tokenizer, profile, calib, bench = real_setup(args)
    cal_path = ensure_calibration(out / "calibration.json", target, draft, tokenizer, profile,
                                  calib, args)
    methods = methods_for(args, profile, cal_path.resolve())
    config = EvalConfig(max_new_tokens=args.max_new_tokens, seed=args.seed,
                        sampling=Sampling(temperature=0.0))
    t0 = time.perf_counter()
    result = run_eval(target, draft, bench, methods, config=config, tokenizer=tokenizer,
                      out_dir=out / "eval", resume=args.resume, profile=profile,
                      progress=not args.tiny,
                      meta={"target": "tiny" if args.tiny else args.target, "draft": draft,
                            "dataset": "tiny" if args.tiny else "spec_bench"})
    print(f"eval: {len(bench)} prompts x {len(methods)} methods, "
          f"{time.perf_counter() - t0:.0f} s")
    report(result, [m.name for m in methods])
    for line in result.failures:
        print(f"FAILURE: {line}")
    return 1 if result.failures else 0


def report(result, names) -> None:
    """Per method: tokens/step, mean tree size, tokens/s, speed-up and its spread, time split;
    then which tree wins and why."""
    rows, summary = result.rows, result.summary
    allrows = summary[summary["category"] == "all"] if (summary["category"] == "all").any() \
        else summary
    print(f"\n{'method':58s} {'tok/step':>8} {'nodes':>6} {'tok/s':>7} {'speedup':>8} "
          f"{'ci95':>11} {'draft':>7} {'verify':>7} {'other':>6}  same-as-AR")
    by = {}
    for name in names:
        r = allrows[allrows["method"] == name]
        if not len(r):
            continue
        r = r.iloc[0]
        m = rows[rows["method"] == name]
        forwards = m["target_forwards"].sum()
        nodes = 1 + m["drafted"].fillna(0).sum() / forwards if forwards else math.nan
        ci = (f"{r['speedup_ci95_low']:.2f}-{r['speedup_ci95_high']:.2f}"
              if r["speedup_ci95_low"] == r["speedup_ci95_low"] else "-")
        by[name] = dict(r, nodes=nodes)
        print(f"{name[:58]:58s} {r['tokens_per_step']:>8.2f} {nodes:>6.1f} "
              f"{r['tokens_per_s']:>7.2f} {r['speedup']:>7.2f}x {ci:>11} "
              f"{r['draft_ms_per_step']:>7.1f} {r['verify_ms_per_step']:>7.1f} "
              f"{r['other_ms_per_step']:>6.1f}  {r['matches_ar']}")
    static = next((n for n in names if n.startswith("dp:")), None)
    if static in by:
        s = by[static]
        for name in names:
            if name in ("ar", static) or name not in by:
                continue
            d = by[name]
            verdict = "wins" if d["speedup"] > s["speedup"] else "loses"
            print(f"{name} vs {static}: {verdict} ({d['speedup']:.2f}x vs {s['speedup']:.2f}x): "
                  f"tokens/step {d['tokens_per_step']:.2f} vs {s['tokens_per_step']:.2f}, "
                  f"draft {d['draft_ms_per_step']:.1f} vs {s['draft_ms_per_step']:.1f} ms/step, "
                  f"verify {d['verify_ms_per_step']:.1f} vs {s['verify_ms_per_step']:.1f}, "
                  f"other {d['other_ms_per_step']:.1f} vs {s['other_ms_per_step']:.1f}, "
                  f"nodes {d['nodes']:.1f} vs {s['nodes']:.1f}")


# ---------------------------------------------------------------------------- main
def main(argv=None) -> int:
    import torch

    args = parse_args(argv)
    threads = torch.get_num_threads()
    try:
        budgets = [int(b) for b in args.budgets.split(",") if b.strip()]
        steps = 20 if args.tiny else args.steps
        print_choice_times(choice_times(budgets, steps, args.depth, args.topk), args.depth,
                           args.topk)
        if args.real or args.tiny:
            return run_real(args)
        return 0
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    sys.exit(main())
