"""Latency profiler: forward time as a function of the number of tokens processed at once.

Target: the KV cache is prefilled to ``context`` tokens, then one tree forward of n tokens with
a tree mask (``treeopt.decode.attention.forward_tree``, the engine's verification call) is
timed and the cache cropped back, for each n. Draft: the same for the tokens one draft level
expands at once. Each point has ``warmup`` untimed and ``repeats`` timed runs; the curve keeps
the median and the spread (inter-quartile range). The sizes are interleaved: every repeat
times every size once (1, 2, 4, ..., then 1, 2, 4, ... again), so a slow drift of the machine
(another process, clock changes) hits every size alike instead of one size's whole sample.
CUDA events time GPU models, ``time.perf_counter`` CPU ones. Provenance (device, dtype,
threads, ``OMP_WAIT_POLICY``, CPU kernels, library versions) goes to ``Latency.meta``.

CPU timings need ``OMP_WAIT_POLICY=PASSIVE`` (set before torch is imported; the ``treeopt``
command does it unless the user set it) or one thread: OpenMP's default spin-waiting makes
timings meaningless when other processes are busy. ``timing_warnings`` flags points whose
spread is comparable to their median and curves that fall as the size grows.
"""

from __future__ import annotations

import platform
import statistics
import time
from pathlib import Path
from typing import Sequence

import torch

from treeopt.errors import TreeoptError
from treeopt.limits import parse_json
from treeopt.tree import Tree

DEFAULT_TOKENS = (1, 2, 4, 8, 16, 32, 64, 128)
# A point whose inter-quartile range exceeds this fraction of its median is flagged as noisy.
NOISY_SPREAD = 0.25
# A point this fraction below a smaller size's median is flagged as a fall of the curve.
FALL_TOLERANCE = 0.05


class LatencyError(TreeoptError, ValueError):
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


def _check_counts(context: int, repeats: int, warmup: int) -> None:
    if context < 1:
        raise LatencyError(f"--context must be >= 1, got {context}")
    if repeats < 1 or warmup < 0:
        raise LatencyError(f"--repeats must be >= 1 and --warmup >= 0, got {repeats} and {warmup}")


def _interleaved(calls: Sequence, timer, repeats: int, warmup: int, after=None
                 ) -> list[list[float]]:
    """Time each of ``calls`` ``repeats`` times, interleaved: ``warmup`` untimed rounds over
    all calls, then ``repeats`` timed rounds over all calls. ``after(i)`` runs untimed after
    each call i (e.g. to crop a cache). Returns the samples of each call."""
    samples: list[list[float]] = [[] for _ in calls]
    for r in range(warmup + repeats):
        for i, fn in enumerate(calls):
            ms = timer(fn)
            if after is not None:
                after(i)
            if r >= warmup:
                samples[i].append(ms)
    return samples


def time_tree_forwards(model, tokens: Sequence[int], *, context: int = 256, repeats: int = 10,
                       warmup: int = 2, seed: int = 0) -> list[list[float]]:
    """Milliseconds of one tree forward of n tokens after a ``context``-token prefix, for each
    n in ``tokens``: ``repeats`` timed samples per n (after ``warmup`` untimed runs), the
    sizes interleaved (each round times every size once)."""
    from treeopt.decode.attention import forward_tree, run_model

    _check_counts(context, repeats, warmup)
    tokens = [int(n) for n in tokens]
    device = _device(model)
    vocab = int(model.config.vocab_size)
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and context + max(tokens) > int(limit):
        raise LatencyError(f"context {context} + {max(tokens)} tokens exceeds the model's "
                           f"{limit} positions; lower --context or --tokens")
    gen = torch.Generator().manual_seed(seed)
    prefix = torch.randint(0, vocab, (1, context), generator=gen).to(device)
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    timer = _Timer(device)
    calls = []
    for n in tokens:
        buf = bushy_tree(n).buffers(device)
        ids = torch.randint(0, vocab, (1, n), generator=gen).to(device)
        pos = (buf.depth + context).unsqueeze(0)
        calls.append(lambda ids=ids, pos=pos, mask=buf.mask: forward_tree(model, ids, pos, mask,
                                                                          cache))
    with torch.no_grad():
        run_model(model, prefix, cache)
        return _interleaved(calls, timer, repeats, warmup, after=lambda i: cache.crop(-tokens[i]))


