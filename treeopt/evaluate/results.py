"""The results of ``treeopt eval``: the files of a results folder, the metrics' definitions,
per-method and per-category summaries, and reading the results back
(``treeopt.evaluate.runner`` writes the rows as it measures them)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

from treeopt.errors import one_line
from treeopt.evaluate import exactness as _exactness, spread as _spread
from treeopt.evaluate.errors import EvalError
from treeopt.evaluate.methods import ALL, AR
from treeopt.evaluate.outdir import atomic_write
from treeopt.limits import MAX_RESULTS_BYTES, read_json

ROWS_FILE = "rows.jsonl"


RUN_FILE = "run.json"


RESULTS_JSON = "results.json"


SUMMARY_CSV = "summary.csv"


PER_PROMPT_CSV = "per_prompt.csv"


METRICS_JSON = "metrics.json"


METRICS = {
    "prompt_tokens": "tokens of the prompt the model saw (after any cut to fit the window)",
    "truncated_tokens": "prompt tokens cut from the left so that the prompt plus "
                        "max_new_tokens fit the model window (the smallest "
                        "max_position_embeddings of the models run); 0 = none",
    "new_tokens": "generated tokens (prompt tokens never counted); with stop_at_eos off every "
                  "method generates exactly max_new_tokens per turn",
    "seconds": "wall-clock seconds of the generate call (prefill included), summed; with "
               "repeats, the fastest run's",
    "repeat_seconds": "with repeats above 1: every run's seconds, the last one's state kept "
                      "(the row's times are the fastest run's that generated the same tokens)",
    "tokens_per_s": "new_tokens / seconds: generated tokens only, never prompt tokens, never "
                    "characters",
    "speedup": "plain decoding's time / this method's time on the same prompts for the same "
               "number of new tokens (computed per token: (ar_seconds / ar_tokens) / "
               "(seconds / new_tokens), identical when the token counts are equal)",
    "speedup_median": "median over prompts of each prompt's speed-up (its turns summed): "
                      "how a typical prompt fares, unlike speedup, which long prompts weigh",
    "speedup_ci95_low": f"lower end of a bootstrap {_spread.LEVEL:.0%} interval of speedup: "
                        f"{_spread.RESAMPLES} resamples of the prompts with replacement (seed "
                        f"{_spread.SEED}), each computing speedup's ratio of summed times; "
                        "the 2.5th percentile; empty with fewer than "
                        f"{_spread.MIN_PROMPTS} prompts",
    "speedup_ci95_high": "upper end of that interval (the 97.5th percentile)",
    "flag": "why a row's speed-up cannot be trusted, ';'-separated, empty = nothing found: "
            + "; ".join(f"{k} = {v}" for k, v in _spread.FLAGS.items()),
    "tokens_per_step": "tokens committed by verification steps / target verification forwards "
                       "(accepted draft tokens + the bonus token per step; the first token, "
                       "which comes from the prefill forward, is excluded); 1 for plain "
                       "decoding. hf-* methods: (new tokens - 1) / (target forwards - 1), "
                       "forwards counted with a hook (Hugging Face verifies candidates in its "
                       "prefill forward too, so this is the same count to within one step)",
    "acceptance_rate": "accepted draft tokens / drafted draft tokens (tree nodes speculated); "
                       "hf-* methods: candidates counted from the lengths of the target's "
                       "inputs, accepted = new tokens - target forwards",
    "mean_accepted": "accepted draft tokens per verification step (mean accepted length)",
    "mean_nodes": "tree nodes verified per verification step, root included (1 = a plain "
                  "decoding step): the draft budget a method actually spent; adaptive drafters "
                  "(egag, dynamic trees, cascades, n-gram fills) change it from step to step, "
                  "and a fixed tree shrinks only where the remaining tokens cut it",
    "mean_depth": "depth (edges below the root) of the verified tree per verification step",
    "expected_tokens_per_step": "F(tree) under the acceptance profile given to the run, when "
                                "one was given",
    "matches_ar": "greedy only: turns whose output equals plain decoding's token for token / "
                  "turns compared; in the summary '5/6 (+1 tie)' counts apart the outputs "
                  "that differ only at a numerical tie (see exactness). A later turn whose "
                  "prompt differs from plain decoding's (an earlier turn differed) is "
                  "compared with plain decoding of its own prompt",
    "exactness": "greedy only: 'equal' (plain decoding's output token for token), 'tie' "
                 "(differs first at a numerical tie: the token plain decoding chose and the "
                 "token this method chose both have logits within tie_tolerance of the "
                 "target's best logit there, recomputed with one target forward; half "
                 "precision rounds batched tree passes and one-token steps differently, so "
                 "the argmax of tied logits may go either way; not a failure) or 'differs' "
                 "(any other difference: a failure, exit status 1)",
    "first_mismatch": "greedy only: index (from 0) of the first new token that differs from "
                      "plain decoding's output; empty when equal",
    "tie_gap": "greedy only, at first_mismatch: the target's best logit minus the lower of "
               "the logits of the two tokens that differ (the top-2 gap when they are the "
               "best two)",
    "tie_tolerance": "greedy only, at first_mismatch: the largest tie_gap counted as a "
                     "numerical tie: the model dtype's relative tolerance (float32 1e-4, "
                     "bfloat16 and float16 2**-3: the measured rounding drift between "
                     "one-token and many-token forwards, see scripts/bench_ties.py) times "
                     "the larger magnitude of the logits compared",
    "tree_bucket": "tree-set methods only (treeopt.treeset): the index of the context range "
                   "whose tree decoded this prompt, chosen by prompt tokens + "
                   "max_new_tokens // 2",
    "tree_nodes": "tree-set methods only: nodes (root included) of the tree that decoded this "
                  "prompt",
    "prefill_ms": "milliseconds of the prefill (prompt forwards and the first token) per turn",
    "draft_ms_per_step": "drafting milliseconds (draft forwards, candidate look-ups) per "
                         "verification step; hf-pld: inside other_ms_per_step",
    "verify_ms_per_step": "target verification-forward milliseconds per verification step",
    "other_ms_per_step": "the rest of each step (acceptance walk, cache compaction, "
                         "bookkeeping; Hugging Face's own loop for hf-* methods) in "
                         "milliseconds per verification step; (draft + verify + other) / "
                         "tokens_per_step is the time per generated token",
    "output_text": "results.json and rows.jsonl only: the generated text up to the first "
                   "end-of-sequence id (the answer; a fixed-length generation goes on past "
                   "it), special tokens removed; empty without a tokenizer",
    "output_ids": "results.json and rows.jsonl only: every generated token id",
    "pass_status": "pass@1 runs only (treeopt.evaluate.passk): 'passed' (exit 0 after every "
                   "test of the problem ran), 'failed' (a test assertion failed), 'timeout' "
                   "or 'error' (an exception, a crash, a resource limit, an early exit); "
                   "empty = not scored",
    "drafter_choice": "what a choosing drafter (auto) drafted with in this generation, one "
                      "line (steps per candidate; empty for fixed drafters)",
    "pass_reason": "pass@1 runs only: why a sample did not pass, one short line",
    "pass_at_1": "pass@1 runs only: samples passed / samples scored (one sample per prompt: "
                 "the unbiased pass@1 estimate); in greedy mode equal for every lossless "
                 "method",
}


SUMMARY_COLUMNS = ["method", "category", "prompts", "new_tokens", "seconds", "tokens_per_s",
                   "speedup", "speedup_median", "speedup_ci95_low", "speedup_ci95_high",
                   "flag", "tokens_per_step", "acceptance_rate", "mean_accepted",
                   "mean_nodes", "mean_depth",
                   "expected_tokens_per_step", "matches_ar", "pass_at_1", "prefill_ms",
                   "draft_ms_per_step", "verify_ms_per_step", "other_ms_per_step"]


TIME_SPLIT = (("draft_s", "draft_ms_per_step"), ("verify_s", "verify_ms_per_step"),
              ("other_s", "other_ms_per_step"))


def summarise(rows: Any, methods: Sequence[str] | None = None) -> Any:
    """One row per (method, category) plus category "all": sums first, then ratios (so long
    prompts weigh by their tokens). ``rows`` needs method, category, prompt_key, new_tokens,
    seconds, target_forwards, step_tokens, drafted, accepted, steps; matches_ar,
    expected_tokens_per_step and the time split (prefill_s, draft_s, verify_s, other_s) are
    optional (NaN columns when missing). The spread of the speed-up (median per-prompt
    speed-up, seeded bootstrap 95 % interval) and the flags come from
    ``treeopt.evaluate.spread``."""
    import pandas as pd

    if len(rows) == 0:
        return pd.DataFrame(columns=SUMMARY_COLUMNS)
    methods = list(methods) if methods else list(dict.fromkeys(rows["method"]))
    cats = list(dict.fromkeys(rows["category"]))
    groups = [(c, rows[rows["category"] == c]) for c in cats]
    if len(cats) > 1:
        groups.append((ALL, rows))
    out = []
    for cat, g in groups:
        ar = g[g["method"] == AR]
        ar_time_per_token = (ar["seconds"].sum() / ar["new_tokens"].sum()
                             if len(ar) and ar["new_tokens"].sum() else math.nan)
        for name in methods:
            m = g[g["method"] == name]
            if not len(m):
                continue
            tokens = int(m["new_tokens"].sum())
            secs = float(m["seconds"].sum())
            forwards = int(m["target_forwards"].sum())
            step_tokens = int(m["step_tokens"].sum())
            drafted = int(m["drafted"].sum())  # unknown (NaN) counts count as 0
            accepted = int(m["accepted"].sum())
            steps = int(m["steps"].sum())
            speedup = (ar_time_per_token / (secs / tokens) if tokens and secs > 0
                       else math.nan)
            spread = _spread.spread(*_spread.paired_times(g, name, AR)) if len(ar) else {
                "prompts": 0, "speedup_median": math.nan, "speedup_ci95_low": math.nan,
                "speedup_ci95_high": math.nan}
            rec = {
                "method": name, "category": cat, "prompts": int(m["prompt_key"].nunique()),
                "new_tokens": tokens, "seconds": secs,
                "tokens_per_s": tokens_per_second(tokens, secs),
                "speedup": speedup,
                "speedup_median": spread["speedup_median"],
                "speedup_ci95_low": spread["speedup_ci95_low"],
                "speedup_ci95_high": spread["speedup_ci95_high"],
                "flag": _spread.flags(speedup, accepted, spread["prompts"],
                                      spread["speedup_ci95_low"], spread["speedup_ci95_high"],
                                      is_reference=name == AR),
                "tokens_per_step": step_tokens / forwards if forwards else math.nan,
                "acceptance_rate": accepted / drafted if drafted else math.nan,
                "mean_accepted": (accepted / steps if steps and (drafted or accepted)
                                  else math.nan),
                "mean_nodes": _per_forward(m, "mean_nodes"),
                "mean_depth": _per_forward(m, "mean_depth"),
                "expected_tokens_per_step": math.nan,
                "matches_ar": "-",
                "pass_at_1": _pass_at_1(m),
                "prefill_ms": 1000 * _total(m, "prefill_s") / len(m),
            }
            for col, split in TIME_SPLIT:
                rec[split] = 1000 * _total(m, col) / forwards if forwards else math.nan
            if "expected_tokens_per_step" in m and m["expected_tokens_per_step"].notna().any():
                rec["expected_tokens_per_step"] = float(m["expected_tokens_per_step"].dropna()
                                                        .iloc[0])
            if "matches_ar" in m and m["matches_ar"].notna().any():
                states = [_exactness.row_exactness(r) for r in m.to_dict("records")]
                states = [v for v in states if v is not None]
                rec["matches_ar"] = _exactness.count_text(
                    states.count(_exactness.EQUAL), states.count(_exactness.TIE), len(states))
            out.append(rec)
    return pd.DataFrame(out, columns=SUMMARY_COLUMNS)


def _pass_at_1(rows: Any) -> float:
    """Samples passed / samples scored (``pass_status``, set by
    ``treeopt.evaluate.passk``); NaN when no row was scored."""
    if "pass_status" not in rows:
        return math.nan
    scored = [s for s in rows["pass_status"] if isinstance(s, str)]
    return sum(s == "passed" for s in scored) / len(scored) if scored else math.nan


def _per_forward(rows: Any, col: str) -> float:
    """Pooled per-step mean of a per-row mean ``col`` (rows weighted by their target
    forwards); NaN when no row has it."""
    if col not in rows:
        return math.nan
    known = rows[rows[col].notna()]
    forwards = float(known["target_forwards"].sum()) if len(known) else 0.0
    if not forwards:
        return math.nan
    return float((known[col] * known["target_forwards"]).sum()) / forwards


def _total(rows: Any, col: str) -> float:
    """Sum of a column; NaN when the column is missing or holds no number at all."""
    if col not in rows:
        return math.nan
    return float(rows[col].sum(min_count=1))


def exactness_failures(rows: Any) -> list[str]:
    """One line per greedy (prompt, turn, method) whose output differs from plain decoding
    other than at a numerical tie (exactness "differs")."""
    if len(rows) == 0 or "matches_ar" not in rows:
        return []
    return [f"{r['method']} differs from ar on prompt {r['prompt_key']} turn "
            f"{int(r['turn'])} at new token {int(r['first_mismatch'])}"
            for r in rows.to_dict("records")
            if _exactness.row_exactness(r) == _exactness.DIFFERS]


def exactness_ties(rows: Any) -> list[str]:
    """One line per greedy (prompt, turn, method) that differs from plain decoding only at a
    numerical tie (exactness "tie"), with the position and the logit gap."""
    if len(rows) == 0 or "exactness" not in rows:
        return []
    return [_exactness.tie_line(r["method"], r["prompt_key"], int(r["turn"]),
                                r.get("first_mismatch"), r.get("tie_gap"),
                                r.get("tie_tolerance"))
            for r in rows.to_dict("records") if _exactness.row_exactness(r) == _exactness.TIE]


STEP_COLUMNS = ("accepted_per_step", "ranks_per_step", "nodes_per_step", "depth_per_step")


OUTPUT_COLUMNS = ("output_ids", "output_text")  # results.json / rows.jsonl only


def metric_definitions(columns: Sequence[str]) -> dict[str, str]:
    """The definitions (``METRICS``) of those of ``columns`` that have one."""
    return {k: v for k, v in METRICS.items() if k in columns}


def write_results(out: Path, rows: Any, summary: Any, meta: dict) -> None:
    """results.json (metrics, settings, summary, per-prompt rows with per-step data),
    summary.csv and per_prompt.csv (plain CSV: ``pandas.read_csv(path)`` reads them) and
    metrics.json beside them (the definition of every CSV column that has one). Each file is
    replaced atomically (a crash leaves the previous version, never a truncated file)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    per_prompt = rows.drop(columns=[c for c in STEP_COLUMNS + OUTPUT_COLUMNS
                                    if c in rows.columns])
    definitions = {"format": "treeopt-eval-metrics", "version": 1,
                   "files": {SUMMARY_CSV: "one row per method and category (category 'all' "
                                          "pools every category)",
                             PER_PROMPT_CSV: "one row per prompt, turn and method"},
                   "metrics": metric_definitions(list(summary.columns)
                                                 + list(per_prompt.columns))}
    atomic_write(out / METRICS_JSON, json.dumps(definitions, indent=1))
    atomic_write(out / SUMMARY_CSV, summary.to_csv(index=False))
    atomic_write(out / PER_PROMPT_CSV, per_prompt.to_csv(index=False))
    doc = {"format": "treeopt-eval", "version": 1, **meta,
           "summary": _records(summary), "rows": _records(rows)}
    atomic_write(out / RESULTS_JSON, json.dumps(doc, indent=1, default=_jsonable))


