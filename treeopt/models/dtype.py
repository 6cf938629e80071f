"""Which dtype a model runs fastest in on this machine, and its latency curve there.

``--dtype auto`` on a CPU means the dtype measured faster for that model on that machine.
The dtypes a device supports well (:func:`supported_dtypes`) are float32 everywhere, bfloat16
on CPUs with AMX or AVX512-BF16 units and on CUDA GPUs with bf16 (else float16). Each is timed
once (:func:`time_forwards`: one-token and multi-token forwards over a cached context,
interleaved, medians relative to the one-token time of each round) and the result is cached
per (model, machine, dtype) in treeopt's cache folder (``latency/*.json``, written
atomically, validated on read: a damaged, foreign or stale file is measured again). The
machine is its CPU model and flags, torch's version and thread count (:func:`machine`).
:func:`choose_dtype` picks from such tables; it is a pure function.

Noise on a shared machine only adds time, and a curve timed while something else ran can be
off by several times (a one-token time of 298 ms cached where decoding then took 87 ms, with
two tokens "cheaper" than one). A curve whose larger size comes out clearly cheaper than a
smaller one (:func:`consistent`) is therefore timed again, keeping each size's lower median;
and a cached curve is re-timed inside :func:`remeasured` (``--remeasure`` of ``generate``,
``chat`` and ``eval``), which the ``auto`` drafter asks for when decoding's own steps are
far off the cached curve.

Plain forwards are only a proxy: a dtype whose curve is flatter verifies trees more cheaply,
and on an AVX512-BF16 CPU the two dtypes' one-token times can tie while speculative decoding
is a fifth faster in bfloat16. So ``tune --dtypes``, which prices the pair's best speculative
configuration in every dtype, replaces the cached choice with the dtype it predicts fastest
(:func:`remember_speculative_choice`, :func:`choose_by_rate`); ``--dtype auto`` then means
that dtype for the model on this machine until the next tune.

The same curves serve the ``auto`` drafter (``treeopt.drafters.auto``), which needs the cost
of verifying 1..16 tokens at once.

Greedy decoding stays exact *in the chosen dtype*: the output equals the target's own greedy
output in that dtype (bf16 logits tie more often; ``treeopt.evaluate.exactness`` tells ties
from differences).
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import inspect
import json
import logging
import math
import os
import platform
import time
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch

from treeopt.decode.attention import attention_in_use
from treeopt.errors import TreeoptError
from treeopt.limits import atomic_write
from treeopt.models.cpu_kernels import PackedLinear, kernels_in_use
from treeopt.profile.model import steady_medians

#: Forward sizes timed (tokens verified at once): the auto drafter's chains of 0..15 drafted
#: tokens read this curve (sizes between two timed ones are interpolated).
SIZES = (1, 2, 3, 4, 6, 8, 12, 16)
CONTEXT = 128
REPEATS = 5
#: The multi-token size that, with one token, scores a dtype (:func:`choose_dtype`).
SCORE_SIZES = (1, 4)
#: Relative score difference below which the dtypes count as tied; ties go to float32.
TIE = 0.02
CACHE_VERSION = 1  # of the dtype choices
#: Of the cached curves; 2: five rounds, each size relative to the one-token time of its round;
#: 3: also timed on both sides of every kernel switch (routed_sizes)
CURVE_VERSION = 3
#: A larger forward timed more than this fraction below a smaller one marks a noisy curve
#: (:func:`consistent`), timed again at most ``RETRIES`` times.
DIP = 0.10
RETRIES = 2
#: Says, once per measurement, that one is being taken (the command line shows it on
#: stderr; a first use on a new machine otherwise waits in silence).
log = logging.getLogger("treeopt.measure")
ENV_PIN = "TREEOPT_AUTO_DTYPE"  # "float32" / "bfloat16" / "float16" pin --dtype auto


class DtypeError(TreeoptError, ValueError):
    """A latency table that cannot be used to choose a dtype."""


# ---------------------------------------------------------------- the machine
def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` says."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (``/proc/cpuinfo``); empty where unknown."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.lower().startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


BF16_FLAGS = ("amx_bf16", "avx512_bf16")


def machine(device: torch.device | str = "cpu") -> dict:
    """What a timing depends on: the CPU model and its matrix flags (or the GPU's name),
    torch's version and its thread count."""
    dev = torch.device(device)
    out = {"torch": torch.__version__, "threads": torch.get_num_threads()}
    if dev.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(dev)
    else:
        flags = cpu_flags()
        out["cpu"] = cpu_model()
        out["flags"] = sorted(f for f in flags if f.startswith(("amx", "avx512_bf16",
                                                                "avx512f", "avx2")))
    return out


def supported_dtypes(device: torch.device | str = "cpu",
                     flags: frozenset[str] | None = None) -> list[str]:
    """The dtypes ``device`` runs well: float32; bfloat16 on a CPU with AMX-BF16 or
    AVX512-BF16 (``flags``: the CPU's flags, default this one's) and on a CUDA GPU with bf16
    (else float16)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return ["float32", "bfloat16" if torch.cuda.is_bf16_supported() else "float16"]
    flags = cpu_flags() if flags is None else flags
    return ["float32"] + (["bfloat16"] if any(f in flags for f in BF16_FLAGS) else [])


# ---------------------------------------------------------------- the choice (pure)
def score(curve: Mapping[int, float]) -> float:
    """A dtype's cost: its one-token plus its 4-token forward time (ms; plain decoding and a
    typical verification). Sizes missing from ``curve`` are interpolated."""
    return sum(interpolate(curve, n) for n in SCORE_SIZES)


def choose_dtype(tables: Mapping[str, Mapping[int, float]]) -> str:
    """The dtype with the lowest :func:`score` in ``tables`` (dtype -> {tokens: ms});
    within ``TIE`` (2 %) of float32, float32 (the reference dtype) wins. Raises DtypeError
    for an empty or unusable table."""
    if not tables:
        raise DtypeError("no latency table to choose a dtype from")
    scores = {}
    for name, curve in tables.items():
        check_curve(curve, f"dtype {name}")
        scores[name] = score(curve)
    best = min(scores, key=lambda k: (scores[k], k != "float32", k))
    if "float32" in scores and scores["float32"] <= scores[best] * (1 + TIE):
        return "float32"
    return best


def choose_by_rate(rates: Mapping[str, float]) -> str:
    """The dtype with the highest tokens/s in ``rates`` (dtype -> predicted tokens/s of the
    pair's best speculative configuration in that dtype); within ``TIE`` (2 %) of float32's,
    float32. Raises DtypeError for an empty table or a rate that is not a positive number."""
    if not rates:
        raise DtypeError("no speculative rates to choose a dtype from")
    for name, rate in rates.items():
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) \
                or not math.isfinite(rate) or rate <= 0:
            raise DtypeError(f"dtype {name}: tokens/s {rate!r} is not a positive number")
    best = max(rates, key=lambda k: (rates[k], k == "float32", k))
    if "float32" in rates and rates["float32"] * (1 + TIE) >= rates[best]:
        return "float32"
    return best


def check_curve(curve: Mapping[int, float], what: str = "latency curve") -> None:
    """Raise DtypeError unless ``curve`` maps positive token counts, 1 among them, to
    positive finite milliseconds."""
    if not isinstance(curve, Mapping) or 1 not in curve:
        raise DtypeError(f"{what}: needs the one-token time")
    for n, ms in curve.items():
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise DtypeError(f"{what}: token count {n!r} is not a positive integer")
        if isinstance(ms, bool) or not isinstance(ms, (int, float)) or not math.isfinite(ms) \
                or ms <= 0:
            raise DtypeError(f"{what}: time {ms!r} at {n} tokens is not a positive number")


def interpolate(curve: Mapping[int, float], n: int) -> float:
    """Forward time (ms) of ``n`` tokens: measured, else linear between the nearest measured
    sizes, else the largest size's time scaled by ``n / size`` beyond it."""
    if n in curve:
        return float(curve[n])
    sizes = sorted(curve)
    below = [s for s in sizes if s < n]
    above = [s for s in sizes if s > n]
    if not below:
        return float(curve[sizes[0]])
    if not above:
        top = sizes[-1]
        return float(curve[top]) * n / top
    a, b = below[-1], above[0]
    return float(curve[a]) + (float(curve[b]) - float(curve[a])) * (n - a) / (b - a)


# ---------------------------------------------------------------- timing
def timed_context(model, context: int, sizes: Sequence[int] = SIZES) -> int:
    """The context ``time_forwards`` times ``sizes`` after when asked for ``context``: at
    most the model's window less the largest size."""
    window = getattr(model.config, "max_position_embeddings", None) or 10 ** 9
    return max(1, min(int(context), int(window) - max(sizes)))


def routed_sizes(model, sizes: Sequence[int] = SIZES) -> tuple[int, ...]:
    """``sizes`` and, where ``model``'s packed layers compute some row counts streamed and
    the rest with oneDNN (``treeopt.models.cpu_kernels``), the counts on both sides of every
    switch between the two and every count padded to a larger one, up to the largest size:
    between two timed sizes every count then runs on one kernel, so a curve interpolated
    there prices it as it runs (5 tokens on oneDNN between 4 streamed and 6 on oneDNN were
    priced halfway between the two)."""
    packed = next((m for m in model.modules() if isinstance(m, PackedLinear)), None)
    routed = packed.streamed if packed is not None else {}
    if not routed:
        return tuple(sorted({int(n) for n in sizes}))
    top = max(int(n) for n in sizes)
    out = {int(n) for n in sizes}
    for c in range(1, top):
        if (c in routed) != (c + 1 in routed):
            out.update((c, c + 1))
    out.update(c for c, n in routed.items() if n > c and c <= top)
    return tuple(sorted(out))


def time_forwards(model, sizes: Sequence[int] = SIZES, context: int = CONTEXT,
                  repeats: int = REPEATS, warmup: int = 1) -> dict[int, float]:
    """Median ms of one forward of ``n`` new tokens after ``context`` cached ones, for each
    ``n`` in ``sizes`` (interleaved rounds, each size relative to the first size's time in
    the same round: ``treeopt.profile.model.steady_medians``; the cache is cropped back
    after each call)."""
    times = timed_rounds(model, sizes, context, repeats, warmup)[0]
    return dict(zip(times, steady_medians(list(times.values()))))


def timed_rounds(model, sizes: Sequence[int], context: int, repeats: int, warmup: int,
                 variants: Sequence[Callable[[], object]] = (lambda: None,)
                 ) -> list[dict[int, list[float]]]:
    """Per variant, ms samples of one forward of ``n`` new tokens after ``context`` cached
    ones for each ``n`` in ``sizes``: ``warmup`` untimed then ``repeats`` timed rounds, each
    round timing every size under every variant in turn (``variants[i]()`` is called just
    before its forward: it switches the model to variant i). The cache is cropped back after
    each call."""
    from transformers import DynamicCache

    device = next(model.parameters()).device
    context = timed_context(model, context, sizes)
    gen = torch.Generator().manual_seed(0)
    vocab = int(model.config.vocab_size)
    ids = torch.randint(0, vocab, (1, context + max(sizes)), generator=gen).to(device)
    times: list[dict[int, list[float]]] = [{int(n): [] for n in sizes} for _ in variants]
    # the cache argument's name in this transformers version (``cache`` replaced
    # ``past_key_values``)
    arg = "cache" if "cache" in inspect.signature(type(model).forward).parameters \
        else "past_key_values"
    with torch.inference_mode():
        cache = DynamicCache(config=model.config)
        model(input_ids=ids[:, :context], use_cache=True, **{arg: cache},
              position_ids=torch.arange(context, device=device)[None], logits_to_keep=1)
        for r in range(warmup + repeats):
            for n in times[0]:
                pos = torch.arange(context, context + n, device=device)[None]
                for variant, samples in zip(variants, times):
                    variant()
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    t0 = time.perf_counter()
                    model(input_ids=ids[:, context:context + n], use_cache=True,
                          **{arg: cache}, position_ids=pos)
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    dt = (time.perf_counter() - t0) * 1000
                    cache.crop(-n)
                    if r >= warmup:
                        samples[n].append(dt)
    return times


# ---------------------------------------------------------------- the cache
def model_key(model) -> str:
    """What names a loaded model in the cache: its folder or id, parameter count and
    architecture (a folder changed in place is a new model only if these change)."""
    name = str(getattr(model.config, "_name_or_path", "") or "")
    params = sum(p.numel() for p in model.parameters())
    return f"{name}|{type(model).__name__}|{params}"


def model_label(model) -> str:
    """A short name of a loaded model for messages: its folder's or id's last part."""
    name = str(getattr(model.config, "_name_or_path", "") or "").rstrip("/\\")
    return name.replace("\\", "/").rsplit("/", 1)[-1] or type(model).__name__


def cache_file(folder: Path, kind: str, ident: dict) -> Path:
    """Where treeopt caches a measurement of ``kind`` (``latency``, ``dtype``, ``kernels``,
    ``tuned``) for identity ``ident``: ``folder/kind/<digest of ident>.json``."""
    digest = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:20]
    return folder / kind / f"{digest}.json"


