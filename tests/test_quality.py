"""Draft quality: TV, KL(P||Q), alpha and the chain acceptance they imply, on hand-computed
distributions, hand-computed chains, and tiny model pairs (API and CLI)."""

import json
import math
from types import SimpleNamespace

import pytest
import torch

from treeopt.decode.sampling import Sampling, SamplingError
from treeopt.profile.quality import (
    QualityError,
    QualityRun,
    QualityStats,
    chain_acceptance,
    distribution_quality,
    draft_model,
    format_quality,
    log_probs,
    profile_quality,
)
from treeopt.testing import tiny_causal_lm, tiny_pair


# ---------------------------------------------------------------------------- by hand
def test_hand_computed_pair():
    p = torch.tensor([0.5, 0.3, 0.2])
    q = torch.tensor([0.2, 0.3, 0.5])
    f = distribution_quality(p, q)
    assert float(f["tv"]) == pytest.approx(0.3, abs=1e-7)
    assert float(f["alpha"]) == pytest.approx(0.7, abs=1e-7)
    # 0.5 ln(0.5/0.2) + 0.3 ln 1 + 0.2 ln(0.2/0.5) = 0.5 ln 2.5 - 0.2 ln 2.5 = 0.3 ln 2.5
    assert float(f["kl"]) == pytest.approx(0.3 * math.log(2.5), abs=1e-7)
    # And the other way round: KL is not symmetric; TV and alpha are.
    g = distribution_quality(q, p)
    assert float(g["kl"]) == pytest.approx(0.2 * math.log(0.4) + 0.5 * math.log(2.5), abs=1e-7)
    assert float(g["tv"]) == pytest.approx(0.3, abs=1e-7)


def test_zero_draft_probability_gives_infinite_kl():
    p = torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0], [0.25, 0.25, 0.5]])
    q = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.25, 0.25, 0.5]])
    f = distribution_quality(p, q)
    assert math.isinf(f["kl"][0])                                   # q = 0 < p
    assert float(f["kl"][1]) == pytest.approx(math.log(2))          # p = 0 < q: finite
    assert float(f["kl"][2]) == 0.0 and float(f["alpha"][2]) == pytest.approx(1.0)
    assert [float(a) for a in f["alpha"]] == pytest.approx([0.5, 0.5, 1.0])
    with pytest.raises(QualityError, match="share a vocabulary"):
        distribution_quality(p, q[:, :2])


def test_underflow_is_not_an_excluded_token():
    """A draft logit 200 below the best underflows to probability 0 in float32; KL comes
    from log-probabilities, so it stays finite: 0.5 ln(0.5 / 1) + 0.5 ln(0.5 / e^-200)
    = 100 - ln 2 (to float precision). A token top-k excludes gives an infinite KL."""
    from treeopt.decode.sampling import logits_to_probs

    p_logits, q_logits = torch.tensor([0.0, 0.0]), torch.tensor([0.0, -200.0])
    p, q = logits_to_probs(p_logits, 1.0), logits_to_probs(q_logits, 1.0)
    assert float(q[1]) == 0.0  # underflow
    f = distribution_quality(p, q, log_probs(p_logits, p, 1.0, 0, 1.0),
                             log_probs(q_logits, q, 1.0, 0, 1.0))
    assert float(f["kl"]) == pytest.approx(100 - math.log(2), rel=1e-9)
    logits = torch.tensor([2.0, 1.0, 0.0])
    pk = logits_to_probs(logits, 1.0, top_k=2)
    full = logits_to_probs(logits, 1.0)
    f = distribution_quality(full, pk, log_probs(logits, full, 1.0, 0, 1.0),
                             log_probs(logits, pk, 1.0, 2, 1.0))
    assert math.isinf(f["kl"])
    f = distribution_quality(pk, full, log_probs(logits, pk, 1.0, 2, 1.0),
                             log_probs(logits, full, 1.0, 0, 1.0))
    # KL(top-2 || full) = ln(1 / mass of the top 2 under the full distribution)
    assert float(f["kl"]) == pytest.approx(-math.log(float(full[:2].sum())), rel=1e-6)
    pp = logits_to_probs(logits, 1.0, top_p=0.6)
    lp = log_probs(logits, pp, 1.0, 0, 0.6)
    assert torch.isinf(lp).tolist() == (pp == 0).tolist()
    assert torch.exp(lp).float() == pytest.approx(pp, abs=1e-6)
    assert log_probs(logits, pk, 0.0, 0, 1.0) is None


