"""Restricted tree families that serving engines can run, and the best member of each.

treeopt's exact DP (``treeopt.search.dp``) finds the best tree of any shape. Serving engines
draft only some shapes; these functions find the best tree an engine CAN run and say how much
expected tokens per step F that restriction costs against the unconstrained optimum at the
same node budget. Sizes count NODES, root included; ``steps`` = depth in edges.

``topk-per-level`` (EAGLE-2, SGLang; knobs top_k, steps, nodes). Level 1 holds the root's top
``k`` children. At every further level, the ``k`` nodes of the level above with the highest
scores (the beam) are expanded, each with its top ``k`` children (ranks 1..k); the expansion
stops after ``steps`` levels. Of all these candidates the ``nodes - 1`` with the highest
scores are kept, and the tree is the root plus them. That is EAGLE-2's ``topK_genrate``
(``top_k``; ``depth`` = steps - 1 expansion rounds after the first level; ``total_token`` =
nodes, root included) and SGLang's EAGLE worker (``speculative_eagle_topk``,
``speculative_num_steps`` = steps, ``speculative_num_draft_tokens`` = nodes, root included);
see ``treeopt.export`` for the sources. A node's score there is the draft's confidence in its
path (product of the draft's probabilities), so the tree changes from step to step. The static
member treeopt builds (:func:`topk_tree`) takes the profile's acceptance as that confidence:
score = product along the path of ``p[rank]``, with each profile row made non-increasing in
rank first (``p'[r] = min(p[1..r])``: a draft's own probabilities fall with the rank, and it
keeps sibling ranks consecutive), ties going to the shallower, then the earlier-created node.
Its F is computed with the profile itself. For a profile whose rows already fall with the rank
the kept set is exactly the best ``nodes``-node subtree of the candidate tree (the top path
probabilities always form a tree), so the family member is the DP's optimum within the beam.

``uniform-per-level`` (vLLM's ``speculative_token_tree`` drafter). Every node of depth d has
the same number ``c[d+1] >= 1`` of children (ranks 1..c), down to the last level: the
SpecInfer expansion trees ``specinfer:c1,c2,...``. vLLM's EAGLE tree drafter takes the top
``c`` children of every node of a level (``child_drafts_per_level``), so it drafts exactly
these shapes. Its best member within a node budget is found by an exact DP over the subtree
size of one node per depth (all nodes of a depth root identical subtrees):
``G[a][m] = max_{c | m-1} 1 + S_a(c) * G[a+1][(m-1)/c]`` with ``S_a(c) = sum p[a][1..c]``.

Both searches are exact over their (few) parameters; ``tests/test_export.py`` checks them
against brute force over every member for small budgets.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np

from treeopt.errors import TreeoptError
from treeopt.limits import MAX_TREE_LEVELS, MAX_TREE_NODES, show_number
from treeopt.search.dp import DPError, profile_rows, solve
from treeopt.shapes import ShapeError, specinfer
from treeopt.tree import Tree

TOPK = "topk-per-level"
UNIFORM = "uniform-per-level"
FAMILIES = (TOPK, UNIFORM)
#: The engine each family is what it runs (``treeopt export --engine``).
FAMILY_ENGINES = {TOPK: ("sglang", "eagle"), UNIFORM: ("vllm",)}
#: Largest top_k the topk-per-level search tries (engines use 1-10; the beam's candidates
#: grow as top_k squared per level).
MAX_TOP_K = 64


class FamilyError(TreeoptError, ValueError):
    """A family search or member that cannot be built as asked (one-line message)."""


# ---------------------------------------------------------------------------- profiles
def _tables(p) -> tuple[np.ndarray, np.ndarray]:
    """(rows, scores): the profile as a float64 (R, W) array (``profile_rows``: one row per
    parent depth, rows past the end reuse the last) and its rows made non-increasing in rank,
    the confidence ordering the engines' drafts have."""

    try:
        rows = profile_rows(p)
    except DPError as exc:
        raise FamilyError(str(exc)) from None
    return rows, np.minimum.accumulate(rows, axis=1)


def _row(table: np.ndarray, depth: int, k: int) -> np.ndarray:
    """The first ``k`` ranks of the row for a parent at ``depth`` (zeros past the profile)."""
    row = table[min(depth, table.shape[0] - 1)]
    out = np.zeros(k)
    w = min(k, row.size)
    out[:w] = row[:w]
    return out


def _positive(x, what: str, minimum: int = 1) -> int:
    if isinstance(x, bool) or not isinstance(x, (int, np.integer)) or x < minimum:
        raise FamilyError(f"{what} must be an integer >= {minimum}, got {show_number(x)}")
    return int(x)


