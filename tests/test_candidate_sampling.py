"""Sampling with drafters that propose candidates without a distribution (n-gram, datastore):
the point-mass rule is lossless, on hand-made distributions and end to end through the engine
(chi-square against the target's exact distribution); a deliberately broken rule fails."""

import pytest
import torch
from helpers import NEW, PROMPT, FixedCandidates, V, exact, pair
from lossless import pair_pvalues as pvalues
from scipy.stats import chisquare

import treeopt.decode.verify as verify_module
from treeopt.decode.engine import generate
from treeopt.decode.sampling import Sampling, sample, verify_candidates
from treeopt.tree import Tree

N = 20_000
P = torch.tensor([0.35, 0.05, 0.2, 0.0, 0.15, 0.1, 0.1, 0.05])


def broken_candidates(p, children, generator=None):
    """Accepts x_i with its target probability but never removes rejected candidates: the
    bonus then over-produces them."""
    u = torch.rand(len(children), generator=generator)
    for i, x in enumerate(children):
        if float(u[i]) < float(p[x]):
            return i, int(x)
    return None, int(sample(p[None].float(), 1, generator))


def outputs(rule, children, n=N, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.tensor([rule(P, children, g)[1] for _ in range(n)])


def pvalue(tokens: torch.Tensor, probs: torch.Tensor) -> float:
    obs = torch.bincount(tokens, minlength=V).double()
    exp = probs.double() * len(tokens)
    keep = exp > 0
    assert obs[~keep].sum() == 0, "produced a token of probability zero"
    return float(chisquare(obs[keep].numpy(), exp[keep].numpy()).pvalue)


@pytest.mark.parametrize("children", [[0], [2, 0], [4, 2, 0], [3, 1], [0, 1, 2, 4, 5, 6, 7]])
def test_point_mass_rule_outputs_the_target_distribution(children):
    assert pvalue(outputs(verify_candidates, children), P) > 1e-3


def test_point_mass_rule_accepts_each_candidate_with_its_target_probability():
    g = torch.Generator().manual_seed(3)
    idx = [verify_candidates(P, [2, 0, 4], g)[0] for _ in range(N)]
    freq = {i: idx.count(i) / N for i in (0, 1, 2, None)}
    # x_i is output as the accepted child exactly when it is the output: P(x_i) each.
    assert freq[0] == pytest.approx(0.2, abs=0.015)
    assert freq[1] == pytest.approx(0.35, abs=0.015)
    assert freq[2] == pytest.approx(0.15, abs=0.015)
    assert freq[None] == pytest.approx(0.30, abs=0.015)


def test_point_mass_rule_edge_cases():
    one_hot = torch.zeros(V)
    one_hot[5] = 1.0
    assert verify_candidates(one_hot, [5]) == (0, 5)  # certain: always accepted
    assert verify_candidates(one_hot, [2, 5]) == (1, 5)
    assert verify_candidates(one_hot, [2, 3]) == (None, 5)  # bonus from the residual
    assert verify_candidates(P, [3, 3])[0] is None  # P(3) = 0: never accepted
    assert verify_candidates(one_hot, [5, 5]) == (0, 5)
    p = P.clone()
    verify_candidates(p, [0, 2])
    assert torch.equal(p, P), "the input distribution must not be modified"


def test_broken_point_mass_rule_fails_the_same_test():
    assert pvalue(outputs(broken_candidates, [0, 2, 4]), P) < 1e-6


TREE = Tree.from_parents([-1, 0, 0, 0, 1, 1, 2])


def engine_samples(n: int) -> torch.Tensor:
    target = pair()[0]
    drafter = FixedCandidates(TREE)
    return torch.tensor([generate(target, drafter, PROMPT, max_new_tokens=NEW,
                                  sampling=Sampling(1.0, seed=s)).tokens for s in range(n)])


def test_engine_with_deterministic_candidates_is_lossless():
    samples = engine_samples(1000)
    assert min(pvalues(samples, exact(1.0, 1.0))) > 1e-3


def test_broken_rule_fails_the_engine_test(monkeypatch):
    monkeypatch.setattr(verify_module, "verify_candidates", broken_candidates)
    samples = engine_samples(400)
    assert min(pvalues(samples, exact(1.0, 1.0))) < 1e-6
