"""Copy-aware acceptance: how often a model-free drafter's candidate is accepted, given what
the drafter knew when it proposed it.

A copy drafter (``ngram``, ``suffix``, ``datastore``) proposes what followed the current text
earlier. Whether the target accepts that depends strongly on how long the match is, how often
the candidate followed it, and how deep into the current draft it sits; a positional profile
(Sequoia's p[depth][rank]) averages all of that away: p1 is 0.12 at the start of a step but
0.30 over all positions, and deep rows are never measured on short continuations. The
:class:`CopyTable` keeps raw counts by those features instead.

Features of one drafted node v (:class:`Features`, :func:`cell`):

- ``rank``: its sibling rank (1 = the drafter's first choice), capped at :data:`MAX_RANK`;
- ``match``: the length of the context suffix its candidates were looked up after (the
  n-gram length for ``ngram``; for ``suffix`` the matched suffix plus the drafted tokens above
  v: the position within the current copy), bucketed by :data:`MATCH_EDGES`;
- ``prob``: the drafter's own estimate of the candidate's probability (its count after that
  context / the context's count), bucketed by :data:`PROB_EDGES`;
- ``depth``: its depth in the step's tree (1 = the first drafted token), capped at
  :data:`MAX_DEPTH` (64: real copies run that long).

Counts. A *trial* is a drafted node whose parent was on the accepted path (the parent was
reached, so the verifier looked at v); it is *accepted* when v is on the accepted path. The
table holds ``trials`` and ``accepted`` per cell, nothing else, so tables measured on several
runs merge by adding counts (:meth:`CopyTable.merge`).

Estimate (:meth:`CopyTable.estimate`): a(v) = P(v accepted | parent reached, cell of v),
shrunk toward coarser cells where a cell has few trials: with K = :data:`PRIOR_TRIALS`,

    a0 = (A_r + K * 0.5) / (T_r + K)                 by rank alone (prior 0.5)
    a1 = (A_rq + K * a0) / (T_rq + K)                by (rank, prob)
    a2 = (A_rqm + K * a1) / (T_rqm + K)              by (rank, prob, match)
    a  = (A_rqmd + K * a2) / (T_rqmd + K)            by (rank, prob, match, depth)

where A and T are the accepted and trial counts summed over the cells that agree on the
named features. With the node values V(v) = Π_{u on root→v} a(u), the expected tokens of a
step that verifies the node set S (parent-closed, root included) is Σ_{v∈S} V(v) (the root's
1 is the bonus token): ``treeopt.search.speclen`` chooses S from that.

File form (a top-level ``"copy"`` section of a profile JSON, or a file of its own)::

    {"format": "treeopt-copy-acceptance", "version": 1, "mode": "online",
     "match_edges": [...], "prob_edges": [...], "max_rank": 3, "max_depth": 64,
     "cells": [[rank, prob_bucket, match_bucket, depth, trials, accepted], ...],
     "meta": {...}}

Reading is bounded: the file size is checked before it is read, the cell list by
``MAX_CELLS`` and every count by ``MAX_COUNT``.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, NamedTuple, Sequence

import numpy as np

from treeopt.errors import TreeoptError
from treeopt.limits import MAX_COUNT, check_plain, read_json

FORMAT = "treeopt-copy-acceptance"
VERSION = 1
#: Lower edges of the match-length buckets (a length m falls in the last edge <= m).
MATCH_EDGES = (0, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48)
#: Lower edges of the estimated-probability buckets.
PROB_EDGES = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99)
MAX_RANK = 3
MAX_DEPTH = 64
#: Prior strength of the shrinkage toward coarser cells (in trials).
PRIOR_TRIALS = 8.0
MAX_CELLS = MAX_RANK * len(PROB_EDGES) * len(MATCH_EDGES) * MAX_DEPTH
#: Largest file read (a full table is ~0.5 MiB of JSON; a profile around it a few MiB).
MAX_FILE_BYTES = 64 << 20
MODES = ("online", "teacher-forced", "merged")


def _shrunk(accepted, trials, towards):
    """The shrinkage of one level (arrays or numbers alike): ``accepted`` of ``trials`` with
    ``PRIOR_TRIALS`` pseudo-trials at ``towards``."""
    return (accepted + PRIOR_TRIALS * towards) / (trials + PRIOR_TRIALS)


class CopyTableError(TreeoptError, ValueError):
    """A copy-acceptance table that is malformed or cannot be merged; one line."""


class Features(NamedTuple):
    """What the drafter knew about one drafted node (see the module docstring)."""

    rank: int
    match: int
    prob: float


def match_bucket(m: int) -> int:
    return bisect.bisect_right(MATCH_EDGES, max(0, int(m))) - 1


def prob_bucket(q: float) -> int:
    q = min(1.0, max(0.0, float(q)))
    return bisect.bisect_right(PROB_EDGES, q) - 1


def cell(features: Features, depth: int) -> tuple[int, int, int, int]:
    """(rank, prob bucket, match bucket, depth) of a node, capped: the table's key."""
    return (min(max(1, int(features.rank)), MAX_RANK), prob_bucket(features.prob),
            match_bucket(features.match), min(max(1, int(depth)), MAX_DEPTH))


