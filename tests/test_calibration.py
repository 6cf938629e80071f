"""Calibration of acceptance by draft confidence (treeopt.profile.calibration): the counting,
the monotone fit, a draft equal to the target (every top-1 candidate accepted, nothing else),
the file round trip, one-line errors and the ``treeopt profile calibration`` command."""

import json

import numpy as np
import pytest
import torch

from treeopt.profile.calibrate import calibrate, candidate_outcomes
from treeopt.profile.calibration import (
    Calibration,
    CalibrationError,
    bin_edges,
    from_samples,
    isotonic,
)
from treeopt.profile.model import Latency, LatencyCurve
from treeopt.testing import tiny_causal_lm

PROMPTS = [[2, 5, 7, 9], [3, 3, 8], [11, 4, 6, 10, 12]]


def one_line(exc) -> str:
    msg = str(exc.value)
    assert msg and "\n" not in msg
    return msg


def peaked(seed: int = 0, scale: float = 30.0):
    """A tiny model with peaked, context-dependent next-token distributions."""
    m = tiny_causal_lm("llama", vocab_size=32, hidden_size=16, num_layers=2, num_heads=2,
                       num_kv_heads=1, seed=seed)
    with torch.no_grad():
        m.model.norm.weight.mul_(scale)
    return m


# ---------------------------------------------------------------------------- the fit
def test_isotonic_pools_adjacent_violators():
    # 0.3 > 0.2 violates: pooled with equal weights to 0.25; weighted pooling below
    assert isotonic(np.array([.1, .3, .2, .5]), np.ones(4)).tolist() == pytest.approx(
        [.1, .25, .25, .5])
    assert isotonic(np.array([.4, .1]), np.array([3.0, 1.0])).tolist() == pytest.approx(
        [.325, .325])
    assert isotonic(np.array([.9, .5, .1]), np.ones(3)).tolist() == pytest.approx([.5] * 3)
    assert isotonic(np.array([.1, .2]), np.ones(2)).tolist() == pytest.approx([.1, .2])


def test_counts_means_and_interpolation_by_hand():
    conf = np.array([0.05, 0.1, 0.15, 0.6, 0.8, 0.9])
    acc = np.array([0, 1, 0, 1, 1, 0], dtype=bool)
    cal = from_samples(conf, acc, edges=np.array([0.0, 0.5, 1.0]))
    assert cal.counts == (3, 3) and cal.accepted == (1, 2)
    assert cal.mean_confidence == pytest.approx((0.1, 2.3 / 3))
    assert cal.rates == pytest.approx([1 / 3, 2 / 3]) == cal.fitted
    # linear between the bin means, constant beyond them
    assert cal.acceptance(0.0) == pytest.approx(1 / 3)
    assert cal.acceptance(1.0) == pytest.approx(2 / 3)
    mid = (0.1 + 2.3 / 3) / 2
    assert cal.acceptance(mid) == pytest.approx(0.5)


def test_fitted_map_is_monotone_even_when_rates_are_not():
    rng = np.random.default_rng(0)
    conf = rng.random(4000)
    # acceptance falls in the middle: the raw rates are not monotone
    p = np.where((conf > 0.4) & (conf < 0.6), 0.05, conf)
    acc = rng.random(4000) < p
    cal = from_samples(conf, acc, bins=10)
    assert any(b < a for a, b in zip(cal.rates, cal.rates[1:]))
    grid = np.linspace(0, 1, 501)
    a = cal.acceptance(grid)
    assert np.all(np.diff(a) >= 0) and a.min() >= 0 and a.max() <= 1
    assert sum(cal.counts) == 4000 and sum(cal.accepted) == int(acc.sum())
    assert all(n == 400 for n in cal.counts)  # quantile bins hold equal shares


def test_bin_edges():
    conf = np.linspace(0, 1, 1001)
    q = bin_edges(conf, 4, "quantile")
    assert q.tolist() == pytest.approx([0, .25, .5, .75, 1])
    log = bin_edges(conf, 5, "log")
    assert log[0] == 0 and log[-1] == 1 and len(log) == 6 and log[1] == pytest.approx(1e-4)
    # repeated quantiles merge: fewer bins, never an empty-width one
    assert len(bin_edges(np.array([0.5] * 50), 10)) == 3
    with pytest.raises(CalibrationError) as exc:
        bin_edges(conf, 0)
    assert "bins" in one_line(exc)
    with pytest.raises(CalibrationError) as exc:
        bin_edges(conf, 4, "linear")
    assert "binning" in one_line(exc)


# ---------------------------------------------------------------------------- measuring
def test_draft_equal_to_target_accepts_exactly_its_top_candidate():
    """With draft = target, the target's greedy token is the draft's top-1 at every position:
    exactly one candidate per position is accepted, always the first, and every candidate
    above 1/2 (necessarily a top-1) is accepted."""
    target = peaked()
    conf, acc = candidate_outcomes(target, target, PROMPTS[0], topk=4, max_new_tokens=12)
    assert conf.shape == acc.shape == (12, 4)
    assert acc[:, 0].all() and not acc[:, 1:].any()
    assert np.all(np.diff(conf, axis=1) <= 0)
    cal = calibrate(target, target, PROMPTS, topk=4, max_new_tokens=12, bins=6)
    assert sum(cal.accepted) == cal.meta["positions"] == 36
    assert cal.meta["candidates"] == 144 and cal.meta["top1_accept"] == 1.0
    exact = from_samples(*calibrate_samples(target, target), edges=np.array([0, .5, 1]))
    assert exact.rates[1] == 1.0
    assert exact.counts[1] > 0
    top = max(i for i, n in enumerate(cal.counts) if n)
    assert cal.fitted[top] > 0.9 and cal.acceptance(1.0) > 0.9