def cache_path(key: str, dtype: str, device: torch.device | str, kernels: str,
               folder: Path, context: int = CONTEXT) -> tuple[Path, dict]:
    """(file, identity) of the latency curve of model ``key`` in ``dtype`` on this machine
    after ``context`` cached tokens (named in the identity unless it is ``CONTEXT``)."""
    ident = {"model": key, "dtype": dtype, "kernels": kernels, "machine": machine(device)}
    if int(context) != CONTEXT:
        ident["context"] = int(context)
    return cache_file(folder, "latency", ident), ident


def read_cached(path: Path, ident: dict, version: int) -> dict | None:
    """The JSON object cached at ``path`` when the file is small (64 KiB at most), parses,
    and carries this ``version`` and identity ``ident``; else None (measure again)."""
    try:
        if not path.is_file() or path.stat().st_size > 1 << 16:
            return None
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    if not isinstance(data, dict) or data.get("version") != version \
            or data.get("identity") != ident:
        return None
    return data


def read_curve(path: Path, ident: dict) -> dict[int, float] | None:
    """The cached curve at ``path`` when it is a valid file for ``ident``, else None."""
    try:
        data = read_cached(path, ident, CURVE_VERSION)
        if data is None or not isinstance(data.get("ms"), dict):
            return None
        curve = {int(k): float(v) for k, v in data["ms"].items()}
        check_curve(curve)
        return curve
    except (OSError, ValueError, TypeError, UnicodeDecodeError, DtypeError):
        return None


