"""Traversal and Block Verification through the engine on a tiny 8-token model: the
distribution of generated tokens matches the target's exact distribution (chi-square on
consecutive pairs, as for the token-level rules), with a draft model and with deterministic
candidates (point masses), temperature, top-k and top-p; a deliberately broken rule fails the
same test; greedy decoding is unchanged; block refuses a branching tree in one line."""

import pytest
import torch
from helpers import NEW, PROMPT, FixedCandidates, exact, pair
from lossless import pair_pvalues

import treeopt.decode.traversal as tv
from treeopt.decode.engine import generate
from treeopt.decode.sampling import Sampling, SamplingError
from treeopt.testing import decode
from treeopt.tree import Tree

DEEP = Tree.from_parents([-1, 0, 0, 1, 1, 2, 3, 3])  # branching, depth 3
CHAIN = Tree.from_parents([-1, 0, 1, 2, 3])           # 4 drafted tokens


def model_samples(tree, rule, n, temperature=1.0, top_k=0, top_p=1.0):
    target, draft = pair()
    return torch.tensor([decode(target, draft, tree, PROMPT, max_new_tokens=NEW,
                                temperature=temperature, top_k=top_k, top_p=top_p, rule=rule,
                                seed=s).tokens for s in range(n)])


def candidate_samples(tree, rule, n):
    target = pair()[0]
    return torch.tensor([generate(target, FixedCandidates(tree), PROMPT, max_new_tokens=NEW,
                                  sampling=Sampling(1.0, rule=rule, seed=s)).tokens
                         for s in range(n)])


@pytest.mark.parametrize("tree,rule,temperature,top_k,top_p", [
    (DEEP, "traversal", 1.0, 0, 1.0),
    (DEEP, "traversal", 0.7, 0, 0.9),
    (CHAIN, "block", 1.0, 0, 1.0),
    (CHAIN, "block", 0.7, 4, 1.0),
])
def test_engine_with_a_draft_model_is_lossless(tree, rule, temperature, top_k, top_p):
    samples = model_samples(tree, rule, 600, temperature, top_k, top_p)
    joint = exact(temperature, top_p) if not top_k else exact_topk(temperature, top_k)
    assert min(pair_pvalues(samples, joint)) > 1e-3


def exact_topk(temperature, top_k):
    from lossless import exact_joint

    return exact_joint(pair()[0], PROMPT, NEW, temperature, top_k=top_k)


@pytest.mark.parametrize("tree,rule", [(DEEP, "traversal"), (CHAIN, "block")])
def test_engine_with_point_mass_candidates_is_lossless(tree, rule):
    samples = candidate_samples(tree, rule, 600)
    assert min(pair_pvalues(samples, exact(1.0, 1.0))) > 1e-3


@pytest.mark.parametrize("tree,rule", [(DEEP, "traversal"), (CHAIN, "block")])
def test_broken_rule_fails_the_engine_test(monkeypatch, tree, rule):
    # the residual ignores the sequence weight: max(P - Q, 0) instead of max(a P - Q, 0)
    monkeypatch.setattr(tv, "_residual",
                        (lambda f: lambda a, *rest: f(1.0, *rest))(tv._residual))
    samples = model_samples(tree, rule, 400)
    assert min(pair_pvalues(samples, exact(1.0, 1.0))) < 1e-6


@pytest.mark.parametrize("tree,rule", [(DEEP, "traversal"), (CHAIN, "block")])
def test_greedy_output_is_plain_decoding(tree, rule):
    target, draft = pair()
    plain = decode(target, None, None, PROMPT, max_new_tokens=24).tokens
    assert decode(target, draft, tree, PROMPT, max_new_tokens=24, rule=rule).tokens == plain


def test_block_on_a_branching_tree_is_a_one_line_error():
    target, draft = pair()
    for temperature in (1.0, 0.0):
        with pytest.raises(SamplingError, match="verifies chains") as err:
            decode(target, draft, DEEP, PROMPT, max_new_tokens=4, temperature=temperature,
                   rule="block")
        assert "\n" not in str(err.value)


def test_self_draft_accepts_whole_paths():
    target = pair()[0]
    for tree, rule in [(DEEP, "traversal"), (CHAIN, "block")]:
        got = decode(target, target, tree, PROMPT, max_new_tokens=61, temperature=1.0,
                     rule=rule, seed=0)
        assert [s.accepted for s in got.stats.steps] == [tree.depth] * (60 // (tree.depth + 1))


def test_profiles_of_sequence_level_rules():
    """A one-level profile of traversal or block is the token-level one (the root's weight
    stays 1); block profiles chains only (width 1, the default with --rule block)."""
    from treeopt.profile.acceptance import AcceptanceError, AcceptanceRun, stochastic_ranks
    from treeopt.rules import default_width

    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(50, 8, generator=g) * 2, -1)
    q = torch.softmax(torch.randn(50, 8, generator=g) * 2, -1)
    ranks = {r: stochastic_ranks(p, q, 3, rule=r, generator=torch.Generator().manual_seed(1))
             for r in ("sequoia", "traversal")}
    assert ranks["traversal"] == ranks["sequoia"]
    assert stochastic_ranks(p, q, 1, rule="block", generator=torch.Generator().manual_seed(1)) \
        == stochastic_ranks(p, q, 1, rule="sequoia", generator=torch.Generator().manual_seed(1))
    with pytest.raises(AcceptanceError, match="width 1"):
        AcceptanceRun(width=8, sampling=Sampling(1.0, rule="block")).check()
    AcceptanceRun(width=1, sampling=Sampling(1.0, rule="block")).check()
    assert default_width("block") == 1 and default_width("traversal") == 8
