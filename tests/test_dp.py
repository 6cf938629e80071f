"""The exact DP against the reference optimum, brute force over every tree up to 9 nodes,
a faithful port of Sequoia's loop DP, and hand-computed trees."""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import pytest
from sequoia_reference_dp import reference_dp, reference_parents, reference_results

from treeopt.search.dp import DPError, solve
from treeopt.tree import Tree

REF_P = [.6, .1, .05, .03, .02, .015, .01, .008]
SEQUOIA_SHIPPED = [.63418, .10795, .05697, .02249, .01949, .01499, .0045, .003, .01199, .0045,
                   .0075, .0045, .006, .003, .0015, .003, .0015, .003, 0, .003, .003, .003, 0,
                   .0015, 0, .0015, 0, 0, 0, .0015, .0015, .0015]
BRUTE_MAX = 9


# ------------------------------------------------------------------ brute force
@lru_cache(maxsize=None)
def all_trees(max_nodes: int) -> tuple[Tree, ...]:
    """Every tree shape with up to ``max_nodes`` nodes: breadth-first parent arrays are
    exactly the non-decreasing sequences with parents[i] < i (Catalan many per size)."""
    out = []

    def grow(parents: list[int], limit: int) -> None:
        out.append(Tree(tuple(parents)))
        if len(parents) == limit:
            return
        i = len(parents)
        for p in range(max(parents[-1], 0) if i > 1 else 0, i):
            parents.append(p)
            grow(parents, limit)
            parents.pop()

    grow([-1], max_nodes)
    return tuple(out)


def brute(trees, p, n: int, levels: int, width: int, at_most: bool = False) -> float:
    best = -math.inf
    for t in trees:
        if (t.size == n or (at_most and t.size <= n)) and t.depth <= levels - 1 \
                and t.width <= width:
            best = max(best, t.expected_tokens(p))
    return best


