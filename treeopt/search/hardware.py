"""Hardware-aware choice of tree size and level limit, and step-time predictions for any tree.

Cost model. One speculative step = drafting the tree + one target forward over all ``n`` tree
nodes (root included), so it produces F(tree) tokens in ``draft_ms + t_target(n)``; plain
decoding produces one token per ``t_target(1)``. Hence

    tokens/s = 1000 · F / step_ms,      speedup = t_target(1) · F / step_ms.

Draft cost, ``draft_cost=`` (default :data:`DEFAULT_DRAFT_COST`, ``"per-level"``, in every
function here and in every command):

- ``"per-level"``: what treeopt's engine runs: one draft forward per level that has children,
  charged for the nodes it expands, ``Σ_k t_draft(#nodes of level k with children)`` (the leaf
  level is never fed to the draft). With a flat draft curve it is ``"sequoia"`` minus one
  forward.
- ``"sequoia"`` (Sequoia's ``tree_search.py``): ``levels · t_draft(1)``, levels = tree depth
  + 1 (root counted; the DP's level limit ``l``). Sequoia's engine does exactly that many
  draft forwards per step: one over the new root (the bonus token) and one per tree level
  after it, each as if it cost one token's forward.

Units: ``levels`` count tree levels with the root (the DP's limit, Sequoia's ``max_depth``);
``depth`` counts edges (``Tree.depth``); a tree of depth d has d + 1 levels.

A size-1 tree is plain decoding and costs no draft time under either model.

Whole generations (:func:`end_to_end`). The step model prices decoding after the prompt; a
generation also pays the prompt's prefill once: the target's forward over the prompt (both
methods) and, with a draft model, the draft's forward over it (speculative decoding only).
Over short answers after long prompts that dilutes the per-step speed-up, and a draft's
prefill can take back much of what it gains. ``tune``
times both prefills on its prompts (``Latency.meta["prefill"]``, :func:`prefill_costs`) and
reports the speed-up of whole generations of its prompts' length beside the per-step one.

Steps with nothing to propose (``empty_rate``). A model-free drafter (n-gram, datastore)
proposes nothing where its index has no match; such a step is a plain decoding step costing
``t_target(1)`` and yielding one token. With a fraction ``e`` of such steps (measured by the
acceptance profiler, ``empty_step_rate``) a tree's step costs
``e · t_target(1) + (1 - e) · (draft_ms + t_target(n))`` on average, while F is unchanged (the
profile counts empty steps as "none accepted"). Model drafters always propose: ``e = 0``.

What is exact and what is not. With ``"sequoia"``, :func:`choose` is exact: F*(n, l) is the DP
optimum and the cost depends on (n, l) only, so every n <= max_size and l <= max_levels is
scored and the minimum of ``(l · t_draft(1) + t_target(n)) / F*(n, l)`` is returned (what
Sequoia computes, over every size instead of a hand-typed list). With ``"per-level"`` (the
default) the cost depends on the tree's level widths, so the true optimum would need a
different DP; here each (n, l) is scored on the DP's F-optimal tree for (n, l) — a
heuristic, exact only among those trees ((n, l) whose optimum F*(n, l) = F*(n, l - 1) is
already reached with fewer levels is scored at l - 1 only). That search is pruned safely
with the lower bound ``(l · min_q t_draft(q) + t_target(n)) / F*(n, l)``, so no candidate
that could beat the returned one is skipped.

Latency curves are not trusted blindly (:class:`MonotoneCurve`). Measured curves, CPU ones
especially, are often non-monotone (noise, or a kernel that changes with the row count), and
extrapolating a falling last segment predicts large trees cheaper than one token. Every cost
here is therefore read from the curve's non-decreasing envelope: verifying n tokens costs at
least as much as the dearest measured size <= n (the running maximum of the measured medians,
interpolated linearly between measured sizes), so a dip can never be exploited and a
falling curve never extrapolates downwards. Beyond the last measured size the cost grows
linearly at the largest of the last segment's slope, the average slope over the measured
range and 0. The envelope is conservative: a real dip (e.g. a faster kernel at 16 rows than
at 8) is priced at the larger cost. :func:`choose` says so in ``Choice.notes`` when the curve
falls, and when the chosen size lies beyond the measured range (an extrapolation);
``measured_only=True`` restricts the choice to measured sizes (Sequoia's ``valid_budget``),
so no chosen cost is interpolated or extrapolated.

Latency that depends on the context (``context=`` in :func:`step_cost`, :func:`predict`,
:func:`choose`; tables measured at several contexts, see ``treeopt.profile.latency``). A
forward's cost grows with the tokens already cached, multi-token forwards more so, so the
best tree for a long prompt can be smaller than for a short one. :func:`latency_at` gives
the table for a context c, and every cost here is read from it, by the same code as for a
single-context table: at a measured context, that context's curves; between two measured
contexts c0 < c < c1, curves whose price at every size n is the linear interpolation in c of
the two contexts' envelope prices, ``(1 - w) · E_c0(n) + w · E_c1(n)`` with
``w = (c - c0) / (c1 - c0)`` (at every size measured at either context, so within the
measured sizes every step cost interpolates linearly in c too); below the smallest or above
the largest measured context, the nearest measured context's curves (clamped: never
extrapolated in c; :func:`choose` says so in its notes). A single-context table is used for
every context, and ``context=None`` means the table's first (smallest) context, which is
what a reader of the single-context format sees.

:func:`choose_per_context` makes the choice at every measured context and splits the context
axis into buckets, one tree each: between two neighbouring measured contexts the boundary is
where their two trees are predicted equally fast (both step costs are linear in c there, so
the crossover is exact), and the first bucket starts at 0 and the last one has no end.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import NamedTuple, Sequence

import numpy as np

from treeopt.errors import TreeoptError
from treeopt.limits import MAX_TREE_NODES
from treeopt.profile import Latency, LatencyCurve
from treeopt.profile.model import contexts_of, latencies_by_context
from treeopt.search.dp import DPTable, solve
from treeopt.tree import Tree

DRAFT_COSTS = ("per-level", "sequoia")
# The one default draft-cost model of every function and command: what treeopt's engine runs.
DEFAULT_DRAFT_COST = "per-level"
# The default level limit (root counted) of the searches, and the largest size the
# hardware-aware sweep considers when the latency table has no point to go by.
DEFAULT_MAX_LEVELS = 12
DEFAULT_MAX_SIZE = 128


class HardwareError(TreeoptError, ValueError):
    """Impossible hardware-aware request (no latency table, bad cost model); one line."""


# A measured point lower than an earlier (smaller) size's by more than this fraction is
# reported as a fall of the curve (smaller dips are timing noise).
FALL_TOLERANCE = 0.05


class MonotoneCurve:
    """The non-decreasing envelope of a latency curve (ms by tokens processed at once).

    At a measured size t_i the cost is Y_i = max(y_0..y_i), the running maximum of the
    measured medians; between measured sizes it is interpolated linearly (so it is never
    below the dearest measured size <= n); below the first size it is Y_0; beyond the last
    size it grows linearly at ``slope`` = max(last segment's slope, average slope over the
    measured range, 0) of the measured curve. ``curve`` is the measured ``LatencyCurve``
    (anything with ``tokens`` and ``ms``)."""

    def __init__(self, curve):
        self.curve = curve
        self.tokens = [int(t) for t in curve.tokens]
        raw = [float(y) for y in curve.ms]
        self.raw = raw
        self.ms = list(np.maximum.accumulate(raw)) if raw else []
        t, y = self.tokens, raw
        if len(t) >= 2:
            last = (y[-1] - y[-2]) / (t[-1] - t[-2])
            average = (y[-1] - y[0]) / (t[-1] - t[0])
            self.slope = max(last, average, 0.0)
        else:
            self.slope = 0.0

    @property
    def max_tokens(self) -> int:
        """The largest measured size."""
        return self.tokens[-1]

    def __call__(self, n: float) -> float:
        t, y = self.tokens, self.ms
        if n <= t[0]:
            return y[0]
        if n >= t[-1]:
            return y[-1] + self.slope * (n - t[-1])
        return float(np.interp(n, t, y))

    def falls(self, tolerance: float = FALL_TOLERANCE) -> list[tuple[int, float, int, float]]:
        """Where the measured curve falls: (earlier size, its ms, later size, its ms) for each
        measured point more than ``tolerance`` (a fraction) below the dearest smaller size."""
        out = []
        for i in range(1, len(self.tokens)):
            j = int(np.argmax(self.raw[:i]))
            if self.raw[i] < self.raw[j] * (1 - tolerance):
                out.append((self.tokens[j], self.raw[j], self.tokens[i], self.raw[i]))
        return out


def monotone(curve):
    """``curve``'s :class:`MonotoneCurve` (None stays None; an envelope is returned as is)."""
    if curve is None or isinstance(curve, MonotoneCurve):
        return curve
    return MonotoneCurve(curve)


