"""Verification rules and logit processing: exact properties and chi-square losslessness tests
on hand-made target/draft distributions (many samples, vectorised)."""

import pytest
import torch
from scipy.stats import chisquare

from treeopt.decode.sampling import (
    MIN_TEMPERATURE,
    Sampling,
    SamplingError,
    check_settings,
    draw_children,
    logits_to_probs,
    sample,
    verify_children,
    verify_children_batch,
    verify_greedy,
)

N = 40_000
V = 8


def chi2_pvalue(tokens: torch.Tensor, probs: torch.Tensor) -> float:
    """Chi-square goodness of fit of sampled tokens (N,) to probs (V,); cells with expected
    count < 5 are pooled into one."""
    observed = torch.bincount(tokens, minlength=probs.numel()).double()
    expected = probs.double() * tokens.numel()
    big = expected >= 5
    obs = torch.cat([observed[big], observed[~big].sum().view(1)])
    exp = torch.cat([expected[big], expected[~big].sum().view(1)])
    if exp[-1] == 0:
        assert obs[-1] == 0, "sampled a token of zero probability"
        obs, exp = obs[:-1], exp[:-1]
    return float(chisquare(obs.numpy(), exp.numpy() * obs.sum().item() / exp.sum().item()).pvalue)


def pair(temperature: float, top_p: float, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    p = logits_to_probs(torch.randn(V, generator=g) * 1.5, temperature, 0, top_p)
    q = logits_to_probs(torch.randn(V, generator=g) * 1.5, temperature, 0, top_p)
    return p, q


def run_rule(p, q, k, rule, seed=1, verify=verify_children_batch):
    g = torch.Generator().manual_seed(seed)
    qb = q.expand(N, V)
    children = draw_children(qb, k, replacement=rule == "specinfer", generator=g)
    return verify(p.expand(N, V), qb, children, rule, g)


# ------------------------------------------------------------------ logit processing
def test_temperature_zero_is_one_hot_argmax():
    logits = torch.tensor([[0.1, 2.0, -1.0], [3.0, 0.0, 2.9]])
    assert torch.equal(logits_to_probs(logits, 0.0), torch.tensor([[0., 1, 0], [1, 0, 0]]))


def test_top_k_and_top_p_by_hand():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log()
    assert torch.allclose(logits_to_probs(logits, 1.0), probs)
    assert torch.allclose(logits_to_probs(logits, 1.0, top_k=2), torch.tensor([.625, .375, 0, 0]))
    # top_p 0.8: 0.5 + 0.3 reaches 0.8 -> keep two; 0.81 needs the third token too.
    assert torch.allclose(logits_to_probs(logits, 1.0, top_p=0.8), torch.tensor([.625, .375, 0, 0]))
    kept = logits_to_probs(logits, 1.0, top_p=0.81)
    assert torch.allclose(kept, torch.tensor([.5, .3, .15, 0]) / 0.95)
    assert torch.equal(logits_to_probs(logits, 1.0, top_p=0.1) > 0,
                       torch.tensor([True, False, False, False]))
    t = logits_to_probs(logits, 0.5)
    assert torch.allclose(t, probs ** 2 / (probs ** 2).sum())


def test_settings_are_checked():
    for bad in [dict(temperature=-1.0), dict(top_k=-1), dict(top_p=0.0), dict(top_p=1.5),
                dict(rule="medusa")]:
        args = dict(temperature=1.0, top_k=0, top_p=1.0, rule="sequoia") | bad
        with pytest.raises(SamplingError):
            check_settings(**args)


def test_near_zero_temperature_is_rejected_not_sampled_as_the_last_id():
    """--temperature 1e-40 used to overflow logits / T: NaN probabilities, sampled as V - 1."""
    logits = torch.tensor([[0.5, 3.0, -1.0, 2.0]])
    with pytest.raises(SamplingError, match="too close to 0"):
        check_settings(1e-40, 0, 1.0, "sequoia")
    with pytest.raises(SamplingError, match="too close to 0"):
        Sampling(temperature=1e-40)
    with pytest.raises(SamplingError, match="temperature 1e-40"):
        logits_to_probs(logits, 1e-40)  # the low-level call refuses too, never NaN
    Sampling(temperature=MIN_TEMPERATURE)  # the threshold itself is a temperature
    probs = logits_to_probs(logits, MIN_TEMPERATURE)
    assert torch.equal(probs, torch.tensor([[0.0, 1.0, 0.0, 0.0]]))
    with pytest.raises(SamplingError, match="finite"):
        check_settings(float("inf"), 0, 1.0, "sequoia")
    with pytest.raises(SamplingError):
        check_settings(float("nan"), 0, 1.0, "sequoia")


def test_nan_logits_and_empty_rows_raise_instead_of_sampling_garbage():
    nan = torch.tensor([[0.5, float("nan"), 1.0], [0.1, 0.2, 0.3]])
    for t in (0.0, 1.0):
        with pytest.raises(SamplingError, match="NaN logits"):
            logits_to_probs(nan, t)
    with pytest.raises(SamplingError, match="all-zero"):
        sample(torch.tensor([[0.2, 0.8, 0.0], [0.0, 0.0, 0.0]]))
    with pytest.raises(SamplingError, match="NaN"):
        sample(torch.tensor([[0.2, float("nan"), 0.1]]))
    with pytest.raises(SamplingError, match="infinite"):
        sample(torch.tensor([[0.2, float("inf"), 0.1]]))
    with pytest.raises(SamplingError, match="NaN"):  # every logit masked: no distribution
        logits_to_probs(torch.full((1, 3), float("-inf")), 1.0)
    with pytest.raises(SamplingError):
        verify_children(torch.tensor([0.0, 0.0, 0.0]), None, [])
    # valid rows are untouched, unnormalised ones included
    g = torch.Generator().manual_seed(0)
    assert sample(torch.tensor([[0.0, 2.0, 0.0]]), 3, g).tolist() == [[1, 1, 1]]


def test_top_k_must_be_a_non_negative_integer():
    for bad in (-5, 2.5):
        with pytest.raises(SamplingError, match="top_k"):
            check_settings(1.0, bad, 1.0, "sequoia")


def test_greedy_rule():
    assert verify_greedy(7, [3, 7, 9]) == (1, 7)
    assert verify_greedy(5, [3, 7]) == (None, 5)
    assert verify_greedy(5, []) == (None, 5)


def test_draw_without_replacement_is_distinct_and_pads_with_fillers():
    g = torch.Generator().manual_seed(0)
    q = torch.tensor([[0.5, 0.5, 0.0, 0.0, 0.0], [0.2, 0.2, 0.2, 0.2, 0.2]]).repeat(2000, 1)
    kids = draw_children(q, 4, replacement=False, generator=g)
    assert all(len(set(r)) == 4 for r in kids[1::2].tolist())
    assert all(sorted(r[:2]) == [0, 1] for r in kids[0::2].tolist())
    assert torch.all(kids[0::2, 2:] == 4)  # fillers: the last token, of probability 0


def test_sample_never_draws_zero_probability_tokens():
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([0.0, 0.3, 0.0, 0.7, 0.0])
    draws = sample(p.expand(N, 5), 2, g)
    assert set(draws.flatten().tolist()) == {1, 3}
    assert chi2_pvalue(draws[:, 1], p) > 1e-3


def test_draw_without_replacement_order_is_sequential_sampling():
    # second draw given the first: P(x2 = j | x1 = i) = q_j / (1 - q_i)
    q = torch.tensor([0.6, 0.3, 0.1])
    kids = draw_children(q.expand(N, 3), 2, False, torch.Generator().manual_seed(3))
    exact = torch.zeros(3)
    for i in range(3):
        for j in range(3):
            if i != j:
                exact[j] += q[i] * q[j] / (1 - q[i])
    assert chi2_pvalue(kids[:, 0], q) > 1e-3
    assert chi2_pvalue(kids[:, 1], exact) > 1e-3


def test_zero_draft_probability_child_is_skipped():
    p = torch.tensor([0.0, 1.0, 0.0])
    q = torch.tensor([1.0, 0.0, 0.0])
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        assert verify_children(p, q, [0, 1], "sequoia", g) == (None, 1)


def test_identical_distributions_accept_first_child():
    p = torch.tensor([0.2, 0.3, 0.5])
    g = torch.Generator().manual_seed(0)
    acc, tok = verify_children_batch(p.expand(1000, 3), p.expand(1000, 3),
                                     draw_children(p.expand(1000, 3), 2, False, g), "sequoia", g)
    assert torch.all(acc == 0)


def test_single_node_api_matches_batch():
    p, q = pair(1.0, 1.0)
    g = torch.Generator().manual_seed(5)
    i, tok = verify_children(p, q, [2, 5], "sequoia", g)
    assert i in (None, 0, 1) and 0 <= tok < V
    assert verify_children(p, None, [], "sequoia", g)[0] is None


# ------------------------------------------------------------------ losslessness
@pytest.mark.parametrize("rule", ["sequoia", "specinfer"])
@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 1.0), (1.0, 0.9), (0.7, 0.9)])
@pytest.mark.parametrize("k", [1, 3])
def test_rule_output_follows_target(rule, temperature, top_p, k):
    p, q = pair(temperature, top_p)
    acc, tok = run_rule(p, q, k, rule)
    assert chi2_pvalue(tok, p) > 1e-3
    # an accepted child's token is that child; rejection happens sometimes, acceptance too
    assert 0 < (acc >= 0).float().mean() < 1