def calibrate_samples(target, draft):
    pairs = [candidate_outcomes(target, draft, p, topk=4, max_new_tokens=12) for p in PROMPTS]
    return np.concatenate([c for c, _ in pairs]), np.concatenate([a for _, a in pairs])


def test_a_weaker_draft_is_calibrated_lower_and_counts_add_up():
    target = peaked(0)
    draft = peaked(1)  # another random model: rarely agrees
    cal = calibrate(target, draft, PROMPTS, topk=3, max_new_tokens=10, bins=4)
    conf, acc = calibrate_samples(target, draft)
    assert sum(cal.accepted) == int(acc[:, :3].sum()) and sum(cal.counts) == 90
    assert cal.meta["top1_accept"] < 1.0


# ---------------------------------------------------------------------------- files
def test_round_trip_with_latency(tmp_path):
    lat = Latency(LatencyCurve([1, 4], [10.0, 14.0]), LatencyCurve([1, 4], [2.0, 3.0]))
    cal = from_samples(np.array([.1, .2, .7, .9]), np.array([0, 0, 1, 1], bool), bins=2,
                       latency=lat, meta={"target": "t"})
    path = cal.save(tmp_path / "c.json")
    back = Calibration.load(path)
    assert back.edges == cal.edges and back.counts == cal.counts
    assert back.accepted == cal.accepted and back.meta == cal.meta
    assert back.latency.target.ms == [10.0, 14.0] and back.latency.draft.ms == [2.0, 3.0]
    doc = json.loads(path.read_text())
    assert doc["format"] == "treeopt-calibration" and doc["bins"][1]["fitted"] == 1.0
    assert back.with_latency(None).latency is None


@pytest.mark.parametrize("mutate,words", [
    (lambda d: d.update(format="treeopt-profile"), "acceptance profile"),
    (lambda d: d.update(format="other"), "format"),
    (lambda d: d.update(version=9), "version"),
    (lambda d: d["bins"][0].update(accepted=99), "accepted"),
    (lambda d: d["bins"][1].update(lo=0.3), "starts at"),
    (lambda d: d["bins"][0].update(count="x"), "integers"),
    (lambda d: d.update(bins=[]), "bins"),
    (lambda d: d.update(latency={"target": {"tokens": [1], "ms": [-1]}}), "positive"),
])
def test_broken_files_give_one_line_errors(tmp_path, mutate, words):
    cal = from_samples(np.array([.1, .2, .7, .9]), np.array([0, 0, 1, 1], bool), bins=2)
    doc = cal.to_dict()
    mutate(doc)
    path = tmp_path / "c.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(CalibrationError) as exc:
        Calibration.load(path)
    assert words in one_line(exc) and str(path) in str(exc.value)


def test_missing_file_and_overwrite_refusal(tmp_path):
    with pytest.raises(CalibrationError) as exc:
        Calibration.load(tmp_path / "none.json")
    assert "no such calibration file" in one_line(exc)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(CalibrationError) as exc:
        Calibration.load(tmp_path / "bad.json")
    assert "JSON" in one_line(exc)
    other = tmp_path / "profile.json"
    other.write_text(json.dumps({"format": "treeopt-profile"}))
    cal = from_samples(np.array([.5]), np.array([True]), bins=1)
    with pytest.raises(CalibrationError) as exc:
        cal.save(other)
    assert "refusing to overwrite" in one_line(exc)
    with pytest.raises(CalibrationError):
        cal.save(tmp_path / "c.txt")
    with pytest.raises(CalibrationError) as exc:
        from_samples(np.zeros(0), np.zeros(0, bool))
    assert "no candidate" in one_line(exc)


# ---------------------------------------------------------------------------- command
def test_cli_profile_calibration(tmp_path, monkeypatch, capsys):
    from helpers import tiny_tokenizer

    from treeopt.cli import main

    monkeypatch.setenv("TREEOPT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = tmp_path / "tiny"
    tiny_causal_lm("llama", num_layers=2, seed=5).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"id": f"p{i}", "text": f"w{5 + i} w{9 + i} w{7 + 2 * i}"})
                            + "\n" for i in range(4)))
    profile = tmp_path / "p.json"
    lat = Latency(LatencyCurve([1, 8], [5.0, 9.0]), LatencyCurve([1, 8], [1.0, 2.0]))
    profile.write_text(json.dumps({"format": "treeopt-profile", "version": 1, "meta": {},
                                   "acceptance": {"p": [0.5]}, "latency": lat.to_dict()}))
    out = tmp_path / "cal.json"
    args = ["profile", "calibration", "--target", str(folder), "--draft", "early-exit:1",
            "--device", "cpu", "--threads", "1", "--dataset", str(data), "--prompts", "3",
            "--max-new-tokens", "6", "--topk", "3", "--bins", "4", "--out", str(out)]
    assert main(args + ["--latency-from", str(profile)]) == 0
    text = capsys.readouterr().out
    assert "calibration:" in text and "candidates" in text
    cal = Calibration.load(out)
    assert sum(cal.counts) == 3 * 6 * 3 and cal.latency.target.ms == [5.0, 9.0]
    assert cal.meta["draft"] == "early-exit:1" and cal.meta["settings"]["topk"] == 3
    assert main(args[:-2] + ["--out", str(profile)]) == 2  # never overwrites a profile
    assert "refusing to overwrite" in capsys.readouterr().err
