"""The per-step speculation size (``treeopt.search.speclen``): hand-computed cases and the
exact choice against enumeration of every parent-closed node set of small random trees."""

import itertools
import random

import numpy as np
import pytest

from treeopt.search.speclen import (
    SpecLenError,
    alpha_budget,
    chain_length,
    choose_nodes,
    node_values,
)


def closed_subsets(parents):
    """Every parent-closed node set holding the root."""
    n = len(parents)
    for bits in itertools.product((0, 1), repeat=n - 1):
        s = {0} | {v for v in range(1, n) if bits[v - 1]}
        if all(parents[v] in s for v in s if v):
            yield s


def brute(parents, accept, cost):
    v = node_values(parents, accept)
    return max(sum(v[i] for i in s) / cost[len(s) - 1] for s in closed_subsets(parents))


def test_hand_computed_chain():
    # E(0) = 1 / 1, E(1) = 1.9 / 1.1 = 1.727, E(2) = (1 + .9 + .45) / 2 = 1.175
    assert chain_length([0.9, 0.5], [1.0, 1.1, 2.0]) == 1
    # verification almost free: take the whole chain
    assert chain_length([0.9, 0.5], [1.0, 1.01, 1.02]) == 2
    # nothing pays: a plain step
    assert chain_length([0.05, 0.05], [1.0, 1.5, 2.0]) == 0
    c = choose_nodes([-1, 0, 1], [1, 0.9, 0.5], [1.0, 1.1, 2.0])
    assert c.nodes == [0, 1]
    assert c.expected_tokens == pytest.approx(1.9)
    assert c.tokens_per_ms == pytest.approx(1.9 / 1.1)


def test_a_sibling_is_kept_when_it_pays():
    # root children 1 (a=.5) and 2 (a=.4), 1's child 3 (a=.9): values 1, .5, .4, .45
    parents, accept = [-1, 0, 0, 1], [1, 0.5, 0.4, 0.9]
    flat = [1.0, 1.0, 1.0, 1.0]
    assert choose_nodes(parents, accept, flat).nodes == [0, 1, 2, 3]
    steep = [1.0, 1.2, 1.8, 3.0]  # 1.5/1.2 = 1.25 > 1.95/1.8 = 1.083 > 2.35/3
    assert choose_nodes(parents, accept, steep).nodes == [0, 1]


@pytest.mark.parametrize("seed", range(40))
def test_choice_equals_brute_force_on_small_trees(seed):
    rng = random.Random(seed)
    n = rng.randint(1, 8)
    parents = [-1] + [rng.randrange(v) for v in range(1, n)]
    accept = [1.0] + [rng.choice([0.0, 1.0, rng.random()]) for _ in range(n - 1)]
    cost = np.cumsum([rng.uniform(0.5, 2.0)] + [rng.uniform(0.0, 1.0) for _ in range(n - 1)])
    if seed % 3 == 0:  # non-monotone costs are handled too
        cost = np.array([rng.uniform(0.5, 3.0) for _ in range(n)])
    got = choose_nodes(parents, accept, cost)
    assert got.tokens_per_ms == pytest.approx(brute(parents, accept, cost))
    s = set(got.nodes)
    assert 0 in s and all(parents[v] in s for v in s if v)
    assert got.expected_tokens == pytest.approx(sum(node_values(parents, accept)[list(s)]))


@pytest.mark.parametrize("seed", range(20))
def test_chain_length_equals_brute_force(seed):
    rng = random.Random(100 + seed)
    d = rng.randint(0, 12)
    a = [rng.random() ** 0.3 for _ in range(d)]
    cost = np.cumsum([1.0] + [rng.uniform(0, 0.4) for _ in range(d)])

    def e(L):
        return (1 + sum(np.prod(a[:i + 1]) for i in range(L))) / cost[L]

    best = max(range(d + 1), key=lambda L: (e(L), -L))
    assert chain_length(a, cost) == best


def test_alpha_budget_is_suffix_decodings_rule():
    assert alpha_budget(5, 1.0, 0.0, 16) == 5
    assert alpha_budget(5, 2.5, 1.0, 16) == 13
    assert alpha_budget(30, 1.0, 0.0, 16) == 16
    assert alpha_budget(3, 0.5, 0.0, 16) == 1
    assert alpha_budget(0, 1.0, -2.0, 16) == 0


def test_bad_input_gives_one_line_errors():
    with pytest.raises(SpecLenError, match="root"):
        node_values([0, 0], [1, 1])
    with pytest.raises(SpecLenError, match=r"\[0, 1\]"):
        node_values([-1, 0], [1, 1.5])
    with pytest.raises(SpecLenError, match="parents come before"):
        node_values([-1, 2, 0], [1, 1, 1])
    with pytest.raises(SpecLenError, match="every size"):
        choose_nodes([-1, 0, 1], [1, 1, 1], [1.0, 2.0])
    with pytest.raises(SpecLenError, match="positive"):
        choose_nodes([-1, 0], [1, 1], [1.0, 0.0])
