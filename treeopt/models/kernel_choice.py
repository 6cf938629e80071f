"""Which CPU linear kernel serves a forward over a few rows fastest, for one model on this
machine: measured once, then cached.

A packed linear layer (``treeopt.models.cpu_kernels.PackedLinear``) computes a forward with
oneDNN's blocked kernel or, for the row counts in its ``streamed`` map, as ``weight @ x.T``.
Which is faster depends on the CPU, the BLAS, the layer sizes and the row count (``python -m
treeopt.bench.kernels --compare linear`` on a 2-core AMD EPYC with AVX2 only: a SmolLM2
forward over 4 tokens 86 ms streamed against 109 ms with oneDNN, one token 83 ms; elsewhere
it can be the other way round), so it is measured: whole-model forwards over each of
``ROWS`` new tokens after ``CONTEXT`` cached ones, both kernels interleaved in every round
(:func:`time_kernels`), and a row count is streamed where it is more than ``MARGIN``
below oneDNN (:func:`decide`, a pure function), possibly computed over more rows (zero
rows padded on: a BLAS can serve four rows faster than three). One row always goes to
oneDNN, as do prefills.

The choice is cached per (model, machine) in treeopt's cache folder (``kernels/*.json``,
written atomically, validated on read; a damaged, foreign or stale file is measured again),
and a measurement made inside ``treeopt.models.dtype.remeasured`` replaces it.
``TREEOPT_CPU_KERNELS=onednn`` (``load_model(kernels="onednn")``) packs without streaming;
``default`` keeps torch's ``nn.Linear``.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Mapping, Sequence

from treeopt.limits import atomic_write
from treeopt.models.cpu_kernels import PackedLinear, stream_rows
from treeopt.models.dtype import (
    cache_file,
    interpolate,
    log,
    machine,
    model_key,
    model_label,
    read_cached,
    remeasured_file,
    timed_rounds,
    to_remeasure,
)

#: Row counts timed; one between them is streamed only padded to a timed count above it.
ROWS = (2, 3, 4, 6, 8, 12, 16)
MAX_ROWS = 16
#: Streamed only when this fraction below oneDNN. Noise decides nothing: on a shared 2-core
#: machine one size's two kernels move 5-10 % between measurements either way (a 3 % margin
#: routed 6-token forwards to the kernel the benchmark then timed 15 % dearer), while the
#: gains at 2-4 tokens are 15-30 %.
MARGIN = 0.10
REPEATS = 7
CONTEXT = 64
VERSION = 1


def decide(onednn: Mapping[int, float], streamed: Mapping[int, float],
           margin: float = MARGIN) -> dict[int, int]:
    """Which row counts 2..``MAX_ROWS`` to compute streamed, and with how many rows, from
    median ms by measured row count of each kernel: for each count m, the cheapest streamed
    forward over a measured count n >= m (zero rows padded on when n > m: on some BLAS
    three rows cost more than four), when it is more than ``margin`` below oneDNN at m
    (measured, or interpolated between the measured counts around it). Returns {m: n}."""
    measured = sorted(int(n) for n in onednn if n in streamed and n >= 2)
    out: dict[int, int] = {}
    if not measured:
        return out
    curve = {n: float(onednn[n]) for n in measured}
    for m in range(2, MAX_ROWS + 1):
        options = [(float(streamed[n]), n) for n in measured if n >= m]
        if not options:
            continue
        cost, n = min(options)
        if cost < (1.0 - margin) * interpolate(curve, m):
            out[m] = n
    return out


def time_kernels(model, rows: Sequence[int] = ROWS, repeats: int = REPEATS,
                 context: int = CONTEXT) -> tuple[dict[int, float], dict[int, float]]:
    """(oneDNN, streamed): ms of one forward of ``model`` over each of ``rows`` new tokens
    after ``context`` cached ones, the two kernels interleaved (one warm-up round): oneDNN's
    median, and streamed as that times the median over rounds of streamed / oneDNN in the
    same round."""
    rows = [int(n) for n in rows]
    samples = timed_rounds(model, rows, context, repeats, 1,
                           (lambda: stream_rows(model, ()), lambda: stream_rows(model, rows)))
    stream_rows(model, ())
    onednn = {n: statistics.median(v) for n, v in samples[0].items()}
    # paired: a slow phase of the machine raises both kernels' times in its rounds alike
    ratio = {n: statistics.median(b / a for a, b in zip(samples[0][n], samples[1][n]))
             for n in rows}
    return onednn, {n: onednn[n] * ratio[n] for n in rows}


def choice_file(model, folder: Path) -> tuple[Path, dict]:
    """(file, identity) of the cached kernel choice for ``model`` (as loaded) here."""
    param = next(model.parameters())
    ident = {"model": model_key(model), "dtype": str(param.dtype).removeprefix("torch."),
             "machine": machine(param.device)}
    return cache_file(folder, "kernels", ident), ident


def read_choice(path: Path, ident: dict) -> dict[int, int] | None:
    """The cached streamed rows ({row count: rows computed}) at ``path`` when the file is
    valid for ``ident`` and its choice is :func:`decide` of its own timings; else None."""
    try:
        data = read_cached(path, ident, VERSION)
        if data is None:
            return None
        onednn = {int(k): float(v) for k, v in data["onednn_ms"].items()}
        streamed = {int(k): float(v) for k, v in data["streamed_ms"].items()}
        rows = {int(m): int(n) for m, n in data["streamed_rows"].items()}
        return rows if rows == decide(onednn, streamed) else None
    except (OSError, ValueError, TypeError, KeyError, AttributeError, UnicodeDecodeError):
        return None


def choose_streamed_rows(model, folder: Path, *, measure: bool = True) -> dict[int, int]:
    """Set and return the row counts ``model``'s packed layers compute streamed on this
    machine ({row count: rows computed}): the cached choice, else (``measure``) timed,
    decided and cached; nothing streamed for a model without packed layers or when not
    measured."""
    if not any(isinstance(m, PackedLinear) for m in model.modules()):
        return {}
    path, ident = choice_file(model, folder)
    rows = None if measure and to_remeasure(path) else read_choice(path, ident)
    if rows is None and measure:
        log.info("choosing %s's CPU kernel for forwards of a few tokens (both timed); later "
                 "runs on this machine read the choice from %s", model_label(model), path.parent)
        # decided from the values as written: a file is valid only if they decide alike
        onednn, streamed = ({n: round(v, 4) for n, v in ms.items()}
                            for ms in time_kernels(model))
        rows = decide(onednn, streamed)
        text = json.dumps({"version": VERSION, "identity": ident, "context": CONTEXT,
                           "onednn_ms": {str(n): v for n, v in onednn.items()},
                           "streamed_ms": {str(n): v for n, v in streamed.items()},
                           "streamed_rows": {str(m): n for m, n in sorted(rows.items())}},
                          indent=1) + "\n"
        atomic_write(path, lambda fh: fh.write(text), binary=False)
        remeasured_file(path)
    rows = rows or {}
    stream_rows(model, rows)
    return rows


__all__ = ["MARGIN", "ROWS", "choice_file", "choose_streamed_rows", "decide", "read_choice",
           "time_kernels"]