# ---------------------------------------------------------------------------- topk-per-level
class _Beam:
    """EAGLE-2 / SGLang's candidate tree for one ``top_k``, grown one level at a time, with
    the best ``keep`` candidates (by score, then depth, then creation order) kept after each
    level. ``parent``/``rank`` of every candidate allow rebuilding the kept tree."""

    def __init__(self, rows: np.ndarray, scores: np.ndarray, top_k: int, keep: int):
        self.rows, self.scores, self.k, self.keep = rows, scores, top_k, keep
        self.parent: list[np.ndarray] = []      # per level: global parent ids (-1 = root)
        self.rank: list[np.ndarray] = []        # per level: sibling ranks from 1
        self.level: tuple | None = None         # (ids, score, prob) of the last level
        self.count = 0
        empty = np.zeros(0)
        # the kept candidates: ids, scores, depths, probabilities of being reached
        self.kept = (np.zeros(0, np.int64), empty, np.zeros(0, np.int64), empty)
        self.steps = 0

    def grow(self) -> int:
        """Add the next level's candidates; returns how many of them are kept."""
        k, d = self.k, self.steps
        if d == 0:
            parents = np.array([-1])
            p_score, p_prob = np.ones(1), np.ones(1)
        else:
            ids, score, prob = self.level
            # the beam: the k best of the level above (ties: created first)
            order = np.lexsort((ids, -score))[:k]
            parents, p_score, p_prob = ids[order], score[order], prob[order]
        c_score = (p_score[:, None] * _row(self.scores, d, k)[None, :]).ravel()
        c_prob = (p_prob[:, None] * _row(self.rows, d, k)[None, :]).ravel()
        n = c_score.size
        c_ids = np.arange(self.count, self.count + n, dtype=np.int64)
        self.count += n
        self.parent.append(np.repeat(parents, k))
        self.rank.append(np.tile(np.arange(1, k + 1), parents.size))
        self.level = (c_ids, c_score, c_prob)
        self.steps += 1
        k_ids, k_score, k_depth, k_prob = self.kept
        ids = np.concatenate([k_ids, c_ids])
        score = np.concatenate([k_score, c_score])
        depth = np.concatenate([k_depth, np.full(n, self.steps, np.int64)])
        prob = np.concatenate([k_prob, c_prob])
        best = np.lexsort((ids, depth, -score))[: self.keep]
        self.kept = (ids[best], score[best], depth[best], prob[best])
        return int(np.count_nonzero(depth[best] == self.steps))

    @property
    def full(self) -> bool:
        return self.kept[0].size == self.keep

    @property
    def expected_tokens(self) -> float:
        """F of the kept tree: the root plus each kept node's probability of being reached."""
        return 1.0 + float(self.kept[3].sum())

    def tree(self) -> Tree:
        parent = np.concatenate(self.parent)
        rank = np.concatenate(self.rank)
        paths: dict[int, tuple[int, ...]] = {-1: ()}
        for i in sorted(int(x) for x in self.kept[0]):  # parents are created before children
            paths[i] = paths[int(parent[i])] + (int(rank[i]) - 1,)
        del paths[-1]
        return Tree.from_paths(paths.values())


def _check_topk(top_k, steps, nodes) -> tuple[int, int, int]:
    top_k = _positive(top_k, "top_k")
    steps = _positive(steps, "steps (tree depth)")
    nodes = _positive(nodes, "nodes (tree size, root included)", minimum=2)
    if nodes > MAX_TREE_NODES:
        raise FamilyError(f"nodes = {nodes} exceeds the limit of {MAX_TREE_NODES} tree nodes "
                          "(MAX_TREE_NODES)")
    top_k = min(top_k, nodes - 1)   # more children than drafted tokens cannot be kept
    steps = min(steps, nodes - 1)   # nor a deeper tree
    return top_k, steps, nodes


def topk_candidates(top_k: int, steps: int) -> int:
    """Candidates EAGLE-2 / SGLang draft for these knobs: top_k + (steps - 1) * top_k**2
    (the kept nodes, ``nodes - 1``, must not exceed it)."""
    return top_k + (steps - 1) * top_k * top_k


