"""Latency profiler: forward time as a function of the number of tokens processed at once.

Target: the KV cache is prefilled to ``context`` tokens, then one tree forward of n tokens with
a tree mask (``treeopt.decode.attention.forward_tree``, the engine's verification call) is
timed and the cache cropped back, for each n. Draft: the same for the tokens one draft level
expands at once. Each point has ``warmup`` untimed and ``repeats`` timed runs; the curve keeps
the median and the spread (inter-quartile range). CUDA events time GPU models,
``time.perf_counter`` CPU ones. Provenance (device, dtype, threads, library versions) goes to
``Latency.meta``.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from pathlib import Path
from typing import Sequence

import torch

from treeopt.tree import Tree

DEFAULT_TOKENS = (1, 2, 4, 8, 16, 32, 64, 128)


class LatencyError(ValueError):
    """Bad latency-profiling input; the message says what to change."""


def parse_tokens(spec: str) -> list[int]:
    """``"1,2,4,8"`` -> [1, 2, 4, 8] (sorted, unique, each >= 1)."""
    try:
        values = sorted({int(x) for x in spec.split(",") if x.strip()})
    except ValueError:
        raise LatencyError(f"--tokens {spec!r} is not a comma-separated list of integers, "
                           "e.g. 1,2,4,8") from None
    if not values or values[0] < 1:
        raise LatencyError(f"--tokens {spec!r} needs integers >= 1, e.g. 1,2,4,8")
    return values


def bushy_tree(n: int) -> Tree:
    """A balanced binary tree of n nodes in BFS order: the mask shape timings use (the cost of
    a forward depends on the token count, barely on the shape)."""
    return Tree.from_parents([-1] + [(i - 1) // 2 for i in range(1, n)])


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _dtype(model) -> torch.dtype:
    return next(model.parameters()).dtype


def quartiles(samples: Sequence[float]) -> tuple[float, float, float]:
    """(q1, median, q3) of the samples (inclusive method; one sample gives it three times)."""
    xs = sorted(samples)
    if len(xs) == 1:
        return xs[0], xs[0], xs[0]
    q1, q2, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    return q1, q2, q3


class _Timer:
    """Milliseconds of a callable: CUDA events on GPU, perf_counter on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __call__(self, fn) -> float:
        if self.cuda:
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return float(start.elapsed_time(end))
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1000.0


def time_tree_forwards(model, tokens: Sequence[int], *, context: int = 256, repeats: int = 10,
                       warmup: int = 2, seed: int = 0) -> list[list[float]]:
    """Milliseconds of one tree forward of n tokens after a ``context``-token prefix, for each
    n in ``tokens``: ``repeats`` timed samples per n (after ``warmup`` untimed runs)."""
    from transformers import DynamicCache

    from treeopt.decode.attention import forward_tree

    if context < 1:
        raise LatencyError(f"--context must be >= 1, got {context}")
    if repeats < 1 or warmup < 0:
        raise LatencyError(f"--repeats must be >= 1 and --warmup >= 0, got {repeats} and {warmup}")
    device = _device(model)
    vocab = int(model.config.vocab_size)
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and context + max(tokens) > int(limit):
        raise LatencyError(f"context {context} + {max(tokens)} tokens exceeds the model's "
                           f"{limit} positions; lower --context or --tokens")
    gen = torch.Generator().manual_seed(seed)
    prefix = torch.randint(0, vocab, (1, context), generator=gen).to(device)
    cache = DynamicCache(config=model.config)
    timer = _Timer(device)
    out: list[list[float]] = []
    with torch.no_grad():
        model(input_ids=prefix, past_key_values=cache, use_cache=True)
        for n in tokens:
            buf = bushy_tree(n).buffers(device)
            ids = torch.randint(0, vocab, (1, n), generator=gen).to(device)
            pos = (buf.depth + context).unsqueeze(0)

            def step():
                forward_tree(model, ids, pos, buf.mask, cache)

            samples = []
            for r in range(warmup + repeats):
                ms = timer(step)
                cache.crop(-n)
                if r >= warmup:
                    samples.append(ms)
            out.append(samples)
    return out