def write_curve(path: Path, ident: dict, curve: Mapping[int, float], context: int) -> None:
    text = json.dumps({"version": CURVE_VERSION, "identity": ident, "context": context,
                       "ms": {str(k): round(float(v), 4) for k, v in sorted(curve.items())}},
                      indent=1) + "\n"
    atomic_write(path, lambda fh: fh.write(text), binary=False)


def consistent(curve: Mapping[int, float], dip: float = DIP) -> bool:
    """Whether no size of ``curve`` costs more than ``dip`` (a fraction) less than a smaller
    size does: a larger forward does at least the work of a smaller one, so such a dip is
    noise (the smaller size was timed while something else ran)."""
    dearest = 0.0
    for n in sorted(curve):
        if curve[n] < (1.0 - dip) * dearest:
            return False
        dearest = max(dearest, float(curve[n]))
    return True


def steady_forwards(model, sizes: Sequence[int] = SIZES, retries: int = RETRIES,
                    **kw) -> dict[int, float]:
    """:func:`time_forwards`, timed again while the curve is not :func:`consistent` (at most
    ``retries`` more times), keeping each size's lowest median: noise only adds time."""
    curve = time_forwards(model, sizes, **kw)
    for _ in range(retries):
        if consistent(curve):
            break
        again = time_forwards(model, sizes, **kw)
        curve = {n: min(curve[n], again[n]) for n in curve}
    return curve