def _curves(latency):
    """(target envelope, draft envelope or None) of a Latency."""
    return monotone(latency.target), monotone(getattr(latency, "draft", None))


class _Envelopes(NamedTuple):
    """A latency table read through its envelopes (what ``choose`` prices with)."""

    target: MonotoneCurve
    draft: MonotoneCurve | None


@dataclass(frozen=True)
class Prediction:
    """Predicted cost and yield of one speculative step with a given tree (times in ms)."""

    size: int
    depth: int  # Tree.depth, in edges
    expected_tokens: float
    draft_ms: float
    verify_ms: float
    step_ms: float
    tokens_per_s: float
    plain_ms: float  # t_target(1): one plain decoding step
    speedup: float

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Choice:
    """Outcome of :func:`choose`. ``levels`` is the chosen DP level limit (root counted,
    Sequoia's convention) so ``table.tree(size, levels)`` rebuilds ``tree``; ``tree.depth``
    (edges) is at most ``levels - 1``.

    ``candidates``: one dict per size shown (powers of two, the latency table's measured
    sizes and the chosen size, all <= max_size; only the measured sizes and 1 with
    ``measured_only``) with that size's best level limit: keys size, levels, depth (edges of
    that tree), F, step_ms, tokens_per_s, speedup. ``notes``: one-line warnings about the
    latency curves (a falling curve priced at its envelope, a choice beyond the measured
    sizes)."""

    size: int
    levels: int
    tree: Tree
    expected_tokens: float
    step_ms: float
    tokens_per_s: float
    speedup: float
    candidates: list[dict] = field(default_factory=list)
    draft_cost: str = DEFAULT_DRAFT_COST
    plain_ms: float = float("nan")
    notes: list[str] = field(default_factory=list)
    measured_only: bool = False
    context: int | None = None  # the context the choice was made for (None: the first)


