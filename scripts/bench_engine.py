"""Benchmark the decoding engine on real weights: autoregressive, chain and DP trees, against
Hugging Face's own greedy and assisted generation, on the same Spec-Bench prompts in one run.

A thin wrapper over ``treeopt.evaluate.runner.run_eval`` (the runner of ``treeopt eval``): every
method decodes every prompt greedily with the same ``max_new_tokens``, methods interleaved
prompt by prompt in a rotating order so machine load hits all of them alike, after one
warm-up call each. Reported per method:

- tok/s: generated tokens / wall time of the call (prompt tokens never counted; the prefill
  is inside the time for every method alike), and the speed-up over our AR engine;
- tokens/step (accepted drafts + bonus per target forward), acceptance rate and F(tree), the
  tokens per step the profile predicts;
- same-as-AR: prompts whose output equals our AR output token for token (greedy is lossless,
  so anything but n/n for an engine row is a bug);
- overhead: per decoding step, wall time outside the draft and target forwards (measured by
  forward hooks) as a share of the step time; the engine's own split (draft, verify, other
  milliseconds per step) is printed as well.

Hugging Face rows: ``hf-greedy`` (``target.generate`` without drafting), ``hf-assisted``
(``assistant_early_exit=K`` for an ``early-exit:K`` draft, else ``assistant_model=`` the draft
model), ``hf-assisted-model`` (an ``early-exit:K`` draft's model as ``assistant_model=``) and,
with ``--hf-prompt-lookup K``, prompt lookup (``hf-pld:K``).

The DP trees are solved (``treeopt.search.dp``) for a greedy rank profile measured here on
separate calibration prompts (``treeopt.profile.acceptance.profile_acceptance``, teacher-forced
on the prompts' own text), or for ``--profile FILE``.

    python scripts/bench_engine.py                      # SmolLM2-135M + early-exit:4, CPU
    python scripts/bench_engine.py --n 16 --max-new-tokens 128 --out results/engine.json
    python scripts/bench_engine.py --tiny               # tiny random models: seconds
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

from treeopt.decode.drafter import Drafter

HF_GREEDY = "hf-greedy"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target", default="smollm2")
    p.add_argument("--draft", default="early-exit:4",
                   help="draft spec; 'early-exit:K' also enables HF's assistant_early_exit=K")
    p.add_argument("--dataset", default="spec_bench",
                   help="'spec_bench' (shipped copy) or a FastChat question .jsonl path")
    p.add_argument("--categories", default=None, help="comma-separated Spec-Bench categories")
    p.add_argument("--n", type=int, default=4, help="prompts to decode")
    p.add_argument("--calib", type=int, default=8, help="calibration prompts for the profile")
    p.add_argument("--seed", type=int, default=0, help="prompt draw")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--max-prompt-tokens", type=int, default=512,
                   help="keep only the last N prompt tokens (long Spec-Bench documents)")
    p.add_argument("--chain", type=int, default=4, help="chain size (nodes incl. the root)")
    p.add_argument("--dp-sizes", default="8,16", help="DP tree sizes (nodes incl. the root)")
    p.add_argument("--dp-depth", type=int, default=6, help="DP levels including the root")
    p.add_argument("--width", type=int, default=8, help="profile width (ranks measured)")
    p.add_argument("--profile", default=None, help="treeopt profile JSON to use for the DP")
    p.add_argument("--no-hf", action="store_true", help="skip Hugging Face's generate rows")
    p.add_argument("--hf-prompt-lookup", default=None, metavar="K,...",
                   help="also run Hugging Face prompt lookup with these numbers of tokens")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--tiny", action="store_true",
                   help="tiny random models (a 2-layer target, a 1-layer draft model) and "
                        "random token-id prompts instead of --target/--draft/--dataset: "
                        "checks the script works in seconds")
    p.add_argument("--out", default=None, help="write results (.json or .csv)")
    return p.parse_args(argv)


# ---------------------------------------------------------------- models and prompts
def tiny_setup(args):
    """(target, draft model, tokenizer None, bench prompts, calibration token lists) of tiny
    random models; prompts are random token ids."""
    from treeopt.datasets import Prompt
    from treeopt.testing import tiny_pair

    target, draft = tiny_pair("llama", vocab_size=96)
    gen = torch.Generator().manual_seed(args.seed)
    ids = [torch.randint(3, 96, (12,), generator=gen).tolist()
           for _ in range(args.n + args.calib)]
    bench = [Prompt(str(i), "tiny", "", token_ids=tuple(x)) for i, x in enumerate(ids[:args.n])]
    return target, draft, None, bench, ids[args.n:]


def real_setup(args):
    """(target, drafter, tokenizer, bench prompts, calibration token lists) from the specs:
    prompts encoded with the tokenizer's chat template and cut to their last
    ``--max-prompt-tokens`` tokens."""
    from treeopt.api import encode_prompt, load_pair
    from treeopt.datasets import Prompt, load_prompts

    pair = load_pair(args.target, args.draft, dtype=args.dtype, device=args.device)
    prompts = load_prompts(args.dataset, categories=args.categories, n=args.n + args.calib,
                           seed=args.seed)
    encoded = [(p, encode_prompt(pair.tokenizer, p.text)[0, -args.max_prompt_tokens:].tolist())
               for p in prompts]
    bench = [Prompt(p.id, p.category, p.text, token_ids=tuple(ids))
             for p, ids in encoded[:args.n]]
    return pair.target, pair.drafter, pair.tokenizer, bench, [ids for _, ids in
                                                              encoded[args.n:]]


def measure_profile(target, draft, calib: list[list[int]], args):
    """Greedy rank profile of the draft, teacher-forced on the calibration prompts' own text
    (``profile_acceptance``, continuation "dataset")."""
    from treeopt.profile.acceptance import AcceptanceRun, profile_acceptance

    run = AcceptanceRun(width=args.width, depth=max(1, args.dp_depth - 1),
                        continuation="dataset", draft="tiny" if args.tiny else args.draft,
                        target="tiny" if args.tiny else args.target)
    return profile_acceptance(target, draft, calib, run)


# ---------------------------------------------------------------- forward timing
class ForwardTimer:
    """Forward hooks summing the wall time of the models' top-level forward calls; the first
    call of each model (its prefill) is summed apart."""

    def __init__(self, *models):
        self.total = self.prefill = 0.0
        self._calls: dict[int, int] = {}
        self._t0: dict[int, float] = {}
        self._handles = []
        for m in models:
            if m is not None:
                self._handles.append(m.register_forward_pre_hook(self._pre))
                self._handles.append(m.register_forward_hook(self._post))

    def _pre(self, module, args):
        self._t0[id(module)] = time.perf_counter()

    def _post(self, module, args, output):
        dt = time.perf_counter() - self._t0.pop(id(module))
        self.total += dt
        n = self._calls[id(module)] = self._calls.get(id(module), 0) + 1
        if n == 1:
            self.prefill += dt

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


class HFGreedy(Drafter):
    """Marks the ``HF greedy`` method: ``Timed`` runs Hugging Face's plain ``generate`` for it
    (the runner hands a method's drafter object through unchanged); it never drafts."""

    name = HF_GREEDY

    def __str__(self) -> str:
        return "Hugging Face generate() without drafting"


class Timed:
    """The ``generate`` the runner calls: the engine with forward hooks on the target and the
    drafter's model, so each engine method's step time outside the forwards (the overhead)
    is known; Hugging Face's plain generate for the HF greedy marker. The first call of each
    method is the runner's warm-up and is not counted."""

    def __init__(self, methods):
        self.by_tree = {id(m.tree): m.name for m in methods if m.tree is not None}
        self.totals: dict[str, list[float]] = {}
        self.seen: set[str] = set()

    def __call__(self, target, drafter, input_ids, **kw):
        from treeopt.decode.engine import generate

        if isinstance(drafter, HFGreedy):
            from treeopt.evaluate.reference import run_hf

            return run_hf(target, input_ids, options={}, **kw)
        timer = ForwardTimer(target, getattr(drafter, "model", None))
        try:
            gen = generate(target, drafter, input_ids, **kw)
        finally:
            timer.remove()
        name = "ar" if drafter is None else self.by_tree.get(id(drafter.shape), "?")
        if name not in self.seen:
            self.seen.add(name)
            return gen
        acc = self.totals.setdefault(name, [0.0, 0.0])
        acc[0] += gen.stats.total_s - gen.stats.prefill_s
        acc[1] += max(0.0, timer.total - timer.prefill)
        return gen

    def overhead_pct(self, name: str) -> float | None:
        step_s, forward_s = self.totals.get(name, (0.0, 0.0))
        return 100 * (step_s - forward_s) / step_s if step_s > 0 else None


# ---------------------------------------------------------------- methods
def build_methods(args, profile, draft_spec: str | None):
    from treeopt.evaluate.methods import Method, ar_method, chain_method, dp_method
    from treeopt.evaluate.reference import early_exit_layers, hf_assisted, hf_prompt_lookup

    engine = [ar_method(), chain_method(args.chain - 1)]
    for n in (int(s) for s in args.dp_sizes.split(",") if s.strip()):
        engine.append(dp_method(profile, n, args.dp_depth))
    hf = []
    if not args.no_hf:
        hf.append(Method(HF_GREEDY, None, "drafter", str(HFGreedy()), HFGreedy()))
        k = early_exit_layers(draft_spec)
        hf.append(hf_assisted(k))
        if k is not None:  # the early-exit draft model itself as HF's assistant_model too
            hf.append(Method("hf-assisted-model", None, "hf",
                             "Hugging Face generate(assistant_model=the early-exit draft)"))
        for k in (args.hf_prompt_lookup or "").split(","):
            if k.strip():
                hf.append(hf_prompt_lookup(int(k)))
    return engine, hf


# ---------------------------------------------------------------- main
def _num(v) -> float | None:
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


def results_table(summary, methods, timed: Timed, engine_names: set[str]) -> list[dict]:
    """One dict per method from the runner's summary (category "all" when there are
    several), with the hook-measured overhead and the time split as shares of a step."""
    cats = set(summary["category"])
    rows = summary[summary["category"] == ("all" if len(cats) > 1 else next(iter(cats)))]
    by_name = {r["method"]: r for r in rows.to_dict("records")}
    out = []
    for m in methods:
        r = by_name.get(m.name)
        if r is None:
            continue
        split = [_num(r.get(k)) for k in ("draft_ms_per_step", "verify_ms_per_step",
                                          "other_ms_per_step")]
        ms_step = sum(x for x in split if x is not None) if any(
            x is not None for x in split) else None
        res = {"method": m.name, "size": m.tree.size if m.tree is not None else 1,
               "depth": m.tree.depth if m.tree is not None else 0,
               "prompts": int(r["prompts"]), "tokens": int(r["new_tokens"]),
               "seconds": round(float(r["seconds"]), 3),
               "tokens_per_s": _num(r["tokens_per_s"]), "speedup_vs_ar": _num(r["speedup"]),
               "tokens_per_step": _num(r["tokens_per_step"]),
               "acceptance_rate": _num(r["acceptance_rate"]),
               "expected_tokens_per_step": _num(r["expected_tokens_per_step"]),
               "ms_per_step": ms_step, "same_as_ar": r["matches_ar"],
               "engine": m.name in engine_names}
        for key, x in zip(("draft_pct", "verify_pct", "other_pct"), split):
            res[key] = 100 * x / ms_step if x is not None and ms_step else None
        res["overhead_pct"] = timed.overhead_pct(m.name) if m.name in engine_names else None
        out.append(res)
    return out


def print_table(results: list[dict]) -> None:
    head = ["method", "size", "tokens", "tok/s", "speedup", "tok/step", "F(tree)", "accept",
            "ms/step", "draft%", "verify%", "other%", "overhead%", "same-as-AR"]
    fmt = "{:<18}" + "{:>10}" * 12 + "{:>11}"
    print(fmt.format(*head))

    def g(res, key, spec):
        v = res.get(key)
        return "-" if v is None else format(v, spec)

    for res in results:
        print(fmt.format(res["method"][:18], res["size"] if res["engine"] else "-",
                         res["tokens"], g(res, "tokens_per_s", ".2f"),
                         g(res, "speedup_vs_ar", ".2f"), g(res, "tokens_per_step", ".2f"),
                         g(res, "expected_tokens_per_step", ".2f"),
                         g(res, "acceptance_rate", ".3f"), g(res, "ms_per_step", ".1f"),
                         g(res, "draft_pct", ".1f"), g(res, "verify_pct", ".1f"),
                         g(res, "other_pct", ".1f"), g(res, "overhead_pct", ".2f"),
                         res["same_as_ar"]))
    print("tok/s = generated tokens / wall time (prefill included, prompt tokens not counted); "
          "F(tree) = tokens per step the profile predicts; overhead% = step time outside the "
          "draft and target forwards (engine rows); draft/verify/other% = the engine's split "
          "of a step (Hugging Face rows: its loop counted as other)")


def write_out(path: str, results: list[dict], meta: dict) -> None:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".csv":
        with out.open("w", newline="") as f:
            keys = sorted({k for r in results for k in r})
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(results)
    else:
        out.write_text(json.dumps({"meta": meta, "results": results}, indent=1))


def main(argv=None) -> int:
    args = parse_args(argv)
    from transformers.utils import logging as hf_logging

    from treeopt.evaluate.runner import EvalConfig, run_eval

    threads = torch.get_num_threads()
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        t0 = time.perf_counter()
        if args.tiny:
            target, draft, tok, bench, calib = tiny_setup(args)
            draft_spec = None
        else:
            target, draft, tok, bench, calib = real_setup(args)
            draft_spec = args.draft
        load_s = time.perf_counter() - t0
        if args.profile:
            from treeopt.profile import Profile

            profile, source = Profile.load(args.profile), args.profile
        else:
            profile = measure_profile(target, draft, calib, args)
            source = f"measured on {len(calib)} calibration prompts"
        engine, hf = build_methods(args, profile, draft_spec)
        methods = engine + hf
        timed = Timed(methods)
        res = run_eval(target, draft, bench, methods,
                       config=EvalConfig(max_new_tokens=args.max_new_tokens, seed=args.seed),
                       tokenizer=tok, profile=profile, progress=False, generate=timed,
                       meta={"target": "tiny" if args.tiny else args.target,
                             "draft": "tiny" if args.tiny else args.draft,
                             "dataset": "tiny" if args.tiny else args.dataset})
    finally:
        torch.set_num_threads(threads)
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()

    engine_names = {m.name for m in engine}
    results = results_table(res.summary, methods, timed, engine_names)
    p = list(profile.p)
    prompt_lens = [len(x.token_ids) for x in bench]
    print(f"target {'tiny' if args.tiny else args.target} | draft "
          f"{'tiny' if args.tiny else args.draft} | device {args.device}, {args.threads} "
          f"threads, {args.dtype} | {len(bench)} prompts "
          f"({', '.join(x.category for x in bench)}), prompt tokens median "
          f"{statistics.median(prompt_lens):.0f}, {args.max_new_tokens} new tokens, greedy | "
          f"load {load_s:.1f} s")
    print("greedy profile p[1..%d] (%s): %s" % (len(p), source, " ".join(f"{x:.3f}" for x in p)))
    print_table(results)
    bad = [line for line in res.failures if line.split(" ", 1)[0] in engine_names]
    for line in bad:
        print(f"NOT LOSSLESS: {line}", file=sys.stderr)
    if args.out:
        meta = dict(vars(args))
        meta.update(profile=p, profile_source=source, prompt_tokens=prompt_lens,
                    load_s=load_s, torch=torch.__version__)
        write_out(args.out, results, meta)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
