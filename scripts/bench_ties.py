"""How far a dtype's multi-token forward rounds from its one-token forward: the measurement
behind the greedy tie tolerance (``treeopt.evaluate.exactness.REL_TOLERANCE``).

Plain decoding computes each next-token distribution in a one-token forward; a tree or chain
verification computes it inside a forward over several tokens. In float32 the two agree to
~1e-6; in bfloat16 they part by a few rounding steps that compound over the layers. A greedy
output of a lossless method may then pick the other of two nearly tied tokens. This script
decodes greedily one token at a time, then feeds the same tokens again in chunks of
``--chunks`` tokens (with the KV cache, as verification does) and also in one uncached
forward (as the exactness check recomputes), and reports per position the *ordering drift*

    drift = max over the top-K tokens i of |(l_i - l_best) - (l'_i - l'_best)| / scale

(``scale`` the best logit's magnitude): how much the gap between the best token and any
near-best token moves between the two roundings, relative to the logits' size. A tie
tolerance must be at least the largest drift (plain vs verification) plus the drift of the
recomputation, or correct outputs are reported as failures.

    OMP_WAIT_POLICY=PASSIVE python scripts/bench_ties.py --dtype bfloat16   # SmolLM2
    python scripts/bench_ties.py --tiny                                     # tiny random model
"""

from __future__ import annotations

import argparse
import os
import platform

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: steady CPU timings


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="smollm2")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--dataset", default="spec_bench")
    ap.add_argument("-n", "--prompts", type=int, default=13)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--chunks", default="2,5,16", help="verification sizes to compare")
    ap.add_argument("--top", type=int, default=5, help="near-best tokens compared (K)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tiny", action="store_true", help="tiny random model, token-id prompts")
    return ap.parse_args(argv)


def load(args):
    import torch

    if args.tiny:
        from treeopt.testing import tiny_causal_lm

        model = tiny_causal_lm(seed=0).to(getattr(torch, args.dtype))
        gen = torch.Generator().manual_seed(0)
        prompts = [torch.randint(0, model.config.vocab_size, (12,), generator=gen).tolist()
                   for _ in range(args.prompts)]
        return model, prompts
    from treeopt.api import encode_prompts
    from treeopt.datasets import load_prompts, select
    from treeopt.models.loading import load_model, load_tokenizer

    model = load_model(args.target, dtype=args.dtype)
    tokenizer = load_tokenizer(args.target)
    chosen = select(load_prompts(args.dataset), n=args.prompts, seed=0)
    return model, encode_prompts(tokenizer, [p.text for p in chosen])


def drift(a, b, top: int) -> float:
    """Ordering drift between two logit vectors of one position (see the module text)."""
    best = int(a.argmax())
    idx = a.topk(top).indices
    da = a[idx] - a[best]
    db = b[idx] - b[best]
    return float((da - db).abs().max() / a[best].abs().clamp_min(1e-6))


def run_prompt(model, ids: list[int], new: int, chunks: list[int], top: int) -> dict:
    import torch

    from treeopt.decode.attention import new_cache, run_model

    x = torch.tensor([ids])
    with torch.inference_mode():
        cache = new_cache(model)
        out = run_model(model, x, cache)
        row, steps, tokens = out.logits[0, -1].float(), [], []
        for _ in range(new):
            steps.append(row)
            tok = int(row.argmax())
            tokens.append(tok)
            out = run_model(model, torch.tensor([[tok]]), cache)
            row = out.logits[0, -1].float()
        result = {}
        for size in chunks:
            cache = new_cache(model)
            run_model(model, x[:, :-1], cache)
            fed = [ids[-1]] + tokens[:-1]      # position j's logits come from feeding fed[j]
            rows = []
            for start in range(0, new, size):
                part = torch.tensor([fed[start:start + size]])
                out = run_model(model, part, cache)
                rows.extend(out.logits[0].float())
            result[f"chunk {size}"] = [drift(steps[j], rows[j], top) for j in range(new)]
        full = model(input_ids=torch.tensor([ids + tokens[:-1]]), use_cache=False)
        rows = full.logits[0, len(ids) - 1:].float()
        result["recomputed"] = [drift(steps[j], rows[j], top) for j in range(new)]
    return result


def quantiles(values: list[float], tolerance: float) -> str:
    v = sorted(values)

    def q(f: float) -> float:
        return v[min(len(v) - 1, int(f * len(v)))]

    return (f"median {q(0.5):.2e}  p99 {q(0.99):.2e}  p99.9 {q(0.999):.2e}  "
            f"max {v[-1]:.2e}  (max / tie tolerance {tolerance:g} = {v[-1] / tolerance:.2f})")


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from treeopt.evaluate.exactness import rel_tolerance

    torch.set_num_threads(args.threads)
    model, prompts = load(args)
    chunks = [int(c) for c in args.chunks.split(",")]
    pooled: dict[str, list[float]] = {}
    for ids in prompts:
        for key, values in run_prompt(model, ids, args.max_new_tokens, chunks,
                                      args.top).items():
            pooled.setdefault(key, []).extend(values)
    cpu = platform.processor() or platform.machine()
    print(f"# {args.target if not args.tiny else 'tiny'} {args.dtype}, {len(prompts)} prompts x "
          f"{args.max_new_tokens} positions, {args.threads} threads, torch "
          f"{torch.__version__}, {cpu}")
    print("ordering drift vs one-token decoding (relative to the best logit):")
    tolerance = rel_tolerance(args.dtype)
    for key, values in pooled.items():
        print(f"  {key:>11}: {quantiles(values, tolerance)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
