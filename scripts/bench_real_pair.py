"""The real pair on this machine: Qwen2.5-Coder-1.5B-Instruct verified, 0.5B drafting.

A thin wrapper around ``treeopt tune`` and ``treeopt eval``:

1. for every draft variant (fp32, int8, a reduced vocabulary, both; see ``VARIANTS``)
   ``treeopt tune`` profiles acceptance on HumanEval prompts that are *not* evaluated and the
   latency of target and draft here, and the hardware-aware DP chooses that variant's tree;
2. ``treeopt eval`` runs, interleaved per prompt and greedy, plain decoding, Hugging Face
   assisted generation with the same pair, chains of the fp32 draft, every variant over the
   tree chosen for it, and the int8 draft over the best chain, on HumanEval and on Spec-Bench
   categories (one eval run per data set; every output is checked against plain decoding);
3. it prints, per data set and category, the speed-up of every method beside HF assisted
   generation, and for every tuned tree its predicted tokens/s next to the measured one;
   step 2 runs greedy and again sampled at each other --temperatures value (fixed seeds, the
   --rule named; sampled outputs are not compared token for token, only greedy ones).

    OMP_WAIT_POLICY=PASSIVE python scripts/bench_real_pair.py --out runs/bench-real-pair

Needs the pair: ``treeopt models fetch qwen2.5-coder`` (about 1.6 GB download). Everything is
resumable (``--resume``): tune folders already written are reused, eval runs continue.
``--target``/``--draft`` take any model specs (a tiny random pair with ``--tiny`` sizes checks
the script in seconds).

Targets (issue "real pair"): >= 1.7x plain decoding on HumanEval with the best lossless
configuration, >= HF assisted generation in every category, predicted tokens/s of the chosen
tree within 15 % of measured.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: steady CPU timings

# Draft variants: name -> options appended to the model drafter spec (treeopt.decode.
# cheap_drafts): the target is never touched, so every variant stays lossless.
VARIANTS = {
    "fp32": "",
    "int8": "quant=int8",
    "vocab32k": "vocab=32768",
    "int8+vocab32k": "quant=int8,vocab=32768",
}
CATEGORIES = "translation,math_reasoning,extraction,qa,coding"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="qwen2.5-coder-1.5b", help="target model spec")
    ap.add_argument("--draft", default="qwen2.5-coder-0.5b", help="draft model spec")
    ap.add_argument("--variants", default=",".join(VARIANTS),
                    help=f"draft variants to tune and evaluate (of {', '.join(VARIANTS)})")
    ap.add_argument("--humaneval", type=int, default=8, help="HumanEval prompts evaluated")
    ap.add_argument("--categories", default=CATEGORIES,
                    help="Spec-Bench categories evaluated ('' = none)")
    ap.add_argument("--per-category", type=int, default=2, help="prompts per category")
    ap.add_argument("--chains", default="2,3,4",
                    help="chains of the fp32 draft, by drafted tokens per step")
    ap.add_argument("--tune-prompts", type=int, default=6,
                    help="held-out HumanEval prompts each variant's acceptance profile uses")
    ap.add_argument("--tune-tokens", type=int, default=32,
                    help="continuation length of the acceptance profile")
    ap.add_argument("--max-size", type=int, default=16,
                    help="largest tree the hardware-aware choice considers")
    ap.add_argument("--latency-tokens", default="1,2,3,4,6,8,12,16",
                    help="tree sizes timed by the latency profile")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per latency point")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="float32",
                    help="dtype of the target and of the plain draft variants (default "
                         "float32; int8 variants are quantised from float32 weights in any "
                         "dtype)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-hf", action="store_true", help="skip HF assisted generation")
    ap.add_argument("--no-pass-at-1", action="store_true",
                    help="skip scoring HumanEval pass@1 (runs the generated code in treeopt's "
                         "best-effort sandbox)")
    ap.add_argument("--temperatures", default="0,0.7,1.0",
                    help="eval runs per temperature, same prompts and seed (0 = greedy, "
                         "outputs checked against plain decoding; default 0,0.7,1.0)")
    ap.add_argument("--rule", default="traversal",
                    help="verification rule of the sampled runs (default traversal)")
    ap.add_argument("--out", required=True, help="results folder")
    ap.add_argument("--resume", action="store_true", help="continue an interrupted run")
    return ap.parse_args(argv)


def variant_spec(draft: str, options: str) -> str:
    """The drafter spec of a draft variant: the plain model spec, or ``model:SPEC,OPTIONS``."""
    return f"model:{draft},{options}" if options else draft


def held_out_humaneval(n_eval: int, seed: int, path: Path) -> list[str]:
    """Writes the HumanEval prompts that are not evaluated as a JSONL prompt file (the
    acceptance profiles use them) and returns the ids of the evaluated ones."""
    from treeopt.datasets import load_prompts

    evaluated = load_prompts("humaneval", n=n_eval, seed=seed)
    ids = {p.id for p in evaluated}
    with open(path, "w", encoding="utf-8") as fh:
        for p in load_prompts("humaneval"):
            if p.id not in ids:
                fh.write(json.dumps({"question_id": p.id, "category": p.category,
                                     "turns": list(p.turns)}) + "\n")
    return sorted(ids)


def tune_variant(args, name: str, spec: str, prompts: Path, out: Path, cli) -> Path | None:
    """``treeopt tune`` of one draft variant into ``out`` (reused when already complete);
    returns the growmap it chose, or None when tuning failed."""
    tree = out / "tree.pt"
    if (out / "summary.json").exists():
        return tree
    argv = ["tune", "--target", args.target, "--draft", spec, "--dataset", str(prompts),
            "--prompts", str(args.tune_prompts), "--max-new-tokens", str(args.tune_tokens),
            "--seed", str(args.seed + 1), "--threads", str(args.threads), "--dtype",
            args.dtype, "--dtypes", "none", "--tokens",
            args.latency_tokens, "--repeats", str(args.repeats), "--max-size",
            str(args.max_size), "--out-dir", str(out), "--quiet"]
    if (out / "profile.json").exists():
        argv.append("--resume")
    t0 = time.perf_counter()
    rc = cli(argv)
    print(f"tune {name}: {time.perf_counter() - t0:.0f} s, exit {rc}", flush=True)
    return tree if rc == 0 and tree.exists() else None


def main(argv=None) -> int:
    import torch

    threads = torch.get_num_threads()  # the CLI's --threads sets them for the process
    try:
        return _run(parse_args(argv))
    finally:
        torch.set_num_threads(threads)


def _run(args) -> int:
    from treeopt.cli import main as cli

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        print(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}", file=sys.stderr)
        return 2
    prompts = out / "tune-prompts.jsonl"
    held_out_humaneval(args.humaneval, args.seed, prompts)
    tuned: dict[str, tuple[str, Path]] = {}
    for name in names:
        spec = variant_spec(args.draft, VARIANTS[name])
        tree = tune_variant(args, name, spec, prompts, out / f"tune-{name}", cli)
        if tree is not None:
            tuned[name] = (spec, tree)
    methods = [f"{spec}@{tree}" for spec, tree in tuned.values()]
    if "int8" in names:
        best_chain = max(int(c) for c in args.chains.split(",") if c.strip())
        methods.append(f"{variant_spec(args.draft, VARIANTS['int8'])}@chain:"
                       f"{min(best_chain, 3) + 1}")
    common = ["--target", args.target, "--draft", args.draft, "--chain", args.chains,
              "--max-new-tokens", str(args.max_new_tokens), "--threads", str(args.threads),
              "--dtype", args.dtype,
              "--seed", str(args.seed), "--no-report"]
    for m in methods:
        common += ["--drafter", m]
    if not args.no_hf:
        common.append("--hf-assisted")
    if args.resume:
        common.append("--resume")
    runs = [("humaneval", ["--dataset", "humaneval", "-n", str(args.humaneval)])]
    cats = [c.strip() for c in args.categories.split(",") if c.strip()]
    if cats:
        runs.append(("spec_bench", ["--dataset", "spec_bench", "--categories", ",".join(cats),
                                    "-n", str(args.per_category * len(cats))]))
    rc = 0
    temps = [float(t) for t in args.temperatures.split(",") if t.strip()]
    for temp in temps:
        sampled = ["--temperature", str(temp), "--rule", args.rule]
        for label, data in runs:
            name = run_name(label, temp, args.rule)
            t0 = time.perf_counter()
            rc = cli(["eval", *data, *common, *sampled, "--out", str(out / name)]) or rc
            print(f"eval {name}: {time.perf_counter() - t0:.0f} s, exit {rc}", flush=True)
    humaneval = out / "eval-humaneval"
    if (humaneval / "results.json").exists() and not args.no_pass_at_1:
        score_pass_at_1(humaneval)
    for temp in temps:
        for label, _ in runs:
            folder = out / run_name(label, temp, args.rule)
            if (folder / "results.json").exists():
                verdict(folder, label if temp == 0 else
                        f"{label}, temperature {temp:g}, rule {args.rule}", tuned, temp == 0,
                        args.max_new_tokens)
    return rc


def run_name(label: str, temperature: float, rule: str) -> str:
    """An eval folder: "eval-humaneval" greedy, "eval-humaneval-T0.7-traversal" sampled."""
    return f"eval-{label}" if temperature == 0 else f"eval-{label}-T{temperature:g}-{rule}"


def score_pass_at_1(folder: Path) -> None:
    """pass@1 of every method's HumanEval completions (a lossless greedy method must score
    exactly what plain decoding scores), run in treeopt's sandbox; already scored programs
    are not run again."""
    from treeopt.evaluate.passk import format_pass, score_run

    t0 = time.perf_counter()
    scored = score_run(folder)
    print(f"pass@1 scoring: {time.perf_counter() - t0:.0f} s", flush=True)
    print(format_pass(scored), flush=True)


def verdict(folder: Path, label: str, tuned: dict[str, tuple[str, Path]],
            greedy: bool = True, max_new_tokens: int = 48) -> None:
    """Per category: every method's speed-up (95 % interval when recorded) beside HF assisted
    generation; for the tuned trees: predicted vs measured tokens/s, and the speed-up of
    whole generations of ``max_new_tokens`` (prefill included) vs the measured one."""
    from treeopt.evaluate.results import load_results

    doc = load_results(folder)
    rows = doc["summary"]
    by_cat: dict[str, dict[str, dict]] = {}
    for r in rows:
        by_cat.setdefault(r["category"], {})[r["method"]] = r
    note = "outputs equal to plain" if greedy else "sampled, outputs not compared"
    print(f"\n== {label}: speed-up over plain decoding (tokens/step; {note})")
    for cat, methods in by_cat.items():
        hf = methods.get("hf-assisted", {}).get("speedup")
        print(f"-- {cat}" + (f"  (HF assisted {hf:.2f}x)" if hf else ""))
        for name, r in sorted(methods.items(), key=lambda kv: -(kv[1]["speedup"] or 0)):
            tps = r.get("tokens_per_step")
            print(f"   {name:70s} {r['speedup'] or 0:5.2f}x  {r['tokens_per_s']:6.2f} tok/s  "
                  f"{(tps or 0):4.2f}  {r.get('matches_ar', '')}")
    # One data set of one category has no separate "all" row.
    overall = by_cat.get("all") or (next(iter(by_cat.values())) if len(by_cat) == 1 else {})
    print(f"\n== {label}: predicted vs measured tokens/s of the tuned trees")
    for name, (spec, tree) in tuned.items():
        summary = tree.parent / "summary.json"
        measured = next((r for m, r in overall.items() if m.startswith(f"{spec}@")), None)
        if not summary.exists() or measured is None:
            continue
        pred = json.loads(summary.read_text(encoding="utf-8")).get("prediction", {})
        p_tps = pred.get("tokens_per_s")
        if p_tps:
            err = measured["tokens_per_s"] / p_tps - 1
            print(f"   {name:14s} predicted {p_tps:6.2f} tok/s ({pred.get('speedup', 0):.2f}x), "
                  f"measured {measured['tokens_per_s']:6.2f} tok/s "
                  f"({measured['speedup'] or 0:.2f}x): {err:+.0%}")
        whole = pred.get("whole")
        if whole and measured.get("speedup") and pred.get("speedup"):
            # tune's prefill times at its prompts' mean length, over this run's answer length
            from treeopt.search.hardware import PrefillCost, end_to_end

            length = whole["prompt_tokens"]
            cost = PrefillCost(whole["prefill_ms"] / length, whole["draft_prefill_ms"] / length)
            p_whole = end_to_end(pred["speedup"], pred["plain_ms"], cost,
                                 [(length, max_new_tokens)])
            print(f"   {'':14s} whole generations, prefill included: predicted "
                  f"{p_whole:.2f}x ({max_new_tokens} tokens after {length}), measured "
                  f"{measured['speedup']:.2f}x: {p_whole / measured['speedup'] - 1:+.0%} "
                  "(prediction error)")


if __name__ == "__main__":
    sys.exit(main())
