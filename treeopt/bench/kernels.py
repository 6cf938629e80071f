"""Faster CPU verification, measured: one target forward over 1..16 tokens after a cached
context, variants of the same model side by side (interleaved, each forward's cache cropped
back after it):

- ``--compare linear`` (default): torch's default linear layers, oneDNN's pre-packed ones
  (``treeopt.models.cpu_kernels``), and the packed ones with the few-row forwards computed
  as measured fastest on this machine (``treeopt.models.kernel_choice``, what ``load_model``
  uses: measured here on first use, then cached), over a causal chain;
- ``--compare packing``: oneDNN's weights laid out for one-row inputs (treeopt's
  ``PACK_ROWS``) against the layout for 16 rows (no row count streamed in either), over a
  causal chain;
- ``--compare attention``: transformers' sdpa attention against treeopt's grouped one
  (``treeopt.decode.attention.GROUPED_SDPA``: query heads stacked on their shared key/value
  heads instead of the cache copied per query head), over a chain and over a balanced
  binary tree, the two masks decoding verifies with.

Run ``python -m treeopt.bench.kernels [--model smollm2] [--compare linear|packing|attention]
[--contexts 256] [--repeats 15]``; it prints one line per (context, mask, tokens), each
variant's median and its ratio to the first variant's."""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import DynamicCache

from treeopt.decode.attention import GROUPED_SDPA, forward_tree, group_query_heads
from treeopt.models.cpu_kernels import PACK_ROWS, kernels_in_use, pack_linear_layers
from treeopt.models.loading import load_model
from treeopt.profile.latency import bushy_tree

SIZES = (1, 2, 3, 4, 6, 8, 16)


def variants(spec: str, compare: str) -> dict[str, torch.nn.Module]:
    """The variants to time (three for ``linear``, two for ``packing`` and ``attention``):
    name -> model."""
    if compare == "packing":
        models = {}
        for rows in (PACK_ROWS, 16):
            model = load_model(spec, kernels="default")
            if not pack_linear_layers(model, pack_rows=rows):
                raise SystemExit(f"{spec}: cannot be packed (float32 on a CPU with oneDNN only)")
            models[f"packed for {rows} row{'s' * (rows != 1)}"] = model
        return models
    if compare == "linear":
        base = load_model(spec, kernels="default")
        packed = load_model(spec, kernels="onednn")
        measured = load_model(spec, kernels="auto")
        return {"default": base, "onednn": packed, kernels_in_use(measured): measured}
    stock = load_model(spec, attn_implementation="sdpa")
    grouped = load_model(spec, attn_implementation="sdpa")
    if not group_query_heads(grouped):
        raise SystemExit(f"{spec}: no grouped-query sdpa layers; nothing to compare")
    return {"sdpa": stock, GROUPED_SDPA: grouped}


def main() -> None:  # pragma: no cover - a measurement, run by hand
    """Time one forward over 1..16 tokens with variants of a model, interleaved."""
    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--compare", choices=("linear", "packing", "attention"), default="linear")
    ap.add_argument("--contexts", default="256", help="cached tokens before the forward, "
                    "comma-separated (default 256)")
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args()
    models = variants(args.model, args.compare)
    names = list(models)
    vocab = int(next(iter(models.values())).config.vocab_size)
    masks = ("chain", "tree") if args.compare == "attention" else ("chain",)
    print(f"{args.model}, {torch.get_num_threads()} threads; median ms of one forward, "
          f"{args.repeats} interleaved repeats")
    print(f"context  mask   tokens  {'  '.join(f'{n:>24s}' for n in names)}  ratios")
    with torch.inference_mode():
        for context in (int(c) for c in args.contexts.split(",")):
            prefix = torch.randint(0, vocab, (1, context))
            caches = {}
            for name, m in models.items():
                caches[name] = DynamicCache(config=m.config)
                forward_tree(m, prefix, torch.arange(context)[None], None, caches[name],
                             logits_to_keep=1)
            for mask in masks:
                for n in SIZES:
                    ids = torch.randint(0, vocab, (1, n))
                    tree = None if mask == "chain" else bushy_tree(n).buffers()
                    pos = (torch.arange(context, context + n) if tree is None
                           else tree.depth + context)[None]
                    times: dict[str, list[float]] = {name: [] for name in names}
                    for _ in range(args.repeats + 1):  # the first round warms up
                        for name, m in models.items():
                            t0 = time.perf_counter()
                            forward_tree(m, ids, pos, None if tree is None else tree.mask,
                                         caches[name])
                            times[name].append((time.perf_counter() - t0) * 1000)
                            caches[name].crop(-n)
                    med = [statistics.median(times[name][1:]) for name in names]
                    ratios = " ".join(f"{x / med[0]:.2f}" for x in med[1:])
                    print(f"{context:7d}  {mask:5s}  {n:6d}  "
                          f"{'  '.join(f'{x:24.1f}' for x in med)}  {ratios}", flush=True)


if __name__ == "__main__":  # pragma: no cover
    main()