def test_enumeration_counts_catalan():
    sizes = [t.size for t in all_trees(BRUTE_MAX)]
    assert [sizes.count(n) for n in range(1, BRUTE_MAX + 1)] == \
        [math.comb(2 * k, k) // (k + 1) for k in range(BRUTE_MAX)]


def _random_profile(rng, width: int, rows: int | None = None):
    def row(w):
        v = rng.dirichlet(np.ones(w + 1))[:w]
        return [float(x) for x in v]
    if rows is None:
        return row(width)
    return [row(width if r % 2 == 0 else max(1, width - 1)) for r in range(rows)]


@pytest.mark.parametrize("seed,width,rows", [
    (0, 1, None), (1, 2, None), (2, 3, None), (3, 5, None),
    (4, 2, 2), (5, 3, 3), (6, 4, 2), (7, 2, 5),
])
def test_dp_equals_brute_force(seed, width, rows):
    rng = np.random.default_rng(seed)
    p = _random_profile(rng, width, rows)
    trees = [t for t in all_trees(BRUTE_MAX) if t.width <= width]
    table = solve(p, BRUTE_MAX, BRUTE_MAX)
    w = table.width
    assert w == width
    for levels in range(1, BRUTE_MAX + 1):
        for n in range(1, BRUTE_MAX + 1):
            exact = brute(trees, p, n, levels, w)
            if exact == -math.inf:
                assert table.values[n, levels] == -math.inf
                with pytest.raises(DPError):
                    table.value(n, levels)
            else:
                assert table.value(n, levels) == pytest.approx(exact, abs=1e-12)
                tree = table.tree(n, levels)
                assert tree.size == n and tree.depth <= levels - 1 and tree.width <= w
                assert tree.expected_tokens(p) == pytest.approx(exact, abs=1e-12)
            at_most = brute(trees, p, n, levels, w, at_most=True)
            assert table.value(n, levels, at_most=True) == pytest.approx(at_most, abs=1e-12)
            t2 = table.tree(n, levels, at_most=True)
            assert t2.size <= n and t2.expected_tokens(p) == pytest.approx(at_most, abs=1e-12)


def test_reference_values_use_levels_counting_root():
    table = solve(REF_P, 256, 13)
    assert table.value(64, 12) == pytest.approx(3.47534, abs=1e-6)
    assert table.value(128, 12) == pytest.approx(3.747442, abs=1e-6)
    assert table.value(256, 12) == pytest.approx(3.981958, abs=1e-6)
    # counting edges instead (13 levels) gives a different optimum at n = 256
    assert table.value(256, 13) > 3.982
    tree = table.tree(256, 12)
    assert tree.depth == 11 and tree.expected_tokens(REF_P) == pytest.approx(
        table.value(256, 12), abs=1e-12)


@pytest.mark.parametrize("p,n,d", [(REF_P, 40, 8), (SEQUOIA_SHIPPED, 24, 5), ([.7, .2], 30, 6)])
def test_matches_sequoia_loop_port(p, n, d):
    T, branch_map = reference_dp(p, n, d)
    ref = np.array(reference_results(T))
    table = solve(p, n, d)
    assert (np.isinf(ref) == np.isinf(table.values)).all()
    finite = np.isfinite(ref)
    assert np.abs(ref[finite] - table.values[finite]).max() < 1e-12
    for m in (n // 2, n):
        ref_tree = Tree(tuple(reference_parents(T, branch_map, m, d)))
        assert ref_tree.expected_tokens(p) == pytest.approx(ref[m, d], abs=1e-12)
        assert table.tree(m, d) == ref_tree  # same arithmetic, same first-maximum ties


def test_hand_computed_trees():
    # chain profile: the only tree of n nodes within n levels is the chain
    table = solve([0.5], 6, 6)
    assert table.value(4, 4) == pytest.approx(1 + .5 + .25 + .125)
    assert table.tree(4, 4) == Tree((-1, 0, 1, 2))
    assert table.values[4, 3] == -math.inf
    # two ranks, three nodes: two root children (1.8) vs chain 1 + .5 + .25 = 1.75
    table = solve([0.5, 0.3], 3, 3)
    assert table.value(3, 3) == pytest.approx(1.8)
    assert table.tree(3, 3) == Tree((-1, 0, 0))
    assert table.value(3, 2) == pytest.approx(1.8)
    # depth-aware: the root's children are weak, deeper ones strong -> a chain wins
    table = solve([[0.5, 0.4], [0.9, 0.05]], 3, 3)
    assert table.value(3, 3) == pytest.approx(1 + .5 + .45)
    assert table.tree(3, 3) == Tree((-1, 0, 1))


def test_zero_probability_ranks_and_capacity():
    p = [0.5, 0.0, 0.2]
    table = solve(p, 20, 3)
    assert table.capacity(3) == 13
    assert table.value(13, 3) == pytest.approx(1 + .7 + .7 * .7)
    assert table.values[14, 3] == -math.inf
    with pytest.raises(DPError, match="largest: 13"):
        table.value(14, 3)
    # at most: extra zero-probability nodes never help, so the smallest optimum is returned
    assert table.best_size(20, 3) == 10  # ranks 1, 3 need the rank-2 placeholder
    assert table.tree(20, 3, at_most=True) == Tree((-1, 0, 0, 0, 1, 1, 1, 3, 3, 3))


def test_depth_rows_past_the_end_reuse_the_last_row():
    rows = [[.5, .3], [.7, .1]]
    a = solve(rows, 30, 7)
    b = solve(rows + [rows[-1]] * 5, 30, 7)
    c = solve([.6, .2], 30, 7)
    d = solve([[.6, .2]], 30, 7)
    assert np.array_equal(a.values, b.values)
    assert np.array_equal(c.values, d.values)
    for n in (10, 30):
        assert a.tree(n, 7).expected_tokens(rows) == pytest.approx(a.value(n, 7), abs=1e-12)


def test_table_is_monotone_and_reconstructs_everywhere():
    rng = np.random.default_rng(11)
    p = _random_profile(rng, 4, 3)
    table = solve(p, 40, 6)
    v = table.values
    finite = np.isfinite(v[1:, 1:])
    assert (np.diff(np.where(finite, v[1:, 1:], -1), axis=1) >= -1e-15).all()
    for n in range(1, 41):
        for levels in range(1, 7):
            if np.isfinite(v[n, levels]):
                t = table.tree(n, levels)
                assert t.size == n and t.depth < levels
                assert t.expected_tokens(p) == pytest.approx(v[n, levels], abs=1e-12)


@pytest.mark.parametrize("call,match", [
    (lambda: solve(REF_P, 0, 3), "budget must be at least 1"),
    (lambda: solve(REF_P, 5, 0), "level limit must be at least 1"),
    (lambda: solve([], 5, 3), "profile is empty"),
    (lambda: solve([.5, -.1], 5, 3), r"in \[0, 1\]"),
    (lambda: solve([.7, .6], 5, 3), "sums to"),
    (lambda: solve(REF_P, 5, 3).value(6, 3), "exceeds this table's max_size"),
    (lambda: solve(REF_P, 5, 3).value(5, 4), "exceed this table's max_levels 3"),
    (lambda: solve(REF_P, 5, max_levels=1).value(5, 1),
     r"5 nodes fits in 1 levels \(depth 0\)"),
    (lambda: solve(REF_P, 5, 3).tree(0, 3), "at least 1"),
])
def test_errors_are_one_line_value_errors(call, match):
    with pytest.raises(DPError, match=match) as info:
        call()
    assert isinstance(info.value, ValueError) and "\n" not in str(info.value)


def test_levels_and_depth_convert_in_one_place():
    """``levels`` count the root (the DP's limit, Sequoia's max_depth); ``depth`` counts edges
    (Tree.depth). A limit of L levels allows trees of depth L - 1 and no deeper."""
    from treeopt.search.dp import depth_for_levels, levels_for_depth

    assert levels_for_depth(0) == 1 and depth_for_levels(1) == 0
    assert all(depth_for_levels(levels_for_depth(d)) == d for d in range(50))
    table = solve([0.9], 10, max_levels=4)  # one rank: the optimum is the longest chain
    assert table.max_levels == 4 and not hasattr(table, "max_depth")
    assert table.tree(4, 4).depth == depth_for_levels(4) == 3
    assert table.tree(10, 4, at_most=True).depth == 3
    with pytest.raises(DPError, match=r"5 nodes fits in 4 levels \(depth 3\)"):
        table.value(5, 4)
