"""Model-free drafters vs Hugging Face prompt lookup vs plain decoding, per Spec-Bench category.

A thin wrapper around ``treeopt eval``: every method runs on every prompt, interleaved per
prompt in a rotating order, greedy, with the same number of new tokens; outputs are checked
token for token against plain decoding. Before the run it builds a datastore from the
Spec-Bench prompts that are *not* evaluated (so the datastore drafter is measured on text it
has not indexed); it is ``OUT/heldout-store.npz``, built before any method runs, so a
``--drafter`` may name it (``auto:datastore=(OUT/heldout-store.npz)``). Afterwards it
prints, per category, the speed-up of every method, HF prompt lookup side by side with
treeopt's best drafter, and the per-step time split (draft / verify / other milliseconds per
step) that explains each figure. It does so at every --temperatures
value (greedy, then sampled at 0.7 and 1.0 with fixed seeds and the --rule named).

    OMP_WAIT_POLICY=PASSIVE python scripts/bench_drafters.py --out runs/bench-drafters

``--target`` takes any model spec ``treeopt eval`` takes, a saved model folder with its
tokenizer included (e.g. a tiny random model with ``--per-category 1 --max-new-tokens 8``
checks the script in seconds).

Targets (issue "drafters"): >= HF prompt lookup in every category, >= 1.3x on translation,
extraction and math_reasoning, never below 0.97x.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: steady CPU timings

# The tree `treeopt tune --draft ngram` chose for SmolLM2 on the development CPU (shipped).
TUNED_NGRAM = "growmaps/smollm2-ngram-cpu.pt"


def tuned_ngram() -> str:
    """The shipped tuned growmap, as the repository-relative path when run from the
    repository root (the method's name stays short), else found beside this script."""
    if Path(TUNED_NGRAM).is_file():
        return TUNED_NGRAM
    return str(Path(__file__).resolve().parent.parent / TUNED_NGRAM)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="smollm2",
                    help="target model spec: smollm2 (default), a model folder with its "
                         "tokenizer, a hub id")
    ap.add_argument("--per-category", type=int, default=4,
                    help="prompts per Spec-Bench category (13 categories; default 4)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--hf-prompt-lookup", default="2",
                    help="HF prompt_lookup_num_tokens values to compare (default 2, HF's "
                         "best on this CPU)")
    ap.add_argument("--drafter", dest="drafters", action="append", default=None,
                    help="treeopt drafter methods SPEC[@SHAPE] (default: ngram over chain:3, "
                         "chain:4, chain:6 and the tree `treeopt tune --draft ngram` chose, "
                         "and the held-out datastore over chain:4)")
    ap.add_argument("--no-datastore", action="store_true",
                    help="skip building and evaluating the held-out datastore")
    ap.add_argument("--temperatures", default="0,0.7,1.0",
                    help="one eval run per temperature, same prompts and seed (0 = greedy, "
                         "outputs checked against plain decoding; default 0,0.7,1.0)")
    ap.add_argument("--rule", default="traversal",
                    help="verification rule of the sampled runs (default traversal)")
    ap.add_argument("--out", required=True, help="results folder (treeopt eval --out)")
    ap.add_argument("--resume", action="store_true", help="continue an interrupted run")
    return ap.parse_args(argv)


def held_out_corpus(eval_ids: set[str], path: Path) -> int:
    """Spec-Bench prompts not evaluated, as a JSONL corpus (one document per turn)."""
    from treeopt.datasets import load_prompts

    n = 0
    with open(path, "w", encoding="utf-8") as fh:
        for p in load_prompts("spec_bench"):
            if p.id in eval_ids:
                continue
            for turn in p.turns:
                fh.write(json.dumps({"text": turn}) + "\n")
                n += 1
    return n


def main(argv=None) -> int:
    import torch

    threads = torch.get_num_threads()  # `treeopt eval --threads` sets them for the process
    try:
        return _run(parse_args(argv))
    finally:
        torch.set_num_threads(threads)


