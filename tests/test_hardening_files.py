"""Hostile and oversized input: memory bombs in tiny files, one size cap for every way of
making a tree, one-line errors instead of tracebacks, no input or foreign file overwritten,
atomic growmap writes, and what ``treeopt show`` reports from a growmap's metadata."""

import json
import os

import pytest
import torch
from helpers import cpu_budget, needs_proc, run_with_memory_limit

from treeopt import limits
from treeopt.cli import main
from treeopt.growmap import MAX_SIZE, GrowmapError, load_growmap, save_growmap, validate_growmap
from treeopt.limits import MAX_TREE_NODES, check_plain, check_tensor
from treeopt.profile import Latency, LatencyCurve, Profile, ProfileError
from treeopt.search.dp import DPError, dp_cost, solve
from treeopt.shapes import ShapeError, chain, from_name, kary
from treeopt.tree import Tree

P = [0.6, 0.1, 0.05, 0.03, 0.02, 0.015, 0.01, 0.008]
EXAMPLE = Tree.from_successors([[1, 2, 3], [4, 5], [6], [], [7], [], [], []])


def one_line_error(capsys, *needles):
    """The command's stderr is exactly one line holding every needle; returns it."""
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


# ============================================================ 1. memory bombs from tiny files
WARM = """
    import sys
    import torch
    torch.set_num_threads(1)
    from treeopt.growmap import load_growmap, save_growmap
    from treeopt.profile import Profile
    from treeopt.tree import Tree
    # warm up every import and code path of loading before the limit
    save_growmap(Tree((-1, 0)), sys.argv[2] + "/warm.pt")
    load_growmap(sys.argv[2] + "/warm.pt")
    torch.save(torch.tensor([0.0, 0.5, 0.5]), sys.argv[2] + "/warm_vec.pt")
    Profile.load(sys.argv[2] + "/warm_vec.pt")
"""
LOAD = """
    path = sys.argv[1]
    try:
        if path.endswith("vec.pt"):
            Profile.load(path)
        else:
            load_growmap(path)
        print("LOADED")
    except ValueError as exc:  # GrowmapError / ProfileError
        print("ERROR", type(exc).__name__, str(exc))
"""


def load_with_memory_limit(path, tmp_path, extra_mb=300, timeout=60):
    """Load ``path`` (growmap, or a Sequoia vector if it ends in vec.pt) in a fresh interpreter
    whose address space may grow by at most ``extra_mb`` MiB past its warmed-up size.
    Returns (stdout lines, peak RSS growth in KiB)."""
    return run_with_memory_limit(WARM, LOAD, path, tmp_path, extra_mb=extra_mb,
                                 timeout=timeout)


def _growmap(tree=EXAMPLE, **changes):
    d = tree.to_growmap()
    d.update(changes)
    return d


def _chain_growmap(size, mask):
    """A chain's growmap built by hand: no (size, size) mask is ever materialised here."""
    return {"roots": [[i] for i in range(size)], "branches": [[1]] * (size - 1) + [[0]],
            "Successors": [[i + 1] for i in range(size - 1)] + [[]],
            "depth": torch.arange(size), "mask": mask, "size": size}


@needs_proc
def test_expanded_depth_tensor_is_refused_in_bounded_memory(tmp_path):
    # 2.5 KB on disk, 10^9 int64 entries (8 GB) once converted
    path = tmp_path / "depth_bomb.pt"
    torch.save(_growmap(depth=torch.zeros(1, dtype=torch.int64).expand(10**9)), path)
    assert path.stat().st_size < 10_000
    lines, growth_kb = load_with_memory_limit(path, tmp_path)
    assert len(lines) == 1 and lines[0].startswith("ERROR GrowmapError"), lines
    assert "'depth'" in lines[0] and "1000000000" in lines[0]
    assert growth_kb < 50_000