#: Inside :func:`remeasured`: the cache files re-timed so far (each once), else None.
_REMEASURE: contextvars.ContextVar[set | None] = contextvars.ContextVar("treeopt_remeasure",
                                                                        default=None)


@contextlib.contextmanager
def remeasured():
    """Within this block :func:`latency_curve` re-times every curve it is asked for (once
    each) instead of reading it from the cache, and replaces the cached file: for a curve
    timed while the machine was busy, or on a machine that has changed since."""
    token = _REMEASURE.set(set())
    try:
        yield
    finally:
        _REMEASURE.reset(token)


def to_remeasure(path: Path) -> bool:
    """Whether the cached measurement at ``path`` is to be timed again: inside
    :func:`remeasured`, until :func:`remeasured_file` says it was."""
    fresh = _REMEASURE.get()
    return fresh is not None and path not in fresh


def remeasured_file(path: Path) -> None:
    """Record, inside :func:`remeasured`, that ``path`` was timed again (once is enough)."""
    fresh = _REMEASURE.get()
    if fresh is not None:
        fresh.add(path)


def latency_curve(model, folder: Path, *, measure: bool = True,
                  sizes: Sequence[int] | None = None, context: int = CONTEXT
                  ) -> dict[int, float] | None:
    """The cached latency curve (tokens -> ms) of ``model`` as loaded (its dtype, device,
    kernels) on this machine, after ``context`` cached tokens, at ``sizes`` (default: the
    :func:`routed_sizes` of ``SIZES``); measured (:func:`steady_forwards`) and cached when
    absent or when inside :func:`remeasured` (None if ``measure`` is false and nothing is
    cached)."""
    sizes = routed_sizes(model) if sizes is None else tuple(sizes)
    device = next(model.parameters()).device
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    path, ident = cache_path(model_key(model), dtype, device,
                             f"{kernels_in_use(model)}/{attention_in_use(model)}", folder,
                             context)
    curve = None if measure and to_remeasure(path) else read_curve(path, ident)
    if curve is not None or not measure:
        return curve
    log.info("timing %s forwards of %s tokens after %d cached (%s); later runs on this "
             "machine read them from %s", model_label(model), ",".join(map(str, sizes)),
             context, dtype, path.parent)
    curve = steady_forwards(model, sizes, context=context)
    write_curve(path, ident, curve, context)
    remeasured_file(path)
    return curve


