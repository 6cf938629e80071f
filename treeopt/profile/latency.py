"""Latency profiler: forward time as a function of the number of tokens processed at once.

Target: the KV cache is prefilled to ``context`` tokens, then one tree forward of n tokens with
a tree mask (``treeopt.decode.attention.forward_tree``, the engine's verification call) is
timed and the cache cropped back, for each n. Draft: the same for the tokens one draft level
expands at once. Each point has ``warmup`` untimed and ``repeats`` timed runs; the curve keeps
the median and the spread (inter-quartile range). The sizes are interleaved: every repeat
times every size once (1, 2, 4, ..., then 1, 2, 4, ... again), so a slow drift of the machine
(another process, clock changes) hits every size alike instead of one size's whole sample;
and each size's time is taken relative to the first size's in the same round
(``treeopt.profile.model.steady_samples``), so a slow phase that spans a few rounds cancels
instead of raising the sizes whose samples it happened to cover most.
CUDA events time GPU models, ``time.perf_counter`` CPU ones. Provenance (device, dtype,
threads, ``OMP_WAIT_POLICY``, CPU kernels, library versions) goes to ``Latency.meta``.

CPU timings need ``OMP_WAIT_POLICY=PASSIVE`` (set before torch is imported; the ``treeopt``
command does it unless the user set it) or one thread: OpenMP's default spin-waiting makes
timings meaningless when other processes are busy. ``timing_warnings`` flags points whose
spread is comparable to their median and curves that fall as the size grows.

Several contexts (``measure_latency(..., contexts=[128, 512, 1024])``, ``treeopt profile
latency --contexts 128,512,1024``). A forward's cost grows with the cached prefix (attention
reads it), and more so for multi-token forwards: one KV cache per context is prefilled, and
every round times every (context, size) pair once, contexts ascending and sizes within each,
so drift hits every context alike (the target's rounds first, then the draft's). After each
timed round the table measured so far is written to ``out`` (atomically), so an interrupted
run keeps every finished round of every context; such a file says so in
``meta["partial"]`` (``{"target_repeats": r, "draft_repeats": r2, "of": repeats}``; the draft
curves are absent until a draft round finished) and ``timing_warnings`` reports it. A
context plus the largest size beyond the model window (``max_position_embeddings`` of the
target or the draft model) is refused before anything is timed.

File format of a multi-context table (an extension of the ``latency`` section that every
reader of the single-context format still reads):

    "latency": {"context": 128, "meta": {..., "curves_by_context": [
                   {"context": 128, "target": {curve}, "draft": {curve}},
                   {"context": 512, "target": {curve}, "draft": {curve}}, ...]},
                "target": {curve}, "draft": {curve}}

``context``, ``target`` and ``draft`` are the first (smallest) context's, exactly as a
single-context table holds them, so older readers see a valid table measured at that
context; ``meta.curves_by_context`` lists every measured context (the first included, equal
to the keys above), ascending, each with its curves in the same curve format (``tokens``,
``ms``, ``spread_ms``). The list lives in ``meta`` because ``meta`` is carried unchanged by
every reader and writer of profiles (merging, acceptance re-profiling, ``Profile.save``),
which therefore never drop contexts. A table without the key has one context.
:func:`latencies_by_context` reads it (validated, one-line ``LatencyError`` otherwise) and
``treeopt.search.hardware.latency_at`` prices any context from it.
"""

from __future__ import annotations

import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from treeopt import __version__
from treeopt.decode.attention import forward_tree, run_model
from treeopt.decode.drafter import Drafter
from treeopt.decode.engine import model_window, prefill
from treeopt.decode.sampling import GREEDY
from treeopt.limits import positive_ints, read_json
from treeopt.models.machine import threading_settings
from treeopt.profile import Latency, LatencyCurve
from treeopt.profile.model import (
    JSON_FORMAT,
    JSON_VERSION,
    MAX_CONTEXTS,
    LatencyError,
    latencies_by_context,
    steady_samples,
    write_json_atomic,
)
from treeopt.shapes import kary
from treeopt.tree import Tree

DEFAULT_TOKENS = (1, 2, 4, 8, 16, 32, 64, 128)
# A point whose inter-quartile range exceeds this fraction of its median is flagged as noisy.
NOISY_SPREAD = 0.25
# A point this fraction below a smaller size's median is flagged as a fall of the curve.
FALL_TOLERANCE = 0.05



