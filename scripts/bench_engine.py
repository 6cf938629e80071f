"""Benchmark the decoding engine on real weights: autoregressive, chain and DP trees, against
Hugging Face's own greedy and assisted generation, on the same Spec-Bench prompts in one run.

For every prompt each method decodes greedily with the same ``max_new_tokens``; methods are
interleaved prompt by prompt so machine load hits all of them alike. Reported per method:

- tok/s: generated tokens / wall time of the call (prompt tokens never counted; the prefill
  is inside the time for every method alike), and the speed-up over our AR engine;
- tokens/step (accepted drafts + bonus per target forward) and acceptance rate;
- same-as-AR: prompts whose output equals our AR output token for token (greedy is lossless,
  so anything but n/n is a bug);
- overhead: per decoding step, wall time outside the draft and target forwards (measured by
  forward hooks) as a share of the step time; the engine's own split (draft_s, verify_s,
  other_s) is printed as well.

The DP trees are solved (``treeopt.search.dp``) for a greedy rank profile measured here on
separate calibration prompts (teacher-forced: the target's argmax at every prompt position
against the draft's ranking), or for ``--profile FILE``.

    python scripts/bench_engine.py                      # SmolLM2-135M + early-exit:4, CPU
    python scripts/bench_engine.py --n 16 --max-new-tokens 128 --out results/engine.json
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch


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
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--out", default=None, help="write results (.json or .csv)")
    return p.parse_args(argv)


# ---------------------------------------------------------------- prompts
def load_texts(spec: str, n: int, seed: int, categories: str | None) -> list[tuple[str, str]]:
    """(category, text) pairs: the first user turn of ``n`` prompts."""
    try:
        from treeopt.evaluate.datasets import load_prompts
    except ImportError:
        load_prompts = None
    if load_prompts is not None:
        return [(p.category, p.text) for p in load_prompts(spec, categories=categories, n=n,
                                                           seed=seed)]
    out = []
    with open(spec, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                q = json.loads(line)
                if not categories or q.get("category") in categories.split(","):
                    out.append((q.get("category", ""), q["turns"][0]))
    return out[:n]


# ---------------------------------------------------------------- forward timing
class ForwardTimer:
    """Forward hooks summing the wall time of the models' top-level forward calls; the first
    ``prefill_calls`` calls after ``reset`` (the prefill) are also summed apart."""

    def __init__(self, *models):
        self.total = self.prefill = 0.0
        self.calls = 0
        self.prefill_calls = 1
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
        self.calls += 1
        if self.calls <= self.prefill_calls:
            self.prefill += dt

    def reset(self) -> None:
        self.total = self.prefill = 0.0
        self.calls = 0

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


# ---------------------------------------------------------------- profile and trees
def measure_profile(target, draft, prompts: list[torch.Tensor], width: int) -> list[float]:
    """Greedy rank profile p[k-1] = P(the target's argmax is the draft's k-th choice),
    teacher-forced over the calibration prompts' positions."""
    counts = [0] * width
    total = 0
    with torch.inference_mode():
        for ids in prompts:
            t = target(ids).logits[0].argmax(-1)
            order = draft(ids).logits[0].topk(width, dim=-1).indices
            hit = (order == t[:, None]).float()
            for k in range(width):
                counts[k] += int(hit[:, k].sum())
            total += ids.shape[1]
    return [c / total for c in counts]


def build_trees(args, profile: list[float]):
    from treeopt.shapes import chain
    from treeopt.tree import Tree

    trees: list[tuple[str, Tree | None]] = [("AR (engine)", None),
                                           (f"chain:{args.chain}", chain(args.chain))]
    sizes = [int(s) for s in args.dp_sizes.split(",") if s.strip()]
    try:
        from treeopt.search.dp import solve

        table = solve(profile, max(sizes), args.dp_depth)
        for n in sizes:
            tree = table.tree(n, args.dp_depth, at_most=True)
            trees.append((f"dp:{tree.size}x{tree.depth}", tree))
    except ImportError:
        from treeopt.shapes import top_path_product

        for n in sizes:
            trees.append((f"greedy:{n}", top_path_product(profile, n)))
    return trees