def test_chain_acceptance_by_hand():
    assert chain_acceptance([0.8, 0.5, 0.0, 1.0]) == pytest.approx([0.8, 1.2, 1.2, 1.2])
    assert chain_acceptance([]) == []


def test_per_depth_weighting_by_hand():
    """alphas 1, .5, 0, 1 and depth 2: starts 0, 1, 2. Depth 1 sees every start (weight 3,
    mean alpha .5); depth 2 is reached with 1, .5 and 0 (weight 1.5) and sees alphas .5, 0,
    1, so its conditional alpha is (.5 + 0 + 0) / 1.5 = 1/3. Per-start chains of 2 accept
    1.5, .5 and 0 tokens: mean 2/3 = .5 + .5 * 1/3."""
    s = QualityStats(depth=2)
    s.add_positions([1.0, 0.5, 0.0, 1.0], [0.0, 0.5, 1.0, 0.0],
                    [0.0, 0.2, math.inf, 0.0])
    d1, d2 = s.by_depth()
    assert (d1["reach"], d1["alpha"], d1["tv"]) == pytest.approx((1.0, 0.5, 0.5))
    assert d2["reach"] == pytest.approx(0.5) and d2["alpha"] == pytest.approx(1 / 3)
    assert d1["chain_accepted"] == pytest.approx(0.5)
    assert d2["chain_accepted"] == pytest.approx(2 / 3)
    # KL: the infinite position (start 2 at depth 1) has weight 1 of 3 at depth 1 and
    # weight .5 * 1 of 1.5 at depth 2 (start 1 reaches it with probability .5).
    assert d1["kl"] is None and d1["kl_inf_share"] == pytest.approx(1 / 3)
    assert d1["kl_finite"] == pytest.approx(0.2 / 2)
    assert d2["kl_inf_share"] == pytest.approx(0.5 / 1.5)
    assert d2["kl_finite"] == pytest.approx(1.0 * 0.2 / 1.0)  # start 0 at depth 2 only
    flat = s.flat()
    assert flat["alpha"] == pytest.approx(0.625) and flat["kl_inf_share"] == 0.25
    assert flat["kl"] is None and flat["kl_finite"] == pytest.approx(0.2 / 3)
    assert flat["chain_independent"] == pytest.approx([0.625, 0.625 + 0.625 ** 2])


def test_chain_accepted_is_the_mean_of_per_start_products():
    g = torch.Generator().manual_seed(0)
    alphas = torch.rand(40, generator=g).tolist()
    depth = 5
    s = QualityStats(depth=depth)
    s.add_positions(alphas, [1 - a for a in alphas], [0.0] * len(alphas))
    starts = range(len(alphas) - depth + 1)
    for d, row in enumerate(s.by_depth(), start=1):
        direct = sum(chain_acceptance(alphas[t:t + d])[-1] for t in starts) / len(starts)
        assert row["chain_accepted"] == pytest.approx(direct, rel=1e-12)
    # The conditional per-depth alphas multiply out to the same chain acceptance.
    conditional = [r["alpha"] for r in s.by_depth()]
    assert chain_acceptance(conditional)[-1] == pytest.approx(s.by_depth()[-1]["chain_accepted"])


def test_stats_add_is_concatenation_of_sums():
    a, b, both = QualityStats(3), QualityStats(3), QualityStats(3)
    xs, ys = [0.9, 0.1, 0.6, 0.7], [0.3, 0.8, 0.4, 0.5, 0.2]
    for st, vals in ((a, xs), (b, ys)):
        st.add_positions(vals, [1 - v for v in vals], [0.1] * len(vals))
    both.add_positions(xs, [1 - v for v in xs], [0.1] * len(xs))
    both.add_positions(ys, [1 - v for v in ys], [0.1] * len(ys))
    a.add(b)
    for got, want in zip(a.by_depth(), both.by_depth()):
        assert got == pytest.approx(want)
    with pytest.raises(QualityError):
        a.add(QualityStats(2))


