"""Hardware-aware choice and predictions: hand-computed steps, brute force over every
(size, depth), Sequoia's selection loop, and the ``treeopt search`` command end to end."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from sequoia_reference_dp import reference_dp, reference_results

from treeopt.cli import main
from treeopt.growmap import load_growmap
from treeopt.profile import Latency, LatencyCurve
from treeopt.search.dp import solve
from treeopt.search.hardware import (
    HardwareError,
    PrefillCost,
    choose,
    draft_ms,
    end_to_end,
    monotone,
    predict,
    prefill_costs,
)
from treeopt.tree import Tree

P = [.6, .1, .05, .03, .02, .015, .01, .008]
L40_TOKENS = [1, 2, 4, 8, 16, 32, 64, 128]
L40_7B = [25.4, 26.8, 28.2, 27.1, 26.8, 27.6, 27.3, 29.5]
L40_68M = [0.28, 0.24, 0.24, 0.25, 0.27, 0.31, 0.33, 0.42]


def latency(target_ms=L40_7B, draft=L40_68M, tokens=L40_TOKENS):
    return Latency(LatencyCurve(list(tokens), list(target_ms)),
                   LatencyCurve(list(tokens), list(draft)) if draft is not None else None)


def test_predict_hand_computed():
    lat = Latency(LatencyCurve([1, 4], [10.0, 16.0]), LatencyCurve([1, 3], [1.0, 2.0]))
    tree = Tree((-1, 0, 0, 1))  # levels of width 1, 2, 1
    p = [0.5, 0.3]
    f = 1 + .5 + .3 + .25
    seq = predict(tree, p, lat, "sequoia")
    assert seq.expected_tokens == pytest.approx(f)
    assert seq.draft_ms == pytest.approx(3 * 1.0)  # three levels x t_draft(1)
    assert seq.verify_ms == pytest.approx(16.0)
    assert seq.step_ms == pytest.approx(19.0)
    assert seq.tokens_per_s == pytest.approx(1000 * f / 19.0)
    assert seq.speedup == pytest.approx(10.0 * f / 19.0)
    per = predict(tree, p, lat, "per-level")
    # the engine feeds the expanded nodes only: level 0 (root) and node 1 of level 1
    assert per.draft_ms == pytest.approx(1.0 + 1.0)
    assert per.step_ms == pytest.approx(16.0 + 2.0)
    wide = Tree((-1, 0, 0, 1, 2))  # both level-1 nodes expanded: t_draft(2) = 1.5
    assert predict(wide, p, lat, "per-level").draft_ms == pytest.approx(1.0 + 1.5)
    assert predict(Tree((-1,)), p, lat, "sequoia").draft_ms == 0.0  # plain decoding
    assert draft_ms(tree, Latency(LatencyCurve([1], [10.0])), "per-level") == 0.0


def sequoia_selection(T_results, valid_budget, target_time, draft_time):
    """Sequoia's own selection loop over hand-typed budgets (tree_search.py)."""
    dec_time, pairs = math.inf, None
    for i, b in enumerate(valid_budget):
        for d, ac_len in enumerate(T_results[b]):
            if ac_len < 0:
                continue
            x = (d * draft_time + target_time[i]) / ac_len
            if x < dec_time:
                dec_time, pairs = x, (b, d)
    return dec_time, pairs


def test_sequoia_cost_reproduces_sequoia_selection():
    # Sequoia's demo config: budgets 1..32, target 10..18 ms, draft 0.3 ms, depth 10
    budgets, target = [1, 2, 4, 8, 16, 32], [10, 10, 10, 12, 14, 18]
    T, _ = reference_dp(P, 32, 10)
    ref_time, (b, d) = sequoia_selection(reference_results(T), budgets, target, 0.3)
    lat = Latency(LatencyCurve(budgets, target), LatencyCurve([1], [0.3]))
    table = solve(P, 32, 10)
    choice = choose(P, lat, 32, 10, "sequoia", table=table)
    # we sweep every size in 1..32, a superset of Sequoia's list: never worse
    assert 1000 / choice.tokens_per_s <= ref_time + 1e-12
    # and on Sequoia's own budgets the same cost gives the same optimum
    ours = min(((l * 0.3 + lat.target(n)) / table.values[n, l], n, l)
               for n in budgets for l in range(1, 11) if np.isfinite(table.values[n, l]))
    assert ours[0] == pytest.approx(ref_time, abs=1e-12) and ours[1:] == (b, d)