# ---------------------------------------------------------------- one method, one prompt
@dataclass
class Row:
    name: str
    size: int = 1
    depth: int = 0
    tokens: int = 0
    seconds: float = 0.0
    steps_s: float = 0.0
    forward_s: float = 0.0
    target_forwards: int = 0
    committed: int = 0
    drafted: int = 0
    accepted: int = 0
    draft_s: float = 0.0
    verify_s: float = 0.0
    other_s: float = 0.0
    same: int = 0
    prompts: int = 0
    outputs: list = field(default_factory=list)
    note: str = ""


def run_engine(row: Row, target, draft, tree, ids, max_new: int, eos, timer: ForwardTimer):
    from treeopt.decode.engine import generate
    from treeopt.decode.model_drafter import ModelDrafter

    timer.reset()
    drafter = ModelDrafter(draft, tree) if tree is not None and draft is not None else None
    gen = generate(target, drafter, ids, max_new_tokens=max_new, eos_token_id=eos)
    st = gen.stats
    # The prefill forwards (target, then draft) are the first calls; per-step time excludes them.
    step_time = st.total_s - st.prefill_s
    row.tokens += st.generated_tokens
    row.seconds += st.total_s
    row.steps_s += step_time
    row.forward_s += max(0.0, timer.total - timer.prefill)
    row.target_forwards += st.target_forwards
    row.committed += sum(s.tokens for s in st.steps)
    row.drafted += st.drafted_tokens
    row.accepted += st.accepted_tokens
    row.draft_s += st.draft_s
    row.verify_s += st.verify_s
    row.other_s += st.other_s
    return gen.tokens


def run_hf(row: Row, target, ids, max_new: int, eos, **kw):
    start = time.perf_counter()
    out = target.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new,
                          do_sample=False, temperature=None, top_p=None, top_k=None,
                          eos_token_id=eos, pad_token_id=eos[0], **kw)
    row.seconds += time.perf_counter() - start
    tokens = out[0, ids.shape[1]:].tolist()
    row.tokens += len(tokens)
    return tokens


