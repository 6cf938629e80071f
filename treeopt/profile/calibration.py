"""Calibration: how often the target accepts a drafted candidate, by the draft's confidence.

The rank profile (``treeopt.profile.acceptance``) says how often the k-th sibling is accepted
on average; a dynamic tree (``treeopt.drafters.dynamic``) knows more at each step: the draft's
own probability of every candidate. This module measures the map from that confidence to
acceptance, so that a step's candidates get calibrated acceptance probabilities:

    a(c) = P(the target accepts candidate x | its parent was reached, the draft gave x prob c)

Measurement (greedy, teacher-forced): along the target's own greedy continuation of each
prompt (the contexts greedy decoding reaches, since decoding is lossless), at every position
the draft's top-``topk`` tokens are the candidates; a candidate's confidence is its softmax
probability (temperature 1) under the draft, and it is accepted when it equals the target's
token there (the greedy rule). The (confidence, accepted) pairs are counted in bins of
confidence: ``"quantile"`` bins (default; edges at quantiles of the measured confidences, so
every bin holds about as many candidates) or ``"log"`` bins (log-spaced edges from 1e-4 to 1).
Raw counts are kept, so the file says how much each figure rests on.

Reading the map (:meth:`Calibration.acceptance`): the per-bin rates are made non-decreasing
by a count-weighted isotonic fit (pool adjacent violators), then interpolated linearly
between the bins' mean confidences (constant beyond the first and last). A monotone map is
what the dynamic drafters rely on: a more confident candidate never gets a lower acceptance,
so siblings keep their rank order and path values never grow along a path.

File (JSON, written atomically): ``{"format": "treeopt-calibration", "version": 1, "meta":
{target, draft, settings, prompts, positions, candidates, ...}, "bins": [{"lo", "hi",
"count", "accepted", "mean_confidence", "rate", "fitted"}, ...], "latency": {...}}``;
``rate`` and ``fitted`` are written for the reader and recomputed from the counts on load.
``latency`` (optional, the ``treeopt.profile.Latency`` form) lets ``dynamic-dp`` price each
step's tree; ``treeopt profile calibration --latency-from PROFILE`` copies it in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from treeopt.errors import TreeoptError
from treeopt.limits import parse_json
from treeopt.profile.model import (
    JSON_FORMAT as PROFILE_FORMAT,
    Latency,
    ProfileError,
    write_json_atomic,
)

JSON_FORMAT = "treeopt-calibration"
JSON_VERSION = 1
BINNINGS = ("quantile", "log")
DEFAULT_BINS = 10
DEFAULT_TOPK = 8
# Lowest edge of log-spaced bins (confidences below it share the first bin).
LOG_FLOOR = 1e-4


class CalibrationError(TreeoptError, ValueError):
    """A calibration that cannot be measured, read or used; one line saying what to change."""


# ---------------------------------------------------------------------------- the map
def isotonic(rates: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Non-decreasing least-squares fit of ``rates`` (B,) weighted by ``weights`` (B,) > 0:
    pool adjacent violators. Returns (B,) float64."""
    values: list[float] = []
    w: list[float] = []
    sizes: list[int] = []
    for r, x in zip(rates.tolist(), weights.tolist()):
        values.append(float(r))
        w.append(float(x))
        sizes.append(1)
        while len(values) > 1 and values[-2] > values[-1]:
            tw = w[-2] + w[-1]
            v = (values[-2] * w[-2] + values[-1] * w[-1]) / tw
            values[-2:], w[-2:], sizes[-2:] = [v], [tw], [sizes[-2] + sizes[-1]]
    return np.repeat(np.array(values, dtype=np.float64), sizes)