@pytest.mark.parametrize("cost", ["sequoia", "per-level"])
def test_choose_equals_brute_force_over_dp_trees(cost):
    lat = latency()
    table = solve(P, 48, 8)
    choice = choose(P, lat, 48, 8, cost, table=table)
    best = math.inf
    for n in range(1, 49):
        for l in range(1, 9):
            if not np.isfinite(table.values[n, l]):
                continue
            if cost == "sequoia":  # costs are read from the curves' envelopes
                step = l * monotone(lat.draft)(1) + monotone(lat.target)(n)
            else:
                step = predict(table.tree(n, l), P, lat, cost).step_ms
            best = min(best, step / table.values[n, l])
    assert choice.step_ms / choice.expected_tokens == pytest.approx(best, rel=1e-12)
    pred = predict(choice.tree, P, lat, cost)
    assert not hasattr(choice, "depth")  # one meaning per word: depth counts edges only
    assert choice.tree.size == choice.size and choice.tree.depth == choice.levels - 1
    assert choice.expected_tokens == pytest.approx(table.value(choice.size, choice.levels))
    assert (choice.step_ms, choice.tokens_per_s, choice.speedup) == pytest.approx(
        (pred.step_ms, pred.tokens_per_s, pred.speedup))
    assert choice.speedup == pytest.approx(lat.target(1) * choice.tokens_per_s / 1000)
    keys = {"size", "levels", "depth", "F", "step_ms", "tokens_per_s", "speedup"}
    assert all(set(c) == keys for c in choice.candidates)
    assert all(c["depth"] == table.tree(c["size"], c["levels"]).depth <= c["levels"] - 1
               for c in choice.candidates)
    assert [c["size"] for c in choice.candidates][:4] == [1, 2, 4, 8]
    assert any(c["size"] == choice.size and c["levels"] == choice.levels
               for c in choice.candidates)
    assert max(c["tokens_per_s"] for c in choice.candidates) == pytest.approx(
        choice.tokens_per_s)


def test_flat_draft_curve_per_level_is_one_forward_less_than_sequoia():
    lat = Latency(LatencyCurve(L40_TOKENS, L40_7B), LatencyCurve([1], [0.5]))
    table = solve(P, 64, 10)
    for n, l in [(2, 2), (8, 4), (32, 6), (64, 10)]:
        tree = table.tree(n, l)
        seq = predict(tree, P, lat, "sequoia").draft_ms
        per = predict(tree, P, lat, "per-level").draft_ms
        assert seq == pytest.approx(0.5 * (tree.depth + 1))
        assert per == pytest.approx(seq - 0.5)  # the leaf level is never fed to the draft
    b = choose(P, lat, 64, 10, "per-level")
    assert b.step_ms == pytest.approx(0.5 * b.tree.depth + monotone(lat.target)(b.size))


def test_no_draft_curve_costs_nothing_and_depth_aware_profiles_work():
    rows = [[.5, .2], [.8, .1]]
    choice = choose(rows, latency(draft=None), 40, 6)
    assert choice.step_ms == pytest.approx(monotone(latency().target)(choice.size))
    assert choice.expected_tokens == pytest.approx(choice.tree.expected_tokens(rows))


def test_hardware_errors():
    with pytest.raises(HardwareError, match="no target latency"):
        choose(P, None, 10, 4)
    with pytest.raises(HardwareError, match="unknown draft cost"):
        choose(P, latency(), 10, 4, "magic")
    with pytest.raises(HardwareError, match="covers size"):
        choose(P, latency(), 10, 4, table=solve(P, 5, 4))
    # A falling curve used to extrapolate to <= 0 ms (refused as "extrapolated"); its
    # envelope now prices every size at >= t(1), and the choice says the curve falls.
    falling = Latency(LatencyCurve([1, 2], [10.0, 5.0]))
    pick = choose(P, falling, 10, 4)
    assert all(c["step_ms"] >= 10.0 for c in pick.candidates)
    assert predict(pick.tree, P, falling).verify_ms >= 10.0
    assert any("falls" in n for n in pick.notes)


# ------------------------------------------------------------------ the command
def _sequoia_vector(path, p):
    torch.save(torch.tensor([0.0, *p, 1 - sum(p)]), path)
    return path


