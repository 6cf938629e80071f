"""The Profile type: what a draft/target pair accepts (by sibling rank, optionally by depth)
and what the hardware costs (forward time by tokens processed at once).

Acceptance (Sequoia's vector): ``p[k-1]`` = probability that the k-th sibling is the one the
verifier accepts (earlier siblings rejected). The events are exclusive, so ``sum(p) <= 1`` and
``none = 1 - sum(p)``. A depth-aware profile keeps one such row per depth of the PARENT node
(``by_depth[d][k-1]``). Raw counts are kept when known so runs can be merged by adding counts.

File formats: treeopt's JSON (see :meth:`Profile.save`) and Sequoia's acceptance-vector ``.pt``
(a 1-D tensor laid out ``[0, p1..pW, none]``).

Limits (``treeopt.limits``): at most ``MAX_PROFILE_WIDTH`` ranks (no node of a tree within the
node cap can use more), ``MAX_PROFILE_ROWS`` depth rows or latency points, counts up to
``MAX_COUNT``, latency points up to ``MAX_LATENCY_TOKENS`` tokens; every number must be
finite. A Sequoia vector is checked by shape and storage before it is converted, so a tiny
file claiming 10^9 entries is refused at once. Writing is atomic, and :meth:`Profile.save`
never replaces a file that is not a profile.

Sequoia vectors WITHOUT the final ``none`` entry (``[0, p1..pW]``, as Sequoia's
``tests/fast_test.py`` writes them) are refused, with the cause and the fix in the message:
such a vector cannot be told apart from a ``[0, p1..pW, none]`` vector whose ``none`` is
wrong (a damaged or hand-edited file), and reading it either way silently changes the
profile — Sequoia's own ``tree_search.py`` always drops the last entry as ``none``. Append
``none = 1 - sum(p)`` to use it.
"""

from __future__ import annotations

import bisect
import json
import math
import statistics
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from treeopt.errors import TreeoptError
from treeopt.limits import (
    MAX_COUNT,
    MAX_LATENCY_TOKENS,
    MAX_PROFILE_ROWS,
    MAX_PROFILE_WIDTH,
    atomic_write,
    check_tensor,
    read_json,
    show_number,
)

TOLERANCE = 1e-6
JSON_FORMAT = "treeopt-profile"
JSON_VERSION = 1


class ProfileError(TreeoptError, ValueError):
    """A profile that is malformed or inconsistent; the one-line message names the field."""


# ---------------------------------------------------------------------------- latency
def steady_samples(samples: Sequence[Sequence[float]]) -> list[list[float]]:
    """Interleaved timings with the machine's slow phases taken out: ``samples[i][r]`` is
    call i's time in round r (every round times every call once, in order). A slow phase of a
    shared machine that spans a round scales its calls alike, so every call but the first is
    taken relative to the first call's time in the same round and scaled by the first call's
    median; the first call keeps its own samples (and spread). A per-call median keeps a phase
    that covers most of one call's rounds and few of another's: a curve once cached on a busy
    2-core machine said 16 tokens cost 2.6x one where tune's 10-round harness, minutes
    before, said 2.05x. Unchanged without usable rounds (one call, a zero time); rounds
    beyond the shortest call dropped."""
    rounds = min((len(s) for s in samples), default=0)
    if len(samples) < 2 or rounds == 0 or min(samples[0][:rounds]) <= 0:
        return [list(s) for s in samples]
    base = samples[0][:rounds]
    level = statistics.median(base)
    return [list(base)] + [[s[r] / base[r] * level for r in range(rounds)]
                           for s in samples[1:]]


def steady_medians(samples: Sequence[Sequence[float]]) -> list[float]:
    """The per-call medians of :func:`steady_samples`."""
    return [statistics.median(s) for s in steady_samples(samples)]


