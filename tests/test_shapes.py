"""Shape library: sizes and structure of every baseline, the greedy, presets and spec parsing."""

import itertools

import pytest

from treeopt.growmap import save_growmap
from treeopt.profile import Profile
from treeopt.shapes import (
    PRESETS,
    ShapeError,
    chain,
    from_name,
    independent_chains,
    kary,
    specinfer,
    top_path_product,
)
from treeopt.tree import Tree

P = [0.6, 0.1, 0.05, 0.03, 0.02, 0.015, 0.01, 0.008]


def test_chain():
    assert chain(1) == Tree((-1,))
    t = chain(5)
    assert t.size == 5 and t.depth == 4 and t.width == 1
    assert t.parents == (-1, 0, 1, 2, 3)
    # F = 1 + .6 + .36 + .216 + .1296
    assert t.expected_tokens([0.6]) == pytest.approx(2.3056)


@pytest.mark.parametrize("k, depth, size",
                         [(1, 3, 4), (2, 0, 1), (2, 3, 15), (3, 2, 13), (4, 1, 5)])
def test_kary(k, depth, size):
    t = kary(k, depth)
    assert t.size == size and t.depth == depth
    assert all(len(c) in (0, k) for c in t.children)
    assert all(len(t.children[n]) == k for n in range(t.size) if t.depths[n] < depth)


def test_kary_hand_value():
    # binary depth 2 with p = (.6, .1): level 1 = .7; level 2 = .7 * .7 -> F = 1 + .7 + .49
    assert kary(2, 2).expected_tokens([0.6, 0.1]) == pytest.approx(2.19)


def test_independent_chains():
    t = independent_chains(4, 5)
    assert t.size == 21 and t.depth == 5 and t.width == 4
    assert t.children[0] == (1, 2, 3, 4)
    assert [t.ranks[i] for i in (1, 2, 3, 4)] == [1, 2, 3, 4]
    assert all(t.ranks[i] == 1 for i in range(5, 21))
    assert len(t.leaves) == 4
    # each root child continues as its own chain
    assert [len(t.path_to(leaf)) for leaf in t.leaves] == [6, 6, 6, 6]
    assert {t.path_to(leaf)[1] for leaf in t.leaves} == {1, 2, 3, 4}
    # F = 1 + sum_r p_r * (1 + .6 + .36) for r = 1, 2 with p = (.6, .1)
    assert independent_chains(2, 3).expected_tokens([0.6, 0.1]) == pytest.approx(1 + 0.7 * 1.96)


def test_specinfer():
    t = specinfer([1, 1, 3, 1, 1, 1, 1, 1])
    assert t.size == 1 + 1 + 1 + 3 * 6 and t.depth == 8
    assert [len(level) for level in t.levels] == [1, 1, 1, 3, 3, 3, 3, 3, 3]
    assert specinfer([2, 2, 2]) == kary(2, 3)
    assert specinfer([1] * 4) == chain(5)
    with pytest.raises(ShapeError, match="empty"):
        specinfer([])
    with pytest.raises(ShapeError, match=r"expansion\[1\] must be an integer >= 1"):
        specinfer([2, 0])


def brute_force_best(p, size):
    """Best F over every tree of ``size`` nodes (breadth-first parent arrays)."""
    best = 0.0
    for tail in itertools.product(range(size), repeat=size - 1):
        parents = (-1,) + tail
        try:
            t = Tree(parents)
        except ValueError:
            continue
        best = max(best, t.expected_tokens(p))
    return best


@pytest.mark.parametrize("size", [1, 2, 4, 6])
def test_top_path_product_optimal_for_decreasing_p(size):
    p = [0.5, 0.2, 0.1]
    assert top_path_product(p, size).expected_tokens(p) == pytest.approx(brute_force_best(p, size))


def test_top_path_product_structure():
    t = top_path_product(P, 8)
    # path probs: .6 .36 .216 .1296 .1 .078 .06 ... -> chain of 5, then rank 2 at root (.1),
    # then (.6, .1) = .06 vs (.6^4) = .1296 ... greedy picks the 7 largest candidates
    probs = sorted(t.path_probs(P)[1:], reverse=True)
    assert t.size == 8
    assert probs == pytest.approx(sorted(probs, reverse=True))
    assert t.expected_tokens(P) == pytest.approx(1 + 0.6 + 0.36 + 0.216 + 0.1296 + 0.1
                                                 + 0.07776 + 0.06)
    assert top_path_product(P, 20, max_depth=2).depth <= 2
    with pytest.raises(ShapeError, match="cannot place"):
        top_path_product([0.5], 5, max_depth=0)


def test_top_path_product_depth_aware():
    table = [[0.9, 0.05], [0.01, 0.0]]  # (0, 0) = .009 < (1,) = .05: the tree stays wide
    t = top_path_product(table, 3)
    assert t.children[0] == (1, 2)


def test_non_monotone_profile_keeps_ranks_consecutive():
    p = [0.5, 0.0, 0.3]
    t = top_path_product(p, 4)
    for kids in t.children:
        assert [t.ranks[k] for k in kids] == list(range(1, len(kids) + 1))


def test_presets():
    t = PRESETS["mc_sim_7b_63"].tree()
    assert t.size == 64 and t.depth == 4 and t.width == 10
    assert len(t.children[0]) == 10
    assert from_name("medusa-63") == t
    assert PRESETS["mc_sim_7b_63"].source.startswith("Medusa")
    ex = from_name("sequoia-example-8")
    assert ex.to_successors() == [[1, 2, 3], [4, 5], [6], [], [7], [], [], []]


def test_from_name_specs(tmp_path):
    assert from_name("chain:8") == chain(8)
    assert from_name("kary:2x3") == kary(2, 3)
    assert from_name("chains:4x5") == independent_chains(4, 5)
    assert from_name("specinfer:1,1,3,1,1,1,1,1") == specinfer([1, 1, 3, 1, 1, 1, 1, 1])
    assert from_name("paths:[[0],[1],[0,0]]") == Tree((-1, 0, 0, 1))
    assert from_name("parents:[-1,0,0,1]") == Tree((-1, 0, 0, 1))
    prof = Profile(P)
    assert from_name("greedy:16", prof) == top_path_product(P, 16)
    assert from_name("greedy:16x2", prof) == top_path_product(P, 16, max_depth=2)
    assert from_name("greedy:16", P) == top_path_product(P, 16)
    save_growmap(kary(3, 2), tmp_path / "k.pt")
    assert from_name(str(tmp_path / "k.pt")) == kary(3, 2)


def test_from_name_dp_matches_reference():
    pytest.importorskip("treeopt.search.dp")
    t = from_name("dp:64", Profile(P))
    assert t.size == 64
    assert t.expected_tokens(P) == pytest.approx(3.47534, abs=1e-5)  # DESIGN reference


@pytest.mark.parametrize("spec, pattern", [
    ("tree:5", "unknown shape 'tree:5'"),
    ("chain:x", "'x' is not an integer"),
    ("chain:0", "chain size must be an integer >= 1"),
    ("kary:2", "expected two numbers like 4x5"),
    ("greedy:10", "needs an acceptance profile"),
    ("dp:10", "needs an acceptance profile"),
    ("paths:[[1]]", "sibling rank 0 is missing"),
    ("paths:{", "not a JSON list"),
    ("parents:[0]", "node 0 must be the root"),
    ("missing.pt", "no such growmap file"),
])
def test_from_name_errors(spec, pattern):
    with pytest.raises(ValueError, match=pattern) as info:
        from_name(spec)
    assert "\n" not in str(info.value)