def test_run_settings_are_checked():
    with pytest.raises(QualityError, match="depth"):
        QualityRun(depth=0).check()
    with pytest.raises(QualityError, match="at least 5"):
        QualityRun(depth=4, max_new_tokens=4).check()
    with pytest.raises(SamplingError, match="temperature"):  # checked when it is made
        QualityRun(sampling=Sampling(temperature=-1)).check()


# ---------------------------------------------------------------------------- tiny models
PROMPTS = [[3, 7, 11, 5, 9], [20, 4, 4, 8], [30, 31, 2, 60, 70, 71]]


@pytest.fixture(scope="module")
def pair():
    return tiny_pair()


def test_draft_equal_to_target_is_perfect(pair):
    target, _ = pair
    run = QualityRun(depth=3, max_new_tokens=8, sampling=Sampling(temperature=1.0))
    q = profile_quality(target, target, PROMPTS, run)
    flat = q.flat()
    assert flat["positions"] == 3 * 7  # the first continuation token is not drafted
    assert flat["tv"] == pytest.approx(0.0, abs=1e-6)
    assert flat["alpha"] == pytest.approx(1.0, abs=1e-6)
    assert flat["kl"] == pytest.approx(0.0, abs=1e-6) and flat["kl_inf_share"] == 0
    for d, row in enumerate(q.by_depth(), start=1):
        assert row["alpha"] == pytest.approx(1.0, abs=1e-6)
        assert row["reach"] == pytest.approx(1.0, abs=1e-5)
        assert row["chain_accepted"] == pytest.approx(d, abs=1e-5)


def test_greedy_alpha_is_top1_agreement(pair):
    """At temperature 0 P and Q are one-hot: alpha is 1 where the draft's argmax is the
    target's greedy token, else 0 (and then KL is infinite)."""
    target, draft = pair
    run = QualityRun(depth=2, max_new_tokens=10, sampling=Sampling(temperature=0.0))
    q = profile_quality(target, draft, PROMPTS, run)
    agree, n = 0, 0
    with torch.no_grad():
        for ids in PROMPTS:
            seq = list(ids)
            for _ in range(10):
                seq.append(int(target(torch.tensor([seq])).logits[0, -1].argmax()))
            full = torch.tensor([seq])
            t_top = target(full).logits[0].argmax(-1)
            d_top = draft(full).logits[0].argmax(-1)
            # positions 1..9 of the continuation: logits at len(ids) .. len(ids) + 8
            for t in range(len(ids), len(ids) + 9):
                agree += int(t_top[t] == d_top[t])
                n += 1
    flat = q.flat()
    assert flat["positions"] == n
    assert flat["alpha"] == pytest.approx(agree / n)
    assert flat["kl_inf_share"] == pytest.approx(1 - agree / n)
    assert flat["tv"] == pytest.approx(1 - agree / n)


def test_sampled_quality_of_a_different_draft(pair, tmp_path):
    target, draft = pair
    run = QualityRun(depth=3, max_new_tokens=8, seed=5,
                     sampling=Sampling(temperature=1.0, top_k=3))
    out = tmp_path / "q.json"
    q = profile_quality(target, draft, PROMPTS, run, out=out)
    flat = q.flat()
    assert 0 < flat["alpha"] < 1 and flat["alpha"] == pytest.approx(1 - flat["tv"], abs=1e-6)
    # The draft's top 3 miss tokens of the target's top 3: KL is infinite there.
    assert flat["kl_inf_share"] > 0 and flat["kl"] is None
    doc = json.loads(out.read_text())
    assert doc["format"] == "treeopt-quality" and doc["flat"]["alpha"] == flat["alpha"]
    assert doc["meta"]["prompts_done"] == 3 and len(doc["by_depth"]) == 3
    again = profile_quality(target, draft, PROMPTS, run)  # seeded: the same positions
    assert again.flat() == flat