@dataclass(frozen=True)
class Calibration:
    """Acceptance by draft confidence, in bins.

    edges: (B + 1,) increasing, edges[0] = 0, edges[-1] = 1: bin i is [edges[i], edges[i+1])
    (the last one includes 1). counts / accepted: (B,) candidates and accepted candidates per
    bin. mean_confidence: (B,) mean confidence of a bin's candidates (NaN when empty).
    latency: an optional ``treeopt.profile.Latency`` for cost-aware choices. meta: provenance.
    """

    edges: tuple[float, ...]
    counts: tuple[int, ...]
    accepted: tuple[int, ...]
    mean_confidence: tuple[float, ...]
    latency: Any = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        edges = [float(x) for x in self.edges]
        b = len(edges) - 1
        if b < 1:
            raise CalibrationError("a calibration needs at least one bin (two edges)")
        if edges[0] != 0.0 or edges[-1] != 1.0:
            raise CalibrationError(f"bin edges must run from 0 to 1, got {edges[0]} .. {edges[-1]}")
        if any(not edges[i] < edges[i + 1] for i in range(b)):
            raise CalibrationError("bin edges must increase strictly")
        if not (len(self.counts) == len(self.accepted) == len(self.mean_confidence) == b):
            raise CalibrationError(f"{b} bins need {b} counts, accepted counts and mean "
                                   "confidences")
        counts = [int(c) for c in self.counts]
        accepted = [int(a) for a in self.accepted]
        for i, (n, a) in enumerate(zip(counts, accepted)):
            if n < 0 or not 0 <= a <= n:
                raise CalibrationError(f"bin {i}: need 0 <= accepted ({a}) <= count ({n})")
        if sum(counts) == 0:
            raise CalibrationError("the calibration counts no candidate; measure it on more "
                                   "prompts")
        means = [float(m) for m in self.mean_confidence]
        for i, (n, m) in enumerate(zip(counts, means)):
            if n and not edges[i] <= m <= edges[i + 1]:
                raise CalibrationError(f"bin {i}: mean confidence {m} lies outside "
                                       f"[{edges[i]}, {edges[i + 1]}]")
        object.__setattr__(self, "edges", tuple(edges))
        object.__setattr__(self, "counts", tuple(counts))
        object.__setattr__(self, "accepted", tuple(accepted))
        object.__setattr__(self, "mean_confidence", tuple(means))
        used = np.array(counts) > 0
        rates = np.array(accepted, dtype=np.float64)[used] / np.array(counts)[used]
        xs = np.maximum.accumulate(np.array(means)[used])
        object.__setattr__(self, "_xs", xs)
        object.__setattr__(self, "_ys", isotonic(rates, np.array(counts, float)[used]))

    # ------------------------------------------------------------------ reading
    @property
    def bins(self) -> int:
        return len(self.counts)

    @property
    def rates(self) -> list[float]:
        """Raw acceptance rate per bin (NaN for an empty bin)."""
        return [a / n if n else float("nan") for a, n in zip(self.accepted, self.counts)]

    @property
    def fitted(self) -> list[float]:
        """The isotonic (non-decreasing) rate per bin (NaN for an empty bin)."""
        out, it = [], iter(self._ys.tolist())
        for n in self.counts:
            out.append(next(it) if n else float("nan"))
        return out

    def acceptance(self, confidence: np.ndarray | float) -> np.ndarray:
        """Calibrated acceptance in [0, 1] of candidates with the given draft confidences
        (any shape): non-decreasing in the confidence (see the module docstring)."""
        return np.interp(confidence, self._xs, self._ys)

    def summary(self) -> str:
        """One line: bins, candidates, acceptance at the lowest and highest bins."""
        ys = self._ys
        return (f"{self.bins} bins, {sum(self.counts)} candidates, acceptance "
                f"{ys[0]:.3f} (confidence {self._xs[0]:.2g}) .. {ys[-1]:.3f} "
                f"(confidence {self._xs[-1]:.2g})"
                + (", latency included" if self.latency is not None else ""))

    def table(self) -> str:
        """One line per bin: range, candidates, raw and fitted acceptance."""
        lines = ["  confidence          candidates  accepted   rate  fitted"]
        for lo, hi, n, a, r, f in zip(self.edges, self.edges[1:], self.counts, self.accepted,
                                      self.rates, self.fitted):
            lines.append(f"  [{lo:.2e}, {hi:.2e})  {n:10d}  {a:8d}  {r:5.3f}  {f:6.3f}")
        return "\n".join(lines)

    # ------------------------------------------------------------------ files
    def to_dict(self) -> dict:
        bins = []
        for i in range(self.bins):
            m = self.mean_confidence[i]
            bins.append({"lo": self.edges[i], "hi": self.edges[i + 1], "count": self.counts[i],
                         "accepted": self.accepted[i],
                         "mean_confidence": None if m != m else m,
                         "rate": None if not self.counts[i] else self.rates[i],
                         "fitted": None if not self.counts[i] else self.fitted[i]})
        d: dict[str, Any] = {"format": JSON_FORMAT, "version": JSON_VERSION,
                             "meta": dict(self.meta), "bins": bins}
        if self.latency is not None:
            d["latency"] = self.latency.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: Any) -> "Calibration":
        if not isinstance(d, dict):
            raise CalibrationError(f"expected a JSON object, got {type(d).__name__}")
        if d.get("format") == PROFILE_FORMAT:
            raise CalibrationError("this is an acceptance profile, not a calibration; measure "
                                   "one with treeopt profile calibration (--latency-from can "
                                   "copy this profile's latency into it)")
        if d.get("format") != JSON_FORMAT:
            raise CalibrationError(f"'format' is {d.get('format')!r}, expected {JSON_FORMAT!r}")
        if d.get("version") != JSON_VERSION:
            raise CalibrationError(f"unsupported calibration 'version' {d.get('version')!r} "
                                   f"(this treeopt reads {JSON_VERSION})")
        bins = d.get("bins")
        if not isinstance(bins, list) or not bins:
            raise CalibrationError("'bins' must be a non-empty list of bin objects")
        edges, counts, accepted, means = [], [], [], []
        for i, b in enumerate(bins):
            if not isinstance(b, dict) or not {"lo", "hi", "count", "accepted"} <= set(b):
                raise CalibrationError(f"'bins[{i}]' needs lo, hi, count and accepted")
            try:
                lo, hi = float(b["lo"]), float(b["hi"])
                n, a = b["count"], b["accepted"]
                if isinstance(n, bool) or isinstance(a, bool) or int(n) != n or int(a) != a:
                    raise ValueError
                m = b.get("mean_confidence")
                m = float("nan") if m is None else float(m)
            except (TypeError, ValueError):
                raise CalibrationError(f"'bins[{i}]': lo, hi, mean_confidence must be numbers "
                                       "and count, accepted integers") from None
            if i == 0:
                edges.append(lo)
            elif lo != edges[-1]:
                raise CalibrationError(f"'bins[{i}]' starts at {lo}, not where bin {i - 1} "
                                       f"ends ({edges[-1]})")
            edges.append(hi)
            counts.append(int(n))
            accepted.append(int(a))
            means.append(m)
        meta = d.get("meta", {})
        if not isinstance(meta, dict):
            raise CalibrationError("'meta' must be an object")
        latency = None
        if d.get("latency") is not None:
            try:
                latency = Latency.from_dict(d["latency"])
            except ProfileError as exc:
                raise CalibrationError(str(exc)) from None
        return cls(tuple(edges), tuple(counts), tuple(accepted), tuple(means), latency, meta)

    @classmethod
    def load(cls, path: str | Path) -> "Calibration":
        path = Path(path)
        if not path.is_file():
            raise CalibrationError(f"{path}: no such calibration file; measure one with "
                                   "treeopt profile calibration")
        try:
            try:
                text = path.read_text()
            except UnicodeDecodeError as exc:
                raise CalibrationError(f"not valid JSON ({str(exc).splitlines()[0]})") from None
            return cls.from_dict(parse_json(text, CalibrationError))
        except CalibrationError as exc:
            raise CalibrationError(f"{path}: {exc}") from None

    def save(self, path: str | Path) -> Path:
        """Write the JSON form atomically; refuses to replace a file of another kind."""

        check_writable(path)
        return write_json_atomic(Path(path), self.to_dict())

    def with_latency(self, latency) -> "Calibration":
        """A copy carrying ``latency`` (a ``treeopt.profile.Latency`` or None)."""
        return Calibration(self.edges, self.counts, self.accepted, self.mean_confidence,
                           latency, dict(self.meta))


