"""Profile type: validation, files (JSON and Sequoia's vector), counts, CI, merge, latency."""

import json
import math
from pathlib import Path

import pytest
import torch

from treeopt.profile import Latency, LatencyCurve, Profile, ProfileError, wilson_interval
from treeopt.tree import Tree

PROFILES = Path(__file__).resolve().parent.parent / "profiles"

SEQUOIA_P = [.63418, .10795, .05697, .02249, .01949, .01499, .0045, .003, .01199, .0045, .0075,
             .0045, .006, .003, .0015, .003, .0015, .003, 0, .003, .003, .003, 0, .0015, 0,
             .0015, 0, 0, 0, .0015, .0015, .0015]


def write(tmp_path, d, name="p.json"):
    path = tmp_path / name
    path.write_text(json.dumps(d))
    return path


def doc(p=(0.6, 0.2), **acc):
    return {"format": "treeopt-profile", "version": 1, "meta": {"source": "test"},
            "acceptance": {"p": list(p), **acc}}


# ------------------------------------------------------------------ basics
def test_none_width_table():
    prof = Profile([0.6, 0.1, 0.05])
    assert prof.width == 3
    assert prof.none == pytest.approx(0.25)
    assert prof.table() == [[0.6, 0.1, 0.05]]
    deep = Profile([0.6, 0.1], by_depth=[[0.6, 0.1], [0.5, 0.2]])
    assert deep.table() == [[0.6, 0.1], [0.5, 0.2]]
    assert deep.table(depth_aware=False) == [[0.6, 0.1]]


def test_table_feeds_tree_expected_tokens():
    # DESIGN's size-8 tree: root children ranks 1,2,3; node 1 has ranks 1,2; node 2 rank 1;
    # node 4 (rank 1 under node 1) has rank 1.
    # F = 1 + (.6 + .1 + .05) + .6*(.6 + .1) + .1*.6 + .6*.6*.6 = 1 + .75 + .42 + .06 + .216
    tree = Tree.from_successors([[1, 2, 3], [4, 5], [6], [], [7], [], [], []])
    prof = Profile([0.6, 0.1, 0.05])
    assert tree.expected_tokens(prof.table()) == pytest.approx(2.446)
    # depth-aware: depth-0 parents use row 0, deeper ones row 1 (.5, .2, 0):
    # F = 1 + .75 + .6*(.5 + .2) + .1*.5 + .6*.5*.5 = 1 + .75 + .42 + .05 + .15
    deep = Profile([0.6, 0.1, 0.05], by_depth=[[0.6, 0.1, 0.05], [0.5, 0.2, 0.0]])
    assert tree.expected_tokens(deep.table()) == pytest.approx(2.37)


@pytest.mark.parametrize("kwargs, pattern", [
    (dict(p=[]), r"'acceptance.p' is empty"),
    (dict(p=[0.5, -0.1]), r"'acceptance.p\[1\]' = -0.1 is negative"),
    (dict(p=[float("nan")]), r"'acceptance.p\[0\]' is nan"),
    (dict(p=[float("inf")]), "must be finite"),
    (dict(p=[1.5]), "exceeds 1"),
    (dict(p=[0.7, 0.3, 0.01]), "sums to 1.010000 > 1"),
    (dict(p=["0.5"]), "must be a number"),
    (dict(p=[0.5], by_depth=[]), "by_depth' is empty"),
    (dict(p=[0.5, 0.1], by_depth=[[0.5, 0.1], [0.5]]), r"by_depth\[1\].p' has 1 entries.*ragged"),
    (dict(p=[0.5], by_depth=[[1.2]]), r"by_depth\[0\].p\[0\]' = 1.2 exceeds 1"),
    (dict(p=[0.5], counts=[5]), "come together"),
    (dict(p=[0.5], counts=[5], none_count=4), "disagrees with its counts"),
    (dict(p=[0.5], counts=[-5], none_count=-5), "non-negative integer"),
    (dict(p=[0.5], counts=[0], none_count=0), "no samples"),
    (dict(p=[0.5, 0.1], counts=[5], none_count=5), "'acceptance.counts' has 1 entries"),
])
def test_validation(kwargs, pattern):
    with pytest.raises(ProfileError, match=pattern) as info:
        Profile(**kwargs)
    assert "\n" not in str(info.value)