@needs_proc
@pytest.mark.parametrize("size", [1 << 15, MAX_TREE_NODES])
def test_expanded_mask_is_refused_in_bounded_memory(size, tmp_path):
    # a chain of `size` nodes whose (size, size) mask is one stored value: 32768 was the old
    # cap (27 GB to validate); 4096 is the new one
    d = _chain_growmap(size, torch.ones(1, 1, dtype=torch.int64).expand(size, size))
    path = tmp_path / "mask_bomb.pt"
    torch.save(d, path)
    lines, growth_kb = load_with_memory_limit(path, tmp_path)
    assert len(lines) == 1 and lines[0].startswith("ERROR GrowmapError"), lines
    if size > MAX_TREE_NODES:
        assert f"{size}" in lines[0] and f"{MAX_TREE_NODES}" in lines[0]
    else:
        assert "'mask'" in lines[0] and "expanded" in lines[0]
    assert growth_kb < 100_000


@needs_proc
def test_expanded_sequoia_vector_is_refused_in_bounded_memory(tmp_path):
    path = tmp_path / "bomb_vec.pt"
    torch.save(torch.zeros(1).expand(10**9), path)
    assert path.stat().st_size < 10_000
    lines, growth_kb = load_with_memory_limit(path, tmp_path)
    assert len(lines) == 1 and lines[0].startswith("ERROR ProfileError"), lines
    assert "acceptance vector" in lines[0] and "1000000000" in lines[0]
    assert growth_kb < 50_000


@needs_proc
def test_shared_list_rows_are_counted_before_they_are_copied(tmp_path):
    # pickle stores a repeated list once: 10^5 references to one 10^4-entry row cost ~1 MB on
    # disk and 10^9 ints (8 GB of pointers, minutes of checks) if walked and copied
    row = list(range(10**4))
    path = tmp_path / "rows_bomb.pt"
    torch.save(_growmap(roots=[row] * 10**5), path)
    lines, growth_kb = load_with_memory_limit(path, tmp_path, timeout=60)
    assert len(lines) == 1 and lines[0].startswith("ERROR GrowmapError"), lines
    assert "'roots'" in lines[0]
    # the same trick in the metadata
    path = tmp_path / "meta_bomb.pt"
    torch.save(_growmap(treeopt={"x": [row] * 10**5}), path)
    lines, growth_kb = load_with_memory_limit(path, tmp_path, timeout=60)
    assert lines[0].startswith("ERROR GrowmapError") and "metadata" in lines[0], lines


def test_every_growmap_tensor_is_checked_before_conversion():
    # exactly `size` entries, but stored expanded or strided: still refused
    with pytest.raises(GrowmapError, match="'depth' is stored expanded"):
        validate_growmap(_growmap(depth=torch.zeros(1, dtype=torch.int64).expand(8)))
    mask = EXAMPLE.to_growmap()["mask"]
    with pytest.raises(GrowmapError, match="'mask' is not contiguous"):
        validate_growmap(_growmap(mask=mask.t().contiguous().t()))
    with pytest.raises(GrowmapError, match="'mask' is a torch.sparse_coo tensor"):
        validate_growmap(_growmap(mask=mask.to_sparse()))
    with pytest.raises(GrowmapError, match=r"'depth' has 9 entries but size is 8"):
        validate_growmap(_growmap(depth=torch.zeros(9, dtype=torch.int64)))
    with pytest.raises(GrowmapError, match=r"'Successors' holds more than 7 node ids"):
        validate_growmap(_growmap(Successors=[[1, 2, 3] * 5] + [[]] * 7))
    # a mask of the right values in a smaller integer type is fine; compared as booleans
    validate_growmap(_growmap(mask=mask.to(torch.uint8)))
    validate_growmap(_growmap(mask=mask.bool()))


def test_check_tensor_and_check_plain_units():
    t = torch.arange(6)
    check_tensor(t, "t", max_numel=6, shape=(6,))
    with pytest.raises(limits.LimitError, match="more than the limit 5"):
        check_tensor(t, "t", max_numel=5)
    with pytest.raises(limits.LimitError, match="expanded"):
        check_tensor(torch.zeros(1).expand(10**12), "t", max_numel=10**13)
    with pytest.raises(limits.LimitError, match="must be a tensor"):
        check_tensor([1, 2], "t", max_numel=5)
    check_plain({"a": [1, 2.5, "x", None, True, {"b": []}]}, "meta")
    with pytest.raises(limits.LimitError, match="nested more than"):
        deep: list = []
        for _ in range(100):
            deep = [deep]
        check_plain(deep, "meta")
    with pytest.raises(limits.LimitError, match="holds a Tensor"):
        check_plain({"t": torch.zeros(2)}, "meta")