SHAPE = (MAX_RANK, len(PROB_EDGES), len(MATCH_EDGES), MAX_DEPTH)


@dataclass
class CopyTable:
    """Trials and acceptances per (rank, prob bucket, match bucket, depth) cell.

    trials, accepted: int64 arrays of shape :data:`SHAPE` (index rank - 1 and depth - 1).
    """

    trials: np.ndarray = field(default_factory=lambda: np.zeros(SHAPE, dtype=np.int64))
    accepted: np.ndarray = field(default_factory=lambda: np.zeros(SHAPE, dtype=np.int64))
    mode: str = "online"
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("trials", "accepted"):
            a = np.asarray(getattr(self, name))
            if a.shape != SHAPE:
                raise CopyTableError(f"copy table '{name}' has shape {a.shape}, expected "
                                     f"{SHAPE}")
            setattr(self, name, a.astype(np.int64, copy=True))
        if (self.accepted < 0).any() or (self.accepted > self.trials).any():
            raise CopyTableError("copy table counts need 0 <= accepted <= trials in every cell")
        if self.mode not in MODES:
            raise CopyTableError(f"copy table mode {self.mode!r}; use one of {', '.join(MODES)}")
        if not isinstance(self.meta, dict):
            raise CopyTableError("copy table 'meta' must be an object")
        self._est: np.ndarray | None = None
        # (trials, accepted) summed by rank, by (rank, prob), by (rank, prob, match): built by
        # the first :meth:`rate`, then kept up to date by :meth:`add`
        self._sums: list | None = None

    # ------------------------------------------------------------------ counting
    def add(self, key: tuple[int, int, int, int], accepted: bool) -> None:
        r, q, m, d = key
        self.trials[r - 1, q, m, d - 1] += 1
        if accepted:
            self.accepted[r - 1, q, m, d - 1] += 1
        self._est = None
        if self._sums is not None:
            for t, a in self._sums:
                idx = (r - 1, q, m)[:t.ndim]
                t[idx] += 1
                a[idx] += bool(accepted)

    def record(self, parents: Sequence[int], features: Sequence[Features | None],
               path: Sequence[int]) -> int:
        """Count one verified step. ``parents``: the proposal tree's parent ids (root -1),
        ``features[v]``: node v's features (index 0, the root, is ignored), ``path``: the
        accepted node ids from the root. Every node whose parent is on the path is a trial,
        accepted when it is on the path itself. Returns the trials counted."""
        on_path = set(int(v) for v in path)
        depth = [0] * len(parents)
        n = 0
        for v in range(1, len(parents)):
            u = parents[v]
            depth[v] = depth[u] + 1
            if u in on_path:
                self.add(cell(features[v], depth[v]), v in on_path)
                n += 1
        return n

    @property
    def total_trials(self) -> int:
        return int(self.trials.sum())

    def merge(self, other: "CopyTable") -> "CopyTable":
        """A new table with the counts of both added."""
        if not isinstance(other, CopyTable):
            raise CopyTableError("can only merge a CopyTable with a CopyTable")
        mode = self.mode if self.mode == other.mode else "merged"
        return CopyTable(self.trials + other.trials, self.accepted + other.accepted, mode,
                         {"merged_from": [dict(self.meta), dict(other.meta)]})

    # ------------------------------------------------------------------ estimate
    def estimate(self) -> np.ndarray:
        """(MAX_RANK, P, M, MAX_DEPTH) float64 acceptance estimates a(cell), by the shrinkage
        of the module docstring (cached until the counts change)."""
        if self._est is not None:
            return self._est
        t, a = self.trials.astype(np.float64), self.accepted.astype(np.float64)
        a0 = _shrunk(a.sum(axis=(1, 2, 3)), t.sum(axis=(1, 2, 3)), 0.5)
        a1 = _shrunk(a.sum(axis=(2, 3)), t.sum(axis=(2, 3)), a0[:, None])
        a2 = _shrunk(a.sum(axis=3), t.sum(axis=3), a1[:, :, None])
        self._est = _shrunk(a, t, a2[:, :, :, None])
        return self._est

    def rate(self, key: tuple[int, int, int, int]) -> float:
        """a(cell) of one cell ``key`` = :func:`cell`'s (rank, prob bucket, match bucket,
        depth), equal to :meth:`estimate` there, from running sums: O(1) however often the
        counts change between reads (``auto`` adds counts and reads a few cells every step,
        where re-estimating the whole table would cost half a millisecond)."""
        if self._sums is None:
            t, a = self.trials, self.accepted
            self._sums = [(t.sum(axis=(1, 2, 3)), a.sum(axis=(1, 2, 3))),
                          (t.sum(axis=(2, 3)), a.sum(axis=(2, 3))),
                          (t.sum(axis=3), a.sum(axis=3))]
        r, q, m, d = key
        towards = 0.5
        for (t, a), idx in zip(self._sums, ((r - 1,), (r - 1, q), (r - 1, q, m))):
            towards = _shrunk(float(a[idx]), float(t[idx]), towards)
        i = (r - 1, q, m, d - 1)
        return _shrunk(float(self.accepted[i]), float(self.trials[i]), towards)

    def accept_prob(self, features: Features, depth: int) -> float:
        """a(v) for one node (see :meth:`estimate`)."""
        return self.rate(cell(features, depth))

    def by_depth(self, rank: int = 1) -> list[tuple[int, int, int]]:
        """(depth, trials, accepted) of ``rank`` summed over the other features, for every
        depth with trials: the view a positional profile would give."""
        t = self.trials[rank - 1].sum(axis=(0, 1))
        a = self.accepted[rank - 1].sum(axis=(0, 1))
        return [(d + 1, int(t[d]), int(a[d])) for d in range(MAX_DEPTH) if t[d]]

    def summary(self) -> str:
        rows = self.by_depth(1)
        deep = max((d for d, _, _ in rows), default=0)
        t, a = self.total_trials, int(self.accepted.sum())
        rate = f"{a / t:.3f}" if t else "-"
        return (f"copy table ({self.mode}): {t} trials, acceptance {rate}, depths 1..{deep}, "
                f"{int((self.trials > 0).sum())} cells")

    # ------------------------------------------------------------------ files
    def to_dict(self) -> dict:
        cells = [[int(r) + 1, int(q), int(m), int(d) + 1, int(self.trials[r, q, m, d]),
                  int(self.accepted[r, q, m, d])]
                 for r, q, m, d in zip(*np.nonzero(self.trials))]
        return {"format": FORMAT, "version": VERSION, "mode": self.mode,
                "match_edges": list(MATCH_EDGES), "prob_edges": list(PROB_EDGES),
                "max_rank": MAX_RANK, "max_depth": MAX_DEPTH, "cells": cells,
                "meta": dict(self.meta)}

    @classmethod
    def from_dict(cls, d: Any) -> "CopyTable":
        if not isinstance(d, dict):
            raise CopyTableError("a copy table must be a JSON object")
        if d.get("format") != FORMAT:
            raise CopyTableError(f"'format' is {d.get('format')!r}, expected {FORMAT!r}")
        if d.get("version") != VERSION:
            raise CopyTableError(f"unsupported copy table 'version' {d.get('version')!r} "
                                 f"(this treeopt reads {VERSION})")
        for key, want in (("match_edges", list(MATCH_EDGES)), ("prob_edges", list(PROB_EDGES)),
                          ("max_rank", MAX_RANK), ("max_depth", MAX_DEPTH)):
            if d.get(key) != want:
                raise CopyTableError(f"copy table '{key}' is {d.get(key)!r}; this treeopt "
                                     f"uses {want!r} (re-measure it)")
        cells = d.get("cells")
        if not isinstance(cells, list) or len(cells) > MAX_CELLS:
            raise CopyTableError(f"copy table 'cells' must be a list of at most {MAX_CELLS} "
                                 "[rank, prob, match, depth, trials, accepted] rows")
        meta = d.get("meta", {})
        check_plain(meta, "copy table 'meta'", CopyTableError)
        trials = np.zeros(SHAPE, dtype=np.int64)
        accepted = np.zeros(SHAPE, dtype=np.int64)
        limits = (MAX_RANK, len(PROB_EDGES) - 1, len(MATCH_EDGES) - 1, MAX_DEPTH)
        for i, row in enumerate(cells):
            if (not isinstance(row, list) or len(row) != 6
                    or not all(type(x) is int for x in row)):
                raise CopyTableError(f"copy table cells[{i}] must be 6 integers")
            r, q, m, dd, t, a = row
            if not (1 <= r <= limits[0] and 0 <= q <= limits[1] and 0 <= m <= limits[2]
                    and 1 <= dd <= limits[3]):
                raise CopyTableError(f"copy table cells[{i}] = {row}: a feature is out of "
                                     "range")
            if not 0 <= a <= t <= MAX_COUNT:
                raise CopyTableError(f"copy table cells[{i}] = {row}: counts need "
                                     f"0 <= accepted <= trials <= {MAX_COUNT}")
            trials[r - 1, q, m, dd - 1] += t
            accepted[r - 1, q, m, dd - 1] += a
        if (trials > MAX_COUNT).any():
            raise CopyTableError("copy table counts exceed MAX_COUNT after adding repeated "
                                 "cells")
        return cls(trials, accepted, d.get("mode", "online"), dict(meta))

    @classmethod
    def load(cls, path: str | Path) -> "CopyTable":
        """A table from its own file or from the ``"copy"`` section of a profile JSON."""
        doc = read_document(path)
        section = doc.get("copy") if doc.get("format") != FORMAT else doc
        if section is None:
            raise CopyTableError(f"{path}: holds no copy-acceptance table; measure one with "
                                 "`treeopt tune --draft ngram|suffix` or `treeopt profile "
                                 "copy`")
        try:
            return cls.from_dict(section)
        except CopyTableError as exc:
            raise CopyTableError(f"{path}: {exc}") from None