@dataclass(frozen=True)
class LatencySettings:
    """What a latency profile times: target tree forwards of ``tokens`` sizes (a list or
    "1,2,4"), at ``context`` cached tokens or at each of ``contexts`` (never both),
    ``repeats`` timed rounds after ``warmup`` untimed ones. None leaves a field to the
    caller's default for the device (``treeopt.tuning.latency_defaults``)."""

    tokens: Sequence[int] | str | None = None
    context: int | None = None
    contexts: Sequence[int] | str | None = None
    repeats: int | None = None
    warmup: int | None = None


def parse_tokens(spec: str) -> list[int]:
    """``"1,2,4,8"`` -> [1, 2, 4, 8] (sorted, unique, each >= 1;
    ``treeopt.limits.positive_ints``)."""
    return positive_ints(spec, "--tokens", "1,2,4,8", LatencyError)


def parse_contexts(spec: str) -> list[int]:
    """``"128,512,1024"`` -> [128, 512, 1024] (sorted, unique, each >= 1): the cached prefix
    lengths ``--contexts`` times curves at."""
    return positive_ints(spec, "--contexts", "128,512,1024", LatencyError)


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


def check_window(model, contexts: Sequence[int], tokens: Sequence[int]) -> None:
    """One-line LatencyError when the largest context plus the largest size exceeds the model's
    window (``treeopt.decode.engine.model_window``; nothing to check when the model has none)."""
    limit = model_window(model)
    if limit is None or not contexts or not tokens:
        return
    context, n = max(contexts), max(tokens)
    if context + n > int(limit):
        flag = "--contexts" if len(contexts) > 1 else "--context"
        raise LatencyError(f"context {context} + {n} tokens exceeds the model's {limit} "
                           f"positions; lower {flag} or --tokens")


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


class _Rounds:
    """Follows an :func:`_interleaved` loop from outside it: ``timer`` records every sample,
    ``after`` runs the per-call hook and, once a timed round is complete, calls
    ``on_round(samples so far)`` (one list of samples per call). The loop itself stays as it
    is, so a progress display wrapping it keeps working."""

    def __init__(self, timer, n_calls: int, warmup: int, after=None, on_round=None):
        self.inner, self.n, self.warmup = timer, n_calls, warmup
        self.hook, self.on_round = after, on_round
        self.log: list[float] = []

    def timer(self, fn) -> float:
        ms = self.inner(fn)
        self.log.append(ms)
        return ms

    def after(self, i: int) -> None:
        if self.hook is not None:
            self.hook(i)
        done, rest = divmod(len(self.log), self.n)
        if self.on_round is not None and rest == 0 and done > self.warmup:
            timed = self.log[self.warmup * self.n:]
            self.on_round([timed[i::self.n] for i in range(self.n)])


def _split(samples: list[list[float]], groups: int) -> list[list[list[float]]]:
    """Per-call samples of ``groups`` equal blocks of calls -> one block per group."""
    k = len(samples) // groups
    return [samples[g * k:(g + 1) * k] for g in range(groups)]


def time_tree_forwards_by_context(model, tokens: Sequence[int], contexts: Sequence[int], *,
                                  repeats: int = 10, warmup: int = 2, seed: int = 0,
                                  on_round=None) -> list[list[list[float]]]:
    """Milliseconds of one tree forward of n tokens after a c-token prefix, for each c in
    ``contexts`` and n in ``tokens``: ``[context][size]`` lists of ``repeats`` samples. One
    KV cache per context; every round times every (context, size) pair once (contexts in
    the given order, sizes within each). ``on_round(samples)`` is called after each timed
    round with the samples so far, in the same ``[context][size]`` layout."""

    contexts = [int(c) for c in contexts]
    for c in contexts:
        _check_counts(c, repeats, warmup)
    tokens = [int(n) for n in tokens]
    check_window(model, contexts, tokens)
    device = _device(model)
    vocab = int(model.config.vocab_size)
    gen = torch.Generator().manual_seed(seed)
    from transformers import DynamicCache

    timer = _Timer(device)
    calls, crops = [], []
    # inference mode, as the engine decodes: no_grad alone costs a few % more per forward
    # on CPU, which made plain steps look dearer than they are in decoding
    with torch.inference_mode():
        for context in contexts:
            prefix = torch.randint(0, vocab, (1, context), generator=gen).to(device)
            cache = DynamicCache(config=model.config)
            run_model(model, prefix, cache)
            for n in tokens:
                buf = bushy_tree(n).buffers(device)
                ids = torch.randint(0, vocab, (1, n), generator=gen).to(device)
                pos = (buf.depth + context).unsqueeze(0)
                calls.append(lambda ids=ids, pos=pos, mask=buf.mask, cache=cache:
                             forward_tree(model, ids, pos, mask, cache))
                crops.append(lambda cache=cache, n=n: cache.crop(-n))
        rounds = _Rounds(timer, len(calls), warmup, lambda i: crops[i](),
                         None if on_round is None
                         else lambda s: on_round(_split(s, len(contexts))))
        samples = _interleaved(calls, rounds.timer, repeats, warmup, after=rounds.after)
    return _split(samples, len(contexts))