# ============================================================ 2. one size cap everywhere
def test_one_cap_constant():
    assert MAX_TREE_NODES == 4096 and MAX_SIZE == MAX_TREE_NODES
    assert limits.MAX_PROFILE_WIDTH == MAX_TREE_NODES - 1


@pytest.mark.parametrize("spec", [
    "chain:4097", "chain:40000", "chain:99999999999999999999", "chain:" + "9" * 5000,
    "kary:2x12", "kary:2x99999999999999999999", "kary:99999999999999999999x1",
    "chains:4097x1", "chains:1x4096", "chains:99999999999999999999x99999999999999999999",
    "specinfer:4096", "specinfer:" + ",".join(["2"] * 12), "specinfer:" + ",".join(["1"] * 5000),
    "greedy:4097", "dp:4097", "dp:99999999999999999999x2",
    "parents:" + json.dumps([-1] + [0] * 4096), "paths:" + json.dumps([[i] for i in range(4096)]),
])
def test_shape_specs_of_every_kind_are_capped_up_front(spec):
    with cpu_budget(2.0), pytest.raises(ShapeError) as info:
        from_name(spec, Profile(P))
    msg = str(info.value)
    assert "\n" not in msg and str(MAX_TREE_NODES) in msg and len(msg) < 400


def test_shapes_at_the_cap_still_work():
    assert chain(MAX_TREE_NODES).size == MAX_TREE_NODES
    assert kary(2, 11).size == 4095
    assert from_name("chains:4095x1").size == MAX_TREE_NODES
    assert from_name("specinfer:" + ",".join(["1"] * 4095)).size == MAX_TREE_NODES
    # a depth limit beyond the size is clamped, not searched
    assert from_name("dp:16x99999999999999999999", Profile(P)) == from_name("dp:16", Profile(P))


def test_dp_is_capped_and_sized_before_it_runs():
    with cpu_budget(2.0):
        with pytest.raises(DPError,
                           match=r"budget \(tree size\) = 100000 exceeds the limit of 4096"):
            solve(P, 100_000, 12)
        with pytest.raises(DPError, match="max depth .* exceeds the limit"):
            solve(P, 64, 5000)
        with pytest.raises(DPError, match="GiB .* over the limits"):
            solve(P, MAX_TREE_NODES, MAX_TREE_NODES)
        with pytest.raises(DPError, match="over the limits"):
            solve([P] * 2000, 3000, 2000)  # depth-aware: one table per (depth, levels left)
    nbytes, ops = dp_cost(1, 8, MAX_TREE_NODES, 12)  # the default depth at the cap: cheap
    assert nbytes < 50 * 2**20 and ops < 1e9
    # ranks a tree of max_size nodes cannot use are dropped; the optimum is unchanged
    table = solve([0.5] + [0.001] * 99, 5, 5)
    assert table.width == 4
    assert table.value(5, 2) == pytest.approx(1 + 0.5 + 0.003)


def test_profile_width_and_latency_limits():
    with pytest.raises(ProfileError, match="4096 .*more than the limit 4095"):
        Profile([0.0] * 4096)
    with pytest.raises(ProfileError, match="exceeds the limit"):
        LatencyCurve([1, 10**30], [1.0, 2.0])
    with pytest.raises(ProfileError, match="'tokens.0.' = inf must be a positive integer"):
        LatencyCurve([float("inf")], [1.0])
    with pytest.raises(ProfileError, match="entries, more than the limit"):
        Profile(torch.zeros(1).expand(10**9))