@dataclass(frozen=True)
class LatencyCurve:
    """Forward time in ms by number of tokens processed at once.

    ``curve(n)`` interpolates piecewise-linearly between measured points, stays flat below
    the first point and extrapolates linearly from the last two points above the last one.
    ``spread_ms`` (optional) is a per-point spread (e.g. interquartile range) of the timings.
    """

    tokens: list[int]
    ms: list[float]
    spread_ms: list[float] | None = None

    def __post_init__(self) -> None:
        tokens = _as_list(self.tokens, "tokens")
        ms = _as_list(self.ms, "ms")
        if not tokens:
            raise ProfileError("latency curve 'tokens' is empty; give at least one point")
        if len(ms) != len(tokens):
            raise ProfileError(f"latency curve has {len(tokens)} 'tokens' but {len(ms)} 'ms'")
        tokens = [_latency_tokens(t, i) for i, t in enumerate(tokens)]
        for i in range(1, len(tokens)):
            if tokens[i] <= tokens[i - 1]:
                raise ProfileError(f"latency 'tokens' must increase strictly, but tokens[{i}] = "
                                   f"{tokens[i]} follows {tokens[i - 1]}")
        ms = [_number(x, f"latency 'ms[{i}]'") for i, x in enumerate(ms)]
        for i, x in enumerate(ms):
            if x <= 0:
                raise ProfileError(f"latency 'ms[{i}]' = {x} must be positive")
        spread = self.spread_ms
        if spread is not None:
            spread = [_number(x, f"latency 'spread_ms[{i}]'")
                      for i, x in enumerate(_as_list(spread, "spread_ms"))]
            if len(spread) != len(tokens):
                raise ProfileError(f"latency 'spread_ms' has {len(spread)} entries, "
                                   f"'tokens' has {len(tokens)}")
            if any(x < 0 for x in spread):
                raise ProfileError("latency 'spread_ms' entries must be non-negative")
        object.__setattr__(self, "tokens", tokens)
        object.__setattr__(self, "ms", ms)
        object.__setattr__(self, "spread_ms", spread)

    def __call__(self, n: float) -> float:
        t, y = self.tokens, self.ms
        if n <= t[0] or len(t) == 1:
            return y[0] if n <= t[0] else y[-1]
        if n >= t[-1]:
            slope = (y[-1] - y[-2]) / (t[-1] - t[-2])
            return y[-1] + slope * (n - t[-1])
        i = bisect.bisect_right(t, n)
        x0, x1, y0, y1 = t[i - 1], t[i], y[i - 1], y[i]
        return y0 + (y1 - y0) * (n - x0) / (x1 - x0)

    def to_dict(self) -> dict:
        d: dict[str, Any] = {"tokens": list(self.tokens), "ms": list(self.ms)}
        if self.spread_ms is not None:
            d["spread_ms"] = list(self.spread_ms)
        return d

    @classmethod
    def from_dict(cls, d: Any, where: str = "latency") -> "LatencyCurve":
        if not isinstance(d, dict):
            raise ProfileError(f"'{where}' must be an object with 'tokens' and 'ms'")
        unknown = set(d) - {"tokens", "ms", "spread_ms"}
        if unknown:
            raise ProfileError(f"'{where}' has unknown field(s) {sorted(unknown)}")
        if "tokens" not in d or "ms" not in d:
            raise ProfileError(f"'{where}' needs both 'tokens' and 'ms'")
        try:
            return cls(d["tokens"], d["ms"], d.get("spread_ms"))
        except ProfileError as exc:
            raise ProfileError(f"'{where}': {exc}") from None


@dataclass(frozen=True)
class Latency:
    """Measured forward times: the target's (verification) and optionally the draft's.
    ``context`` is the prefix length the timings were taken at."""

    target: LatencyCurve
    draft: LatencyCurve | None = None
    context: int | None = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.target, LatencyCurve):
            raise ProfileError("latency 'target' must be a LatencyCurve")
        if self.draft is not None and not isinstance(self.draft, LatencyCurve):
            raise ProfileError("latency 'draft' must be a LatencyCurve or None")
        if self.context is not None and (isinstance(self.context, bool)
                                         or not isinstance(self.context, int)
                                         or self.context < 0):
            raise ProfileError(f"latency 'context' = {self.context!r} must be a "
                               "non-negative integer")
        if not isinstance(self.meta, dict):
            raise ProfileError("latency 'meta' must be a dict")

    def to_dict(self) -> dict:
        d: dict[str, Any] = {}
        if self.context is not None:
            d["context"] = self.context
        d["meta"] = dict(self.meta)
        d["target"] = self.target.to_dict()
        if self.draft is not None:
            d["draft"] = self.draft.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: Any) -> "Latency":
        if not isinstance(d, dict):
            raise ProfileError("'latency' must be an object with a 'target' curve")
        unknown = set(d) - {"context", "meta", "target", "draft"}
        if unknown:
            raise ProfileError(f"'latency' has unknown field(s) {sorted(unknown)}")
        if "target" not in d:
            raise ProfileError("'latency' needs a 'target' curve")
        target = LatencyCurve.from_dict(d["target"], "latency.target")
        draft = (LatencyCurve.from_dict(d["draft"], "latency.draft")
                 if d.get("draft") is not None else None)
        return cls(target, draft, d.get("context"), dict(d.get("meta") or {}))


