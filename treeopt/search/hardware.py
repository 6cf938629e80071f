"""Hardware-aware choice of tree size and depth, and step-time predictions for any tree.

Cost model. One speculative step = drafting the tree + one target forward over all ``n`` tree
nodes (root included), so it produces F(tree) tokens in ``draft_ms + t_target(n)``; plain
decoding produces one token per ``t_target(1)``. Hence

    tokens/s = 1000 · F / step_ms,      speedup = t_target(1) · F / step_ms.

Draft cost, ``draft_cost=``:

- ``"sequoia"`` (Sequoia's ``tree_search.py``): ``levels · t_draft(1)``, levels = tree depth
  + 1 = the DP's depth limit ``l`` (root counted). Sequoia's engine does exactly that many
  draft forwards per step: one over the new root (the bonus token) and one per tree level
  after it, each as if it cost one token's forward.
- ``"per-level"``: what treeopt's engine runs: one draft forward per level that has children,
  charged for the nodes it expands, ``Σ_k t_draft(#nodes of level k with children)`` (the leaf
  level is never fed to the draft). With a flat draft curve it is ``"sequoia"`` minus one
  forward.

A size-1 tree is plain decoding and costs no draft time under either model.

Steps with nothing to propose (``empty_rate``). A model-free drafter (n-gram, datastore)
proposes nothing where its index has no match; such a step is a plain decoding step costing
``t_target(1)`` and yielding one token. With a fraction ``e`` of such steps (measured by the
acceptance profiler, ``empty_step_rate``) a tree's step costs
``e · t_target(1) + (1 - e) · (draft_ms + t_target(n))`` on average, while F is unchanged (the
profile counts empty steps as "none accepted"). Model drafters always propose: ``e = 0``.

What is exact and what is not. With ``"sequoia"``, :func:`choose` is exact: F*(n, l) is the DP
optimum and the cost depends on (n, l) only, so every n <= max_size and l <= max_depth is
scored and the minimum of ``(l · t_draft(1) + t_target(n)) / F*(n, l)`` is returned (what
Sequoia computes, over every size instead of a hand-typed list). With ``"per-level"`` the cost
depends on the tree's level widths, so the true optimum would need a different DP; here each
(n, l) is scored on the DP's F-optimal tree for (n, l) — a heuristic, exact only among those
trees ((n, l) whose optimum F*(n, l) = F*(n, l - 1) is already reached with fewer levels is
scored at l - 1 only). That search is pruned safely with the lower bound
``(l · min_q t_draft(q) + t_target(n)) / F*(n, l)``, so no candidate that could beat the
returned one is skipped. Sizes beyond the latency table's last point use the curve's linear
extrapolation.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from treeopt.search.dp import DPTable, solve
from treeopt.tree import Tree

DRAFT_COSTS = ("sequoia", "per-level")


class HardwareError(ValueError):
    """Impossible hardware-aware request (no latency table, bad cost model); one line."""


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
    """Outcome of :func:`choose`. ``depth`` is the DP level limit (root counted, Sequoia's
    convention) so ``table.tree(size, depth)`` rebuilds ``tree``; ``tree.depth`` = depth - 1.

    ``candidates``: one dict per size shown (powers of two, the latency table's measured
    sizes and the chosen size, all <= max_size) with that size's best depth: keys size,
    depth, tree_depth, F, step_ms, tokens_per_s, speedup."""

    size: int
    depth: int
    tree: Tree
    expected_tokens: float
    step_ms: float
    tokens_per_s: float
    speedup: float
    candidates: list[dict] = field(default_factory=list)
    draft_cost: str = "sequoia"
    plain_ms: float = float("nan")


def _check_cost(draft_cost: str) -> None:
    if draft_cost not in DRAFT_COSTS:
        raise HardwareError(f"unknown draft cost model {draft_cost!r}; use one of "
                            f"{', '.join(DRAFT_COSTS)}")


def _check_latency(latency) -> None:
    if latency is None or getattr(latency, "target", None) is None:
        raise HardwareError("no target latency table: profile latency first (treeopt profile "
                            "--latency) or give a fixed --budget")


def draft_ms(tree: Tree, latency, draft_cost: str = "sequoia") -> float:
    """Draft time of one step for ``tree`` under the cost model (0 if no draft curve, and 0
    for a size-1 tree, which is plain decoding: nothing is drafted).

    sequoia: Sequoia's charge, one draft forward per level counting the root,
    ``levels * t_draft(1)``. per-level: what treeopt's engine runs, one draft forward per level
    that has children, over the nodes it expands: ``sum t_draft(expanded nodes at level)``."""
    _check_cost(draft_cost)
    curve = getattr(latency, "draft", None)
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
    if not 0.0 <= empty_rate < 1.0:
        raise HardwareError(f"empty_rate must be in [0, 1), got {empty_rate}")


def predict(tree: Tree, profile_table, latency, draft_cost: str = "sequoia",
            empty_rate: float = 0.0) -> Prediction:
    """Step time, expected tokens, tokens/s and speed-up over plain decoding for any tree.

    profile_table: 1-D rank profile (W,) or depth-aware (R, W), as ``Tree.expected_tokens``.
    latency: ``treeopt.profile.Latency`` (``target(n)`` and optional ``draft(n)`` in ms).
    empty_rate: fraction of steps that propose nothing (see the module docstring); the draft
    and verify times are then averages over all steps."""
    _check_latency(latency)
    _check_empty(empty_rate)
    f = tree.expected_tokens(profile_table)
    plain = float(latency.target(1))
    d_ms = draft_ms(tree, latency, draft_cost)
    v_ms = float(latency.target(tree.size))
    if tree.size > 1 and empty_rate:
        d_ms, v_ms = (1 - empty_rate) * d_ms, empty_rate * plain + (1 - empty_rate) * v_ms
    step = d_ms + v_ms
    return Prediction(size=tree.size, depth=tree.depth, expected_tokens=f, draft_ms=d_ms,
                      verify_ms=v_ms, step_ms=step, tokens_per_s=1000.0 * f / step,
                      plain_ms=plain, speedup=plain * f / step)


def _display_sizes(latency, max_size: int, chosen: int) -> list[int]:
    sizes = {1 << k for k in range(max_size.bit_length()) if 1 << k <= max_size}
    sizes.update(int(t) for t in getattr(latency.target, "tokens", []) if 1 <= int(t) <= max_size)
    sizes.add(chosen)
    return sorted(sizes)


def choose(profile_table, latency, max_size: int, max_depth: int,
           draft_cost: str = "sequoia", table: DPTable | None = None,
           empty_rate: float = 0.0) -> Choice:
    """Pick the (size, depth) with the most tokens/s; see the module docstring for the model.

    profile_table: 1-D (W,) or depth-aware (R, W) rank profile. ``max_depth`` counts levels
    including the root. ``table``: a :func:`treeopt.search.dp.solve` result to reuse (must
    cover max_size and max_depth). ``empty_rate``: fraction of steps that propose nothing."""
    _check_cost(draft_cost)
    _check_latency(latency)
    _check_empty(empty_rate)
    e = float(empty_rate)
    if table is None:
        table = solve(profile_table, max_size, max_depth)
    elif table.max_size < max_size or table.max_depth < max_depth:
        raise HardwareError(f"DP table covers size {table.max_size}, depth {table.max_depth}; "
                            f"need {max_size}, {max_depth}")
    F = table.values[1 : max_size + 1, 1 : max_depth + 1]  # (n, l), index n-1, l-1
    sizes = np.arange(1, max_size + 1)
    levels = np.arange(1, max_depth + 1)
    verify = np.array([float(latency.target(int(n))) for n in sizes])
    if verify.min() <= 0:
        bad = int(sizes[np.argmax(verify <= 0)])
        raise HardwareError(f"the target latency curve predicts {verify.min():.3f} ms at "
                            f"{bad} tokens (extrapolated); lower max_size to the measured range")
    plain = float(latency.target(1))
    curve = getattr(latency, "draft", None)
    t1 = float(curve(1)) if curve is not None else 0.0
    with np.errstate(invalid="ignore", divide="ignore"):
        step_seq = e * plain + (1 - e) * (levels[None, :] * t1 + verify[:, None])
        step_seq[0, :] = verify[0]  # size 1 is plain decoding: no draft forward
        ratio_seq = np.where(np.isfinite(F), step_seq / F, np.inf)

    scored: dict[tuple[int, int], tuple[float, Tree | None]] = {}

    def score(n: int, l: int) -> float:
        """ms per token of (n, l) under the chosen model (inf if infeasible)."""
        if (n, l) not in scored:
            if not np.isfinite(F[n - 1, l - 1]):
                scored[(n, l)] = (np.inf, None)
            elif draft_cost == "sequoia":
                scored[(n, l)] = (float(ratio_seq[n - 1, l - 1]), None)
            else:
                tree = table.tree(n, l)
                step = draft_ms(tree, latency, draft_cost) + verify[n - 1]
                if n > 1:
                    step = e * plain + (1 - e) * step
                scored[(n, l)] = (step / float(F[n - 1, l - 1]), tree)
        return scored[(n, l)][0]

    if draft_cost == "sequoia":
        flat = np.lexsort((np.broadcast_to(sizes[:, None], F.shape).ravel(),
                           np.broadcast_to(levels[None, :], F.shape).ravel(),
                           ratio_seq.ravel()))
        n_best, l_best = divmod(int(flat[0]), max_depth)
        n_best, l_best = n_best + 1, l_best + 1
    else:
        tmin = min(float(curve(int(q))) for q in sizes) if curve is not None else 0.0
        deeper = np.ones_like(F, dtype=bool)
        deeper[:, 1:] = F[:, 1:] > F[:, :-1]  # a shallower limit reaches the same optimum
        with np.errstate(invalid="ignore", divide="ignore"):
            lower = e * plain + (1 - e) * (levels[None, :] * tmin + verify[:, None])
            lower[0, :] = verify[0]  # size 1: no draft forward
            bound = np.where(np.isfinite(F) & deeper, lower / F, np.inf)
        order = np.argsort(bound, axis=None, kind="stable")
        best = (np.inf, 1, 1)
        for idx in order:
            n, l = divmod(int(idx), max_depth)
            if bound.flat[idx] >= best[0] or not np.isfinite(bound.flat[idx]):
                break
            s = score(n + 1, l + 1)
            if s < best[0]:
                best = (s, n + 1, l + 1)
        _, n_best, l_best = best
        if not np.isfinite(best[0]):
            raise HardwareError("no feasible tree for these limits")

    tree = scored.get((n_best, l_best), (None, None))[1] or table.tree(n_best, l_best)
    pred = predict(tree, profile_table, latency, draft_cost, e)

    candidates = []
    for n in _display_sizes(latency, max_size, n_best):
        ls = [l for l in levels if np.isfinite(F[n - 1, l - 1])
              and (l == 1 or F[n - 1, l - 1] > F[n - 1, l - 2])]
        if not ls:
            continue
        l = min(ls, key=lambda l: (score(n, int(l)), l))
        s = score(n, int(l))
        f = float(F[n - 1, l - 1])
        candidates.append({"size": int(n), "depth": int(l),
                           "tree_depth": int(table.tree(n, int(l)).depth), "F": f,
                           "step_ms": s * f, "tokens_per_s": 1000.0 / s,
                           "speedup": plain / s})
    return Choice(size=n_best, depth=l_best, tree=tree, expected_tokens=pred.expected_tokens,
                  step_ms=pred.step_ms, tokens_per_s=pred.tokens_per_s, speedup=pred.speedup,
                  candidates=candidates, draft_cost=draft_cost, plain_ms=plain)