def check_cost(draft_cost: str) -> None:
    """The one check of a draft-cost model name (one of ``DRAFT_COSTS``)."""
    if draft_cost not in DRAFT_COSTS:
        raise HardwareError(f"unknown draft cost model {draft_cost!r}; use one of "
                            f"{', '.join(DRAFT_COSTS)}")


def _check_latency(latency) -> None:
    if latency is None or getattr(latency, "target", None) is None:
        raise HardwareError("no target latency table: profile latency first (treeopt profile "
                            "--latency) or give a fixed --budget")


def draft_ms(tree: Tree, latency, draft_cost: str = DEFAULT_DRAFT_COST) -> float:
    """Draft time of one step for ``tree`` under the cost model (0 if no draft curve, and 0
    for a size-1 tree, which is plain decoding: nothing is drafted).

    sequoia: Sequoia's charge, one draft forward per level counting the root,
    ``levels * t_draft(1)``. per-level: what treeopt's engine runs, one draft forward per level
    that has children, over the nodes it expands: ``sum t_draft(expanded nodes at level)``.
    t_draft is the draft curve's non-decreasing envelope (:class:`MonotoneCurve`)."""
    check_cost(draft_cost)
    curve = monotone(getattr(latency, "draft", None))
    if curve is None or tree.size == 1:
        return 0.0
    if draft_cost == "sequoia":
        return (tree.depth + 1) * float(curve(1))
    children = tree.children
    expanded = (sum(1 for v in level if children[v]) for level in tree.levels)
    return float(sum(curve(n) for n in expanded if n))