def _records(df: Any) -> list[dict]:
    recs = df.to_dict(orient="records")
    return [{k: _clean(v) for k, v in r.items()} for r in recs]


def _clean(v: Any) -> Any:
    if isinstance(v, float) and math.isnan(v):
        return None
    if hasattr(v, "item") and not isinstance(v, (list, dict)):
        v = v.item()
        if isinstance(v, float) and math.isnan(v):
            return None
    return v


def _jsonable(v: Any) -> Any:
    if hasattr(v, "tolist"):
        return v.tolist()
    return str(v)


def format_summary(summary: Any) -> str:
    """The summary as an aligned text table for the terminal. The speed-up's spread is
    shown compactly: ``median`` (per-prompt speed-ups) and ``ci95`` (``low-high``); the
    ``flag`` column only when a row is flagged (see ``METRICS["flag"]``)."""
    show = summary.copy()

    def num(v: Any) -> bool:
        return v is not None and not (isinstance(v, float) and math.isnan(v))

    if "speedup_median" in show:
        show["speedup_median"] = [f"{v:.2f}x" if num(v) else "-"
                                  for v in show["speedup_median"]]
    if "speedup_ci95_low" in show and "speedup_ci95_high" in show:
        ci = [f"{lo:.2f}-{hi:.2f}" if num(lo) and num(hi) else "-"
              for lo, hi in zip(show["speedup_ci95_low"], show["speedup_ci95_high"])]
        at = list(show.columns).index("speedup_ci95_low")
        show = show.drop(columns=["speedup_ci95_low", "speedup_ci95_high"])
        show.insert(at, "ci95", ci)
    if "flag" in show:
        flags = ["" if not isinstance(v, str) else v for v in show["flag"]]
        if any(flags):
            show["flag"] = [f or "-" for f in flags]
        else:
            show = show.drop(columns=["flag"])
    for col, fmt in (("seconds", "{:.2f}"), ("tokens_per_s", "{:.1f}"), ("speedup", "{:.2f}x"),
                     ("tokens_per_step", "{:.2f}"), ("acceptance_rate", "{:.1%}"),
                     ("mean_accepted", "{:.2f}"), ("mean_nodes", "{:.1f}"),
                     ("mean_depth", "{:.1f}"), ("expected_tokens_per_step", "{:.2f}"),
                     ("pass_at_1", "{:.1%}"),
                     ("prefill_ms", "{:.1f}"), ("draft_ms_per_step", "{:.2f}"),
                     ("verify_ms_per_step", "{:.2f}"), ("other_ms_per_step", "{:.2f}")):
        if col in show:
            show[col] = [("-" if v is None or (isinstance(v, float) and math.isnan(v))
                          else fmt.format(v)) for v in show[col]]
    for col in ("expected_tokens_per_step", "pass_at_1", "prefill_ms", "draft_ms_per_step",
                "verify_ms_per_step", "other_ms_per_step"):
        if col in show and (show[col] == "-").all():
            show = show.drop(columns=[col])
    # Short headers for the time split (ms per verification step) so the table stays narrow.
    show = show.rename(columns={"speedup_median": "median", "mean_nodes": "nodes/step",
                                "mean_depth": "depth/step",
                                "draft_ms_per_step": "draft_ms/step",
                                "verify_ms_per_step": "verify_ms/step",
                                "other_ms_per_step": "other_ms/step"})
    return show.to_string(index=False)


