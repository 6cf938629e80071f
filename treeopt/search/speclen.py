"""Per-step speculation size for model-free drafters: how many of the drafted nodes to verify.

A model-free drafter drafts for free (microseconds), so every step it can propose its largest
candidate tree and let this module keep the part worth verifying. Inputs: the candidate tree
(parents), each node's conditional acceptance a(v) = P(v accepted | parent accepted, what
the drafter knew), from ``treeopt.profile.copytable``, and the cost of a step that verifies n
nodes (root included), ``cost[n - 1]`` in ms: t_verify(n) from the measured latency curve
plus the draft's cost (about 0 for model-free drafters).

What :func:`choose_nodes` maximises, and why it is exact. Let V(v) = Π_{u on root→v} a(u)
(V(root) = 1). Node v is on the accepted path exactly when every node from the root to it is
accepted, so P(v on path) = V(v) (the chain rule of the conditionals), and a step verifying a
parent-closed set S produces 1 + (accepted nodes) tokens; by linearity of expectation

    E[tokens](S) = Σ_{v∈S} V(v)        (the root's 1 is the bonus token).

For a chain of L drafted tokens this is E[tokens](L) = 1 + Σ_{i<=L} Π_{j<=i} a_j. The step's
cost depends on |S| only, so the objective is R(S) = E[tokens](S) / cost(|S|), tokens per ms
of this step, over the parent-closed S containing the root (|S| = 1: no speculation, a plain
step). Since every a <= 1, V(child) <= V(parent). Order the nodes by (V descending, id
ascending), parents before children in id order: a parent precedes each of its children, so
every prefix of that order is parent-closed, and the n-prefix holds the n largest values. Any
parent-closed S of size n therefore has E[tokens](S) <= E[tokens](n-prefix), at the same cost,
and max_S R(S) = max_n F(n) / cost(n) with F(n) the n-prefix sum: one sort, one cumulative
sum. (The tests check it against enumeration of every parent-closed subset.)

What it does not claim: it maximises this step's ratio. The long-run rate of a sequence of
steps is Σ tokens / Σ cost; a policy maximising E[tokens] - λ·cost with λ the optimal rate
(Dinkelbach) can differ from the per-step ratio when states differ a lot between steps. The
per-step ratio never chooses a step slower per token than plain decoding would be predicted
to be when n = 1 is a candidate: R(S*) >= R({root}) = 1 / t(1).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import numpy as np

from treeopt.errors import TreeoptError


class SpecLenError(TreeoptError, ValueError):
    """Bad input to the per-step size choice; one line."""


class StepChoice(NamedTuple):
    """The nodes to verify (ids of the candidate tree, ascending, root first), their expected
    tokens, the step's cost in ms and the ratio tokens / ms."""

    nodes: list[int]
    expected_tokens: float
    cost_ms: float

    @property
    def tokens_per_ms(self) -> float:
        return self.expected_tokens / self.cost_ms


def node_values(parents: Sequence[int], accept: Sequence[float]) -> np.ndarray:
    """(n,) V(v) = Π a(u) over the path root→v; ``accept[0]`` (the root's) is ignored.
    ``parents``: parent ids, -1 for node 0, every parent numbered before its child."""
    n = len(parents)
    if n == 0 or parents[0] != -1:
        raise SpecLenError("a candidate tree starts with its root (parent -1)")
    if len(accept) != n:
        raise SpecLenError(f"{len(accept)} acceptance values for {n} nodes")
    v = np.ones(n, dtype=np.float64)
    for i in range(1, n):
        p = parents[i]
        a = float(accept[i])
        if not 0 <= p < i:
            raise SpecLenError(f"node {i} has parent {p}; parents come before children")
        if not (0.0 <= a <= 1.0) or math.isnan(a):
            raise SpecLenError(f"acceptance of node {i} is {a}; it must lie in [0, 1]")
        v[i] = v[p] * a
    return v


def _check_cost(cost_ms: Sequence[float], n: int) -> np.ndarray:
    cost = np.asarray(cost_ms, dtype=np.float64)
    if cost.ndim != 1 or cost.shape[0] < n:
        raise SpecLenError(f"need the cost of every size 1..{n}, got {cost.shape}")
    if not np.all(np.isfinite(cost[:n])) or np.any(cost[:n] <= 0):
        raise SpecLenError("step costs must be positive and finite")
    return cost[:n]


def choose_nodes(parents: Sequence[int], accept: Sequence[float], cost_ms: Sequence[float],
                 max_nodes: int | None = None) -> StepChoice:
    """The parent-closed node set S (root included) maximising Σ_{v∈S} V(v) / cost_ms[|S|-1]
    (exact; proof in the module docstring). ``cost_ms``: (m,) cost of verifying 1..m nodes,
    m >= the candidate tree's size (or ``max_nodes``). Ties go to the smaller set."""
    values = node_values(parents, accept)
    n = len(values) if max_nodes is None else max(1, min(len(values), int(max_nodes)))
    order = np.argsort(-values, kind="stable")[:n]  # (V desc, id asc): prefixes are closed
    cost = _check_cost(cost_ms, n)
    gain = np.cumsum(values[order])
    ratio = gain / cost
    best = int(np.argmax(ratio))  # first maximum: the smallest best set
    return StepChoice(sorted(int(v) for v in order[:best + 1]), float(gain[best]),
                      float(cost[best]))


def chain_length(accept: Sequence[float], cost_ms: Sequence[float]) -> int:
    """Drafted tokens L to verify from a chain with conditional acceptances ``accept``
    (a_1..a_D): argmax_L (1 + Σ_{i<=L} Π_{j<=i} a_j) / cost_ms[L] (the chain case of
    :func:`choose_nodes`, where ``cost_ms[L]`` is the cost of L + 1 nodes)."""
    d = len(accept)
    parents = [-1] + list(range(d))
    return len(choose_nodes(parents, [1.0] + list(accept), cost_ms).nodes) - 1


def cost_table(verify_ms, n: int, draft_ms: float = 0.0) -> np.ndarray:
    """(n,) cost of steps verifying 1..n nodes: ``verify_ms(k)`` (a latency curve, read
    through its monotone envelope by the caller) plus ``draft_ms`` for k >= 2 (a plain step
    drafts nothing)."""
    out = np.array([float(verify_ms(k)) for k in range(1, n + 1)], dtype=np.float64)
    out[1:] += float(draft_ms)
    return out


def alpha_budget(match_len: int, alpha: float, offset: float, max_tokens: int) -> int:
    """SuffixDecoding's speculation budget: ``min(max_tokens, floor(alpha * p + offset))``
    drafted tokens for a match of length p (never negative)."""
    return max(0, min(int(max_tokens), int(math.floor(alpha * match_len + offset + 1e-6))))


__all__ = ["SpecLenError", "StepChoice", "alpha_budget", "chain_length", "choose_nodes",
           "cost_table", "node_values"]