def test_search_budget_and_sizes_are_capped_up_front(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Profile(P).save("p.json")
    for argv, needles in [
        (["--budget", "100000"], ["--budget = 100000", "4096"]),
        (["--budget", "40000"], ["--budget = 40000", "4096"]),
        (["--budget", "99999999999999999999"], ["--budget", "4096"]),
        (["--max-size", "10000000"], ["--max-size = 10000000", "4096"]),
        (["--budget", "64", "--max-depth", "5000"], ["--max-depth = 5000", "4096"]),
    ]:
        with cpu_budget(5.0):
            assert main(["search", "--profile", "p.json", *argv]) == 2
        one_line_error(capsys, *needles)
    assert not (tmp_path / "growmaps").exists()


def test_shapes_command_refuses_huge_chains_and_writes_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for spec in ("chain:40000", "chain:20000"):
        assert main(["shapes", spec]) == 2
        one_line_error(capsys, spec.split(":")[1], "4096")
    assert main(["shapes", "chain:4", "chain:40000"]) == 2  # checked before the first write
    capsys.readouterr()
    assert not (tmp_path / "growmaps").exists()


def test_latency_point_far_out_does_not_set_the_sweep(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    lat = Latency(LatencyCurve([1, 8, 10**7], [10.0, 12.0, 1e6]), LatencyCurve([1], [1.0]))
    Profile(P, latency=lat).save("lat.json")
    assert main(["search", "--profile", "lat.json", "--max-depth", "3", "--out", "g.pt"]) == 0
    out = capsys.readouterr().out
    assert f"sizes 1..{MAX_TREE_NODES}," in out
    tree, meta = load_growmap(tmp_path / "g.pt")
    assert tree.size <= MAX_TREE_NODES


# ============================================================ 3. one-line errors
def test_deeply_nested_json_is_a_one_line_error(tmp_path, capsys):
    deep = "[" * 100_000 + "]" * 100_000
    (tmp_path / "g.json").write_text(deep)
    with pytest.raises(GrowmapError, match="nested too deeply"):
        load_growmap(tmp_path / "g.json")
    (tmp_path / "p.json").write_text('{"format": "treeopt-profile", "acceptance": ' + deep + "}")
    with pytest.raises(ProfileError, match="p.json: not valid JSON: nested too deeply"):
        Profile.load(tmp_path / "p.json")
    assert main(["show", str(tmp_path / "g.json")]) == 2
    one_line_error(capsys, "g.json", "nested too deeply")
    assert main(["show", "kary:2x2", "--profile", str(tmp_path / "p.json")]) == 2
    one_line_error(capsys, "p.json", "nested too deeply")
    with pytest.raises(ShapeError, match="not a JSON list"):
        from_name("paths:" + "[" * 100_000)
    # integers beyond what Python converts (4300 digits): an error, not a traceback
    (tmp_path / "big.json").write_text('{"size": ' + "9" * 5000 + "}")
    with pytest.raises(GrowmapError, match="not valid JSON"):
        load_growmap(tmp_path / "big.json")


@pytest.mark.parametrize("acc, needle", [
    ('{"p": [0.5], "counts": [Infinity], "none_count": 1}', "non-negative integer count"),
    ('{"p": [0.5], "counts": [1e400], "none_count": 1}', "non-negative integer count"),
    ('{"p": [0.5], "counts": [NaN], "none_count": 1}', "non-negative integer count"),
    ('{"p": [0.5], "counts": [1' + "0" * 30 + '], "none_count": 1}', "beyond any real count"),
    ('{"p": [1' + "0" * 400 + ']}', "too large"),
    ('{"p": [Infinity]}', "must be finite"),
])
def test_infinite_or_huge_numbers_in_profiles(acc, needle, tmp_path, capsys):
    path = tmp_path / "p.json"
    path.write_text('{"format": "treeopt-profile", "version": 1, "acceptance": ' + acc + "}")
    with pytest.raises(ProfileError, match=needle):
        Profile.load(path)
    assert main(["show", "chain:3", "--profile", str(path)]) == 2
    one_line_error(capsys, "p.json", needle)


@pytest.mark.parametrize("tokens", ["[1, Infinity]", "[1, 1e400]", "[1, NaN]",
                                    "[1, 1" + "0" * 30 + "]"])
def test_infinite_or_huge_latency_tokens(tokens, tmp_path):
    path = tmp_path / "p.json"
    path.write_text('{"format": "treeopt-profile", "version": 1, "acceptance": {"p": [0.5]}, '
                    '"latency": {"target": {"tokens": ' + tokens + ', "ms": [1.0, 2.0]}}}')
    with pytest.raises(ProfileError, match=r"tokens\[1\]"):
        Profile.load(path)


@pytest.mark.parametrize("spec, needle", [
    ("parents:[-1,1e400]", "parents[1] = inf is not an integer"),
    ("parents:[-1,0.0]", "parents[1] = 0.0 is not an integer"),
    ("paths:[[1e400]]", "paths[0] must be a list"),
    ("chain:99999999999999999999", "99999999999999999999"),
    ("kary:2xInfinity", "not an integer"),
])
def test_overflowing_shape_specs(spec, needle, capsys):
    with pytest.raises(ShapeError) as info:
        from_name(spec)
    assert needle in str(info.value)
    assert main(["show", spec]) == 2
    one_line_error(capsys, needle)


def test_search_checks_the_picture_before_writing_anything(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Profile(P).save("p.json")
    assert main(["search", "--profile", "p.json", "--budget", "8", "--picture", "x.txt"]) == 2
    one_line_error(capsys, "x.txt", ".png")
    assert not (tmp_path / "growmaps").exists() and not (tmp_path / "x.txt").exists()
    assert main(["search", "--profile", "p.json", "--budget", "8", "--out", "g.txt"]) == 2
    one_line_error(capsys, "unknown growmap extension")
    assert main(["search", "--profile", "p.json", "--budget", "8", "--table", "p.json"]) == 2
    one_line_error(capsys, "--table p.json")
    assert json.loads((tmp_path / "p.json").read_text())["format"] == "treeopt-profile"
    assert not (tmp_path / "growmaps").exists()


# ============================================================ 4. never overwrite inputs
def _searched(path):
    meta = {"method": "dp", "profile": "p.json", "expected_tokens": 3.47534, "budget": 64}
    return save_growmap(EXAMPLE, path, meta=meta)


def test_shapes_never_rewrites_its_input(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    src = _searched(tmp_path / "growmaps" / "x.pt")
    before = src.read_bytes()
    assert main(["shapes", "growmaps/x.pt"]) == 2
    one_line_error(capsys, "growmaps/x.pt", "input")
    assert src.read_bytes() == before
    assert main(["shapes", "growmaps/x.pt", "--out", "growmaps/./x.pt"]) == 2
    capsys.readouterr()
    assert src.read_bytes() == before
    # converting keeps the search metadata
    assert main(["shapes", "growmaps/x.pt", "--json"]) == 0
    capsys.readouterr()
    tree, meta = load_growmap(tmp_path / "growmaps" / "x.json")
    assert tree == EXAMPLE
    assert meta["method"] == "dp" and meta["expected_tokens"] == 3.47534
    assert meta["profile"] == "p.json" and meta["converted_from"] == "growmaps/x.pt"


def test_no_growmap_over_a_file_of_another_kind(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Profile(P).save("p.json")
    before = (tmp_path / "p.json").read_bytes()
    assert main(["shapes", "chain:4", "--out", "p.json"]) == 2
    one_line_error(capsys, "p.json", "refusing to overwrite", "treeopt-profile")
    with pytest.raises(GrowmapError, match="refusing to overwrite"):
        save_growmap(EXAMPLE, tmp_path / "p.json")
    assert main(["search", "--profile", "p.json", "--budget", "8", "--out", "p.json"]) == 2
    one_line_error(capsys, "--out p.json is also --profile")
    Profile(P).save("q.json")
    assert main(["search", "--profile", "p.json", "--budget", "8", "--out", "q.json"]) == 2
    one_line_error(capsys, "q.json", "refusing to overwrite")
    assert (tmp_path / "p.json").read_bytes() == before
    # a Sequoia vector under a growmap name is not replaced either
    torch.save(torch.tensor([0.0, 0.5, 0.5]), tmp_path / "vec.pt")
    with pytest.raises(GrowmapError, match="refusing to overwrite"):
        save_growmap(EXAMPLE, tmp_path / "vec.pt")
    # and no profile over a growmap
    g = save_growmap(EXAMPLE, tmp_path / "g.json")
    with pytest.raises(ProfileError, match="refusing to overwrite"):
        Profile(P).save(g)
    # replacing a growmap with a growmap, or an empty file, is fine
    save_growmap(chain(3), g)
    (tmp_path / "empty.pt").write_bytes(b"")
    save_growmap(chain(3), tmp_path / "empty.pt")
    assert load_growmap(g)[0] == load_growmap(tmp_path / "empty.pt")[0] == chain(3)


# ============================================================ 5. atomic writes
@pytest.mark.parametrize("suffix", [".pt", ".json"])
@pytest.mark.parametrize("failure", ["rename", "write"])
def test_interrupted_growmap_write_keeps_the_old_file(suffix, failure, tmp_path, monkeypatch):
    path = _searched(tmp_path / f"g{suffix}")
    before = path.read_bytes()

    def boom(*args, **kwargs):
        raise KeyboardInterrupt("killed mid-write")

    if failure == "rename":
        monkeypatch.setattr(os, "replace", boom)
    elif suffix == ".pt":
        def partial_save(obj, fh, *args, **kwargs):
            fh.write(b"PK\x03\x04 half a zip")
            raise KeyboardInterrupt("killed mid-write")
        monkeypatch.setattr(torch, "save", partial_save)
    else:  # the text is written, the flush to disk fails
        monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(KeyboardInterrupt):
        save_growmap(chain(5), path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert load_growmap(path)[0] == EXAMPLE
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


def test_interrupted_profile_write_keeps_the_old_file(tmp_path, monkeypatch):
    for name in ("p.json", "p.pt"):
        path = Profile(P).save(tmp_path / name)
        before = path.read_bytes()
        monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError("disk")))
        with pytest.raises(OSError):
            Profile([0.5]).save(path)
        monkeypatch.undo()
        assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.json", "p.pt"]


def test_written_growmap_has_ordinary_permissions(tmp_path):
    umask = os.umask(0o022)
    try:
        path = save_growmap(EXAMPLE, tmp_path / "g.pt")
    finally:
        os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o644


# ============================================================ 6. show and Sequoia vectors
def test_show_reports_recorded_profile_and_expected_tokens(tmp_path, capsys):
    g = _searched(tmp_path / "g.pt")
    assert main(["show", str(g)]) == 0
    line = capsys.readouterr().out.strip()
    assert line == ("g.pt: size 8, depth 3, width 3, 4 leaves; recorded: F = 3.4753 "
                    "tokens/step under p.json (dp, budget 64)")
    prof = Profile([0.6, 0.1, 0.05]).save(tmp_path / "q.json")
    assert main(["show", str(g), "--profile", str(prof)]) == 0
    line = capsys.readouterr().out.strip()
    assert "F = 2.4460 tokens/step; recorded: F = 3.4753 tokens/step under p.json" in line
    # a Sequoia growmap (no metadata): the summary alone
    save_growmap(EXAMPLE, tmp_path / "plain.pt")
    assert main(["show", str(tmp_path / "plain.pt")]) == 0
    assert "recorded" not in capsys.readouterr().out


def test_sequoia_vector_without_none_says_why_and_how_to_fix(tmp_path, capsys):
    # Sequoia's tests/fast_test.py saves [0, p1..pW] with no final none entry
    p = [0.6, 0.2, 0.1]
    torch.save(torch.tensor([0.0, *p]), tmp_path / "fast.pt")
    with pytest.raises(ProfileError) as info:
        Profile.load(tmp_path / "fast.pt")
    msg = str(info.value)
    assert "not 1 - sum(p)" in msg and "fast_test.py" in msg and "append" in msg
    assert main(["show", "chain:3", "--profile", str(tmp_path / "fast.pt")]) == 2
    one_line_error(capsys, "fast_test.py")
    # the fix given in the message works
    v = torch.load(tmp_path / "fast.pt")
    torch.save(torch.cat([v, 1 - v.sum(0, keepdim=True)]), tmp_path / "fast.pt")
    assert Profile.load(tmp_path / "fast.pt").p == pytest.approx(p)
    # entries summing past 1 fit neither layout: no fast_test hint
    torch.save(torch.tensor([0.0, 0.7, 0.6]), tmp_path / "bad.pt")
    with pytest.raises(ProfileError) as info:
        Profile.load(tmp_path / "bad.pt")
    assert "fast_test" not in str(info.value)


def test_check_width_unit():
    assert limits.check_width(8, "--width", vocab_size=49152) == 8
    with pytest.raises(limits.LimitError, match="exceeds the vocabulary"):
        limits.check_width(64, "--width", vocab_size=50)
    with pytest.raises(limits.LimitError, match="exceeds the limit 4095"):
        limits.check_width(10**6, "--width")
    with pytest.raises(limits.LimitError, match="must be an integer"):
        limits.check_width(float("inf"), "--width")