def test_a_draft_near_the_target(pair):
    """The target with its output layer slightly perturbed: a high alpha, a small finite
    KL where the top-3 sets agree and an infinite one where they do not."""
    import copy

    target, _ = pair
    near = copy.deepcopy(target)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        near.lm_head.weight += 0.002 * torch.randn(near.lm_head.weight.shape, generator=g)
    run = QualityRun(depth=3, max_new_tokens=8, seed=5,
                     sampling=Sampling(temperature=1.0, top_k=3))
    flat = profile_quality(target, near, PROMPTS, run).flat()
    far = profile_quality(target, pair[1], PROMPTS, run).flat()
    assert flat["alpha"] > far["alpha"] and flat["tv"] < far["tv"]
    assert 0 < flat["kl_inf_share"] < 1 and 0 < flat["kl_finite"] < 1e-3
    no_top_k = profile_quality(target, near, PROMPTS, QualityRun(depth=3, max_new_tokens=8,
                                                                 seed=5)).flat()
    assert no_top_k["kl_inf_share"] == 0 and no_top_k["kl"] == pytest.approx(
        no_top_k["kl_finite"]) and no_top_k["alpha"] > 0.95


def test_model_free_drafter_is_refused(pair):
    from treeopt.decode.drafter import build_drafter

    target, _ = pair
    ngram = build_drafter("ngram", target=target)
    with pytest.raises(QualityError, match="needs a draft distribution") as e:
        draft_model(ngram)
    assert "\n" not in str(e.value)
    with pytest.raises(QualityError, match="vocabulary"):
        profile_quality(target, tiny_causal_lm(vocab_size=128, num_layers=1), PROMPTS[:1],
                        QualityRun(depth=1, max_new_tokens=3))


def test_format_with_a_rank_profile(pair):
    from treeopt.profile import Profile

    target, draft = pair
    q = profile_quality(target, draft, PROMPTS, QualityRun(depth=2, max_new_tokens=6))
    prof = Profile.from_counts([6, 2], 2, depth_counts=[[6, 2], [3, 1]], depth_none=[2, 6])
    text = format_quality(q, prof)
    assert "p1(profile)" in text and "chain(profile)" in text
    lines = text.splitlines()
    row2 = next(line for line in lines if line.split()[:1] == ["2"])
    # p1 by depth .6 and .3; the chain the profile implies: .6, .6 + .6 * .3 = .78
    assert row2.split()[-2:] == ["0.300", "0.780"]


def test_cli_profile_quality(pair, tmp_path, monkeypatch, capsys):
    import treeopt.cli.profile as cli_profile
    from treeopt.cli import main
    from treeopt.profile import Profile

    target, draft = pair

    class Chars:
        chat_template = None

        def encode(self, text, add_special_tokens=True):
            return [2 + (ord(c) - 97 if c.isalpha() else 26) for c in text.lower()
                    if c.isalpha() or c == " "][:24]

        def __call__(self, text, add_special_tokens=True, return_tensors=None):
            ids = self.encode(text)
            return {"input_ids": torch.tensor([ids]) if return_tensors == "pt" else ids}

    def load(args):
        assert args.draft == "tiny-draft"
        return SimpleNamespace(target=target, draft=draft, drafter=None, tokenizer=Chars()), \
            torch.device("cpu")

    monkeypatch.setattr(cli_profile, "load_models", load)
    prof = tmp_path / "p.json"
    Profile.from_counts([6, 2], 2, depth_counts=[[6, 2], [3, 1]], depth_none=[2, 6]).save(prof)
    out = tmp_path / "quality.json"
    rc = main(["profile", "quality", "--target", "tiny", "--draft", "tiny-draft", "--dataset",
               "spec_bench", "-n", "2", "--max-new-tokens", "6", "--depth", "2",
               "--profile", str(prof), "--out", str(out), "--quiet"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "p1(profile)" in captured.out and "KL(P||Q)" in captured.out
    doc = json.loads(out.read_text())
    assert doc["settings"]["temperature"] == 1.0 and doc["meta"]["prompts_done"] == 2
    rc = main(["profile", "quality", "--target", "tiny", "--draft", "tiny-draft", "--depth",
               "0", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "--depth" in err and len(err.strip().splitlines()) == 1


def test_quality_document_is_strict_json(pair, tmp_path):
    """Infinite KL never reaches the file as a non-JSON number."""
    target, draft = pair
    out = tmp_path / "q.json"
    profile_quality(target, draft, PROMPTS[:1],
                    QualityRun(depth=1, max_new_tokens=4, sampling=Sampling(temperature=0.0)),
                    out=out)
    json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(f"non-JSON {c}"))