def empty_step_rate(profile) -> float:
    """Fraction of decoding steps at which the profiled drafter proposed nothing (0 for
    profiles without that count, e.g. model drafters')."""
    meta = getattr(profile, "meta", None) or {}
    steps = meta.get("steps") or 0
    return float(meta.get("no_candidate_steps", 0)) / steps if steps else 0.0


def _check_empty(empty_rate: float) -> None:
    # 1.0 is a drafter that never proposed: every step is plain (and its profile's F is 1)
    if not 0.0 <= empty_rate <= 1.0:
        raise HardwareError(f"empty_rate must be in [0, 1], got {empty_rate}")


class StepCost(NamedTuple):
    """One speculative step's average cost in ms (see :func:`step_cost`)."""

    draft_ms: float
    verify_ms: float
    plain_ms: float  # t_target(1): one plain decoding step

    @property
    def step_ms(self) -> float:
        return self.draft_ms + self.verify_ms


def average_step(step, empty_rate: float, plain: float):
    """Average cost of a speculative step when a fraction ``empty_rate`` of steps propose
    nothing and cost one plain forward ``plain`` instead of ``step`` (floats or arrays)."""
    return empty_rate * plain + (1 - empty_rate) * step


def step_cost(tree: Tree, latency, draft_cost: str = DEFAULT_DRAFT_COST,
              empty_rate: float = 0.0, context: int | None = None) -> StepCost:
    """Draft and verify time of one step with ``tree`` (averaged over steps when a fraction
    ``empty_rate`` of them propose nothing), read through the curves' non-decreasing
    envelopes: the one cost every prediction and every search objective uses. ``context``:
    the cached tokens the step sees (:func:`latency_at`; None = the table's first context)."""
    _check_latency(latency)
    _check_empty(empty_rate)
    latency = latency_at(latency, context)
    target = monotone(latency.target)
    plain = float(target(1))
    d_ms = draft_ms(tree, latency, draft_cost)
    v_ms = float(target(tree.size))
    if tree.size > 1 and empty_rate:
        d_ms, v_ms = (1 - empty_rate) * d_ms, average_step(v_ms, empty_rate, plain)
    return StepCost(d_ms, v_ms, plain)


def predict(tree: Tree, profile_table, latency, draft_cost: str = DEFAULT_DRAFT_COST,
            empty_rate: float = 0.0, context: int | None = None) -> Prediction:
    """Step time, expected tokens, tokens/s and speed-up over plain decoding for any tree.

    profile_table: 1-D rank profile (W,) or depth-aware (R, W), as ``Tree.expected_tokens``.
    latency: ``treeopt.profile.Latency`` (``target(n)`` and optional ``draft(n)`` in ms),
    read through the curves' non-decreasing envelopes (see the module docstring).
    empty_rate: fraction of steps that propose nothing (see the module docstring); the draft
    and verify times are then averages over all steps (:func:`step_cost`). ``context``: the
    cached tokens the step sees (:func:`latency_at`; None = the table's first context)."""
    d_ms, v_ms, plain = step_cost(tree, latency, draft_cost, empty_rate, context)
    f = tree.expected_tokens(profile_table)
    step = d_ms + v_ms
    return Prediction(size=tree.size, depth=tree.depth, expected_tokens=f, draft_ms=d_ms,
                      verify_ms=v_ms, step_ms=step, tokens_per_s=1000.0 * f / step,
                      plain_ms=plain, speedup=plain * f / step)


class PrefillCost(NamedTuple):
    """Milliseconds per prompt token of a generation's prefill (``Latency.meta["prefill"]``,
    timed by ``treeopt.profile.latency.time_prefill``): the target's forward over the prompt
    and the drafter's start (a draft model's forward over it; ~0 for a model-free drafter)."""

    target_ms_per_token: float
    draft_ms_per_token: float