def time_proposals(drafter, tokens: Sequence[int], *, vocab: int, context: int = 256,
                   repeats: int = 10, warmup: int = 2, seed: int = 0) -> list[list[float]]:
    """Milliseconds of one ``propose`` of a model-free drafter (n-gram, datastore, ...) that
    fills one level of q candidates, after a ``context``-token text, for each q in
    ``tokens`` (interleaved like ``time_tree_forwards``). The text repeats a random 32-token
    phrase, so lookups find matches and pay their full cost."""
    from treeopt.decode.sampling import GREEDY
    from treeopt.shapes import kary

    _check_counts(context, repeats, warmup)
    gen = torch.Generator().manual_seed(seed)
    phrase = torch.randint(0, vocab, (32,), generator=gen).tolist()
    text = (phrase * (context // 32 + 1))[:context]
    timer = _Timer(torch.device("cpu"))
    calls = []
    for q in tokens:
        level = drafter.reshaped(kary(q, 1))
        level.start(torch.tensor([text], dtype=torch.int64))
        calls.append(lambda level=level: level.propose(text, 1, GREEDY))
    return _interleaved(calls, timer, repeats, warmup)


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


def threading_settings(model=None, draft=None) -> dict:
    """What CPU timings depend on: torch's intra- and inter-op threads, ``OMP_WAIT_POLICY``
    as set in this process (None = unset: OpenMP's default, active spin-waiting) and the CPU
    linear kernels of the model (and draft model) timed."""
    import os

    from treeopt.decode.cpu_kernels import kernels_in_use

    out = {"threads": torch.get_num_threads(),
           "interop_threads": torch.get_num_interop_threads(),
           "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}
    if model is not None:
        out["kernels"] = kernels_in_use(model)
    if draft is not None:
        out["draft_kernels"] = kernels_in_use(draft)
    return out


def timing_warnings(latency, noisy: float = NOISY_SPREAD,
                    fall: float = FALL_TOLERANCE) -> list[str]:
    """One line per problem with a measured latency table: points whose spread (IQR) exceeds
    ``noisy`` times their median, and curves that fall (a point more than ``fall`` below a
    smaller size's median). Each line says what to do about it."""
    cpu = (latency.meta or {}).get("device_type", "cpu") != "cuda"
    fix = ("more --repeats (e.g. 20), --threads 1, or a quieter machine" if cpu
           else "more --repeats or a quieter GPU")
    out = []
    for name, curve in (("target", latency.target), ("draft", latency.draft)):
        if curve is None:
            continue
        spread = curve.spread_ms or [0.0] * len(curve.ms)
        wide = [(n, ms, s) for n, ms, s in zip(curve.tokens, curve.ms, spread)
                if ms > 0 and s > noisy * ms]
        if wide:
            pts = ", ".join(f"{n} tokens (IQR {s:.2f} of {ms:.2f} ms)" for n, ms, s in wide[:4])
            more = f" and {len(wide) - 4} more sizes" if len(wide) > 4 else ""
            out.append(f"{name} latency is noisy: the IQR exceeds {noisy:.0%} of the median at "
                       f"{pts}{more}; re-measure with {fix}")
        for i in range(1, len(curve.ms)):
            j = max(range(i), key=lambda k: curve.ms[k])
            if curve.ms[i] < curve.ms[j] * (1 - fall):
                out.append(f"{name} latency falls: {curve.ms[j]:.2f} ms at {curve.tokens[j]} "
                           f"tokens but {curve.ms[i]:.2f} ms at {curve.tokens[i]}; the "
                           "hardware-aware choice prices sizes at the curve's non-decreasing "
                           f"envelope; if this is noise, re-measure with {fix}")
                break
    return out


def measure_latency(target, draft=None, *, tokens: Sequence[int] = DEFAULT_TOKENS,
                    draft_tokens: Sequence[int] | None = None, context: int = 256,
                    repeats: int = 10, warmup: int = 2, seed: int = 0,
                    names: dict | None = None):
    """Latency curves of the target (tree forward of n tokens) and, if given, the draft
    (forward of the q tokens one level expands; ``draft_tokens`` defaults to ``tokens``).
    ``draft`` is a draft model, a Drafter with a model, or a model-free Drafter, whose curve
    is the cost of proposing one level of q candidates (``time_proposals``).

    Returns ``treeopt.profile.Latency`` with meta: device, dtype, threading settings
    (``threading_settings``), context, repeats, warmup, library versions and ``names`` (e.g.
    the model specs)."""
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
        **threading_settings(target, draft if draft is not None
                             and not isinstance(draft, Drafter) else None),
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
            text = path.read_text()
        except (OSError, UnicodeDecodeError):
            raise LatencyError(f"{path} exists but is not a JSON profile; choose another "
                               "--out") from None
        doc = parse_json(text, lambda msg: LatencyError(
            f"{path} exists but is not a JSON profile ({msg}); choose another --out"))
        if not isinstance(doc, dict) or doc.get("format") != JSON_FORMAT:
            raise LatencyError(f"{path} exists but is not a treeopt profile; choose another "
                               "--out")
    doc["latency"] = latency.to_dict()
    return write_json_atomic(path, doc)


def load_latency(path):
    """The latency section of a profile .json (also a latency-only file), or None."""
    from treeopt.profile import Latency

    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError):
        raise LatencyError(f"{path}: not a readable JSON profile") from None
    doc = parse_json(text, lambda msg: LatencyError(f"{path}: not a readable JSON profile "
                                                    f"({msg})"))
    if not isinstance(doc, dict) or doc.get("latency") is None:
        return None
    return Latency.from_dict(doc["latency"])