def test_rule_with_disjoint_support_and_fillers():
    p = torch.tensor([0.0, 0.0, 0.1, 0.2, 0.3, 0.4, 0.0, 0.0])
    q = torch.tensor([0.5, 0.3, 0.2, 0.0, 0.0, 0.0, 0.0, 0.0])
    for rule in ["sequoia", "specinfer"]:
        _, tok = run_rule(p, q, 5, rule)
        assert chi2_pvalue(tok, p) > 1e-3


def _broken(p, q, children, rule, generator, bug):
    """A copy of the Sequoia rule with one deliberate bug, to prove the test's power."""
    b, k = children.shape
    p0, p, q = p.clone(), p.clone(), q.clone()
    token = torch.full((b,), -1)
    done = torch.zeros(b, dtype=torch.bool)
    u = torch.rand(b, k, generator=generator)
    for i in range(k):
        x = children[:, i:i + 1]
        px, qx = p.gather(1, x).squeeze(1), q.gather(1, x).squeeze(1)
        valid = (qx > 0) & ~done
        acc = valid & (u[:, i] * qx < px)
        token = torch.where(acc, x.squeeze(1), token)
        done |= acc
        rej = (valid & ~acc)[:, None]
        res = (p - q).clamp_min(0)
        res = res / res.sum(-1, keepdim=True).clamp_min(1e-30)
        p = torch.where(rej, res, p)
        if bug != "keep_q":
            q2 = q.scatter(1, x, 0.0)
            q = torch.where(rej, q2 / q2.sum(-1, keepdim=True).clamp_min(1e-30), q)
    src = p0 if bug == "bonus_from_original_p" else p
    bonus = torch.multinomial(src, 1, generator=generator).squeeze(1)
    return None, torch.where(done, token, bonus)


@pytest.mark.parametrize("bug", ["keep_q", "bonus_from_original_p"])
def test_chi_square_detects_a_broken_rule(bug):
    p, q = pair(1.0, 1.0)
    _, tok = run_rule(p, q, 3, "sequoia", verify=lambda *a: _broken(*a, bug=bug))
    assert chi2_pvalue(tok, p) < 1e-6


def test_specinfer_children_without_replacement_is_detected():
    # Sequoia's rule needs children drawn without replacement; SpecInfer's rule needs them
    # drawn with replacement: mixing them is lossy, and the test sees it.
    p, q = pair(1.0, 1.0)
    g = torch.Generator().manual_seed(1)
    kids = draw_children(q.expand(N, V), 3, replacement=False, generator=g)
    _, tok = verify_children_batch(p.expand(N, V), q.expand(N, V), kids, "specinfer", g)
    assert chi2_pvalue(tok, p) < 1e-6