def time_tree_forwards(model, tokens: Sequence[int], *, context: int = 256, repeats: int = 10,
                       warmup: int = 2, seed: int = 0) -> list[list[float]]:
    """Milliseconds of one tree forward of n tokens after a ``context``-token prefix, for each
    n in ``tokens``: ``repeats`` timed samples per n (after ``warmup`` untimed runs), the
    sizes interleaved (each round times every size once)."""
    _check_counts(context, repeats, warmup)
    return time_tree_forwards_by_context(model, tokens, [context], repeats=repeats,
                                         warmup=warmup, seed=seed)[0]


def time_proposals_by_context(drafter, tokens: Sequence[int], contexts: Sequence[int], *,
                              vocab: int, repeats: int = 10, warmup: int = 2, seed: int = 0,
                              on_round=None) -> list[list[list[float]]]:
    """Milliseconds of one ``propose`` of a model-free drafter (n-gram, datastore, ...) that
    fills one level of q candidates, after a c-token text, for each c in ``contexts`` and q
    in ``tokens``: ``[context][size]`` sample lists, interleaved like
    :func:`time_tree_forwards_by_context`. The text repeats a random 32-token phrase, so
    lookups find matches and pay their full cost."""

    contexts = [int(c) for c in contexts]
    for c in contexts:
        _check_counts(c, repeats, warmup)
    gen = torch.Generator().manual_seed(seed)
    phrase = torch.randint(0, vocab, (32,), generator=gen).tolist()
    timer = _Timer(torch.device("cpu"))
    calls = []
    for context in contexts:
        text = (phrase * (context // 32 + 1))[:context]
        for q in tokens:
            level = drafter.reshaped(kary(q, 1))
            level.start(torch.tensor([text], dtype=torch.int64))
            calls.append(lambda level=level, text=text: level.propose(text, 1, GREEDY))
    rounds = _Rounds(timer, len(calls), warmup, None,
                     None if on_round is None else lambda s: on_round(_split(s, len(contexts))))
    samples = _interleaved(calls, rounds.timer, repeats, warmup, after=rounds.after)
    return _split(samples, len(contexts))


def time_proposals(drafter, tokens: Sequence[int], *, vocab: int, context: int = 256,
                   repeats: int = 10, warmup: int = 2, seed: int = 0) -> list[list[float]]:
    """Milliseconds of one ``propose`` of a model-free drafter (n-gram, datastore, ...) that
    fills one level of q candidates, after a ``context``-token text, for each q in
    ``tokens`` (interleaved like ``time_tree_forwards``)."""
    _check_counts(context, repeats, warmup)
    return time_proposals_by_context(drafter, tokens, [context], vocab=vocab, repeats=repeats,
                                     warmup=warmup, seed=seed)[0]


def curve_from_samples(tokens: Sequence[int], samples: Sequence[Sequence[float]]):
    """A LatencyCurve of medians with IQR spreads, each size's samples taken relative to the
    first size's in the same round (``treeopt.profile.model.steady_samples``: a slow phase of
    the machine that spans a round cancels)."""
    stats = [quartiles(s) for s in steady_samples(samples)]
    return LatencyCurve(tokens=list(tokens), ms=[round(m, 4) for _, m, _ in stats],
                        spread_ms=[round(q3 - q1, 4) for q1, _, q3 in stats])


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    proc = platform.processor() or platform.machine()
    return f"cpu ({proc}, {torch.get_num_threads()} threads)"



# ---------------------------------------------------------------------------- contexts

def with_contexts(tables: Sequence, meta: dict | None = None):
    """One ``Latency`` holding the tables (``Latency`` objects, one per context, each with its
    ``context``) in the multi-context format of the module docstring: the smallest context's
    curves at the top level, every context's in ``meta["curves_by_context"]``. ``meta``
    defaults to the first table's. A single table comes back with ``meta`` and no list."""

    tables = sorted(tables, key=lambda t: -1 if t.context is None else t.context)
    if not tables:
        raise LatencyError("no latency table to combine")
    contexts = [t.context for t in tables]
    if len(tables) > 1 and (None in contexts or len(set(contexts)) != len(contexts)):
        raise LatencyError(f"latency tables need distinct contexts to be combined, got "
                           f"{contexts}")
    if len({t.draft is None for t in tables}) > 1:
        raise LatencyError("every context needs a draft curve, or none does")
    first = tables[0]
    meta = dict(first.meta if meta is None else meta)
    meta.pop("curves_by_context", None)
    if len(tables) > 1:
        meta["context"] = first.context
        meta["curves_by_context"] = [
            {"context": t.context, "target": t.target.to_dict(),
             **({"draft": t.draft.to_dict()} if t.draft is not None else {})} for t in tables]
    return Latency(first.target, first.draft, first.context, meta)



def timing_warnings(latency, noisy: float = NOISY_SPREAD,
                    fall: float = FALL_TOLERANCE) -> list[str]:
    """One line per problem with a measured latency table: points whose spread (IQR) exceeds
    ``noisy`` times their median, and curves that fall (a point more than ``fall`` below a
    smaller size's median), per context for a multi-context table (the line starts
    "at context C:"), and a table whose measurement was interrupted (``meta["partial"]``).
    Each line says what to do about it."""
    meta = latency.meta or {}
    cpu = meta.get("device_type", "cpu") != "cuda"
    fix = ("more --repeats (e.g. 20), --threads 1, or a quieter machine" if cpu
           else "more --repeats or a quieter GPU")
    out = []
    partial = meta.get("partial")
    if isinstance(partial, dict):
        got = f"{partial.get('target_repeats', 0)} of {partial.get('of', '?')} timed repeats"
        draft = partial.get("draft_repeats")
        drafted = (f", draft {draft} of {partial.get('of', '?')}" if draft
                   else ", draft not measured" if draft is not None else "")
        out.append(f"the latency measurement was interrupted: the medians are of {got} "
                   f"(target{drafted}); run treeopt profile latency again to measure it in "
                   "full")
    tables = latencies_by_context(latency)
    for table in tables:
        where = f"at context {table.context}: " if len(tables) > 1 else ""
        for name, curve in (("target", table.target), ("draft", table.draft)):
            if curve is None:
                continue
            spread = curve.spread_ms or [0.0] * len(curve.ms)
            wide = [(n, ms, s) for n, ms, s in zip(curve.tokens, curve.ms, spread)
                    if ms > 0 and s > noisy * ms]
            if wide:
                pts = ", ".join(f"{n} tokens (IQR {s:.2f} of {ms:.2f} ms)"
                                for n, ms, s in wide[:4])
                more = f" and {len(wide) - 4} more sizes" if len(wide) > 4 else ""
                out.append(f"{where}{name} latency is noisy: the IQR exceeds {noisy:.0%} of "
                           f"the median at {pts}{more}; re-measure with {fix}")
            for i in range(1, len(curve.ms)):
                j = max(range(i), key=lambda k: curve.ms[k])
                if curve.ms[i] < curve.ms[j] * (1 - fall):
                    out.append(f"{where}{name} latency falls: {curve.ms[j]:.2f} ms at "
                               f"{curve.tokens[j]} tokens but {curve.ms[i]:.2f} ms at "
                               f"{curve.tokens[i]}; the hardware-aware choice prices sizes at "
                               "the curve's non-decreasing envelope; if this is noise, "
                               f"re-measure with {fix}")
                    break
    return out


def time_prefill(target, drafter: Drafter | None, prompts: Sequence[Sequence[int]], *,
                 warmup: int = 1, most: int = 3) -> dict:
    """The prompt's prefill, timed as the engine runs it: the target's forward over each prompt
    (``treeopt.decode.engine.prefill``) and, separately, the drafter's ``start`` on it (a draft
    model prefills its cache there; a model-free drafter indexes the prompt), on a forked
    drafter so nothing it keeps changes. Up to ``most`` prompts (the longest first: prefill
    cost grows with length, so they weigh most) are timed once each, after ``warmup`` untimed
    prefills of the first. Returns the ``prefill`` entry of ``Latency.meta``:
    ``{"prompt_tokens": [L...], "target_ms": [...], "draft_ms": [...]}`` (``draft_ms`` zeros
    without a drafter); :func:`treeopt.search.hardware.prefill_costs` reads it."""
    chosen = sorted((list(p) for p in prompts if len(p)), key=len, reverse=True)[:max(1, most)]
    if not chosen:
        raise LatencyError("no prompt to time the prefill on")
    device = _device(target)
    timer = _Timer(device)
    draft = drafter.forked() if drafter is not None else None
    if draft is not None:
        draft.check(target)
    out: dict = {"prompt_tokens": [], "target_ms": [], "draft_ms": []}
    with torch.inference_mode():
        for i in range(-warmup, len(chosen)):
            ids = torch.tensor([chosen[max(i, 0)]], dtype=torch.long, device=device)
            t_ms = timer(lambda: prefill(target, None, ids, GREEDY, None))
            d_ms = timer(lambda: draft.start(ids)) if draft is not None else 0.0
            if i >= 0:
                out["prompt_tokens"].append(int(ids.shape[1]))
                out["target_ms"].append(round(t_ms, 3))
                out["draft_ms"].append(round(d_ms, 3))
    return out


def measure_latency(target, draft=None, *, tokens: Sequence[int] = DEFAULT_TOKENS,
                    draft_tokens: Sequence[int] | None = None, context: int = 256,
                    contexts: Sequence[int] | None = None, repeats: int = 10, warmup: int = 2,
                    seed: int = 0, names: dict | None = None, out=None):
    """Latency curves of the target (tree forward of n tokens) and, if given, the draft
    (forward of the q tokens one level expands; ``draft_tokens`` defaults to ``tokens``).
    ``draft`` is a draft model, a Drafter with a model, or a model-free Drafter, whose curve
    is the cost of proposing one level of q candidates (``time_proposals``).

    ``contexts``: several cached prefix lengths (instead of the one ``context``), timed
    interleaved with one cache each; the result is a multi-context table (module docstring).
    Contexts beyond the model window are refused before anything is timed. ``out``: a
    profile .json that receives the table measured so far after every timed round (see
    :func:`write_latency`; checked before anything is timed) and the full table at the end.

    Returns ``treeopt.profile.Latency`` with meta: device, dtype, threading settings
    (``threading_settings``), context (the first), repeats, warmup, library versions and
    ``names`` (e.g. the model specs)."""
    import transformers

    tokens = sorted({int(n) for n in tokens})
    if not tokens or tokens[0] < 1:
        raise LatencyError("token counts must be integers >= 1")
    ctxs = [int(context)] if contexts is None else sorted({int(c) for c in contexts})
    if not ctxs:
        raise LatencyError("--contexts needs at least one context, e.g. 128,512,1024")
    for c in ctxs:
        _check_counts(c, repeats, warmup)
    if len(ctxs) > MAX_CONTEXTS:
        raise LatencyError(f"{len(ctxs)} contexts exceed the limit {MAX_CONTEXTS}")
    if isinstance(draft, Drafter) and getattr(draft, "model", None) is not None:
        draft = draft.model
    dt = sorted({int(n) for n in (draft_tokens or tokens)}) if draft is not None else []
    check_window(target, ctxs, tokens)
    if draft is not None and not isinstance(draft, Drafter):
        check_window(draft, ctxs, dt)
    if out is not None:
        _profile_doc(Path(out))  # refuse a bad --out before minutes of timing
    t0 = time.perf_counter()
    device = _device(target)
    base = {
        "device": device_name(device),
        "device_type": device.type,
        "dtype": str(_dtype(target)).replace("torch.", ""),
        **threading_settings(target, draft if draft is not None
                             and not isinstance(draft, Drafter) else None),
        "context": ctxs[0],
        "repeats": repeats,
        "warmup": warmup,
        "statistic": "median ms; spread_ms = inter-quartile range",
        "timer": "cuda events" if device.type == "cuda" else "time.perf_counter",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "treeopt": __version__,
    }
    if draft is not None and not isinstance(draft, Drafter):
        base["draft_dtype"] = str(_dtype(draft)).replace("torch.", "")
    elif draft is not None:
        base["draft_kind"] = f"{draft.name} drafter (propose time per level of q candidates)"
    samples: dict = {"target": None, "draft": None}

    def table(partial: bool):
        meta = dict(base, seconds=round(time.perf_counter() - t0, 2),
                    created=time.strftime("%Y-%m-%dT%H:%M:%S"))
        if partial:
            meta["partial"] = {"target_repeats": len(samples["target"][0][0]),
                               "draft_repeats": (len(samples["draft"][0][0])
                                                 if samples["draft"] else 0) if dt else None,
                               "of": repeats}
        meta.update(names or {})
        tables = [Latency(curve_from_samples(tokens, samples["target"][i]),
                          curve_from_samples(dt, samples["draft"][i]) if samples["draft"]
                          else None, c, {}) for i, c in enumerate(ctxs)]
        return with_contexts(tables, meta)

    last = "draft" if draft is not None else "target"

    def checkpoint(phase: str):
        def keep(so_far):
            samples[phase] = so_far
            finished = phase == last and len(so_far[0][0]) == repeats  # written below
            if out is not None and not finished:
                write_latency(table(partial=True), out)
        return keep

    samples["target"] = time_tree_forwards_by_context(
        target, tokens, ctxs, repeats=repeats, warmup=warmup, seed=seed,
        on_round=checkpoint("target"))
    if draft is not None:
        if isinstance(draft, Drafter):
            samples["draft"] = time_proposals_by_context(
                draft, dt, ctxs, vocab=int(target.config.vocab_size), repeats=repeats,
                warmup=warmup, seed=seed + 1, on_round=checkpoint("draft"))
        else:
            samples["draft"] = time_tree_forwards_by_context(
                draft, dt, ctxs, repeats=repeats, warmup=warmup, seed=seed + 1,
                on_round=checkpoint("draft"))
    latency = table(partial=False)
    if out is not None:
        write_latency(latency, out)
    return latency


def _profile_doc(path: Path) -> dict:
    """The profile document ``path`` holds (a fresh latency-only document when there is no
    file); a one-line LatencyError when the path is no place for a latency table."""

    if path.suffix.lower() != ".json":
        raise LatencyError(f"--out {path.name}: latency is written into a .json profile")
    doc = {"format": JSON_FORMAT, "version": JSON_VERSION, "meta": {}}
    if path.exists():
        try:
            doc = read_json(path, lambda msg: LatencyError(
                f"{path} exists but is not a JSON profile ({msg}); choose another --out"))
        except OSError:
            raise LatencyError(f"{path} exists but is not a JSON profile; choose another "
                               "--out") from None
        if not isinstance(doc, dict) or doc.get("format") != JSON_FORMAT:
            raise LatencyError(f"{path} exists but is not a treeopt profile; choose another "
                               "--out")
    return doc


def write_latency(latency, out) -> Path:
    """Write ``latency`` as the latency section of the profile file ``out``: replaced in place
    when the file holds a profile (its acceptance is kept), else a latency-only file (format
    treeopt-profile without an acceptance section; ``load_latency`` reads it). A
    multi-context table is written in the format of the module docstring."""

    path = Path(out)
    latencies_by_context(latency)  # a malformed multi-context table is never written
    doc = _profile_doc(path)
    doc["latency"] = latency.to_dict()
    return write_json_atomic(path, doc)


def load_latency(path):
    """The latency section of a profile .json (also a latency-only file), or None. A
    multi-context table is checked (:func:`latencies_by_context`)."""

    try:
        doc = read_json(path, lambda msg: LatencyError(f"{path}: not a readable JSON profile "
                                                       f"({msg})"))
    except OSError:
        raise LatencyError(f"{path}: not a readable JSON profile") from None
    if not isinstance(doc, dict) or doc.get("latency") is None:
        return None
    latency = Latency.from_dict(doc["latency"])
    try:
        latencies_by_context(latency)
    except LatencyError as exc:
        raise LatencyError(f"{path}: {exc}") from None
    return latency
