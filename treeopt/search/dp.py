"""Exact dynamic program for the tree shape with the most expected tokens per step.

Problem. Given a rank profile ``p`` (``p[k-1]`` = probability that the draft's k-th choice at
a node is the one accepted; 1-D), or a depth-aware profile ``p[a][k-1]`` for a parent at depth
``a`` (2-D; rows past the end reuse the last row), find for every size ``m`` and level limit
``l`` the tree maximising F(tree) = Σ_v Π_{edges on root→v} p[rank] (``Tree.expected_tokens``).

Units: levels and depth. The DP's limit ``l`` counts LEVELS, ROOT INCLUDED, exactly like
``max_depth`` in Sequoia's ``tree_search.py`` (its table ``T[m][l][b]`` has ``T[1][l][0] = 1``
for every ``l >= 1``); treeopt calls that number ``levels`` everywhere and keeps the word
``depth`` for edges (``Tree.depth``, shape strings such as ``dp:64x8``). A tree allowed ``l``
levels has ``Tree.depth <= l - 1``; a chain of ``n`` nodes needs ``l = n``. The two convert
in one place, :func:`levels_for_depth` / :func:`depth_for_levels`. With this convention the DP
reproduces the reference optimum F*(256, 12) = 3.981958 for p = [.6, .1, .05, .03, .02, .015,
.01, .008]; a limit of 12 edges (13 levels) would give 3.982934. Like Sequoia, a node has at
most W children, W = the profile's length (zero entries inside the profile are usable ranks,
ranks beyond it are not), so a tree of exactly ``m`` nodes may be impossible at small ``l``;
such entries are ``-inf``.

Recurrence. For a subtree whose root sits at absolute depth ``a`` with ``r`` levels left,
``T[a,r][b][m]`` = best F of a subtree of exactly ``m`` nodes whose root has exactly ``b``
children; ``T[a,r][0] = [m == 1]`` and children are added one rank at a time:

    T[a,r][b][m] = max_{y} T[a,r][b-1][y] + q_a[b] · C[m - y],   C = max_b' T[a+1,r-1][b']

a (max,+) convolution in ``m``, done here with numpy on a strided Toeplitz view. Only depths
``a < R`` (R = profile rows) differ, so tables are kept for ``a = min(depth, R - 1)``: a 1-D
profile costs L = ``max_levels`` convolution rounds of ``W`` convolutions, O(L·W·n²/2) in all.
All ``T`` vectors are kept (float64, (W+1)·(n+1) per (a, r)); the optimal tree is rebuilt by
recomputing each argmax from them, so no argmax tables are stored.

Limits (``treeopt.limits``). ``max_size`` and ``max_levels`` are at most ``MAX_TREE_NODES``
(the engine verifies a whole tree in one forward), ranks beyond ``max_size - 1`` are dropped
(no node of an n-node tree has more than n - 1 children, so the optimum is unchanged), and
:func:`solve` refuses up front, naming the numbers, a request whose tables or work exceed
``MAX_DP_BYTES`` / ``MAX_DP_OPS`` (see :func:`dp_cost`) instead of running for hours.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
from numpy.lib.stride_tricks import as_strided

from treeopt.errors import TreeoptError
from treeopt.limits import MAX_DP_BYTES, MAX_DP_OPS, MAX_TREE_LEVELS, check_nodes
from treeopt.tree import Tree

_BLOCK = 256  # rows of the Toeplitz view handled at once (bounds the scratch buffer)


class DPError(TreeoptError, ValueError):
    """Impossible request to the DP (bad profile, budget or level limit); one-line message."""


def levels_for_depth(depth: int) -> int:
    """Levels (root counted, Sequoia's ``max_depth``) of a tree ``depth`` edges deep."""
    return int(depth) + 1


def depth_for_levels(levels: int) -> int:
    """Depth in edges (``Tree.depth``) of a tree with ``levels`` levels, root counted."""
    return int(levels) - 1


def profile_rows(p: Sequence[float] | Sequence[Sequence[float]] | np.ndarray) -> np.ndarray:
    """Normalise a rank profile to a float64 array (R, W): one row per parent depth.

    A 1-D profile gives R = 1. Rows of a 2-D profile may differ in length; short rows are
    padded with zeros to the longest (W)."""
    if isinstance(p, np.ndarray) or hasattr(p, "numpy"):
        arr = np.asarray(p, dtype=np.float64)
        if arr.ndim not in (1, 2):
            raise DPError(f"profile must be 1-D or 2-D, got {arr.ndim}-D")
        rows = [arr] if arr.ndim == 1 else list(arr)
    else:
        rows = list(p)
        if rows and np.ndim(rows[0]) == 0:
            rows = [rows]
    if not rows or max(len(r) for r in rows) == 0:
        raise DPError("profile is empty: it needs at least p[1] (the top-1 acceptance rate)")
    width = max(len(r) for r in rows)
    out = np.zeros((len(rows), width), dtype=np.float64)
    for i, r in enumerate(rows):
        out[i, : len(r)] = np.asarray(r, dtype=np.float64)
    if not np.all(np.isfinite(out)) or out.min() < 0 or out.max() > 1:
        raise DPError("profile entries must be probabilities in [0, 1]")
    if out.sum(axis=1).max() > 1 + 1e-4:
        raise DPError(f"profile row sums to {out.sum(axis=1).max():.6f} > 1; rank acceptance "
                      "events are exclusive, so each row must sum to at most 1")
    return out


def _maxplus(a: np.ndarray, b: np.ndarray, scratch: tuple[np.ndarray, np.ndarray],
             out: np.ndarray) -> None:
    """out[m] = max_y a[y] + b[m - y] for m, y in 0..n (b[<0] = -inf). a, b, out: (n+1,).

    ``scratch`` = (pad (2(n+1),), work (min(_BLOCK, n+1), n+1)) reusable float64 buffers.
    Rows m are done in blocks; within a block only y < block end can contribute."""
    n1 = a.shape[0]
    pad, work = scratch
    pad[:n1] = -np.inf
    pad[n1:] = b
    finite = np.flatnonzero(np.isfinite(a))
    out.fill(-np.inf)
    if finite.size == 0 or not np.isfinite(b).any():
        return
    y0 = int(finite[0])
    s = pad.strides[0]
    for lo in range(y0 + 1, n1, _BLOCK):
        hi = min(lo + _BLOCK, n1)
        # view[i, j] = b[lo + i - (y0 + j)] = pad[n1 + lo + i - y0 - j]
        view = as_strided(pad[n1 + lo - y0:], shape=(hi - lo, hi - y0), strides=(s, -s),
                          writeable=False)
        w = work[: hi - lo, : hi - y0]
        np.add(view, a[y0:hi], out=w)
        np.max(w, axis=1, out=out[lo:hi])


@dataclass
class DPTable:
    """Result of :func:`solve`: every optimum F*(m, l) and what is needed to rebuild trees.

    ``values``: (max_size + 1, max_levels + 1) float64, ``values[m, l]`` = F*(m, l), the best
    expected tokens per step of a tree of exactly m nodes and at most l levels (root counted,
    Sequoia's convention; ``Tree.depth <= l - 1``); ``-inf`` where no such tree exists (row 0
    and column 0 are ``-inf``)."""

    rows: np.ndarray
    max_size: int
    max_levels: int
    values: np.ndarray
    _T: dict = field(repr=False)
    _best: dict = field(repr=False)
    _qc: dict = field(default_factory=dict, repr=False)

    @property
    def width(self) -> int:
        """Most children a node may have: the profile length W (at most ``max_size - 1``;
        further ranks cannot be used by a tree of ``max_size`` nodes and are dropped)."""
        return int(self.rows.shape[1])

    @property
    def depth_aware(self) -> bool:
        return self.rows.shape[0] > 1

    def capacity(self, levels: int) -> int:
        """Largest tree with at most ``levels`` levels and at most W children per node."""
        w = self.width
        return levels if w == 1 else (w ** levels - 1) // (w - 1)

    def _check(self, n: int, levels: int) -> None:
        if n < 1:
            raise DPError(f"tree size must be at least 1 (the root), got {n}")
        if levels < 1:
            raise DPError(f"the level limit must be at least 1 (the root), got {levels}")
        if n > self.max_size:
            raise DPError(f"size {n} exceeds this table's max_size {self.max_size}; "
                          "solve again with a larger max_size")
        if levels > self.max_levels:
            raise DPError(f"{levels} levels exceed this table's max_levels {self.max_levels}; "
                          "solve again with a larger max_levels")

    def best_size(self, n: int, levels: int) -> int:
        """Smallest m <= n reaching max_{m' <= n} F*(m', levels) (the "at most n nodes"
        optimum)."""
        self._check(n, levels)
        col = self.values[1 : n + 1, levels]
        return int(np.argmax(col)) + 1

    def value(self, n: int, levels: int, at_most: bool = False) -> float:
        """F*(n, levels): best expected tokens per step, exactly n nodes (or at most n with
        ``at_most``), at most ``levels`` levels counting the root."""
        self._check(n, levels)
        if at_most:
            n = self.best_size(n, levels)
        v = float(self.values[n, levels])
        if v == -np.inf:
            raise DPError(f"no tree of exactly {n} nodes fits in {levels} levels (depth "
                          f"{depth_for_levels(levels)}) with at most {self.width} children per "
                          f"node (largest: {self.capacity(levels)}); allow more levels or ask "
                          "for at most n nodes")
        return v

    def tree(self, n: int, levels: int, at_most: bool = False) -> Tree:
        """An optimal tree for (n, levels): breadth-first ids, children in rank order (the
        k-th child of a node is the draft's k-th choice). ``expected_tokens`` equals
        ``value``."""
        self.value(n, levels, at_most)  # validates
        if at_most:
            n = self.best_size(n, levels)
        nrows = self.rows.shape[0]
        parents = [-1]
        states = [(0, levels, n)]  # (row index of the node's depth, levels left, subtree size)
        i = 0
        while i < len(states):
            a, r, m = states[i]
            if m > 1:
                tb = self._T[(a, r)]
                b = int(np.argmax(tb[:, m]))
                child_a = min(a + 1, nrows - 1)
                c = self._child_vector(a, r)
                sizes = []
                for j in range(b, 0, -1):
                    # same arithmetic as the forward pass, so the argmax is exact
                    cand = c[j, m - 1 : 0 : -1] + tb[j - 1, 1:m]
                    y = int(np.argmax(cand)) + 1
                    sizes.append(m - y)
                    m = y
                for s in reversed(sizes):
                    parents.append(i)
                    states.append((child_a, r - 1, s))
            i += 1
        return Tree(tuple(parents))

    def _child_vector(self, a: int, r: int) -> np.ndarray:
        """(W+1, n+1) ``q_a[b] · C`` rows, rebuilt exactly as in the forward pass."""
        if (a, r) not in self._qc:
            self._qc[(a, r)] = _scaled_children(self.rows, self._best, a, r)
        return self._qc[(a, r)]


def _scaled_children(rows: np.ndarray, best: dict, a: int, r: int) -> np.ndarray:
    """(W+1, n+1): row b is q_a[b] · C with C the best child-subtree vector (-inf kept)."""
    nrows = rows.shape[0]
    c = best[(min(a + 1, nrows - 1), r - 1)]
    q = np.concatenate(([0.0], rows[a]))
    finite = np.isfinite(c)
    out = np.full((q.size, c.size), -np.inf)
    out[:, finite] = q[:, None] * c[finite][None, :]
    return out


def dp_cost(rows: int, width: int, max_size: int, max_levels: int) -> tuple[int, int]:
    """(bytes of tables kept, (max,+) additions) of :func:`solve` for a profile of ``rows``
    depth rows and ``width`` ranks (after dropping ranks beyond ``max_size - 1``)."""
    n1 = max_size + 1
    rows = max(1, min(rows, max_levels))
    width = max(1, min(width, max_size - 1))
    # one (W+1, n+1) table per (a, r) with 2 <= r <= max_levels, a < min(rows, max_levels-r+1)
    tables = sum(min(rows, max_levels - r + 1) for r in range(2, max_levels + 1))
    nbytes = 8 * (tables * (width + 1) * n1 + n1 * (max_levels + 1) + 2 * tables * n1)
    ops = tables * width * n1 * n1 // 2
    return nbytes, ops


def solve(p, max_size: int, max_levels: int) -> DPTable:
    """Solve the DP for every size m <= ``max_size`` and level limit l <= ``max_levels``.

    p: 1-D rank profile (W,) or depth-aware (R, W) (list, numpy array or tensor).
    ``max_levels`` counts levels including the root (Sequoia's ``max_depth``; a depth limit of
    D edges is ``levels_for_depth(D)`` = D + 1 levels). Both are capped (``MAX_TREE_NODES``)
    and the whole request is sized before any work: see the module docstring."""
    rows = profile_rows(p)
    if isinstance(max_size, bool) or not isinstance(max_size, (int, np.integer)):
        raise DPError(f"budget must be an integer number of nodes, got {max_size!r}")
    if isinstance(max_levels, bool) or not isinstance(max_levels, (int, np.integer)):
        raise DPError(f"the level limit must be an integer number of levels, got {max_levels!r}")
    max_size, max_levels = int(max_size), int(max_levels)
    if max_size < 1:
        raise DPError(f"budget must be at least 1 node (the root), got {max_size}")
    if max_levels < 1:
        raise DPError(f"the level limit must be at least 1 (the root), got {max_levels}")
    check_nodes(max_size, "budget (tree size)", DPError)
    if max_levels > MAX_TREE_LEVELS:
        raise DPError(f"level limit = {max_levels} (a max depth of "
                      f"{depth_for_levels(max_levels)} edges) exceeds the limit of "
                      f"{MAX_TREE_LEVELS} levels (a tree within the node cap, MAX_TREE_NODES, "
                      "has no more levels)")
    nrows = min(rows.shape[0], max_levels)
    rows = rows[:nrows, : max(1, min(rows.shape[1], max_size - 1))]
    width = rows.shape[1]
    nbytes, ops = dp_cost(nrows, width, max_size, max_levels)
    if nbytes > MAX_DP_BYTES or ops > MAX_DP_OPS:
        raise DPError(f"DP for size {max_size}, {max_levels} levels, {width} ranks, {nrows} "
                      f"depth row(s) needs {nbytes / 2**30:.1f} GiB and {ops:.2e} operations, "
                      f"over the limits ({MAX_DP_BYTES / 2**30:.0f} GiB, {MAX_DP_OPS:.0e}); "
                      "lower the budget or the level limit")
    n1 = max_size + 1
    unit = np.full(n1, -np.inf)
    if n1 > 1:
        unit[1] = 1.0
    pad = np.empty(2 * n1)
    work = np.empty((min(_BLOCK, n1), n1))
    T: dict = {}
    best: dict = {}
    for a in range(nrows):
        best[(a, 1)] = unit
    for r in range(2, max_levels + 1):
        # absolute depth a of the subtree root satisfies a + r <= max_levels
        for a in range(min(nrows, max_levels - r + 1)):
            qc = _scaled_children(rows, best, a, r)
            tb = np.empty((width + 1, n1))
            tb[0] = unit
            for b in range(1, width + 1):
                _maxplus(tb[b - 1], qc[b], (pad, work), tb[b])
            T[(a, r)] = tb
            best[(a, r)] = tb.max(axis=0)
    values = np.full((n1, max_levels + 1), -np.inf)
    for l in range(1, max_levels + 1):
        values[:, l] = best[(0, l)]
    values[0, :] = -np.inf
    return DPTable(rows=rows, max_size=max_size, max_levels=max_levels, values=values,
                   _T=T, _best=best)