def auto_dtype(name: str, load: Callable[[str], object], device: torch.device | str,
               folder: Path, dtypes: Sequence[str] | None = None
               ) -> tuple[str, dict[str, dict[int, float]]]:
    """The dtype ``--dtype auto`` means for the model ``name`` (its resolved folder or id) on
    ``device``: ``$TREEOPT_AUTO_DTYPE`` when set, the only dtype the device supports well
    (:func:`supported_dtypes`) when there is one, else :func:`choose_dtype` over each dtype's
    curve. The choice is cached per (model, machine) in ``dtype/*.json``; only without a
    valid cached choice is ``load(dtype)`` called to load the model in each dtype and time it
    (each copy is dropped before the next is loaded). A choice ``tune`` cached from
    speculative rates (:func:`remember_speculative_choice`) takes precedence over plain
    timing. Returns (dtype, the curves used; empty for a choice made from rates)."""
    pinned = os.environ.get(ENV_PIN, "").strip().lower()
    if pinned and pinned != "measure":
        return pinned, {}
    dtypes = list(dtypes or supported_dtypes(device))
    if len(dtypes) == 1:
        return dtypes[0], {}
    path, ident = choice_path(name, dtypes, device, folder)
    cached = read_choice(path, ident)
    if cached is not None:
        return cached
    log.info("choosing --dtype auto for %s: timing it in %s; later runs on this machine read "
             "the choice from %s", Path(str(name)).name, ", ".join(dtypes), path.parent)
    tables: dict[str, dict[int, float]] = {}
    for dt in dtypes:
        try:
            model = load(dt)
            tables[dt] = latency_curve(model, folder)
        except (RuntimeError, NotImplementedError, TypeError) as exc:
            if dt == dtypes[0]:
                raise
            # a model whose layers cannot run in this dtype here: not a candidate
            tables.pop(dt, None)
            del exc
            continue
        finally:
            model = None
    # chosen from the values as written: a file is valid only if its own values choose alike
    tables = {k: {n: round(v, 4) for n, v in sorted(c.items())} for k, c in tables.items()}
    choice = choose_dtype(tables)
    text = json.dumps({"version": CACHE_VERSION, "identity": ident, "choice": choice,
                       "ms": {k: {str(n): v for n, v in c.items()} for k, c in tables.items()}},
                      indent=1) + "\n"
    atomic_write(path, lambda fh: fh.write(text), binary=False)
    return choice, tables