def _run(args) -> int:
    from treeopt.cli import main as cli
    from treeopt.datasets import load_prompts

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    n = 13 * args.per_category
    evaluated = load_prompts("spec_bench", n=n, seed=args.seed)
    drafters = args.drafters or ["ngram@chain:3", "ngram@chain:4", "ngram@chain:6",
                                 f"ngram@{tuned_ngram()}"]
    if not args.no_datastore:
        store = out / "heldout-store.npz"
        if not store.exists():
            corpus = out / "heldout-corpus.jsonl"
            docs = held_out_corpus({p.id for p in evaluated}, corpus)
            print(f"datastore corpus: {docs} Spec-Bench turns not evaluated", flush=True)
            rc = cli(["datastore", "build", "--corpus", str(corpus), "--tokenizer", args.target,
                      "--out", str(store)])
            if rc:
                return rc
        drafters = drafters + [f"datastore:{store}@chain:4"]
    rc = 0
    for temp in temperatures(args.temperatures):
        folder = out / run_name(temp, args.rule)
        eval_args = ["eval", "--target", args.target, "--draft", "none", "--dataset",
                     "spec_bench", "-n", str(n), "--seed", str(args.seed), "--max-new-tokens",
                     str(args.max_new_tokens), "--threads", str(args.threads), "--out",
                     str(folder), "--no-report", "--temperature", str(temp), "--rule",
                     args.rule]
        for d in drafters:
            eval_args += ["--drafter", d]
        if args.hf_prompt_lookup:
            eval_args += ["--hf-prompt-lookup", args.hf_prompt_lookup]
        if args.resume:
            eval_args.append("--resume")
        t0 = time.perf_counter()
        rc = cli(eval_args) or rc
        print(f"eval {run_label(temp, args.rule)}: {time.perf_counter() - t0:.0f} s, exit {rc}",
              flush=True)
        if (folder / "results.json").exists():
            print(f"\n== {run_label(temp, args.rule)}")
            verdict(folder, drafters, args.hf_prompt_lookup)
    return rc


def temperatures(text: str) -> list[float]:
    """"0,0.7,1.0" -> [0.0, 0.7, 1.0]."""
    return [float(t) for t in text.split(",") if t.strip()]


def run_name(temperature: float, rule: str) -> str:
    """The eval folder of one temperature: "eval" for greedy (as before sampled rows were
    added), "eval-T0.7-traversal" for a sampled run."""
    return "eval" if temperature == 0 else f"eval-T{temperature:g}-{rule}"


def run_label(temperature: float, rule: str) -> str:
    return ("greedy (temperature 0)" if temperature == 0 else
            f"temperature {temperature:g}, rule {rule}, seed per prompt fixed")


def verdict(folder: Path, drafters: list[str], hf: str) -> None:
    """Per category: HF prompt lookup's best speed-up beside treeopt's best drafter; per
    treeopt method: its lowest category speed-up and in how many categories it matches HF."""
    from treeopt.evaluate.results import load_results

    rows = load_results(folder)["summary"]
    hf_names = [f"hf-pld:{k}" for k in hf.split(",") if k] if hf else []
    by_cat: dict[str, dict[str, float]] = {}
    for r in rows:
        by_cat.setdefault(r["category"], {})[r["method"]] = r["speedup"] or 0.0
    cats = [c for c in by_cat if c != "all"]
    hf_best = {c: max((by_cat[c].get(m, 0.0) for m in hf_names), default=0.0) for c in by_cat}
    print("\ncategory            HF best   treeopt best")
    for cat in cats + ["all"]:
        ours = [(by_cat[cat].get(m, 0.0), m) for m in drafters if m in by_cat.get(cat, {})]
        if ours:
            best, name = max(ours)
            print(f"{cat:18s}  {hf_best[cat]:5.2f}x    {best:5.2f}x {name}")
    print("\nmethod                          lowest category   categories >= HF best")
    for m in drafters:
        vals = [(by_cat[c].get(m, 0.0), c) for c in cats if m in by_cat[c]]
        if vals:
            low, where = min(vals)
            ge = sum(by_cat[c][m] >= hf_best[c] for c in cats if m in by_cat[c])
            print(f"{m:30s}  {low:5.2f}x {where:14s}  {ge}/{len(vals)}")


if __name__ == "__main__":
    sys.exit(main())