def check_writable(path: str | Path) -> None:
    """One-line CalibrationError unless ``path`` may receive a calibration: a .json that is
    absent, empty or a calibration already (never a profile, growmap or other file)."""
    path = Path(path)
    if path.suffix.lower() != ".json":
        raise CalibrationError(f"{path}: calibrations are written as .json")
    if path.is_dir():
        raise CalibrationError(f"{path}: is a folder, not a calibration file")
    if path.exists() and path.stat().st_size:
        try:
            doc = parse_json(path.read_text(), CalibrationError)
        except (CalibrationError, OSError, UnicodeDecodeError):
            doc = None
        if not (isinstance(doc, dict) and doc.get("format") == JSON_FORMAT):
            raise CalibrationError(f"{path}: refusing to overwrite a file that is not a "
                                   "calibration; choose another output path")


# ---------------------------------------------------------------------------- binning
def bin_edges(confidence: np.ndarray, bins: int = DEFAULT_BINS,
              binning: str = "quantile") -> np.ndarray:
    """Edges (B' + 1,) of ``bins`` bins over [0, 1] (B' <= bins: repeated quantiles merge).

    quantile: inner edges at the 1/B .. (B-1)/B quantiles of ``confidence``; log: inner edges
    log-spaced from ``LOG_FLOOR`` to 1."""
    check_settings(bins, binning)
    if binning == "log":
        inner = np.logspace(np.log10(LOG_FLOOR), 0.0, bins)[:-1]
    else:
        conf = np.asarray(confidence, dtype=np.float64).ravel()
        if conf.size == 0:
            raise CalibrationError("no candidate was measured; give longer continuations or "
                                   "more prompts")
        inner = np.quantile(conf, np.linspace(0, 1, bins + 1)[1:-1])
    edges = np.unique(np.concatenate([[0.0], inner, [1.0]]).clip(0.0, 1.0))
    return edges


