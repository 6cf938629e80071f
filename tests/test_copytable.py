"""The copy-acceptance table: counts against hand counts, the shrinkage estimate by hand,
files (round trip, merge by adding counts, bounded and validated reading), and the online /
teacher-forced measurements on a tiny model."""

import json

import numpy as np
import pytest
import torch

from treeopt.profile import copytable as ct
from treeopt.profile.copytable import CopyTable, CopyTableError, Features, cell


def test_features_fall_in_their_buckets():
    assert ct.match_bucket(0) == 0 and ct.match_bucket(1) == 1 and ct.match_bucket(5) == 4
    assert ct.match_bucket(7) == 5 and ct.match_bucket(1000) == len(ct.MATCH_EDGES) - 1
    assert ct.prob_bucket(0.0) == 0 and ct.prob_bucket(0.3) == 2 and ct.prob_bucket(1.0) == 6
    assert cell(Features(5, 3, 0.5), 100) == (3, 3, 3, 64)  # rank and depth capped


def test_record_counts_every_node_whose_parent_was_accepted():
    # root -> 1, 2 ; 1 -> 3 ; 3 -> 4 ; 2 -> 5. Accepted path 0, 1, 3.
    parents = [-1, 0, 0, 1, 3, 2]
    f = [None, Features(1, 4, 0.8), Features(2, 4, 0.2), Features(1, 5, 1.0),
         Features(1, 6, 0.6), Features(1, 5, 1.0)]
    t = CopyTable()
    assert t.record(parents, f, [0, 1, 3]) == 4  # nodes 1, 2, 3, 4; node 5's parent rejected
    # prob .8 -> bucket 4 (>= .75), .2 -> 1, 1.0 -> 6, .6 -> 3; match 4 -> 4, 5 -> 4, 6 -> 5
    expect = {(1, 4, 4, 1): (1, 1), (2, 1, 4, 1): (1, 0), (1, 6, 4, 2): (1, 1),
              (1, 3, 5, 3): (1, 0)}  # (rank, prob bucket, match bucket, depth)
    got = {(r + 1, q, m, d + 1): (int(t.trials[r, q, m, d]), int(t.accepted[r, q, m, d]))
           for r, q, m, d in zip(*np.nonzero(t.trials))}
    assert got == expect
    assert t.by_depth(1) == [(1, 1, 1), (2, 1, 1), (3, 1, 0)]


def test_estimate_is_the_shrinkage_by_hand():
    t = CopyTable()
    key = (1, 5, 4, 2)
    for ok in (1, 1, 1, 0):
        t.add(key, bool(ok))
    t.add((1, 5, 4, 7), False)  # same (rank, prob, match), another depth
    t.add((1, 2, 1, 1), True)   # same rank only
    k = ct.PRIOR_TRIALS
    a0 = (4 + k * 0.5) / (6 + k)
    a1 = (3 + k * a0) / (5 + k)
    a2 = (3 + k * a1) / (5 + k)
    a = (3 + k * a2) / (4 + k)
    assert t.accept_prob(Features(1, 4, 0.95), 2) == pytest.approx(a)
    # an empty cell falls back to its parent level: (rank 1, prob 5, match 4, depth 3) -> a2
    assert t.accept_prob(Features(1, 4, 0.95), 3) == pytest.approx((0 + k * a2) / k)
    # a rank never seen: the prior 0.5 all the way down
    assert t.accept_prob(Features(2, 1, 0.5), 1) == pytest.approx(0.5)


@pytest.mark.parametrize("seed", [0, 1])
def test_one_cell_rate_is_the_estimate_there_as_counts_arrive(seed):
    """``rate`` (running sums, O(1)) equals ``estimate`` (the whole table summed afresh)
    exactly in every cell, on a random table and after random counts added one by one."""
    rng = np.random.default_rng(seed)
    trials = rng.integers(0, 4, ct.SHAPE)
    t = CopyTable(trials, np.minimum(trials, rng.integers(0, 4, ct.SHAPE)))
    keys = [(r + 1, q, m, d + 1) for r, q, m, d in np.ndindex(*ct.SHAPE)]

    def agree():
        est = t.estimate()
        return all(t.rate(k) == est[k[0] - 1, k[1], k[2], k[3] - 1] for k in keys)

    assert agree()
    for i in rng.integers(0, len(keys), 300):
        t.add(keys[i], bool(rng.integers(0, 2)))
        t.rate(keys[i])  # read between counts, as auto does
    assert agree()


def test_round_trip_merge_and_profile_section(tmp_path):
    t = CopyTable(meta={"drafter": "suffix"})
    t.record([-1, 0, 1], [None, Features(1, 8, 1.0), Features(1, 9, 1.0)], [0, 1, 2])
    u = CopyTable.from_dict(json.loads(json.dumps(t.to_dict())))
    assert (u.trials == t.trials).all() and (u.accepted == t.accepted).all()
    both = t.merge(u)
    assert both.total_trials == 4 and int(both.accepted.sum()) == 4
    own = tmp_path / "copy.json"
    own.write_text(json.dumps(t.to_dict()))
    assert CopyTable.load(own).total_trials == 2
    prof = tmp_path / "profile.json"
    prof.write_text(json.dumps({"format": "treeopt-profile", "version": 1, "copy": t.to_dict()}))
    assert CopyTable.load(prof).total_trials == 2