# ---------------------------------------------------------------------------- profile
@dataclass(frozen=True)
class Profile:
    """Acceptance by sibling rank (``p``, optionally ``by_depth``), raw counts when known,
    latency when measured, and provenance in ``meta``.

    p:            [W] floats, ``p[k-1]`` = P(rank k accepted); ``sum(p) <= 1``.
    by_depth:     [D][W] floats, row d for a parent at depth d (rows past the end reuse the
                  last one), or None.
    counts:       [W] ints, how often rank k was the accepted one; ``none_count``: how often
                  none was. ``p == counts / (sum(counts) + none_count)``.
    depth_counts: [D][W] ints and ``depth_none`` [D] ints, the same per depth.
    """

    p: list[float]
    by_depth: list[list[float]] | None = None
    counts: list[int] | None = None
    none_count: int | None = None
    depth_counts: list[list[int]] | None = None
    depth_none: list[int] | None = None
    latency: Latency | None = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        p = _prob_row(self.p, "acceptance.p")
        object.__setattr__(self, "p", p)
        width = len(p)
        if self.by_depth is not None:
            rows = _as_list(self.by_depth, "acceptance.by_depth")
            if not rows:
                raise ProfileError("'acceptance.by_depth' is empty; omit it or give one row "
                                   "per depth")
            rows = [_prob_row(r, f"acceptance.by_depth[{d}].p") for d, r in enumerate(rows)]
            for d, r in enumerate(rows):
                if len(r) != width:
                    raise ProfileError(f"'acceptance.by_depth[{d}].p' has {len(r)} entries but "
                                       f"'acceptance.p' has {width} (ragged by_depth)")
            object.__setattr__(self, "by_depth", rows)
        if (self.counts is None) != (self.none_count is None):
            raise ProfileError("'acceptance.counts' and 'acceptance.none_count' come together; "
                               "give both or neither")
        if self.counts is not None:
            counts = _count_row(self.counts, "acceptance.counts")
            none_count = _count(self.none_count, "acceptance.none_count")
            if len(counts) != width:
                raise ProfileError(f"'acceptance.counts' has {len(counts)} entries but "
                                   f"'acceptance.p' has {width}")
            _check_matches(p, counts, none_count, "acceptance")
            object.__setattr__(self, "counts", counts)
            object.__setattr__(self, "none_count", none_count)
        if (self.depth_counts is None) != (self.depth_none is None):
            raise ProfileError("'depth_counts' and 'depth_none' come together; give both or "
                               "neither")
        if self.depth_counts is not None:
            if self.by_depth is None:
                raise ProfileError("depth counts given without 'acceptance.by_depth'")
            dc = [_count_row(r, f"acceptance.by_depth[{d}].counts")
                  for d, r in enumerate(_as_list(self.depth_counts, "depth_counts"))]
            dn = [_count(x, f"acceptance.by_depth[{d}].none_count")
                  for d, x in enumerate(_as_list(self.depth_none, "depth_none"))]
            if len(dc) != len(self.by_depth) or len(dn) != len(self.by_depth):
                raise ProfileError(f"depth counts cover {len(dc)} depths (none counts {len(dn)})"
                                   f" but 'acceptance.by_depth' has {len(self.by_depth)} rows")
            for d, (row, c, n) in enumerate(zip(self.by_depth, dc, dn)):
                if len(c) != width:
                    raise ProfileError(f"'acceptance.by_depth[{d}].counts' has {len(c)} entries "
                                       f"but 'acceptance.p' has {width}")
                _check_matches(row, c, n, f"acceptance.by_depth[{d}]")
            object.__setattr__(self, "depth_counts", dc)
            object.__setattr__(self, "depth_none", dn)
        if self.latency is not None and not isinstance(self.latency, Latency):
            raise ProfileError("'latency' must be a Latency or None")
        if not isinstance(self.meta, dict):
            raise ProfileError("'meta' must be a dict")

    # ------------------------------------------------------------------ views
    @property
    def none(self) -> float:
        """Probability that no sibling is accepted: ``1 - sum(p)``."""
        return max(0.0, 1.0 - math.fsum(self.p))

    @property
    def width(self) -> int:
        """Number of ranks measured (W)."""
        return len(self.p)

    @property
    def depth_aware(self) -> bool:
        return self.by_depth is not None

    def table(self, depth_aware: bool = True) -> list[list[float]]:
        """2-D ``[depth][rank-1]`` table for ``Tree.expected_tokens`` and the DP: the
        per-depth rows if present (and ``depth_aware``), else the single row ``[p]``."""
        if depth_aware and self.by_depth is not None:
            return [list(r) for r in self.by_depth]
        return [list(self.p)]

    def ci95(self, depth: int | None = None) -> list[tuple[float, float]]:
        """95 % Wilson score interval for each ``p[k-1]`` (or ``by_depth[depth]``), from the
        raw counts. Raises :class:`ProfileError` when the profile has no counts."""
        if depth is None:
            if self.counts is None:
                raise ProfileError("this profile has no raw counts, so no confidence interval; "
                                   "profile with treeopt to keep counts")
            counts, total = self.counts, sum(self.counts) + self.none_count
        else:
            if self.depth_counts is None:
                raise ProfileError("this profile has no per-depth counts")
            if not 0 <= depth < len(self.depth_counts):
                raise ProfileError(f"depth {depth} outside 0..{len(self.depth_counts) - 1}")
            counts = self.depth_counts[depth]
            total = sum(counts) + self.depth_none[depth]
        return [wilson_interval(c, total) for c in counts]

    # ------------------------------------------------------------------ building
    @classmethod
    def from_counts(cls, counts: Sequence[int], none_count: int,
                    depth_counts: Sequence[Sequence[int]] | None = None,
                    depth_none: Sequence[int] | None = None, meta: dict | None = None,
                    latency: Latency | None = None) -> "Profile":
        """Profile with ``p = counts / (sum(counts) + none_count)`` (the same per depth)."""
        counts = _count_row(counts, "acceptance.counts")
        none_count = _count(none_count, "acceptance.none_count")
        p = _p_from_counts(counts, none_count, "acceptance")
        by_depth = None
        if depth_counts is not None:
            if depth_none is None:
                raise ProfileError("'depth_counts' given without 'depth_none'")
            depth_counts = [_count_row(r, f"acceptance.by_depth[{d}].counts")
                            for d, r in enumerate(depth_counts)]
            depth_none = [_count(x, f"acceptance.by_depth[{d}].none_count")
                          for d, x in enumerate(depth_none)]
            if len(depth_none) != len(depth_counts):
                raise ProfileError(f"'depth_none' has {len(depth_none)} entries but "
                                   f"'depth_counts' has {len(depth_counts)} rows")
            by_depth = [_p_from_counts(c, n, f"acceptance.by_depth[{d}]")
                        for d, (c, n) in enumerate(zip(depth_counts, depth_none))]
        return cls(p, by_depth, counts, none_count,
                   depth_counts=depth_counts, depth_none=depth_none,
                   latency=latency, meta=dict(meta or {}))

    def merge(self, other: "Profile") -> "Profile":
        """Pool two profiles of the same pair by adding raw counts (both need counts and the
        same width). Per-depth counts are pooled depth by depth when both have them and
        dropped otherwise. Latency is kept from ``self`` (else ``other``).

        Refused (one line): profiles whose recorded settings differ in any of
        ``MERGE_KEYS`` (target, draft, temperature, top-k, top-p, rule, width, depth, mode,
        continuation; top-k/top-p/rule are ignored when both are greedy), a profile with
        settings and one without, and the same measurement twice (same prompt record and
        counts). The merged meta keeps the settings and both prompt records, so the next
        merge is checked too."""
        if self.counts is None or other.counts is None:
            which = "first" if self.counts is None else "second"
            raise ProfileError(f"cannot merge: the {which} profile has no raw counts "
                               "(only counted profiles can be pooled)")
        if self.width != other.width:
            raise ProfileError(f"cannot merge profiles of width {self.width} and "
                               f"{other.width}; profile both with the same width")
        _check_same_setting(self.meta, other.meta)
        if _measurement(self) == _measurement(other):
            raise ProfileError("cannot merge: both profiles hold the same measurement (the same "
                               "prompts and counts); pooling it twice would count every "
                               "position twice")
        counts = [a + b for a, b in zip(self.counts, other.counts)]
        none_count = self.none_count + other.none_count
        depth_counts = depth_none = None
        if self.depth_counts is not None and other.depth_counts is not None:
            n = max(len(self.depth_counts), len(other.depth_counts))
            zero = [0] * self.width
            depth_counts, depth_none = [], []
            for d in range(n):
                a = self.depth_counts[d] if d < len(self.depth_counts) else zero
                b = other.depth_counts[d] if d < len(other.depth_counts) else zero
                an = self.depth_none[d] if d < len(self.depth_none) else 0
                bn = other.depth_none[d] if d < len(other.depth_none) else 0
                depth_counts.append([x + y for x, y in zip(a, b)])
                depth_none.append(an + bn)
        meta = {"description": "merged profile (counts added)",
                "merged_from": [dict(self.meta), dict(other.meta)]}
        mine, theirs = _settings(self.meta), _settings(other.meta)
        if mine is not None and theirs is not None:  # the next merge checks against these
            meta["settings"] = {k: v for k, v in mine.items()
                                if k in MERGE_KEYS or theirs.get(k) == v}
        hashes = [_prompt_record(self.meta), _prompt_record(other.meta)]
        if all(h is not None for h in hashes):
            meta["prompt_hashes"] = hashes[0] + hashes[1]
        return Profile.from_counts(counts, none_count, depth_counts, depth_none, meta=meta,
                                   latency=self.latency or other.latency)

    # ------------------------------------------------------------------ files
    def to_dict(self) -> dict:
        acc: dict[str, Any] = {"p": list(self.p)}
        if self.counts is not None:
            acc["counts"] = list(self.counts)
            acc["none_count"] = self.none_count
        if self.by_depth is not None:
            rows = []
            for d, row in enumerate(self.by_depth):
                r: dict[str, Any] = {"p": list(row)}
                if self.depth_counts is not None:
                    r["counts"] = list(self.depth_counts[d])
                    r["none_count"] = self.depth_none[d]
                rows.append(r)
            acc["by_depth"] = rows
        d: dict[str, Any] = {"format": JSON_FORMAT, "version": JSON_VERSION,
                             "meta": dict(self.meta), "acceptance": acc}
        if self.latency is not None:
            d["latency"] = self.latency.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: Any) -> "Profile":
        if not isinstance(d, dict):
            raise ProfileError(f"expected a JSON object, got {type(d).__name__}")
        if d.get("format") != JSON_FORMAT:
            raise ProfileError(f"'format' is {d.get('format')!r}, expected {JSON_FORMAT!r}")
        if d.get("version") != JSON_VERSION:
            raise ProfileError(f"unsupported profile 'version' {d.get('version')!r} "
                               f"(this treeopt reads {JSON_VERSION})")
        acc = d.get("acceptance")
        if not isinstance(acc, dict) or "p" not in acc:
            raise ProfileError("'acceptance' must be an object with at least 'p'")
        unknown = set(acc) - {"p", "counts", "none_count", "by_depth"}
        if unknown:
            raise ProfileError(f"'acceptance' has unknown field(s) {sorted(unknown)}")
        meta = d.get("meta", {})
        if not isinstance(meta, dict):
            raise ProfileError("'meta' must be an object")
        by_depth = depth_counts = depth_none = None
        if acc.get("by_depth") is not None:
            rows = acc["by_depth"]
            if not isinstance(rows, list):
                raise ProfileError("'acceptance.by_depth' must be a list of {\"p\": [...]} rows")
            by_depth = []
            for i, r in enumerate(rows):
                if not isinstance(r, dict) or "p" not in r:
                    raise ProfileError(f"'acceptance.by_depth[{i}]' must be an object with 'p'")
                by_depth.append(r["p"])
            has = ["counts" in r for r in rows]
            if any(has) and not all(has):
                raise ProfileError("'acceptance.by_depth' rows must all have 'counts' or none")
            if rows and all(has):
                depth_counts = [r["counts"] for r in rows]
                depth_none = [r.get("none_count") for r in rows]
        latency = Latency.from_dict(d["latency"]) if d.get("latency") is not None else None
        return cls(acc["p"], by_depth, acc.get("counts"), acc.get("none_count"),
                   depth_counts, depth_none, latency, dict(meta))

    @classmethod
    def load(cls, path: str | Path) -> "Profile":
        """Read a treeopt JSON profile or a Sequoia acceptance-vector ``.pt``
        (1-D tensor ``[0, p1..pW, none]``)."""
        path = Path(path)
        if not path.is_file():
            raise ProfileError(f"{path}: no such profile file")
        try:
            if path.suffix.lower() in (".pt", ".pth"):
                return _load_sequoia_vector(path)
            return cls.from_dict(read_json(path, ProfileError))
        except ProfileError as exc:
            raise ProfileError(f"{path}: {exc}") from None

    def save(self, path: str | Path) -> Path:
        """Write treeopt JSON (``.json``), or Sequoia's acceptance vector (``.pt``: the
        1-D float tensor ``[0, p1..pW, none]``; counts, depth rows and latency are lost)."""
        path = Path(path)
        suffix = path.suffix.lower()
        if suffix not in (".pt", ".pth", ".json"):
            raise ProfileError(f"{path}: unknown profile extension {path.suffix!r}; "
                               "use .json (or .pt for Sequoia's vector)")
        _check_replaceable(path)
        if suffix in (".pt", ".pth"):
            import torch

            vector = torch.tensor([0.0, *self.p, self.none], dtype=torch.float32)
            atomic_write(path, lambda fh: torch.save(vector, fh))
        else:
            write_json_atomic(path, self.to_dict())
        return path

    def summary(self, ranks: int = 4) -> str:
        """One line: width, depth rows, the first ranks, none, latency points."""
        head = " ".join(f"{x:.3f}" for x in self.p[:ranks])
        more = " ..." if self.width > ranks else ""
        parts = [f"W={self.width}", f"p=[{head}{more}]", f"none={self.none:.3f}"]
        if self.by_depth is not None:
            parts.append(f"{len(self.by_depth)} depth rows")
        if self.counts is not None:
            parts.append(f"{sum(self.counts) + self.none_count} samples")
        if self.latency is not None:
            parts.append(f"latency {len(self.latency.target.tokens)} points")
        return ", ".join(parts)