def test_sum_tolerance():
    Profile([0.5, 0.5 + 5e-7])
    with pytest.raises(ProfileError):
        Profile([0.5, 0.5 + 5e-6])


# ------------------------------------------------------------------ latency
def test_latency_curve_interpolation():
    c = LatencyCurve([1, 2, 4, 8], [10.0, 12.0, 20.0, 24.0])
    assert c(1) == 10.0 and c(0) == 10.0 and c(0.5) == 10.0  # flat below
    assert c(3) == pytest.approx(16.0)
    assert c(6) == pytest.approx(22.0)
    assert c(8) == 24.0
    assert c(16) == pytest.approx(32.0)  # slope of the last two points: 1 ms/token
    assert LatencyCurve([4], [7.0])(100) == 7.0


@pytest.mark.parametrize("tokens, ms, spread, pattern", [
    ([], [], None, "empty"),
    ([1, 2], [1.0], None, "2 'tokens' but 1 'ms'"),
    ([1, 4, 2], [1.0, 2.0, 3.0], None, r"increase strictly.*tokens\[2\] = 2 follows 4"),
    ([1, 1], [1.0, 2.0], None, "increase strictly"),
    ([0, 1], [1.0, 2.0], None, r"'tokens\[0\]' = 0 must be a positive integer"),
    ([1.5], [1.0], None, "positive integer"),
    ([1, 2], [1.0, 0.0], None, r"'ms\[1\]' = 0.0 must be positive"),
    ([1, 2], [1.0, -3.0], None, "must be positive"),
    ([1, 2], [1.0, float("nan")], None, "finite"),
    ([1, 2], [1.0, 2.0], [0.1], "'spread_ms' has 1 entries"),
    ([1, 2], [1.0, 2.0], [0.1, -1], "non-negative"),
])
def test_latency_validation(tokens, ms, spread, pattern):
    with pytest.raises(ProfileError, match=pattern):
        LatencyCurve(tokens, ms, spread)


def test_latency_in_file_names_file_and_field(tmp_path):
    d = doc()
    d["latency"] = {"context": 192, "meta": {}, "target": {"tokens": [1, 2, 2], "ms": [1, 2, 3]}}
    path = write(tmp_path, d)
    with pytest.raises(ProfileError, match=r"p.json: 'latency.target': .*increase strictly"):
        Profile.load(path)
    d["latency"] = {"draft": {"tokens": [1], "ms": [1]}}
    with pytest.raises(ProfileError, match="needs a 'target' curve"):
        Profile.load(write(tmp_path, d))
    d["latency"] = {"target": {"tokens": [1], "ms": [1]}, "draft": {"tokens": [1], "ms": [-1]}}
    with pytest.raises(ProfileError, match="'latency.draft'.*must be positive"):
        Profile.load(write(tmp_path, d))


# ------------------------------------------------------------------ files
def test_json_round_trip_full(tmp_path):
    lat = Latency(LatencyCurve([1, 2, 4], [25.4, 26.8, 28.2], [0.1, 0.2, 0.3]),
                  LatencyCurve([1, 2], [0.28, 0.24]), context=192, meta={"device": "L40"})
    prof = Profile.from_counts([60, 20, 5], 15, depth_counts=[[60, 20, 5], [3, 1, 0]],
                               depth_none=[15, 1], meta={"pair": "a/b"}, latency=lat)
    path = prof.save(tmp_path / "full.json")
    back = Profile.load(path)
    assert back == prof
    assert back.latency.target(3) == pytest.approx(27.5)
    d = json.loads(path.read_text())
    assert d["format"] == "treeopt-profile" and d["version"] == 1
    assert d["acceptance"]["by_depth"][1] == {"p": [0.6, 0.2, 0.0], "counts": [3, 1, 0],
                                              "none_count": 1}