def prefill_costs(latency) -> PrefillCost | None:
    """The prefill costs a latency table carries (None when it was measured without them)."""
    entry = (getattr(latency, "meta", None) or {}).get("prefill")
    if entry is None:
        return None
    try:
        tokens = [int(x) for x in entry["prompt_tokens"]]
        t_ms = [float(x) for x in entry["target_ms"]]
        d_ms = [float(x) for x in entry["draft_ms"]]
    except (TypeError, KeyError, ValueError) as exc:
        raise HardwareError(f"the latency table's prefill entry is malformed ({exc!r}); "
                            "re-run treeopt tune to measure it again") from None
    if (not tokens or len({len(tokens), len(t_ms), len(d_ms)}) != 1 or min(tokens) < 1
            or min(t_ms + d_ms) < 0 or not all(math.isfinite(x) for x in t_ms + d_ms)):
        raise HardwareError("the latency table's prefill entry needs equally long lists of "
                            "prompt lengths >= 1 and finite times >= 0; re-run treeopt tune "
                            "to measure it again")
    return PrefillCost(sum(t_ms) / sum(tokens), sum(d_ms) / sum(tokens))


def end_to_end(speedup: float, plain_ms: float, prefill: PrefillCost,
               generations: Sequence[tuple[int, int]], draft: bool = True) -> float:
    """Speed-up over plain decoding of whole generations, prefill included, from a per-step
    ``speedup`` (:class:`Prediction`'s). Each generation (prompt tokens L, new tokens N) costs
    plain decoding ``L·p_t + (N - 1)·plain_ms`` (the first new token comes from the prefill)
    and speculative decoding ``L·(p_t + p_d) + (N - 1)·plain_ms / speedup``, where ``p_d``
    counts only for a method that runs the drafter timed (``draft``). Times are summed over
    the generations, as eval sums them."""
    if not speedup > 0 or not plain_ms > 0:
        raise HardwareError(f"end_to_end needs a positive speed-up and plain step time, got "
                            f"{speedup} and {plain_ms}")
    p_t = prefill.target_ms_per_token
    p_d = prefill.draft_ms_per_token if draft else 0.0
    plain = spec = 0.0
    for prompt_tokens, new_tokens in generations:
        decode = max(int(new_tokens) - 1, 0) * plain_ms
        plain += int(prompt_tokens) * p_t + decode
        spec += int(prompt_tokens) * (p_t + p_d) + decode / speedup
    return plain / spec if spec > 0 else 1.0


def _measured_sizes(latency, max_size: int) -> set[int]:
    return {int(t) for t in getattr(latency.target, "tokens", []) if 1 <= int(t) <= max_size}


def _display_sizes(latency, max_size: int, chosen: int, measured_only: bool = False
                   ) -> list[int]:
    sizes = _measured_sizes(latency, max_size) | {1, chosen}
    if not measured_only:
        sizes.update(1 << k for k in range(max_size.bit_length()) if 1 << k <= max_size)
    return sorted(sizes)


def _fall_note(name: str, curve: MonotoneCurve) -> str | None:
    falls = curve.falls()
    if not falls:
        return None
    a, ya, b, yb = falls[0]
    more = f" and {len(falls) - 1} more such point(s)" if len(falls) > 1 else ""
    return (f"the {name} latency curve falls ({ya:.2f} ms at {a} tokens, {yb:.2f} ms at {b}"
            f"{more}): costs use its non-decreasing envelope, so no size is priced below a "
            "smaller one; if that is timing noise, re-measure with more --repeats or "
            "--threads 1")


def curve_notes(latency, tree: Tree | None = None, draft_cost: str = DEFAULT_DRAFT_COST,
                falls: bool = True) -> list[str]:
    """One-line warnings about a latency table: falling curves (priced at their envelopes;
    left out with ``falls=False``) and, given a tree, costs read beyond the measured sizes
    (extrapolated)."""
    target, draft = _curves(latency)
    notes = []
    if falls:
        notes = [n for n in (_fall_note("target", target),
                             _fall_note("draft", draft) if draft is not None else None) if n]
    if tree is None:
        return notes
    if tree.size > target.max_tokens:
        notes.append(f"size {tree.size} lies beyond the largest measured target size "
                     f"{target.max_tokens}: its verify cost {target(tree.size):.2f} ms is "
                     "extrapolated; time larger sizes (--tokens) or choose among measured "
                     "sizes only (--measured-sizes-only)")
    if draft is not None and tree.size > 1 and draft_cost == "per-level":
        children = tree.children
        widest = max(sum(1 for v in level if children[v]) for level in tree.levels)
        if widest > draft.max_tokens:
            notes.append(f"the draft cost of a level of {widest} nodes is extrapolated beyond "
                         f"the largest measured draft size {draft.max_tokens}")
    return notes