def write_json_atomic(path: str | Path, doc: Any) -> Path:
    """Write ``doc`` as JSON through a temporary file in the same folder and ``os.replace``,
    so an interruption never leaves a half-written file (profiles are rewritten while a long
    measurement runs)."""
    text = json.dumps(doc, indent=2) + "\n"
    return atomic_write(path, lambda fh: fh.write(text), binary=False)


def check_replaceable(path: str | Path) -> None:
    """Refuse to overwrite an existing non-empty file that is not a profile: a growmap, a
    picture, anything else (``save`` would destroy it)."""
    path = Path(path)
    if path.is_dir():
        raise ProfileError(f"{path}: is a folder, not a profile file")
    if not path.exists() or path.stat().st_size == 0:
        return
    kind = "a file that is not a treeopt profile"
    if path.suffix.lower() == ".json":
        try:
            doc = read_json(path, ProfileError)
        except (ProfileError, OSError):
            doc = None
        if isinstance(doc, dict) and doc.get("format") == JSON_FORMAT:
            return
        if isinstance(doc, dict) and isinstance(doc.get("format"), str):
            kind = f"a {doc['format']!r} file"
    else:
        try:
            _load_sequoia_vector(path)
            return
        except ProfileError:
            kind = "a file that is not a Sequoia acceptance vector"
    raise ProfileError(f"{path}: refusing to overwrite {kind} with a profile; choose another "
                       "output path or remove the file")