def read_document(path: str | Path) -> dict:
    """The JSON object in ``path``, read only when the file is at most
    :data:`MAX_FILE_BYTES` (one-line CopyTableError otherwise)."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError:
        raise CopyTableError(f"{path}: no such file") from None
    if not path.is_file():
        raise CopyTableError(f"{path}: not a file")
    if size > MAX_FILE_BYTES:
        raise CopyTableError(f"{path}: {size} bytes, more than the {MAX_FILE_BYTES} a "
                             "profile may hold")
    doc = read_json(path, lambda msg: CopyTableError(f"{path}: {msg}"))
    if not isinstance(doc, dict):
        raise CopyTableError(f"{path}: expected a JSON object")
    return doc


def pooled(tables: Iterable[CopyTable]) -> CopyTable:
    """All tables' counts added (an empty online table for none)."""
    out = CopyTable()
    first = True
    for t in tables:
        out = t if first else out.merge(t)
        first = False
    return out


def expected_chain_tokens(accept: Sequence[float]) -> float:
    """1 + Σ_i Π_{j<=i} a_j: expected tokens of a step verifying a chain with conditional
    acceptances ``accept`` (the bonus included)."""
    total, run = 1.0, 1.0
    for a in accept:
        run *= float(a)
        total += run
    return total if math.isfinite(total) else float("nan")


__all__ = ["CopyTable", "CopyTableError", "Features", "FORMAT", "MATCH_EDGES", "MAX_DEPTH",
           "MAX_RANK", "PROB_EDGES", "cell", "expected_chain_tokens", "match_bucket",
           "pooled", "prob_bucket", "read_document"]