def default_max_size(latency) -> int:
    """The largest size the hardware-aware sweep considers when none is given: the largest
    measured target latency point, clamped to ``MAX_TREE_NODES`` (a point at 10^7 tokens must
    not make the sweep 10^7 nodes wide), or ``DEFAULT_MAX_SIZE`` without a latency table."""
    tokens = [int(t) for t in getattr(getattr(latency, "target", None), "tokens", None) or []]
    return min(max(tokens), MAX_TREE_NODES) if tokens else DEFAULT_MAX_SIZE


def choose(profile_table, latency, max_size: int, max_levels: int,
           draft_cost: str = DEFAULT_DRAFT_COST, table: DPTable | None = None,
           empty_rate: float = 0.0, measured_only: bool = False,
           context: int | None = None) -> Choice:
    """Pick the (size, levels) with the most tokens/s; see the module docstring for the model.

    profile_table: 1-D (W,) or depth-aware (R, W) rank profile. ``max_levels`` counts levels
    including the root. ``table``: a :func:`treeopt.search.dp.solve` result to reuse (must
    cover max_size and max_levels). ``empty_rate``: fraction of steps that propose nothing.
    ``measured_only``: consider only the sizes the target curve measured (and size 1, plain
    decoding), as Sequoia's ``valid_budget`` does, so the chosen size's verify cost is
    neither interpolated nor extrapolated. Latency is read through the curves'
    non-decreasing envelopes; ``Choice.notes`` warns about falling curves and extrapolation.
    ``context``: the cached tokens the steps see (:func:`latency_at`; None = the table's
    first context); ``Choice.context`` records it."""
    check_cost(draft_cost)
    _check_latency(latency)
    _check_empty(empty_rate)
    clamp_note = _clamp_note(latency, context)
    latency = latency_at(latency, context)
    e = float(empty_rate)
    if table is None:
        table = solve(profile_table, max_size, max_levels)
    elif table.max_size < max_size or table.max_levels < max_levels:
        raise HardwareError(f"DP table covers size {table.max_size}, {table.max_levels} levels; "
                            f"need {max_size}, {max_levels}")
    F = table.values[1 : max_size + 1, 1 : max_levels + 1]  # (n, l), index n-1, l-1
    sizes = np.arange(1, max_size + 1)
    levels = np.arange(1, max_levels + 1)
    target, curve = _curves(latency)
    env = _Envelopes(target, curve)  # the envelopes, built once
    verify = np.array([float(target(int(n))) for n in sizes])
    if verify.min() <= 0:
        bad = int(sizes[np.argmax(verify <= 0)])
        raise HardwareError(f"the target latency curve predicts {verify.min():.3f} ms at "
                            f"{bad} tokens (extrapolated); lower max_size to the measured range")
    plain = float(target(1))
    t1 = float(curve(1)) if curve is not None else 0.0
    allowed = np.ones(max_size, dtype=bool)  # sizes the choice may take
    if measured_only:
        allowed[:] = False
        allowed[[t - 1 for t in _measured_sizes(latency, max_size) | {1}]] = True
    feasible = np.isfinite(F) & allowed[:, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        step_seq = average_step(levels[None, :] * t1 + verify[:, None], e, plain)
        step_seq[0, :] = verify[0]  # size 1 is plain decoding: no draft forward
        ratio_seq = np.where(feasible, step_seq / F, np.inf)

    scored: dict[tuple[int, int], tuple[float, Tree | None]] = {}

    def score(n: int, l: int) -> float:
        """ms per token of (n, l) under the chosen model (inf if infeasible)."""
        if (n, l) not in scored:
            if not feasible[n - 1, l - 1]:
                scored[(n, l)] = (np.inf, None)
            elif draft_cost == "sequoia":
                scored[(n, l)] = (float(ratio_seq[n - 1, l - 1]), None)
            else:
                tree = table.tree(n, l)
                step = draft_ms(tree, env, draft_cost) + verify[n - 1]
                if n > 1:
                    step = average_step(step, e, plain)
                scored[(n, l)] = (step / float(F[n - 1, l - 1]), tree)
        return scored[(n, l)][0]

    if draft_cost == "sequoia":
        flat = np.lexsort((np.broadcast_to(sizes[:, None], F.shape).ravel(),
                           np.broadcast_to(levels[None, :], F.shape).ravel(),
                           ratio_seq.ravel()))
        n_best, l_best = divmod(int(flat[0]), max_levels)
        n_best, l_best = n_best + 1, l_best + 1
    else:
        tmin = min(float(curve(int(q))) for q in sizes) if curve is not None else 0.0
        deeper = np.ones_like(F, dtype=bool)
        deeper[:, 1:] = F[:, 1:] > F[:, :-1]  # a shallower limit reaches the same optimum
        with np.errstate(invalid="ignore", divide="ignore"):
            lower = average_step(levels[None, :] * tmin + verify[:, None], e, plain)
            lower[0, :] = verify[0]  # size 1: no draft forward
            bound = np.where(feasible & deeper, lower / F, np.inf)
        order = np.argsort(bound, axis=None, kind="stable")
        best = (np.inf, 1, 1)
        for idx in order:
            n, l = divmod(int(idx), max_levels)
            if bound.flat[idx] >= best[0] or not np.isfinite(bound.flat[idx]):
                break
            s = score(n + 1, l + 1)
            if s < best[0]:
                best = (s, n + 1, l + 1)
        _, n_best, l_best = best
        if not np.isfinite(best[0]):
            raise HardwareError("no feasible tree for these limits")

    tree = scored.get((n_best, l_best), (None, None))[1] or table.tree(n_best, l_best)
    pred = predict(tree, profile_table, env, draft_cost, e)

    candidates = []
    for n in _display_sizes(latency, max_size, n_best, measured_only):
        ls = [l for l in levels if feasible[n - 1, l - 1]
              and (l == 1 or F[n - 1, l - 1] > F[n - 1, l - 2])]
        if not ls:
            continue
        l = min(ls, key=lambda l: (score(n, int(l)), l))
        s = score(n, int(l))
        f = float(F[n - 1, l - 1])
        candidates.append({"size": int(n), "levels": int(l),
                           "depth": int(table.tree(n, int(l)).depth), "F": f,
                           "step_ms": s * f, "tokens_per_s": 1000.0 / s,
                           "speedup": plain / s})
    return Choice(size=n_best, levels=l_best, tree=tree, expected_tokens=pred.expected_tokens,
                  step_ms=pred.step_ms, tokens_per_s=pred.tokens_per_s, speedup=pred.speedup,
                  candidates=candidates, draft_cost=draft_cost, plain_ms=plain,
                  notes=curve_notes(latency, tree, draft_cost) + clamp_note,
                  measured_only=measured_only, context=context)


# ---------------------------------------------------------------------------- contexts
def latency_at(latency, context: int | None = None):
    """The single-context latency table for ``context`` cached tokens (see the module
    docstring): a measured context's own table; between two measured contexts, curves whose
    envelope prices interpolate linearly in the context; outside the measured contexts, the
    nearest one's (clamped). ``context=None`` and single-context tables give ``latency``
    itself."""

    if context is None:
        return latency
    tables = latencies_by_context(latency)
    if len(tables) == 1:
        return latency
    c = float(context)
    if c <= tables[0].context:
        return tables[0]
    if c >= tables[-1].context:
        return tables[-1]
    hi = next(i for i, t in enumerate(tables) if t.context >= c)
    a, b = tables[hi - 1], tables[hi]
    if b.context == c:
        return b
    return _between(a, b, (c - a.context) / (b.context - a.context), context)


def _between(a, b, w: float, context):
    """The table ``w`` of the way from ``a`` to ``b``: at every size either measured, the
    linear mix of the two envelopes' prices."""

    def mix(ca, cb):
        if ca is None or cb is None:
            return None
        ea, eb = MonotoneCurve(ca), MonotoneCurve(cb)
        sizes = sorted(set(ea.tokens) | set(eb.tokens))
        return LatencyCurve(sizes, [(1 - w) * ea(n) + w * eb(n) for n in sizes])

    meta = dict(a.meta, context=context, interpolated={"between": [a.context, b.context],
                                                       "weight": w})
    return Latency(mix(a.target, b.target), mix(a.draft, b.draft), int(round(context)), meta)


def _clamp_note(latency, context) -> list[str]:
    """A note when ``context`` lies outside the measured contexts of a multi-context table."""
    if context is None:
        return []

    measured = contexts_of(latency)
    if len(measured) < 2 or measured[0] <= context <= measured[-1]:
        return []
    near = measured[0] if context < measured[0] else measured[-1]
    return [f"context {context} lies outside the measured contexts {measured[0]}..{measured[-1]}: "
            f"priced with the curves measured at {near} (not extrapolated); measure it with "
            "treeopt profile latency --contexts"]


@dataclass
class ContextChoice:
    """One bucket of :func:`choose_per_context`: the tree chosen at the measured ``context``,
    used for contexts ``start`` .. ``end`` - 1 (``end`` None: no end)."""

    start: int
    end: int | None
    context: int
    choice: Choice


def ms_per_token(tree: Tree, profile_table, latency, draft_cost: str = DEFAULT_DRAFT_COST,
                 empty_rate: float = 0.0, context: int | None = None) -> float:
    """Predicted milliseconds per generated token with ``tree`` at ``context``
    (step ms / expected tokens per step, :func:`predict`)."""
    pred = predict(tree, profile_table, latency, draft_cost, empty_rate, context)
    return pred.step_ms / pred.expected_tokens


def crossover(a: Tree, b: Tree, profile_table, latency, c0: int, c1: int,
              draft_cost: str = DEFAULT_DRAFT_COST, empty_rate: float = 0.0) -> int:
    """The first context in ``c0 + 1 .. c1`` from which ``b`` is predicted faster than
    ``a`` (``c1`` when it never is before ``c1``): both trees' ms per token are linear in the
    context between two neighbouring measured contexts, so the crossing point is exact."""
    d0 = (ms_per_token(a, profile_table, latency, draft_cost, empty_rate, c0)
          - ms_per_token(b, profile_table, latency, draft_cost, empty_rate, c0))
    d1 = (ms_per_token(a, profile_table, latency, draft_cost, empty_rate, c1)
          - ms_per_token(b, profile_table, latency, draft_cost, empty_rate, c1))
    if d1 <= 0:  # a is at least as fast all the way (identical trees included)
        return c1
    if d0 > 0:  # b is faster from the start
        return c0 + 1
    x = c0 + (c1 - c0) * (-d0) / (d1 - d0)  # d(x) = 0; b is faster just after x
    return int(min(max(np.floor(x) + 1, c0 + 1), c1))


def choose_per_context(profile_table, latency, max_size: int, max_levels: int,
                       draft_cost: str = DEFAULT_DRAFT_COST, table: DPTable | None = None,
                       empty_rate: float = 0.0, measured_only: bool = False
                       ) -> list[ContextChoice]:
    """:func:`choose` at every measured context of ``latency``, ascending, as buckets of the
    context axis (see the module docstring): bucket i serves contexts ``start`` to
    ``end - 1``; the first starts at 0, the last has no end. A single-context table gives
    one bucket covering every context."""

    _check_latency(latency)
    contexts = contexts_of(latency)
    if table is None:
        table = solve(profile_table, max_size, max_levels)
    choices = [choose(profile_table, latency, max_size, max_levels, draft_cost, table,
                      empty_rate, measured_only, context=c) for c in contexts]
    starts = [0]
    for i in range(1, len(choices)):
        starts.append(crossover(choices[i - 1].tree, choices[i].tree, profile_table, latency,
                                contexts[i - 1], contexts[i], draft_cost, empty_rate))
    ends = starts[1:] + [None]
    return [ContextChoice(s, e, int(c) if c is not None else 0, ch)
            for s, e, c, ch in zip(starts, ends, contexts, choices)]