_check_replaceable = check_replaceable


#: Settings (``meta["settings"]`` of a measured profile) that must agree for two profiles
#: to be pooled: counts of another pair or sampling setting measure something else.
MERGE_KEYS = ("target", "draft", "temperature", "top_k", "top_p", "rule", "width", "depth",
              "mode", "continuation")
#: Ignored when both profiles are greedy (they do not change the argmax).
SAMPLING_ONLY = ("top_k", "top_p", "rule")


def _settings(meta: Any) -> dict | None:
    settings = meta.get("settings") if isinstance(meta, dict) else None
    return settings if isinstance(settings, dict) else None


def _prompt_record(meta: Any) -> list | None:
    hashes = meta.get("prompt_hashes") if isinstance(meta, dict) else None
    return list(hashes) if isinstance(hashes, list) else None


def _check_same_setting(a_meta: dict, b_meta: dict) -> None:
    a, b = _settings(a_meta), _settings(b_meta)
    if a is None and b is None:
        return  # hand-made profiles: nothing recorded to compare
    if a is None or b is None:
        which = "first" if a is None else "second"
        raise ProfileError(f"cannot merge: the {which} profile does not record its settings "
                           "(pair, sampling), so it cannot be shown to match the other")
    missing = object()
    greedy = a.get("temperature") == 0 and b.get("temperature") == 0
    for key in MERGE_KEYS:
        if greedy and key in SAMPLING_ONLY:
            continue
        x, y = a.get(key, missing), b.get(key, missing)
        if x != y:
            show = [("not recorded" if v is missing else show_number(v)) for v in (x, y)]
            raise ProfileError(f"cannot merge: the profiles differ in {key} ({show[0]} vs "
                               f"{show[1]}); pool only profiles of the same pair and settings")