def choice_path(name: str, dtypes: Sequence[str], device: torch.device | str,
                folder: Path) -> tuple[Path, dict]:
    """(file, identity) of the cached ``--dtype auto`` choice for model ``name`` among
    ``dtypes`` on this machine."""
    ident = {"model": str(name), "dtypes": list(dtypes), "machine": machine(device)}
    return cache_file(folder, "dtype", ident), ident


def remember_speculative_choice(name: str, rates: Mapping[str, float], *, draft: str,
                                device: torch.device | str, folder: Path) -> str | None:
    """Cache :func:`choose_by_rate` of ``rates`` (dtype -> the predicted tokens/s of the
    pair's best configuration with drafter ``draft``, from ``tune --dtypes``) as what
    ``--dtype auto`` means for model ``name`` (its resolved folder or id) on this machine.
    Returns the dtype, or None (nothing written) when ``rates`` lacks a dtype the device
    supports well (a partial comparison does not replace a complete measurement) or the
    device is a GPU (where ``--dtype auto`` is not measured: bfloat16, else float16)."""
    dtypes = supported_dtypes(device)
    if torch.device(device).type != "cpu" or len(dtypes) < 2 or not set(dtypes) <= set(rates):
        return None
    rates = {d: round(float(rates[d]), 4) for d in dtypes}  # chosen from the values written
    choice = choose_by_rate(rates)
    path, ident = choice_path(name, dtypes, device, folder)
    text = json.dumps({"version": CACHE_VERSION, "identity": ident, "choice": choice,
                       "basis": "speculative", "draft": str(draft),
                       "tokens_per_s": rates},
                      indent=1) + "\n"
    atomic_write(path, lambda fh: fh.write(text), binary=False)
    return choice


def read_choice(path: Path, ident: dict) -> tuple[str, dict[str, dict[int, float]]] | None:
    """(dtype, curves) from a cached choice file valid for ``ident``: the right version and
    identity, and either a curve per dtype with a choice equal to :func:`choose_dtype` of
    them, or (a choice ``tune`` made) a speculative rate per dtype with a choice equal to
    :func:`choose_by_rate` of them (curves: empty); else None (the caller measures again)."""
    try:
        data = read_cached(path, ident, CACHE_VERSION)
        if data is None:
            return None
        rates = data.get("tokens_per_s")
        if isinstance(rates, dict):
            if set(rates) != set(ident["dtypes"]):
                return None
            choice = choose_by_rate({k: float(v) for k, v in rates.items()})
            return (choice, {}) if choice == data.get("choice") else None
        if not isinstance(data.get("ms"), dict) \
                or not data["ms"] or not set(data["ms"]) <= set(ident["dtypes"]):
            return None
        tables = {k: {int(n): float(v) for n, v in c.items()} for k, c in data["ms"].items()}
        choice = choose_dtype(tables)
        return (choice, tables) if choice == data.get("choice") else None
    except (OSError, ValueError, TypeError, AttributeError, UnicodeDecodeError, DtypeError):
        return None


__all__ = ["BF16_FLAGS", "DtypeError", "SIZES", "auto_dtype", "cache_file", "check_curve",
           "choice_path",
           "choose_by_rate", "choose_dtype", "consistent", "interpolate", "latency_curve",
           "machine", "model_label", "read_cached", "remeasured", "remeasured_file",
           "remember_speculative_choice", "routed_sizes", "steady_forwards", "supported_dtypes",
           "time_forwards", "timed_context", "timed_rounds", "to_remeasure"]