# ---------------------------------------------------------------- main
def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    from treeopt.decode.api import encode_prompt, eos_ids
    from treeopt.decode.models import load_pair

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    t0 = time.perf_counter()
    pair = load_pair(args.target, args.draft, dtype=args.dtype, device=args.device)
    target, draft, tok = pair.target, pair.draft, pair.tokenizer
    load_s = time.perf_counter() - t0
    eos = eos_ids(tok, target)

    texts = load_texts(args.dataset, args.n + args.calib, args.seed, args.categories)
    encoded = [(cat, encode_prompt(tok, text)[:, -args.max_prompt_tokens:].to(target.device))
               for cat, text in texts]
    bench, calib = encoded[:args.n], encoded[args.n:]
    if args.profile:
        from treeopt.profile import Profile

        profile = list(Profile.load(args.profile).p)
        source = args.profile
    else:
        profile = measure_profile(target, draft, [ids for _, ids in calib], args.width)
        source = f"measured on {len(calib)} calibration prompts"
    trees = build_trees(args, profile)

    rows = [Row(name) for name, _ in trees]
    for row, (_, tree) in zip(rows, trees):
        if tree is not None:
            row.size, row.depth = tree.size, tree.depth
    hf_rows = []
    if not args.no_hf:
        hf_rows.append(("HF greedy", {}))
        if draft is not None:
            hf_rows.append(("HF assisted (assistant_model)", {"assistant_model": draft}))
        if args.draft.startswith("early-exit:"):
            k = int(args.draft.split(":", 1)[1])
            hf_rows.append((f"HF assisted (assistant_early_exit={k})",
                            {"assistant_early_exit": k}))
    rows += [Row(name) for name, _ in hf_rows]

    timer = ForwardTimer(target, draft)
    warm = bench[0][1][:, :16]
    for _, tree in trees:  # warm-up: first calls allocate and pick kernels
        timer.prefill_calls = 2 if tree is not None and draft is not None else 1
        run_engine(Row("warm"), target, draft, tree, warm, 4, eos, timer)

    with torch.inference_mode():
        for cat, ids in bench:
            ar_tokens = None
            for row, (_, tree) in zip(rows, trees):
                timer.prefill_calls = 2 if tree is not None and draft is not None else 1
                tokens = run_engine(row, target, draft, tree, ids, args.max_new_tokens, eos,
                                    timer)
                ar_tokens = tokens if ar_tokens is None else ar_tokens
                row.same += tokens == ar_tokens
                row.prompts += 1
            for row, (_, kw) in zip(rows[len(trees):], hf_rows):
                try:
                    tokens = run_hf(row, target, ids, args.max_new_tokens, eos, **kw)
                except Exception as exc:  # report, keep benchmarking the other methods
                    row.note = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:80]}"
                    continue
                row.same += tokens == ar_tokens
                row.prompts += 1
    timer.remove()

    ar = rows[0]
    ar_tps = ar.tokens / ar.seconds if ar.seconds else float("nan")
    results = []
    for r in rows:
        tps = r.tokens / r.seconds if r.seconds else float("nan")
        res = {
            "method": r.name, "size": r.size, "depth": r.depth, "prompts": r.prompts,
            "tokens": r.tokens, "seconds": round(r.seconds, 3), "tokens_per_s": round(tps, 3),
            "speedup_vs_ar": round(tps / ar_tps, 3) if r.prompts else None,
            "same_as_ar": f"{r.same}/{r.prompts}", "note": r.note,
        }
        if r.target_forwards:
            res.update(
                tokens_per_step=round(r.committed / r.target_forwards, 3),
                acceptance_rate=round(r.accepted / r.drafted, 3) if r.drafted else None,
                overhead_pct=round(100 * (r.steps_s - r.forward_s) / r.steps_s, 2),
                engine_other_pct=round(100 * r.other_s / r.steps_s, 2),
                draft_pct=round(100 * r.draft_s / r.steps_s, 1),
                verify_pct=round(100 * r.verify_s / r.steps_s, 1),
                ms_per_step=round(1000 * r.steps_s / r.target_forwards, 2),
            )
        results.append(res)

    prompt_lens = [ids.shape[1] for _, ids in bench]
    print(f"target {args.target} | draft {args.draft} | device {args.device}, "
          f"{args.threads} threads, {args.dtype} | {args.n} prompts "
          f"({', '.join(c for c, _ in bench)}), prompt tokens median "
          f"{statistics.median(prompt_lens):.0f}, {args.max_new_tokens} new tokens, greedy | "
          f"load {load_s:.1f} s")
    print("greedy profile p[1..%d] (%s): %s" % (len(profile), source,
                                               " ".join(f"{x:.3f}" for x in profile)))
    head = ["method", "size", "tokens", "tok/s", "speedup", "tok/step", "accept", "ms/step",
            "draft%", "verify%", "other%", "overhead%", "same-as-AR"]
    print(("{:<38}" + "{:>9}" * 11 + "{:>11}").format(*head))
    for res in results:
        def g(key, fmt):
            v = res.get(key)
            return "-" if v is None else format(v, fmt)
        print(("{:<38}" + "{:>9}" * 11 + "{:>11}").format(
            res["method"][:38], res["size"] if res.get("tokens_per_step") else "-",
            res["tokens"],
            g("tokens_per_s", ".2f"), g("speedup_vs_ar", ".2f"), g("tokens_per_step", ".2f"),
            g("acceptance_rate", ".3f"), g("ms_per_step", ".1f"), g("draft_pct", ".1f"),
            g("verify_pct", ".1f"), g("engine_other_pct", ".2f"), g("overhead_pct", ".2f"),
            res["same_as_ar"]) + (f"  {res['note']}" if res["note"] else ""))
    print("tok/s = generated tokens / wall time (prefill included, prompt tokens not counted); "
          "overhead% = step time outside the draft and target forwards; other% = the "
          "engine's other_s (accept, cache compaction, commit)")

    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.suffix == ".csv":
            with out.open("w", newline="") as f:
                keys = sorted({k for r in results for k in r})
                w = csv.DictWriter(f, fieldnames=keys)
                w.writeheader()
                w.writerows(results)
        else:
            meta = {k: v for k, v in vars(args).items()}
            meta.update(profile=profile, profile_source=source, prompt_tokens=prompt_lens,
                        load_s=load_s, torch=torch.__version__)
            out.write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    bad = [r for r in rows[:len(trees)] if r.same != r.prompts]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