@pytest.mark.parametrize("edit,match", [
    (lambda d: d.update(format="x"), "no copy-acceptance table"),
    (lambda d: d.update(version=9), "version"),
    (lambda d: d.update(max_depth=32), "max_depth"),
    (lambda d: d["cells"].append([1, 0, 0, 1, 1, 2]), "counts"),
    (lambda d: d["cells"].append([4, 0, 0, 1, 1, 0]), "out of range"),
    (lambda d: d["cells"].append([1, 0, 0, 1, 1.5, 0]), "6 integers"),
    (lambda d: d.update(cells="x"), "cells"),
])
def test_bad_tables_give_one_line_errors(tmp_path, edit, match):
    d = CopyTable().to_dict()
    edit(d)
    p = tmp_path / "t.json"
    p.write_text(json.dumps(d))
    with pytest.raises(CopyTableError, match=match) as exc:
        CopyTable.load(p)
    assert "\n" not in str(exc.value)


def test_reading_is_bounded_and_refuses_non_profiles(tmp_path, monkeypatch):
    p = tmp_path / "big.json"
    p.write_text(json.dumps(CopyTable().to_dict()))
    monkeypatch.setattr(ct, "MAX_FILE_BYTES", 10)
    with pytest.raises(CopyTableError, match="bytes"):
        CopyTable.load(p)
    monkeypatch.undo()
    q = tmp_path / "p.json"
    q.write_text(json.dumps({"format": "treeopt-profile", "version": 1}))
    with pytest.raises(CopyTableError, match="no copy-acceptance table"):
        CopyTable.load(q)
    with pytest.raises(CopyTableError, match="no such file"):
        CopyTable.load(tmp_path / "missing.json")
    r = tmp_path / "bad.json"
    r.write_text("{")
    with pytest.raises(CopyTableError, match="JSON"):
        CopyTable.load(r)


# ---------------------------------------------------------------------------- measuring
def sharp_target():
    from treeopt.testing import tiny_causal_lm

    m = tiny_causal_lm("llama", seed=0)
    with torch.no_grad():
        m.model.norm.weight.mul_(8)
    return m


PROMPTS = [[3, 14, 15, 92, 65] * 3, list(range(10, 27)) * 2]


@pytest.mark.parametrize("name", ["ngram", "suffix:global=0"])
def test_online_counts_are_the_engines_accepted_tokens(name):
    from treeopt.decode.drafter import build_drafter
    from treeopt.decode.engine import generate
    from treeopt.profile.copy import measuring_copy, online_table

    target = sharp_target()
    drafter = build_drafter(name, target=target)
    table = online_table(target, drafter, PROMPTS, max_new_tokens=40, max_tokens=12)
    probe = CopyTable()
    d = measuring_copy(drafter, 12, probe)
    accepted = sum(generate(target, d, torch.tensor([p]), max_new_tokens=40
                            ).stats.accepted_tokens for p in PROMPTS)
    assert int(table.accepted.sum()) == accepted > 0
    assert table.total_trials > accepted
    assert max(dd for dd, _, _ in table.by_depth(1)) >= 5  # long copies give deep rows


def test_teacher_forced_counts_every_position():
    from treeopt.decode.drafter import build_drafter
    from treeopt.profile.copy import greedy_path, teacher_forced_table

    assert greedy_path([-1, 0, 0, 2, 3], [9, 5, 6, 7, 8], [6, 7, 1]) == [0, 2, 3]
    assert greedy_path([-1, 0], [9, 5], [4]) == [0]
    target = sharp_target()
    table = teacher_forced_table(target, build_drafter("ngram", target=target), PROMPTS,
                                 max_new_tokens=30, max_tokens=8)
    # every position after the first with a candidate starts a step: at most 29 per prompt
    depth1 = table.by_depth(1)[0]
    assert depth1[0] == 1 and 0 < depth1[1] <= 2 * 29 and 0 < depth1[2] <= depth1[1]
    assert table.mode == "teacher-forced"


def test_write_into_a_profile_keeps_its_sections(tmp_path):
    from treeopt.profile.copy import write_copy_table

    p = tmp_path / "profile.json"
    p.write_text(json.dumps({"format": "treeopt-profile", "version": 1, "meta": {"a": 1},
                             "latency": {"target": {"tokens": [1, 2], "ms": [1.0, 1.5]}}}))
    t = CopyTable()
    t.add((1, 6, 5, 1), True)
    write_copy_table(t, p)
    write_copy_table(t, p, merge=True)
    doc = json.loads(p.read_text())
    assert doc["meta"] == {"a": 1} and "latency" in doc
    assert CopyTable.load(p).total_trials == 2
    other = tmp_path / "x.json"
    other.write_text(json.dumps({"format": "something"}))
    with pytest.raises(CopyTableError, match="not a treeopt profile"):
        write_copy_table(t, other)