def test_load_errors_name_file_and_field(tmp_path):
    cases = [
        (doc(p=[0.5, -0.2]), r"p.json: 'acceptance.p\[1\]' = -0.2 is negative"),
        (doc(p=[0.9, 0.2]), "p.json: 'acceptance.p' sums to"),
        (doc(p=[0.5, 0.1], by_depth=[{"p": [0.5, 0.1]}, {"p": [0.5]}]), "ragged by_depth"),
        (doc(p=[0.5], by_depth=[[0.5]]), r"'acceptance.by_depth\[0\]' must be an object"),
        (doc(p=[0.5, 0.2], counts=[5, 2], none_count=3, extra=1), "unknown field"),
        (doc(p=[0.5], by_depth=[{"p": [0.5], "counts": [1], "none_count": 1}, {"p": [0.4]}]),
         "must all have 'counts'"),
        ({"format": "treeopt-profile", "version": 1, "acceptance": {}}, "at least 'p'"),
        ({"format": "something", "version": 1}, "'format' is 'something'"),
        ({**doc(), "version": 2}, "unsupported profile 'version'"),
        ([0.5, 0.2], "expected a JSON object"),
    ]
    for d, pattern in cases:
        with pytest.raises(ProfileError, match=pattern) as info:
            Profile.load(write(tmp_path, d))
        assert "\n" not in str(info.value)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ProfileError, match="bad.json: not valid JSON"):
        Profile.load(tmp_path / "bad.json")
    with pytest.raises(ProfileError, match="no such profile file"):
        Profile.load(tmp_path / "missing.json")


def test_sequoia_vector_pt(tmp_path):
    none = 1 - math.fsum(SEQUOIA_P)
    torch.save(torch.tensor([0.0, *SEQUOIA_P, none]), tmp_path / "acc.pt")
    prof = Profile.load(tmp_path / "acc.pt")
    assert prof.width == 32
    assert prof.p == pytest.approx(SEQUOIA_P, abs=1e-7)
    assert prof.none == pytest.approx(0.07346, abs=1e-4)  # published none, rounded
    # what Sequoia's tree_search reads: torch.load(...)[:-1], p[1..W]
    prof.save(tmp_path / "out.pt")
    v = torch.load(tmp_path / "out.pt", weights_only=True)
    assert v.dim() == 1 and v.numel() == 34 and v[0] == 0
    assert v[:-1][1:].tolist() == pytest.approx(SEQUOIA_P, abs=1e-7)


def test_sequoia_vector_errors(tmp_path):
    cases = {
        "2d.pt": (torch.zeros(2, 3), "1-D float tensor"),
        "short.pt": (torch.tensor([0.0, 1.0]), "2 entries"),
        "lead.pt": (torch.tensor([0.5, 0.3, 0.2]), "must start with 0"),
        "none.pt": (torch.tensor([0.0, 0.5, 0.2, 0.1]), "not 1 - sum"),
        "neg.pt": (torch.tensor([0.0, 0.9, -0.1, 0.2]), r"'acceptance.p\[1\]' = .* is negative"),
        "dict.pt": ({"p": [0.5]}, "got dict"),
    }
    for name, (obj, pattern) in cases.items():
        torch.save(obj, tmp_path / name)
        with pytest.raises(ProfileError, match=pattern) as info:
            Profile.load(tmp_path / name)
        assert str(info.value).startswith(str(tmp_path / name))
    (tmp_path / "trunc.pt").write_bytes(b"PK\x03\x04trunc")
    with pytest.raises(ProfileError, match="not a readable torch file"):
        Profile.load(tmp_path / "trunc.pt")


def test_hostile_profile_pt_never_runs(tmp_path):
    marker = tmp_path / "marker"

    class Payload:
        def __reduce__(self):
            return (exec, (f"open({str(marker)!r}, 'w').write('x')",))

    torch.save(Payload(), tmp_path / "evil.pt")
    with pytest.raises(ProfileError, match="refused to load"):
        Profile.load(tmp_path / "evil.pt")
    assert not marker.exists()