def _measurement(profile: "Profile") -> tuple:
    """What makes two profiles the same measurement: the prompt record and every count."""
    return (_prompt_record(profile.meta), profile.counts, profile.none_count,
            profile.depth_counts, profile.depth_none)


def wilson_interval(successes: int, total: int, z: float = 1.959963984540054
                    ) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (95 % by default)."""
    if total <= 0:
        return (0.0, 1.0)
    phat = successes / total
    denom = 1 + z * z / total
    centre = (phat + z * z / (2 * total)) / denom
    half = z * math.sqrt(phat * (1 - phat) / total + z * z / (4 * total * total)) / denom
    lo = 0.0 if successes == 0 else max(0.0, centre - half)
    hi = 1.0 if successes == total else min(1.0, centre + half)
    return (lo, hi)


# ---------------------------------------------------------------------------- helpers
def _load_sequoia_vector(path: Path) -> Profile:
    import pickle

    import torch

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            v = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise ProfileError("refused to load: the file holds objects other than plain data "
                           "and tensors") from None
    except Exception as exc:
        raise ProfileError(f"not a readable torch file ({str(exc).strip().splitlines()[0]})"
                           if str(exc).strip() else "not a readable torch file") from None
    if not isinstance(v, torch.Tensor) or v.dim() != 1 or not v.is_floating_point():
        what = (f"{v.dtype} tensor of shape {tuple(v.shape)}" if isinstance(v, torch.Tensor)
                else type(v).__name__)
        raise ProfileError(f"expected Sequoia's acceptance vector (1-D float tensor "
                           f"[0, p1..pW, none]), got {what}")
    # shape and storage before .tolist(): an expanded 10^9-entry vector is a 2 KB file
    check_tensor(v, "acceptance vector", ProfileError, ndim=1, max_numel=MAX_PROFILE_WIDTH + 2)
    if v.numel() < 3:
        raise ProfileError(f"acceptance vector has {v.numel()} entries; need [0, p1.., none]")
    values = [float(x) for x in v.tolist()]
    if not all(math.isfinite(x) for x in values):
        raise ProfileError("acceptance vector holds inf or nan; every entry must be finite")
    if abs(values[0]) > TOLERANCE:
        raise ProfileError(f"acceptance vector must start with 0 (Sequoia layout [0, p1..pW, "
                           f"none]), got {values[0]}")
    p, none = values[1:-1], values[-1]
    if not 0 <= none <= 1 or abs(math.fsum(p) + none - 1) > 1e-3:
        hint = ""
        total = math.fsum(values[1:])
        if all(x >= 0 for x in values[1:]) and total <= 1 + 1e-3:
            # a valid [0, p1..pW] vector without its none entry (Sequoia's fast_test.py)
            hint = (f"; if it was written by Sequoia's tests/fast_test.py, it lacks the final "
                    f"none entry (its {len(values) - 1} entries sum to {total:.5f}): append "
                    "none = 1 - sum, e.g. v = torch.load(f); torch.save(torch.cat([v, "
                    "1 - v.sum(0, keepdim=True)]), f)")
        raise ProfileError(f"acceptance vector's last entry (none = {none:.5f}) is not "
                           f"1 - sum(p) = {1 - math.fsum(p):.5f}{hint}")
    meta = {"source": "Sequoia acceptance-vector .pt", "file": path.name,
            "description": "acceptance vector imported from Sequoia's format"}
    return Profile(p, meta=meta)


def _as_list(x: Any, name: str, limit: int = MAX_PROFILE_ROWS) -> list:
    """``x`` as a list of at most ``limit`` entries (arrays and tensors are sized before they
    are converted)."""
    if hasattr(x, "tolist") and not isinstance(x, (list, tuple)):
        n = x.numel() if hasattr(x, "numel") else getattr(x, "size", None)
        if isinstance(n, int) and n > limit:
            raise ProfileError(f"'{name}' has {show_number(n)} entries, more than the limit "
                               f"{limit}")
        x = x.tolist()
    if not isinstance(x, (list, tuple)):
        raise ProfileError(f"'{name}' must be a list, got {type(x).__name__}")
    if len(x) > limit:
        raise ProfileError(f"'{name}' has {len(x)} entries, more than the limit {limit}")
    return list(x)


def _number(x: Any, name: str) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise ProfileError(f"{name} must be a number, got {type(x).__name__}")
    try:
        x = float(x)
    except OverflowError:  # an int beyond float range
        raise ProfileError(f"{name} = {show_number(x)} is too large; must be finite") from None
    if not math.isfinite(x):
        raise ProfileError(f"{name} is {x}; must be finite")
    return x


def _latency_tokens(t: Any, i: int) -> int:
    """A latency point's token count: a positive integer (JSON's ``8.0`` too), finite, at
    most ``MAX_LATENCY_TOKENS``; never overflows on ``Infinity`` or huge numbers."""
    name = f"latency 'tokens[{i}]'"
    whole = not isinstance(t, bool) and (
        isinstance(t, int) or (isinstance(t, float) and math.isfinite(t) and t.is_integer()))
    if not whole or t < 1:
        raise ProfileError(f"{name} = {show_number(t)} must be a positive integer")
    if t > MAX_LATENCY_TOKENS:
        raise ProfileError(f"{name} = {show_number(t)} exceeds the limit of "
                           f"{MAX_LATENCY_TOKENS} tokens at once")
    return int(t)


def _prob_row(row: Any, name: str) -> list[float]:
    # at most MAX_PROFILE_WIDTH ranks: no node of a tree within the node cap has more children
    values = _as_list(row, name, limit=MAX_PROFILE_WIDTH)
    if not values:
        raise ProfileError(f"'{name}' is empty; give at least p1")
    out = []
    for i, x in enumerate(values):
        x = _number(x, f"'{name}[{i}]'")
        if x < 0:
            raise ProfileError(f"'{name}[{i}]' = {x} is negative; probabilities lie in [0, 1]")
        if x > 1:
            raise ProfileError(f"'{name}[{i}]' = {x} exceeds 1; probabilities lie in [0, 1]")
        out.append(x)
    total = math.fsum(out)
    if total > 1 + TOLERANCE:
        raise ProfileError(f"'{name}' sums to {total:.6f} > 1; ranks are exclusive events "
                           "(p[k] = P(rank k is the accepted one)), not cumulative")
    return out


def _count(x: Any, name: str) -> int:
    if hasattr(x, "item") and not isinstance(x, (int, float)):
        if getattr(x, "ndim", 0) != 0:
            raise ProfileError(f"'{name}' must be a non-negative integer count, got an array")
        x = x.item()
    if (isinstance(x, bool) or not isinstance(x, (int, float))
            or (isinstance(x, float) and not (math.isfinite(x) and x.is_integer())) or x < 0):
        raise ProfileError(f"'{name}' = {show_number(x)} must be a non-negative integer count")
    if x > MAX_COUNT:
        raise ProfileError(f"'{name}' = {show_number(x)} is beyond any real count (limit "
                           f"{MAX_COUNT})")
    return int(x)


def _count_row(row: Any, name: str) -> list[int]:
    values = _as_list(row, name, limit=MAX_PROFILE_WIDTH)
    if not values:
        raise ProfileError(f"'{name}' is empty")
    return [_count(x, f"{name}[{i}]") for i, x in enumerate(values)]


def _p_from_counts(counts: list[int], none_count: int, name: str) -> list[float]:
    total = sum(counts) + none_count
    if total == 0:
        raise ProfileError(f"'{name}' has no samples (all counts are 0)")
    return [c / total for c in counts]


def _check_matches(p: list[float], counts: list[int], none_count: int, name: str) -> None:
    want = _p_from_counts(counts, none_count, name)
    for k, (a, b) in enumerate(zip(p, want)):
        if abs(a - b) > TOLERANCE:
            raise ProfileError(f"'{name}.p[{k}]' = {a} disagrees with its counts "
                               f"({counts[k]}/{sum(counts) + none_count} = {b:.6f})")


def reliable_table(profile, min_samples: int = 50) -> list[list[float]]:
    """``profile.table()`` without the deep rows measured on fewer than ``min_samples``
    steps (rows past the end reuse the last kept one); the flat row when no depth row has
    enough. A deep row seen a handful of times (often all "none") would otherwise forbid
    the DP from going deeper on noise."""
    if profile.depth_counts is None:
        return profile.table()
    rows = []
    for d, row in enumerate(profile.by_depth):
        if sum(profile.depth_counts[d]) + profile.depth_none[d] < min_samples:
            break
        rows.append(list(row))
    return rows or profile.table(depth_aware=False)


class LatencyError(TreeoptError, ValueError):
    """Bad latency-profiling input; the message says what to change."""


# At most this many contexts in one table (a hand-made file claiming more is refused).
MAX_CONTEXTS = 256


def describe_table(profile, depth_aware: bool = True, min_samples: int = 50) -> str:
    """Which rank table a search uses for ``profile`` (as :func:`reliable_table` picks it),
    in words: the pooled rank row, or which depth rows."""
    if profile.depth_counts is None or profile.by_depth is None:
        return "rank profile (one row, no per-depth rows)"
    if not depth_aware:
        return "rank profile (one row pooled over all depths; --no-depth-aware)"
    kept = len(reliable_table(profile, min_samples)) if profile.depth_counts is not None else 0
    total = len(profile.by_depth)
    enough = all(sum(profile.depth_counts[d]) + profile.depth_none[d] >= min_samples
                 for d in range(kept))
    if not kept or not enough:
        return (f"rank profile (one row pooled over all depths: no depth row has "
                f"{min_samples} steps)")
    if kept == total:
        return f"depth-aware profile ({total} depth rows)"
    rows = "the depth-0 row" if kept == 1 else f"depth rows 0..{kept - 1}"
    return (f"depth-aware profile ({rows} of {total}; deeper rows have fewer than "
            f"{min_samples} steps and reuse row {kept - 1})")


def latencies_by_context(latency) -> list:
    """The single-context tables of ``latency``, one ``Latency`` per measured context,
    ascending (each with the shared meta, without the list): ``[latency]`` for a
    single-context table. A malformed ``curves_by_context`` is a one-line LatencyError."""
    meta = dict(getattr(latency, "meta", None) or {})
    raw = meta.pop("curves_by_context", None)
    if raw is None:
        return [latency]
    where = "latency meta 'curves_by_context'"
    if not isinstance(raw, list) or not raw:
        raise LatencyError(f"{where} must be a non-empty list of per-context curves")
    if len(raw) > MAX_CONTEXTS:
        raise LatencyError(f"{where} lists {len(raw)} contexts, more than the limit "
                           f"{MAX_CONTEXTS}")
    out = []
    for i, entry in enumerate(raw):
        if not isinstance(entry, dict) or "target" not in entry or "context" not in entry:
            raise LatencyError(f"{where}[{i}] must be an object with 'context' and 'target'")
        unknown = set(entry) - {"context", "target", "draft"}
        if unknown:
            raise LatencyError(f"{where}[{i}] has unknown field(s) {sorted(unknown)}")
        c = entry["context"]
        if isinstance(c, bool) or not isinstance(c, int) or c < 0:
            raise LatencyError(f"{where}[{i}].context = {c!r} must be a non-negative integer")
        if out and c <= out[-1].context:
            raise LatencyError(f"{where} must list contexts in increasing order, but "
                               f"{c} follows {out[-1].context}")
        try:
            target = LatencyCurve.from_dict(entry["target"], f"{where}[{i}].target")
            draft = (LatencyCurve.from_dict(entry["draft"], f"{where}[{i}].draft")
                     if entry.get("draft") is not None else None)
        except ProfileError as exc:
            raise LatencyError(str(exc)) from None
        out.append(Latency(target, draft, c, dict(meta, context=c)))
    if len({t.draft is None for t in out}) > 1:
        raise LatencyError(f"{where}: every context needs a draft curve, or none does")
    first = out[0]
    same = (first.context == latency.context and first.target == latency.target
            and first.draft == latency.draft)
    if not same:
        raise LatencyError(f"{where}[0] (context {first.context}) differs from the table's own "
                           f"curves (context {latency.context}); they must be the same "
                           "measurement: re-measure, or remove 'curves_by_context'")
    return out


def contexts_of(latency) -> list[int | None]:
    """The contexts a latency table was measured at, ascending (one for a single-context
    table: its ``context``, possibly None)."""
    return [t.context for t in latencies_by_context(latency)]
