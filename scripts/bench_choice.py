"""Regret and prediction error of treeopt's choices, on prompts nobody tuned on.

A thin wrapper around :func:`treeopt.evaluate.choice.bench_choice`: for a pair and a data set,
``tune`` chooses a configuration (drafter, tree or per-step sizes) on one split of the
prompts; on the held-out split ``eval`` measures, interleaved, plain decoding, that choice, the
``auto`` drafter and a grid (chains of 2..16 drafted tokens, DP trees of 8/16/32 nodes, Hugging
Face prompt lookup; a grid method equal to tune's choice is measured once, as the choice),
once per dtype and per ``--temperatures`` value (sampled runs: tuned at that temperature,
verified by ``--rule``, seeded). Printed per dtype, temperature and category: plain
decoding's tokens/s, the speed-ups over plain decoding *in the same dtype* (so a dtype's gain
never hides in a speculation figure), regret (best measured / chosen - 1) of tune's choice
and of ``auto``, and the tune's prediction error (predicted / measured - 1, both of whole
generations: the prefill tune timed is in the prediction as it is in eval's times). Then the
plain speed of each dtype and the one ``--dtype auto`` picks after ``tune --dtypes`` (the dtype
whose choice is predicted fastest). With ``--out`` nothing measured is lost to an interruption:
``--resume`` continues the run (tunes resumed, finished prompts kept).

    OMP_WAIT_POLICY=PASSIVE python scripts/bench_choice.py --target smollm2 --draft ngram \\
        --dtypes float32,bfloat16 --tune-prompts 8 --eval-prompts 13
    OMP_WAIT_POLICY=PASSIVE python scripts/bench_choice.py --temperatures 0,0.7,1.0 \\
        --rule traversal

Targets (issue 16): regret <= 3 % and |prediction error| <= 10 %.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: steady CPU timings


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="smollm2", help="target model spec (default smollm2)")
    ap.add_argument("--draft", default="ngram", help="the drafter tune profiles (default ngram)")
    ap.add_argument("--dataset", default="spec_bench")
    ap.add_argument("--categories", default=None)
    ap.add_argument("--dtypes", default="float32",
                    help="comma-separated dtypes to measure (default float32)")
    ap.add_argument("--tune-prompts", type=int, default=8)
    ap.add_argument("--eval-prompts", type=int, default=13)
    ap.add_argument("--tune-tokens", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--chains", type=ints, default=[2, 4, 8, 16])
    ap.add_argument("--dp-sizes", type=ints, default=[8, 16, 32])
    ap.add_argument("--hf-prompt-lookup", type=ints, default=[3])
    ap.add_argument("--latency-tokens", type=ints, default=None)
    ap.add_argument("--latency-repeats", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0, help="prompt split and sampling seed")
    ap.add_argument("--temperatures", type=floats, default=[0.0],
                    help="comma-separated; each is its own tune and measurement (default 0: "
                         "greedy; e.g. 0,0.7,1.0)")
    ap.add_argument("--rule", default="sequoia",
                    help="verification rule when sampling (sequoia, specinfer, traversal, "
                         "block: chains only, with --dp-sizes '')")
    ap.add_argument("--stop-at-eos", action="store_true")
    ap.add_argument("--repeats", type=int, default=1,
                    help="run each measured generation this many times and keep the fastest "
                         "(default 1; 3 on a noisy machine)")
    ap.add_argument("--out", default=None,
                    help="keep everything here: the settings, each run's tune and eval "
                         "folders (rows as prompts finish) and the tables (choice.json)")
    ap.add_argument("--resume", action="store_true",
                    help="continue the interrupted run in --out (same options)")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    from transformers.utils import logging as hf_logging

    from treeopt.evaluate.choice import ChoiceSettings, bench_choice
    from treeopt.profile.latency import LatencySettings

    threads, verbosity = torch.get_num_threads(), hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    from treeopt.errors import TreeoptError, one_line

    try:
        settings = ChoiceSettings(
            tune_prompts=args.tune_prompts, eval_prompts=args.eval_prompts,
            dtypes=tuple(d.strip() for d in args.dtypes.split(",") if d.strip()),
            max_new_tokens=args.max_new_tokens, tune_tokens=args.tune_tokens,
            chains=tuple(args.chains), dp_sizes=tuple(args.dp_sizes),
            hf_lookup=tuple(args.hf_prompt_lookup), seed=args.seed,
            categories=args.categories, stop_at_eos=args.stop_at_eos,
            latency=LatencySettings(tokens=args.latency_tokens, repeats=args.latency_repeats),
            temperatures=tuple(args.temperatures), rule=args.rule, repeats=args.repeats)
        if args.resume and not args.out:
            raise TreeoptError("--resume continues the run in --out; give --out")
        report = bench_choice(args.target, args.draft, args.dataset, settings, out=args.out,
                              resume=args.resume)
    except TreeoptError as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2
    finally:
        torch.set_num_threads(threads)
        hf_logging.set_verbosity(verbosity)
        (hf_logging.enable_progress_bar if bars else hf_logging.disable_progress_bar)()
    table, dtypes = report.table(), report.dtypes()
    for run in report.runs:
        for note in run.notes:
            print(f"note ({run.dtype}, T={run.temperature:g}): {note}", file=sys.stderr)
    print(f"{args.target} + {args.draft}, {args.dataset}: tune on "
          f"{len(report.settings['tune_prompts'])} prompts, measure on "
          f"{len(report.settings['eval_prompts'])} others, {args.max_new_tokens} new tokens, "
          f"{args.threads} threads; speed-ups over plain decoding in the same dtype"
          + ("" if args.temperatures == [0.0] else
             f"; temperatures {','.join(f'{t:g}' for t in args.temperatures)}, sampled runs "
             f"verified by {args.rule}"))
    with_pd = __import__("pandas")
    with with_pd.option_context("display.width", 250, "display.max_columns", 30):
        print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
        print()
        print(dtypes.to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    held = report.held_out()
    if len(held):
        print()
        print("tune's choice replayed along plain decoding's outputs of the held-out prompts "
              "(first turns), against the speed-up measured there without the prefill:")
        with with_pd.option_context("display.width", 250, "display.max_columns", 30):
            print(held.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
        for _, r in held.iterrows():
            if isinstance(r.get("held_out_pick"), str):
                print(f"{r['dtype']}: replayed on the held-out prompts it would pick "
                      f"{r['held_out_pick']} (measured {r['held_out_pick_measured']:.3f}x "
                      f"without the prefill; best {r['held_out_best']} "
                      f"{r['held_out_best_measured']:.3f}x): the predictor's own regret "
                      f"{r['model_regret']:+.1%}, the rest is the tune split")
    priced = report.priced()
    if len(priced):
        print()
        print("every method's measured steps priced with tune's latency curve (plus its "
              "measured drafting, no prefill): its decisions without the timing noise between "
              "methods")
        with with_pd.option_context("display.width", 250, "display.max_columns", 30):
            print(priced.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    every = table[table["category"] == "all"]
    for _, r in every.iterrows():
        head = f"{r['dtype']}" + (f" T={r['temperature']:g} ({r['rule']})"
                                  if r["temperature"] > 0 else "")
        print(f"{head}: tune chose {r['tuned_method']}")
        ci = r.get("regret_tuned_ci95_low")
        ci = ("" if ci is None or ci != ci else
              f" (95 % interval {ci:+.1%} to {r['regret_tuned_ci95_high']:+.1%})")
        print(f"{head}: regret tuned {r['regret_tuned']:+.1%}{ci}, auto "
              f"{r['regret_auto']:+.1%}; prediction error {r['prediction_error_tuned']:+.1%} "
              f"(targets: regret <= 3 %, |error| <= 10 %)")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        drop = ("output_ids", "output_text")
        rows = {r.dtype + (f"-t{r.temperature:g}" if r.temperature > 0 else ""):
                r.rows.drop(columns=[c for c in drop if c in r.rows]).to_dict(orient="records")
                for r in report.runs if r.rows is not None}
        (out / "choice.json").write_text(json.dumps(
            {"settings": report.settings, "table": table.to_dict(orient="records"),
             "held_out_replay": held.to_dict(orient="records"),
             "priced_steps": priced.to_dict(orient="records"),
             "dtypes": dtypes.to_dict(orient="records"), "rows": rows}, indent=1,
            default=str) + "\n")
    failures = [f"{r.dtype} {row['method']} {row['prompt_key']}: first differs at new token "
                f"{row.get('first_mismatch')}" for r in report.runs
                if r.rows is not None and "exactness" in r.rows
                for _, row in r.rows[r.rows["exactness"] == "differs"].iterrows()]
    if failures:
        print(f"GREEDY EXACTNESS FAILED for {len(failures)} output(s) (beyond the dtype's tie "
              "tolerance):", file=sys.stderr)
        for line in failures:
            print(f"  {line}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