def time_proposals(drafter, tokens: Sequence[int], *, vocab: int, context: int = 256,
                   repeats: int = 10, warmup: int = 2, seed: int = 0) -> list[list[float]]:
    """Milliseconds of one ``propose`` of a model-free drafter (n-gram, datastore, ...) that
    fills one level of q candidates, after a ``context``-token text, for each q in
    ``tokens``. The text repeats a random 32-token phrase, so lookups find matches and pay
    their full cost."""
    from treeopt.decode.sampling import GREEDY
    from treeopt.shapes import kary

    if context < 1:
        raise LatencyError(f"--context must be >= 1, got {context}")
    if repeats < 1 or warmup < 0:
        raise LatencyError(f"--repeats must be >= 1 and --warmup >= 0, got {repeats} and {warmup}")
    gen = torch.Generator().manual_seed(seed)
    phrase = torch.randint(0, vocab, (32,), generator=gen).tolist()
    text = (phrase * (context // 32 + 1))[:context]
    timer = _Timer(torch.device("cpu"))
    out: list[list[float]] = []
    for q in tokens:
        level = drafter.reshaped(kary(q, 1))
        level.start(torch.tensor([text], dtype=torch.int64))
        samples = []
        for r in range(warmup + repeats):
            ms = timer(lambda: level.propose(text, 1, GREEDY))
            if r >= warmup:
                samples.append(ms)
        out.append(samples)
    return out


def curve_from_samples(tokens: Sequence[int], samples: Sequence[Sequence[float]]):
    """A LatencyCurve of medians with IQR spreads."""
    from treeopt.profile import LatencyCurve

    stats = [quartiles(s) for s in samples]
    return LatencyCurve(tokens=list(tokens), ms=[round(m, 4) for _, m, _ in stats],
                        spread_ms=[round(q3 - q1, 4) for q1, _, q3 in stats])


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    proc = platform.processor() or platform.machine()
    return f"cpu ({proc}, {torch.get_num_threads()} threads)"


def measure_latency(target, draft=None, *, tokens: Sequence[int] = DEFAULT_TOKENS,
                    draft_tokens: Sequence[int] | None = None, context: int = 256,
                    repeats: int = 10, warmup: int = 2, seed: int = 0,
                    names: dict | None = None):
    """Latency curves of the target (tree forward of n tokens) and, if given, the draft
    (forward of the q tokens one level expands; ``draft_tokens`` defaults to ``tokens``).
    ``draft`` is a draft model, a Drafter with a model, or a model-free Drafter, whose curve
    is the cost of proposing one level of q candidates (``time_proposals``).

    Returns ``treeopt.profile.Latency`` with meta: device, dtype, threads, context, repeats,
    warmup, library versions and ``names`` (e.g. the model specs)."""
    import transformers

    from treeopt import __version__
    from treeopt.profile import Latency

    tokens = sorted({int(n) for n in tokens})
    if not tokens or tokens[0] < 1:
        raise LatencyError("token counts must be integers >= 1")
    t0 = time.perf_counter()
    target_curve = curve_from_samples(
        tokens, time_tree_forwards(target, tokens, context=context, repeats=repeats,
                                   warmup=warmup, seed=seed))
    draft_curve = None
    from treeopt.decode.drafter import Drafter

    if isinstance(draft, Drafter) and getattr(draft, "model", None) is not None:
        draft = draft.model
    if draft is not None:
        dt = sorted({int(n) for n in (draft_tokens or tokens)})
        if isinstance(draft, Drafter):
            samples = time_proposals(draft, dt, vocab=int(target.config.vocab_size),
                                     context=context, repeats=repeats, warmup=warmup,
                                     seed=seed + 1)
        else:
            samples = time_tree_forwards(draft, dt, context=context, repeats=repeats,
                                         warmup=warmup, seed=seed + 1)
        draft_curve = curve_from_samples(dt, samples)
    device = _device(target)
    meta = {
        "device": device_name(device),
        "device_type": device.type,
        "dtype": str(_dtype(target)).replace("torch.", ""),
        "threads": torch.get_num_threads(),
        "context": context,
        "repeats": repeats,
        "warmup": warmup,
        "statistic": "median ms; spread_ms = inter-quartile range",
        "timer": "cuda events" if device.type == "cuda" else "time.perf_counter",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "treeopt": __version__,
        "seconds": round(time.perf_counter() - t0, 2),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    if draft is not None and not isinstance(draft, Drafter):
        meta["draft_dtype"] = str(_dtype(draft)).replace("torch.", "")
    elif draft is not None:
        meta["draft_kind"] = f"{draft.name} drafter (propose time per level of q candidates)"
    meta.update(names or {})
    return Latency(target=target_curve, draft=draft_curve, context=context, meta=meta)


def write_latency(latency, out) -> Path:
    """Write ``latency`` as the latency section of the profile file ``out``: replaced in place
    when the file holds a profile (its acceptance is kept), else a latency-only file (format
    treeopt-profile without an acceptance section; ``load_latency`` reads it)."""
    from treeopt.profile.model import JSON_FORMAT, JSON_VERSION, write_json_atomic

    path = Path(out)
    if path.suffix.lower() != ".json":
        raise LatencyError(f"--out {path.name}: latency is written into a .json profile")
    doc = {"format": JSON_FORMAT, "version": JSON_VERSION, "meta": {}}
    if path.exists():
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError):
            raise LatencyError(f"{path} exists but is not a JSON profile; choose another "
                               "--out") from None
        if not isinstance(doc, dict) or doc.get("format") != JSON_FORMAT:
            raise LatencyError(f"{path} exists but is not a treeopt profile; choose another "
                               "--out")
    doc["latency"] = latency.to_dict()
    return write_json_atomic(path, doc)


def load_latency(path):
    """The latency section of a profile .json (also a latency-only file), or None."""
    import json
    from pathlib import Path

    from treeopt.profile import Latency

    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        raise LatencyError(f"{path}: not a readable JSON profile") from None
    if not isinstance(doc, dict) or doc.get("latency") is None:
        return None
    return Latency.from_dict(doc["latency"])