def test_cli_fixed_budget_on_sequoia_vector(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _sequoia_vector(tmp_path / "vec.pt", P)
    assert main(["search", "--profile", "vec.pt", "--budget", "128", "--max-levels", "12",
                 "--out", "g.pt", "--table", "t.csv", "--picture", "g.dot"]) == 0
    out = capsys.readouterr().out
    assert "expected tokens per step: 3.74744" in out
    tree, meta = load_growmap(tmp_path / "g.pt")
    p32 = torch.tensor(P).tolist()  # the vector is float32
    assert tree.size == 128 and tree.depth <= 11
    assert f"depth {tree.depth} edges ({tree.depth + 1} levels; limit 12 levels = depth 11)" \
        in out
    assert tree.expected_tokens(p32) == pytest.approx(meta["expected_tokens"], abs=1e-9)
    assert meta["method"] == "dp" and meta["budget"] == 128 and meta["max_levels"] == 12
    assert meta["depth"] == tree.depth and meta["size"] == 128
    # the same limit in edges gives the same tree
    assert main(["search", "--profile", "vec.pt", "--budget", "128", "--max-depth", "11",
                 "--out", "e.pt"]) == 0
    assert load_growmap(tmp_path / "e.pt")[0] == tree
    assert "limit 12 levels = depth 11" in capsys.readouterr().out
    lines = (tmp_path / "t.csv").read_text().splitlines()
    assert len(lines) == 129 and lines[0].startswith("size,levels_1")
    assert (tmp_path / "g.dot").is_file()
    # default output folder
    assert main(["search", "--profile", "vec.pt", "--budget", "9", "--at-most"]) == 0
    assert (tmp_path / "growmaps" / "vec-dp-n9.pt").is_file()


def test_cli_hardware_aware_and_errors(tmp_path, capsys):
    prof = {"format": "treeopt-profile", "version": 1, "meta": {},
            "acceptance": {"p": P},
            "latency": {"target": {"tokens": L40_TOKENS, "ms": L40_7B},
                        "draft": {"tokens": L40_TOKENS, "ms": L40_68M}}}
    path = tmp_path / "prof.json"
    path.write_text(json.dumps(prof))
    out = tmp_path / "hw.json"
    assert main(["search", "--profile", str(path), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "speed-up" in text and "candidates" in text
    tree, meta = load_growmap(out)
    choice = choose(P, latency(), 128, 12)
    assert tree == choice.tree
    assert meta["predicted_tokens_per_s"] == pytest.approx(choice.tokens_per_s)
    vec = _sequoia_vector(tmp_path / "vec.pt", P)
    assert main(["search", "--profile", str(vec), "--out", str(out)]) == 2
    assert main(["search", "--profile", str(vec), "--budget", "100", "--max-levels", "2",
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "no latency table" in err and "no tree of exactly 100 nodes" in err
    assert all(line.startswith("treeopt search: error:") for line in err.strip().splitlines())


@pytest.mark.parametrize("cost", ["sequoia", "per-level"])
def test_plain_decoding_candidate_has_no_draft_cost(cost):
    lat = latency()
    choice = choose(P, lat, 16, 6, cost)
    size1 = next(c for c in choice.candidates if c["size"] == 1)
    assert size1["step_ms"] == pytest.approx(lat.target(1))
    assert size1["speedup"] == pytest.approx(1.0)
    # a draft so slow that nothing beats plain decoding: the choice is size 1, speed-up 1
    slow = Latency(lat.target, LatencyCurve([1], [1000.0]))
    assert choose(P, slow, 16, 6, cost).size == 1



def test_steps_that_propose_nothing_cost_one_plain_forward():
    """A model-free drafter with no candidate at a fraction e of steps: those steps cost
    t(1) and yield one token; F already counts them as "none accepted"."""
    from treeopt.profile import Latency, LatencyCurve
    from treeopt.search.hardware import choose, empty_step_rate, predict
    from treeopt.tree import Tree

    lat = Latency(target=LatencyCurve(tokens=[1, 2, 3, 4], ms=[10.0, 20.0, 20.0, 20.0]),
                  draft=None, context=128, meta={})
    chain = Tree((-1, 0, 1))
    table = [[0.6], [0.8]]  # F(chain) = 1 + 0.6 + 0.6 * 0.8 = 2.08
    plain = predict(chain, table, lat)
    assert plain.step_ms == 20.0 and plain.speedup == pytest.approx(10 * 2.08 / 20)
    half = predict(chain, table, lat, empty_rate=0.5)
    assert half.expected_tokens == pytest.approx(2.08)
    assert half.step_ms == pytest.approx(0.5 * 10 + 0.5 * 20)
    assert half.speedup == pytest.approx(10 * 2.08 / 15)
    # Without empty steps no tree pays (2.08 tokens for 2x the time of one); with half of
    # the steps empty the 3-node chain does, and choose() finds it.
    assert choose(table, lat, 3, 3).size < 3 or choose(table, lat, 3, 3).speedup <= 1.05
    pick = choose(table, lat, 3, 3, empty_rate=0.5)
    assert pick.size == 3 and pick.speedup == pytest.approx(half.speedup)
    # A drafter that never proposed (every profiled step empty: its profile holds only
    # "none accepted") decodes plainly: every tree is plain decoding's speed, and the choice
    # is plain decoding, not an error (sampled tune on prompts an n-gram index never matches)
    never = [[0.0], [0.0]]
    assert predict(chain, never, lat, empty_rate=1.0).speedup == pytest.approx(1.0)
    assert choose(never, lat, 3, 3, empty_rate=1.0).size == 1
    for bad in (-0.1, 1.01):
        with pytest.raises(ValueError, match="empty_rate"):
            predict(chain, table, lat, empty_rate=bad)

    class Meta:
        meta = {"steps": 200, "no_candidate_steps": 50}

    assert empty_step_rate(Meta()) == 0.25 and empty_step_rate(object()) == 0.0


# ------------------------------------------------------------------ untrusted latency curves
NOISY_TOKENS, NOISY_MS = [1, 2, 4, 8, 16], [10.0, 30.0, 12.0, 14.0, 13.0]


def test_envelope_never_falls_nor_extrapolates_below_the_measurements():
    env = monotone(LatencyCurve(NOISY_TOKENS, NOISY_MS))
    values = [env(n) for n in range(1, 129)]
    assert all(b >= a for a, b in zip(values, values[1:]))  # non-decreasing
    for n in range(1, 129):  # never below the dearest measured size <= n
        assert env(n) >= max(y for t, y in zip(NOISY_TOKENS, NOISY_MS) if t <= n)
    assert env(64) >= 30.0 > 10.0  # the raw curve extrapolated 64 tokens to 7 ms
    assert LatencyCurve(NOISY_TOKENS, NOISY_MS)(64) == pytest.approx(7.0)
    # beyond the last point: at least the last slope; a flat/falling end uses the average one
    convex = monotone(LatencyCurve([1, 2, 4], [10.0, 11.0, 15.0]))
    assert convex(8) == pytest.approx(15.0 + 2.0 * 4)
    flat_end = monotone(LatencyCurve([1, 2, 4], [10.0, 12.0, 12.0]))
    assert flat_end(8) == pytest.approx(12.0 + (2.0 / 3.0) * 4)
    assert monotone(LatencyCurve([4], [9.0]))(100) == 9.0
    # a monotone curve is its own envelope
    lat = latency(target_ms=sorted(L40_7B))
    assert all(monotone(lat.target)(n) == pytest.approx(lat.target(n)) for n in range(1, 129))


@pytest.mark.parametrize("cost", ["sequoia", "per-level"])
def test_non_monotone_target_curve_claims_no_speedup_from_extrapolation(cost):
    """Target [10, 30, 12, 14, 13] ms at 1..16 tokens: the raw curve extrapolates
    verify(64) = 7 ms < verify(1) and the choice claimed 1.93x."""
    lat = Latency(LatencyCurve(NOISY_TOKENS, NOISY_MS), LatencyCurve([1], [0.5]))
    choice = choose(P, lat, 64, 12, cost)
    # every size > 1 now costs at least 30 ms; F* <= 3.5 tokens: at most ~1.17x over 10 ms
    assert choice.speedup < 1.2
    assert all(c["step_ms"] >= 10.0 for c in choice.candidates)
    assert any("falls" in n and "30.00 ms at 2" in n for n in choice.notes)
    pred = predict(choice.tree, P, lat, cost)
    assert pred.verify_ms >= 10.0 and choice.speedup == pytest.approx(pred.speedup)


def test_choice_beyond_the_measured_sizes_is_flagged_and_measured_only_avoids_it():
    tokens, ms = L40_TOKENS[:6], L40_7B[:6]  # measured up to 32 tokens, nearly flat
    lat = latency(target_ms=ms, draft=L40_68M[:6], tokens=tokens)
    free = choose(P, lat, 100, 12)
    assert free.size > 32
    assert any("beyond the largest measured target size 32" in n for n in free.notes)
    for cost in ("sequoia", "per-level"):
        only = choose(P, lat, 100, 12, cost, measured_only=True)
        assert only.measured_only and only.size in set(tokens)
        assert not any("beyond" in n for n in only.notes)
        assert {c["size"] for c in only.candidates} <= set(tokens)
        # exact among the measured sizes: brute force over every depth of those sizes
        table = solve(P, 100, 12)
        best = min(predict(table.tree(n, l), P, lat, cost).step_ms / table.values[n, l]
                   for n in tokens for l in range(1, 13) if np.isfinite(table.values[n, l]))
        assert only.step_ms / only.expected_tokens == pytest.approx(best, rel=1e-9)
        assert only.tokens_per_s <= free.tokens_per_s + 1e-9


def test_measured_only_keeps_empty_steps_and_plain_decoding():
    lat = Latency(target=LatencyCurve(tokens=[1, 2, 3, 4], ms=[10.0, 20.0, 20.0, 20.0]))
    table = [[0.6], [0.8]]
    pick = choose(table, lat, 3, 3, empty_rate=0.5, measured_only=True)
    assert pick.size == 3
    only_two = Latency(target=LatencyCurve(tokens=[1, 4], ms=[10.0, 100.0]))
    assert choose(table, only_two, 3, 3, measured_only=True).size == 1


def test_whole_generations_pay_the_prefill_once():
    """By hand: 2 ms per prompt token for the target, 1 for the draft, 10 ms a plain step,
    2x per step. A 100-token prompt and 11 new tokens: plain 200 + 10 * 10 = 300 ms;
    speculative 100 * 3 + 100 / 2 = 350 ms (the draft's prefill takes the gain and more);
    a configuration without the draft pays 200 + 50 = 250 ms."""
    cost = PrefillCost(2.0, 1.0)
    assert end_to_end(2.0, 10.0, cost, [(100, 11)]) == pytest.approx(300 / 350)
    assert end_to_end(2.0, 10.0, cost, [(100, 11)], draft=False) == pytest.approx(300 / 250)
    # times are summed over generations, as eval sums them; a long answer tends to per-step
    both = end_to_end(2.0, 10.0, cost, [(100, 11), (10, 101)])
    assert both == pytest.approx((300 + 20 + 1000) / (350 + 30 + 500))
    assert end_to_end(2.0, 10.0, cost, [(10, 10**7)]) == pytest.approx(2.0, rel=1e-5)
    assert end_to_end(1.5, 10.0, PrefillCost(0.0, 0.0), [(50, 20)]) == pytest.approx(1.5)
    with pytest.raises(HardwareError, match="positive"):
        end_to_end(0.0, 10.0, cost, [(1, 2)])


def test_prefill_costs_are_read_from_the_latency_table():
    curve = LatencyCurve([1, 2], [10.0, 12.0])
    assert prefill_costs(Latency(curve, None, 8, {})) is None
    lat = Latency(curve, None, 8, {"prefill": {"prompt_tokens": [100, 50],
                                               "target_ms": [300.0, 150.0],
                                               "draft_ms": [30.0, 0.0]}})
    assert prefill_costs(lat) == (pytest.approx(3.0), pytest.approx(0.2))
    for bad in ({"prompt_tokens": [100]}, {"prompt_tokens": [0], "target_ms": [1.0],
                                           "draft_ms": [0.0]},
                {"prompt_tokens": [5, 6], "target_ms": [1.0], "draft_ms": [0.0]},
                {"prompt_tokens": [5], "target_ms": [float("nan")], "draft_ms": [0.0]}):
        with pytest.raises(HardwareError, match="prefill entry") as err:
            prefill_costs(Latency(curve, None, 8, {"prefill": bad}))
        assert "\n" not in str(err.value)