def from_samples(confidence: np.ndarray, accepted: np.ndarray, *, bins: int = DEFAULT_BINS,
                 binning: str = "quantile", edges: np.ndarray | None = None,
                 latency=None, meta: dict | None = None) -> Calibration:
    """Count (confidence, accepted) pairs (any equal shapes) into bins (``edges`` given, or
    :func:`bin_edges`)."""
    conf = np.asarray(confidence, dtype=np.float64).ravel()
    acc = np.asarray(accepted, dtype=bool).ravel()
    if conf.shape != acc.shape:
        raise CalibrationError(f"{conf.size} confidences but {acc.size} outcomes")
    if conf.size == 0:
        raise CalibrationError("no candidate was measured; give longer continuations or more "
                               "prompts")
    if not bool(np.all((conf >= 0) & (conf <= 1))):
        raise CalibrationError("confidences must be probabilities in [0, 1]")
    edges = bin_edges(conf, bins, binning) if edges is None else np.asarray(edges, float)
    b = len(edges) - 1
    which = np.clip(np.searchsorted(edges, conf, side="right") - 1, 0, b - 1)
    counts = np.bincount(which, minlength=b)
    hits = np.bincount(which, weights=acc.astype(np.float64), minlength=b)
    sums = np.bincount(which, weights=conf, minlength=b)
    means = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
    means = np.where(counts > 0, np.clip(means, edges[:-1], edges[1:]), np.nan)
    return Calibration(tuple(edges.tolist()), tuple(int(c) for c in counts),
                       tuple(int(round(h)) for h in hits), tuple(means.tolist()), latency,
                       dict(meta or {}))


def check_settings(bins: int, binning: str, topk: int = 1, max_new_tokens: int = 1) -> None:
    """One-line CalibrationError for out-of-range measurement settings."""
    if binning not in BINNINGS:
        raise CalibrationError(f"unknown binning {binning!r}; use {' or '.join(BINNINGS)}")
    for name, value in (("bins", bins), ("topk", topk), ("max_new_tokens", max_new_tokens)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise CalibrationError(f"{name} must be an integer >= 1, got {value!r}")


# ---------------------------------------------------------------------------- measuring

__all__ = ["BINNINGS", "Calibration", "CalibrationError", "bin_edges", "check_settings",
           "check_writable", "from_samples", "isotonic"]
