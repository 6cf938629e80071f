"""Faster CPU linear layers, measured: one forward over 1..16 tokens with torch's default and
oneDNN's pre-packed linear layers (``treeopt.models.cpu_kernels``), interleaved.

Run ``python -m treeopt.bench.kernels [--model smollm2] [--context 256] [--repeats 15]``."""

from __future__ import annotations

import argparse
import copy
import time

import torch
from transformers import DynamicCache

from treeopt.decode.attention import run_model
from treeopt.models.cpu_kernels import pack_linear_layers
from treeopt.models.loading import load_model


def main() -> None:  # pragma: no cover - a measurement, run by hand
    """Time one forward over 1..16 tokens with torch's and oneDNN's linear layers."""
    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args()
    base = load_model(args.model, kernels="default")
    packed = copy.deepcopy(base)
    pack_linear_layers(packed)
    vocab = int(base.config.vocab_size)
    prefix = torch.randint(0, vocab, (1, args.context))
    caches = {}
    with torch.inference_mode():
        for name, m in (("default", base), ("onednn", packed)):
            caches[name] = DynamicCache(config=m.config)
            run_model(m, prefix, caches[name])
        print("tokens  default ms  onednn ms  (medians, interleaved)")
        for n in (1, 2, 3, 4, 6, 8, 16):
            ids = torch.randint(0, vocab, (1, n))
            pos = torch.arange(args.context, args.context + n)[None]
            times: dict[str, list[float]] = {"default": [], "onednn": []}
            for _ in range(args.repeats):
                for name, m in (("default", base), ("onednn", packed)):
                    t0 = time.perf_counter()
                    run_model(m, ids, caches[name], position_ids=pos)
                    times[name].append((time.perf_counter() - t0) * 1000)
                    caches[name].crop(-n)
            med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
            print(f"{n:6d}  {med['default']:10.1f}  {med['onednn']:9.1f}")


if __name__ == "__main__":  # pragma: no cover
    main()
