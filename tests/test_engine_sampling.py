"""Stochastic tree decoding is lossless end to end: on a tiny 8-token model the engine's
distribution of generated token pairs matches the target's exact distribution (computed by
enumerating every continuation), for Sequoia's and SpecInfer's rules, trees and chains,
temperature and top-p; a deliberately broken rule fails the same test."""

import itertools
from functools import lru_cache

import pytest
import torch
from scipy.stats import chisquare

import treeopt.decode.verify as verify_module
from treeopt.testing import decode
from treeopt.decode.sampling import logits_to_probs, verify_children
from treeopt.testing import tiny_causal_lm
from treeopt.tree import Tree

V = 8
NEW = 4
PROMPT = torch.tensor([[2, 3, 4]])
TREE = Tree.from_parents([-1, 0, 0, 0, 1, 1, 2])
CHAIN = Tree.from_parents([-1, 0, 1])


def small(seed: int):
    m = tiny_causal_lm("llama", vocab_size=V, hidden_size=16, num_layers=1, num_heads=2,
                       num_kv_heads=1, seed=seed)
    with torch.no_grad():
        m.model.norm.weight.mul_(40.0)  # peaked, context-dependent distributions
    return m


@lru_cache(maxsize=None)
def pair():
    return small(0), small(1)


@lru_cache(maxsize=None)
def exact(temperature: float, top_p: float) -> torch.Tensor:
    """(V,) * NEW joint probability of the first NEW generated tokens, by enumeration."""
    target = pair()[0]
    seqs = torch.tensor(list(itertools.product(range(V), repeat=NEW - 1)))
    x = torch.cat([PROMPT.expand(len(seqs), -1), seqs], 1)
    with torch.inference_mode():
        probs = logits_to_probs(target(input_ids=x).logits[:, -NEW:], temperature, 0, top_p)
    joint = torch.ones(())
    for i in range(NEW):
        # probs[s, i] is the next-token distribution after the first i tokens of s
        step = probs[:, i].reshape((V,) * (NEW - 1) + (V,))
        step = step[(slice(None),) * i + (0,) * (NEW - 1 - i)]
        joint = joint.unsqueeze(-1) * step
    return joint.double()


def sample(tree, rule, temperature, top_p, n) -> torch.Tensor:
    target, draft = pair()
    return torch.tensor([decode(target, draft, tree, PROMPT, max_new_tokens=NEW,
                                  temperature=temperature, top_p=top_p, rule=rule,
                                  seed=s).tokens for s in range(n)])


def pvalues(samples: torch.Tensor, joint: torch.Tensor) -> list[float]:
    """Chi-square p-values of consecutive token pairs (t1,t2), (t2,t3), ... against the exact
    pair marginals (cells with expected count < 5 pooled)."""
    out = []
    for i in range(NEW - 1):
        keep = [i, i + 1]
        marg = joint.sum(dim=[d for d in range(NEW) if d not in keep]).flatten()
        obs = torch.bincount(samples[:, i] * V + samples[:, i + 1], minlength=V * V).double()
        exp = marg * len(samples)
        big = exp >= 5
        o = torch.cat([obs[big], obs[~big].sum().view(1)])
        e = torch.cat([exp[big], exp[~big].sum().view(1)])
        if e[-1] == 0:
            assert o[-1] == 0, "generated a token pair of probability zero"
            o, e = o[:-1], e[:-1]
        out.append(float(chisquare(o.numpy(), (e * o.sum() / e.sum()).numpy()).pvalue))
    return out


@pytest.mark.parametrize("tree,rule,temperature,top_p,n", [
    (TREE, "sequoia", 1.0, 1.0, 1000),
    (TREE, "specinfer", 0.7, 0.9, 1000),
    (CHAIN, "sequoia", 0.7, 0.9, 400),
])
def test_engine_sampling_is_lossless(tree, rule, temperature, top_p, n):
    samples = sample(tree, rule, temperature, top_p, n)
    assert min(pvalues(samples, exact(temperature, top_p))) > 1e-3


def test_broken_rule_fails_the_engine_test(monkeypatch):
    def keep_q(p, q, children, rule, generator):
        return verify_children(p, q, children, "specinfer", generator)

    monkeypatch.setattr(verify_module, "verify_children", keep_q)
    samples = sample(TREE, "sequoia", 1.0, 1.0, 300)
    assert min(pvalues(samples, exact(1.0, 1.0))) < 1e-6


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
