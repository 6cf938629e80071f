"""Stochastic tree decoding is lossless end to end: on a tiny 8-token model the engine's
distribution of generated token pairs matches the target's exact distribution (computed by
enumerating every continuation), for Sequoia's and SpecInfer's rules, trees and chains,
temperature and top-p; a deliberately broken rule fails the same test."""


import pytest
import torch
from helpers import NEW, PROMPT, exact, pair
from lossless import pair_pvalues

import treeopt.decode.verify as verify_module
from treeopt.decode.sampling import verify_children
from treeopt.testing import decode
from treeopt.tree import Tree

TREE = Tree.from_parents([-1, 0, 0, 0, 1, 1, 2])
CHAIN = Tree.from_parents([-1, 0, 1])



def sample(tree, rule, temperature, top_p, n) -> torch.Tensor:
    target, draft = pair()
    return torch.tensor([decode(target, draft, tree, PROMPT, max_new_tokens=NEW,
                                  temperature=temperature, top_p=top_p, rule=rule,
                                  seed=s).tokens for s in range(n)])


@pytest.mark.parametrize("tree,rule,temperature,top_p,n", [
    (TREE, "sequoia", 1.0, 1.0, 1000),
    (TREE, "specinfer", 0.7, 0.9, 1000),
    (CHAIN, "sequoia", 0.7, 0.9, 400),
])
def test_engine_sampling_is_lossless(tree, rule, temperature, top_p, n):
    samples = sample(tree, rule, temperature, top_p, n)
    assert min(pair_pvalues(samples, exact(temperature, top_p))) > 1e-3


def test_broken_rule_fails_the_engine_test(monkeypatch):
    def keep_q(p, q, children, rule, generator):
        return verify_children(p, q, children, "specinfer", generator)

    monkeypatch.setattr(verify_module, "verify_children", keep_q)
    samples = sample(TREE, "sequoia", 1.0, 1.0, 300)
    assert min(pair_pvalues(samples, exact(1.0, 1.0))) < 1e-6


def test_seed_reproduces_and_stats_add_up():
    target, draft = pair()
    runs = [decode(target, draft, TREE, PROMPT, max_new_tokens=30, temperature=1.0,
                     seed=s) for s in (11, 11, 12)]
    assert runs[0].tokens == runs[1].tokens != runs[2].tokens
    s = runs[0].stats
    assert s.generated_tokens == 30 == 1 + sum(st.tokens for st in s.steps)
    assert s.accepted_tokens == sum(st.accepted for st in s.steps)
    assert all(len(st.ranks) == st.accepted for st in s.steps)
    assert 0 < s.acceptance_rate < 1


@pytest.mark.parametrize("tree", [TREE, CHAIN])
def test_self_draft_is_always_accepted(tree):
    """With the target as its own draft, Q equals P at every node (up to rounding), so every
    step accepts a full root-to-leaf path (min(1, P/Q) = 1)."""
    target = pair()[0]
    got = decode(target, target, tree, PROMPT, max_new_tokens=61, temperature=1.0, seed=0)
    assert [s.accepted for s in got.stats.steps] == [tree.depth] * (60 // (tree.depth + 1))