def choice_lines(rows: Any) -> list[str]:
    """One line per method whose drafter chooses (``auto``): its choice on the last prompt."""
    if "drafter_choice" not in getattr(rows, "columns", ()):
        return []
    out = []
    for name, group in rows.groupby("method", sort=False):
        said = [c for c in group["drafter_choice"] if isinstance(c, str) and c]
        if said:
            out.append(f"{name}: last prompt: {said[-1]}")
    return out


def load_results(path: str | Path) -> dict:
    """results.json of a run (a folder or the file)."""
    p = Path(path)
    if p.is_dir():
        p = p / RESULTS_JSON
    if not p.exists():
        raise EvalError(f"{p}: no results file; give a folder written by treeopt eval or its "
                        f"{RESULTS_JSON}")
    try:
        doc = read_json(p, max_bytes=MAX_RESULTS_BYTES)
    except ValueError as exc:  # LimitError: invalid JSON, not text, too large
        raise EvalError(f"{p}: not a treeopt eval results file ({one_line(exc, 160)})") from None
    if doc.get("format") != "treeopt-eval":
        raise EvalError(f"{p}: not a treeopt eval results file (no format 'treeopt-eval')")
    return doc


def tokens_per_second(generated_tokens: int, seconds: float) -> float:
    """Generated tokens per second of wall time; prompt tokens are not an argument on
    purpose."""
    return generated_tokens / seconds if seconds > 0 else math.nan