def topk_tree(p, top_k: int, steps: int, nodes: int) -> Tree:
    """The ``topk-per-level`` member for these knobs: the tree EAGLE-2 (top_k, depth =
    steps - 1, total_token = nodes) and SGLang (eagle_topk, num_steps, num_draft_tokens) build
    when the draft's confidence is the profile ``p``'s acceptance (module docstring).

    p: rank profile (W,) or depth-aware (R, W). Raises :class:`FamilyError` when the knobs
    draft fewer candidates than ``nodes - 1``."""
    top_k, steps, nodes = _check_topk(top_k, steps, nodes)
    if topk_candidates(top_k, steps) < nodes - 1:
        raise FamilyError(f"top_k {top_k} and {steps} steps draft only "
                          f"{topk_candidates(top_k, steps)} candidates, fewer than the "
                          f"{nodes - 1} drafted tokens of a {nodes}-node tree; raise top_k or "
                          "steps")
    rows, scores = _tables(p)
    beam = _Beam(rows, scores, top_k, nodes - 1)
    for _ in range(steps):
        beam.grow()
    return beam.tree()


def topk_members(p, nodes: int, max_steps: int, max_top_k: int = MAX_TOP_K
                 ) -> Iterator[tuple[int, int, float]]:
    """``(top_k, steps, F)`` of every distinct ``topk-per-level`` member of exactly ``nodes``
    nodes with depth at most ``max_steps``, top_k = 1..``max_top_k``. Steps past the last one
    that adds a node give the same tree and are not listed (deeper candidates all score below
    the kept ones); knobs drafting fewer than ``nodes - 1`` candidates are skipped."""
    nodes = _positive(nodes, "nodes (tree size, root included)", minimum=2)
    max_steps = min(_positive(max_steps, "max_steps (depth limit)"), nodes - 1)
    rows, scores = _tables(p)
    for k in range(1, min(_positive(max_top_k, "max_top_k"), nodes - 1) + 1):
        beam = _Beam(rows, scores, k, nodes - 1)
        while beam.steps < max_steps:
            added = beam.grow()
            if beam.full:
                if added == 0:
                    break
                yield k, beam.steps, beam.expected_tokens


# ---------------------------------------------------------------------------- uniform-per-level
def uniform_expansion(tree: Tree) -> list[int] | None:
    """``[c1, c2, ...]`` when every node of depth d has exactly c[d+1] children down to the
    last level (a ``uniform-per-level`` tree, vLLM's drafter family), else None."""
    out = []
    for level in tree.levels[:-1]:
        counts = {len(tree.children[n]) for n in level}
        if len(counts) != 1:
            return None
        out.append(counts.pop())
    return out


def uniform_tree(expansion: Sequence[int]) -> Tree:
    """The ``uniform-per-level`` tree with these children counts per level (``[]`` = the
    root alone)."""

    if not expansion:
        return Tree((-1,))
    try:
        return specinfer(list(expansion))
    except ShapeError as exc:
        raise FamilyError(str(exc)) from None