# ------------------------------------------------------------------ counts, CI, merge
def test_from_counts_and_ci95():
    prof = Profile.from_counts([60, 20, 5], 15)
    assert prof.p == [0.6, 0.2, 0.05]
    assert prof.none == pytest.approx(0.15)
    ci = prof.ci95()
    assert len(ci) == 3
    # Wilson, n=100, k=60, z=1.96: centre (0.6 + 1.92/100)/1.0384 = 0.59630;
    # half 1.96*sqrt(0.0024 + 0.0000960)/1.0384 = 0.094312 -> (0.50200, 0.69061)
    assert ci[0] == pytest.approx((0.50200, 0.69060), abs=2e-5)
    for (lo, hi), p in zip(ci, prof.p):
        assert lo < p < hi
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == 1.0
    with pytest.raises(ProfileError, match="no raw counts"):
        Profile([0.5]).ci95()


def test_from_counts_depth_rows():
    prof = Profile.from_counts([6, 2], 2, depth_counts=[[4, 1], [2, 1]], depth_none=[0, 2])
    assert prof.by_depth == [[0.8, 0.2], [0.4, 0.2]]
    assert prof.ci95(depth=1)[0] == wilson_interval(2, 5)
    with pytest.raises(ProfileError, match="no samples"):
        Profile.from_counts([6, 2], 2, depth_counts=[[0, 0]], depth_none=[0])
    with pytest.raises(ProfileError, match="'depth_none' has 1 entries"):
        Profile.from_counts([6, 2], 2, depth_counts=[[1, 0], [1, 0]], depth_none=[0])


def test_merge_adds_counts():
    a = Profile.from_counts([60, 20, 5], 15, depth_counts=[[60, 20, 5]], depth_none=[15],
                            meta={"run": 1})
    b = Profile.from_counts([10, 10, 0], 80, depth_counts=[[5, 5, 0], [5, 5, 0]],
                            depth_none=[40, 40], meta={"run": 2})
    m = a.merge(b)
    assert m.counts == [70, 30, 5] and m.none_count == 95
    assert m.p == [0.35, 0.15, 0.025]
    assert m.depth_counts == [[65, 25, 5], [5, 5, 0]] and m.depth_none == [55, 40]
    assert m.meta["merged_from"] == [{"run": 1}, {"run": 2}]
    # only one side with depth counts: depth rows are dropped, totals still add
    c = Profile.from_counts([1, 1, 0], 2)
    assert a.merge(c).by_depth is None and a.merge(c).counts == [61, 21, 5]


def test_merge_errors():
    counted = Profile.from_counts([6, 2], 2)
    with pytest.raises(ProfileError, match="second profile has no raw counts"):
        counted.merge(Profile([0.6, 0.2]))
    with pytest.raises(ProfileError, match="first profile has no raw counts"):
        Profile([0.6, 0.2]).merge(counted)
    with pytest.raises(ProfileError, match="width 2 and 3"):
        counted.merge(Profile.from_counts([1, 1, 1], 1))


# ------------------------------------------------------------------ shipped profiles
def test_shipped_profiles_load_and_state_provenance():
    files = sorted(PROFILES.glob("*.json"))
    assert files, "no shipped profiles"
    for path in files:
        prof = Profile.load(path)
        assert prof.meta.get("source") and prof.meta.get("description"), path.name


def test_shipped_sequoia_reference_is_the_published_vector():
    prof = Profile.load(PROFILES / "sequoia-reference.json")
    assert prof.p == SEQUOIA_P
    assert prof.none == pytest.approx(0.07346, abs=1e-4)
    lat = Profile.load(PROFILES / "sequoia-reference-l40-7b.json")
    assert lat.p == SEQUOIA_P
    assert lat.latency.target.tokens == [1, 2, 4, 8, 16, 32, 64, 128]
    assert lat.latency.target.ms == [25.4, 26.8, 28.2, 27.1, 26.8, 27.6, 27.3, 29.5]
    assert lat.latency.draft.ms == [0.28, 0.24, 0.24, 0.25, 0.27, 0.31, 0.33, 0.42]
    assert lat.latency.context == 192