def best_uniform(p, budget: int, max_levels: int) -> tuple[float, list[int]]:
    """The best ``uniform-per-level`` tree of at most ``budget`` nodes and at most
    ``max_levels`` levels (root counted): ``(F, expansion)``, the smallest such tree on ties.

    Exact DP (module docstring): ``G[a][m]``, the best F of a uniform subtree of exactly m
    nodes whose root sits at depth a. Children counts beyond the profile's width W are never
    better (their ranks add nodes, not F), so c <= W: O(levels * budget * ln W) work."""
    budget = _positive(budget, "budget (tree size, root included)")
    levels = _positive(max_levels, "max_levels (levels, root counted)")
    if budget > MAX_TREE_NODES:
        raise FamilyError(f"budget = {budget} exceeds the limit of {MAX_TREE_NODES} tree nodes "
                          "(MAX_TREE_NODES)")
    levels = min(levels, budget, MAX_TREE_LEVELS)
    rows, _ = _tables(p)
    width = min(rows.shape[1], max(budget - 1, 1))
    gain = np.cumsum(rows[:, :width], axis=1)  # gain[a][c-1] = sum p[a][1..c]
    G = np.full((levels, budget + 1), -np.inf)
    G[:, 1] = 1.0
    for a in range(levels - 2, -1, -1):
        g = gain[min(a, gain.shape[0] - 1)]
        below = G[a + 1]
        for c in range(1, width + 1):
            j = np.arange(1, (budget - 1) // c + 1)   # each child subtree has j nodes
            sub = below[j]
            ok = np.isfinite(sub)               # -inf: no such subtree (0 * -inf is nan)
            value = np.full(j.size, -np.inf)
            value[ok] = 1.0 + g[c - 1] * sub[ok]
            np.maximum.at(G[a], 1 + c * j, value)
    col = G[0, 1:]
    m = int(np.argmax(col)) + 1
    best = float(col[m - 1])
    expansion = []
    for a in range(levels - 1):
        if m == 1:
            break
        g = gain[min(a, gain.shape[0] - 1)]
        options = [(1.0 + g[c - 1] * G[a + 1][(m - 1) // c], -c) for c in range(1, width + 1)
                   if (m - 1) % c == 0 and G[a + 1][(m - 1) // c] > -np.inf]
        value, neg_c = max(options)
        expansion.append(-neg_c)
        m = (m - 1) // -neg_c
    return best, expansion


# ---------------------------------------------------------------------------- the search
@dataclass
class FamilyResult:
    """The best member of ``family`` for a profile and budget, against the DP optimum.

    ``tree`` / ``expected_tokens``: the best member and its F. ``params``: the knobs that
    make it (topk-per-level: top_k, steps, nodes; uniform-per-level: expansion).
    ``optimum`` / ``optimum_tree``: the unconstrained DP optimum with at most ``budget`` nodes
    and ``max_levels`` levels. ``loss``: 1 - expected_tokens / optimum (the share of F the
    restriction costs). ``members``: (top_k, steps) members compared (topk-per-level)."""

    family: str
    tree: Tree
    expected_tokens: float
    params: dict
    optimum: float
    optimum_tree: Tree
    budget: int
    max_levels: int
    members: int | None
    notes: list[str] = field(default_factory=list)

    @property
    def loss(self) -> float:
        return 1.0 - self.expected_tokens / self.optimum if self.optimum > 0 else 0.0


def search_family(p, family: str, budget: int, max_levels: int,
                  max_top_k: int = MAX_TOP_K) -> FamilyResult:
    """The best tree of ``family`` (``FAMILIES``) for profile ``p`` with ``budget`` nodes
    (topk-per-level: exactly, as its engines verify exactly ``nodes``; uniform-per-level: at
    most) and at most ``max_levels`` levels, root counted; and the DP optimum it is compared
    with (at most ``budget`` nodes, same level limit)."""

    if family not in FAMILIES:
        raise FamilyError(f"unknown tree family {family!r}; use one of {', '.join(FAMILIES)}")
    budget = _positive(budget, "budget (tree size, root included)", minimum=2)
    levels = _positive(max_levels, "max_levels (levels, root counted)", minimum=2)
    if budget > MAX_TREE_NODES:
        raise FamilyError(f"budget = {budget} exceeds the limit of {MAX_TREE_NODES} tree nodes "
                          "(MAX_TREE_NODES)")
    levels = min(levels, budget)
    _tables(p)  # validates the profile once, before any work
    table = solve(p, budget, levels)
    optimum_tree = table.tree(budget, levels, at_most=True)
    optimum = float(table.value(budget, levels, at_most=True))
    notes: list[str] = []
    if family == TOPK:
        members = list(topk_members(p, budget, levels - 1, max_top_k))
        if not members:
            raise FamilyError(f"no top_k <= {max_top_k} reaches {budget} nodes within "
                              f"{levels} levels; allow more levels (--max-levels)")
        k, steps, value = max(members, key=lambda m: (m[2], -m[0], -m[1]))
        tree = topk_tree(p, k, steps, budget)
        params = {"top_k": k, "steps": steps, "nodes": budget}
        if budget - 1 > max_top_k and k == max_top_k:
            notes.append(f"top_k was searched up to {max_top_k} only")
    else:
        value, expansion = best_uniform(p, budget, levels)
        tree = uniform_tree(expansion)
        params = {"expansion": expansion}
        members = None
    return FamilyResult(family=family, tree=tree, expected_tokens=float(value), params=params,
                        optimum=optimum, optimum_tree=optimum_tree, budget=budget,
                        max_levels=levels, members=None if members is None else len(members),
                        notes=notes)


def family_meta(found: FamilyResult, family: str, budget: int, max_levels: int, *,
                depth_aware: bool, profile: str | None = None) -> dict:
    """The growmap metadata of a family search's best member: the family and its knobs, its
    F against the unconstrained optimum at the same budget and level limit, and the
    restriction's loss."""
    tree = found.tree
    return {"method": "family", "family": family, **found.params,
            "expected_tokens": found.expected_tokens, "dp_expected_tokens": found.optimum,
            "restriction_loss": found.loss, "budget": budget, "max_levels": max_levels,
            "size": tree.size, "depth": tree.depth, "depth_aware": depth_aware,
            "profile": None if profile is None else str(profile)}
