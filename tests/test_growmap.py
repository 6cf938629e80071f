"""Growmap I/O: Sequoia compatibility, round trips, and every kind of damage."""

import json
import pickle

import pytest
import torch

from treeopt.growmap import (
    GrowmapError,
    growmap_dict,
    load_growmap,
    save_growmap,
    validate_growmap,
)
from treeopt.tree import Tree

# DESIGN's size-8 example.
EXAMPLE = dict(
    roots=[[0], [1, 2, 3], [4, 5, 6], [7]],
    branches=[[3], [2, 1, 0], [1, 0, 0], [0]],
    Successors=[[1, 2, 3], [4, 5], [6], [], [7], [], [], []],
    depth=[0, 1, 1, 1, 2, 2, 2, 3],
)


def sequoia_growmap(branch_plan):
    """Build a growmap the way Sequoia's tree_search.py does after its DP: expand every active
    node level by level, giving node i ``branch_plan[i]`` consecutive children.

    Mirrors its loop (positions / Successors / parents / depth / attention_mask rows copied
    from the parent), so the types are Sequoia's: python lists, a ``.long()`` mask, a
    ``LongTensor`` depth and a python int size."""
    m = len(branch_plan)
    active = [True]
    depth = [0]
    successors = [[]]
    attention_mask = torch.zeros(m, m).long()
    parents = [-1]
    expand_lists, expand_branches = [], []
    num_nodes = 1
    while True:
        expand, expand_branch = [], []
        for i, act in enumerate(active):
            if act:
                if parents[i] != -1:
                    attention_mask[i] = attention_mask[parents[i]]
                attention_mask[i][i] = 1
                expand.append(i)
                active[i] = False
                z = branch_plan[i]
                expand_branch.append(z)
                successors[i].extend(list(range(num_nodes, num_nodes + z)))
                successors.extend([[] for _ in range(z)])
                parents.extend([i for _ in range(z)])
                depth.extend([depth[i] + 1 for _ in range(z)])
                num_nodes = num_nodes + z
        if len(expand) == 0:
            break
        expand_lists.append(expand)
        expand_branches.append(expand_branch)
        active.extend([True for _ in range(sum(expand_branch))])
    assert num_nodes == m
    return {"roots": expand_lists, "branches": expand_branches, "Successors": successors,
            "mask": attention_mask, "depth": torch.LongTensor(depth), "size": num_nodes}


def example_tree():
    return Tree.from_successors(EXAMPLE["Successors"])


# ------------------------------------------------------------------ Sequoia compatibility
@pytest.mark.parametrize("plan", [
    [3, 2, 1, 0, 1, 0, 0, 0],          # DESIGN's size-8 example
    [1, 1, 1, 1, 0],                   # chain of 5
    [2, 2, 2, 0, 0, 0, 0],             # binary, depth 2
    [0],                               # root only
])
def test_sequoia_built_growmap_matches_ours(plan, tmp_path):
    seq = sequoia_growmap(plan)
    tree = validate_growmap(seq)
    ours = tree.to_growmap()
    assert ours["roots"] == seq["roots"]
    assert ours["branches"] == seq["branches"]
    assert ours["Successors"] == seq["Successors"]
    assert ours["size"] == seq["size"]
    assert ours["mask"].dtype == seq["mask"].dtype == torch.int64
    assert torch.equal(ours["mask"], seq["mask"])
    assert ours["depth"].dtype == seq["depth"].dtype == torch.int64
    assert torch.equal(ours["depth"], seq["depth"])
    # Sequoia's file (torch.save of its dict) loads in ours.
    torch.save(seq, tmp_path / "sequoia.pt")
    loaded, meta = load_growmap(tmp_path / "sequoia.pt")
    assert loaded == tree and meta == {}


def test_example_values_and_design_table():
    seq = sequoia_growmap([3, 2, 1, 0, 1, 0, 0, 0])
    assert seq["roots"] == EXAMPLE["roots"]
    assert seq["branches"] == EXAMPLE["branches"]
    assert seq["Successors"] == EXAMPLE["Successors"]
    assert seq["depth"].tolist() == EXAMPLE["depth"]


def test_our_pt_reads_like_sequoia_expects(tmp_path):
    """Plain torch.load (what Sequoia calls) gets exactly Sequoia's types, and the fields are
    usable the way its verifier and testbed use them."""
    tree = example_tree()
    save_growmap(tree, tmp_path / "t.pt", meta={"profile": "x.json", "expected_tokens": 2.5,
                                                 "budget": {"size": 8, "depth": 4}})
    g = torch.load(tmp_path / "t.pt", weights_only=True)
    assert type(g["size"]) is int and g["size"] == 8
    assert all(type(x) is int for row in g["roots"] + g["branches"] + g["Successors"]
               for x in row)
    assert isinstance(g["mask"], torch.Tensor) and g["mask"].dtype == torch.int64
    assert tuple(g["mask"].shape) == (8, 8)
    assert g["depth"].dtype == torch.int64
    # Sequoia: draft_step = len(roots); it grows levels 0..draft_step-2 with branches[i].
    assert len(g["roots"]) == tree.depth + 1
    assert [sum(x) for x in g["branches"]][:-1] == [3, 3, 1]
    assert ((g["mask"] == 0).float().sum() == 64 - sum(len(tree.path_to(i)) for i in range(8)))
    assert g["depth"][1:].tolist() == EXAMPLE["depth"][1:]
    assert g["treeopt"] == {"profile": "x.json", "expected_tokens": 2.5,
                            "budget": {"size": 8, "depth": 4}}


# ------------------------------------------------------------------ round trips
@pytest.mark.parametrize("suffix", [".pt", ".json"])
def test_round_trip(suffix, tmp_path):
    trees = [example_tree(), Tree((-1,)), Tree.from_parents([-1, 0, 1, 2]),
             Tree.from_paths([[0], [1], [2], [0, 0], [0, 1], [1, 0], [0, 0, 0]])]
    for i, tree in enumerate(trees):
        path = save_growmap(tree, tmp_path / f"t{i}{suffix}", meta={"i": i, "t": (1, 2)})
        loaded, meta = load_growmap(path)
        assert loaded == tree
        assert meta == {"i": i, "t": [1, 2]}


def test_json_with_mask_and_between_formats(tmp_path):
    tree = example_tree()
    save_growmap(tree, tmp_path / "a.json", json_mask=True)
    d = json.loads((tmp_path / "a.json").read_text())
    assert d["mask"] == tree.to_growmap()["mask"].tolist()
    t1, _ = load_growmap(tmp_path / "a.json")
    save_growmap(t1, tmp_path / "b.pt")
    t2, _ = load_growmap(tmp_path / "b.pt")
    save_growmap(t2, tmp_path / "c.json")
    t3, meta = load_growmap(tmp_path / "c.json")
    assert t1 == t2 == t3 == tree and meta == {}
    assert "mask" not in json.loads((tmp_path / "c.json").read_text())


def test_json_without_format_key_is_accepted(tmp_path):
    (tmp_path / "g.json").write_text(json.dumps({**EXAMPLE, "size": 8}))
    assert load_growmap(tmp_path / "g.json")[0] == example_tree()


def test_growmap_dict_meta_must_be_plain():
    with pytest.raises(GrowmapError, match="meta.x holds a object"):
        growmap_dict(example_tree(), {"x": object()})


def test_unknown_extension(tmp_path):
    with pytest.raises(GrowmapError, match="unknown growmap extension"):
        save_growmap(example_tree(), tmp_path / "t.txt")


# ------------------------------------------------------------------ damage
def good():
    return example_tree().to_growmap()


def damaged(**changes):
    d = good()
    for k, v in changes.items():
        if v is KeyError:
            del d[k]
        else:
            d[k] = v
    return d


BAD_MASK = good()["mask"].clone()
BAD_MASK[7, 2] = 1
BAD_MASK_VALUE = good()["mask"].clone()
BAD_MASK_VALUE[3, 0] = 2

DAMAGE = {
    "missing roots": (damaged(roots=KeyError), "missing key.*'roots'"),
    "missing mask": (damaged(mask=KeyError), "missing key.*'mask'"),
    "size is str": (damaged(size="8"), "'size' must be an int"),
    "size is bool": (damaged(size=True), "'size' must be an int"),
    "size mismatch": (damaged(size=9), "'Successors' has 8 rows but size is 9"),
    "size zero": (damaged(size=0), "outside 1.."),
    "roots[0] not root": (damaged(roots=[[1], [0, 2, 3], [4, 5, 6], [7]]),
                          r"'roots\[0\]' must be \[0\]"),
    "roots wrong level": (damaged(roots=[[0], [1, 2], [3, 4, 5, 6], [7]],
                                  branches=[[3], [2, 1], [0, 1, 0, 0], [0]]), r"'roots\[1\]'"),
    "roots missing level": (damaged(roots=[[0], [1, 2, 3], [4, 5, 6]],
                                    branches=[[3], [2, 1, 0], [1, 0, 0]]), r"'roots\[3\]'"),
    "roots/branches shapes": (damaged(branches=[[3], [2, 1], [1, 0, 0], [0]]), "different shapes"),
    "branches wrong count": (damaged(branches=[[3], [2, 1, 0], [0, 1, 0], [0]]),
                             r"'branches\[2\]\[0\]' = 0 but node 4 has 1 children"),
    "roots not lists": (damaged(roots="0123"), "'roots' must be a list"),
    "successor float": (damaged(Successors=[[1.0, 2, 3], [4, 5], [6], [], [7], [], [], []]),
                        r"'Successors\[0\]\[0\]' must be an int"),
    "successor out of range": (damaged(Successors=[[1, 2, 3], [4, 9], [6], [], [7], [], [], []]),
                               "bad 'Successors'.*outside"),
    "successor two parents": (damaged(Successors=[[1, 2, 3], [4, 5], [4], [], [7], [], [], []]),
                              "bad 'Successors'.*two parents"),
    "successors unreachable": (damaged(Successors=[[1, 2, 3], [4, 5], [], [], [7], [], [], []]),
                               "bad 'Successors'.*nobody's child"),
    "successors not breadth-first": (damaged(Successors=[[1, 2, 3], [4, 5], [6], [], [], [],
                                                         [], [7]]),
                                     "bad 'Successors'"),
    "mask wrong entry": (damaged(mask=BAD_MASK), r"'mask\[7\]\[2\]' = 1 but should be 0"),
    "mask value 2": (damaged(mask=BAD_MASK_VALUE), r"'mask\[3\]\[0\]' = 2"),
    "mask wrong shape": (damaged(mask=torch.ones(7, 7, dtype=torch.int64)), "shape"),
    "mask float": (damaged(mask=good()["mask"].float()), "integer"),
    "mask list": (damaged(mask="mask"), "'mask' must be an int64 tensor"),
    "depth wrong": (damaged(depth=torch.tensor([0, 1, 1, 1, 2, 2, 2, 2])),
                    r"'depth\[7\]' = 2 but node 7 is at depth 3"),
    "depth short": (damaged(depth=torch.tensor([0, 1, 1, 1, 2, 2, 2])), "7 entries but size is 8"),
    "depth 2-D": (damaged(depth=torch.zeros(2, 4, dtype=torch.int64)), "1-D integer tensor"),
    "metadata not dict": (damaged(treeopt=[1, 2]), "metadata must be a dict"),
}


@pytest.mark.parametrize("name", list(DAMAGE))
def test_damage_in_pt_file(name, tmp_path):
    d, pattern = DAMAGE[name]
    path = tmp_path / "bad.pt"
    torch.save(d, path)
    with pytest.raises(GrowmapError, match=pattern) as info:
        load_growmap(path)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(str(path))


def test_validate_names_source():
    with pytest.raises(GrowmapError, match="^g.pt: missing"):
        validate_growmap(damaged(size=KeyError), source="g.pt")


def test_not_a_dict(tmp_path):
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(GrowmapError, match="expected a dict.*got list"):
        load_growmap(tmp_path / "list.pt")
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    with pytest.raises(GrowmapError, match="got Tensor"):
        load_growmap(tmp_path / "tensor.pt")


def test_truncated_and_garbage_files(tmp_path):
    path = tmp_path / "g.pt"
    save_growmap(example_tree(), path)
    data = path.read_bytes()
    for i, cut in enumerate([0, 10, len(data) // 2, len(data) - 5]):
        bad = tmp_path / f"cut{i}.pt"
        bad.write_bytes(data[:cut])
        with pytest.raises(GrowmapError, match="not a readable torch file") as info:
            load_growmap(bad)
        assert "\n" not in str(info.value)
    (tmp_path / "junk.pt").write_bytes(b"\x00\xffnot a pickle at all" * 10)
    with pytest.raises(GrowmapError):
        load_growmap(tmp_path / "junk.pt")
    with pytest.raises(GrowmapError, match="no such growmap file"):
        load_growmap(tmp_path / "missing.pt")


class _Payload:
    """Unpickling this would run ``exec`` and create the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


@pytest.mark.parametrize("how", ["torch.save", "pickle.dump", "inside a dict"])
def test_hostile_pickle_never_runs(how, tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pt"
    if how == "torch.save":
        torch.save(_Payload(marker), path)
    elif how == "pickle.dump":
        path.write_bytes(pickle.dumps(_Payload(marker)))
    else:
        torch.save({**good(), "treeopt": _Payload(marker)}, path)
    with pytest.raises(GrowmapError) as info:
        load_growmap(path)
    assert not marker.exists()
    assert "\n" not in str(info.value)
    if how != "pickle.dump":
        assert "refused to load" in str(info.value)


def test_bad_json(tmp_path):
    cases = {
        "syntax.json": ("{roots: [[0]]", "not valid JSON"),
        "list.json": ("[1, 2]", "expected a JSON object"),
        "missing.json": (json.dumps({"roots": [[0]], "branches": [[0]], "size": 1}),
                         "missing key.*'Successors'"),
        "format.json": (json.dumps({"format": "other", **EXAMPLE, "size": 8}), "'format'"),
        "version.json": (json.dumps({"format": "treeopt-growmap", "version": 9, **EXAMPLE,
                                     "size": 8}), "unsupported growmap version"),
        "depth.json": (json.dumps({**EXAMPLE, "depth": [0, 1, 1, 1, 2, 2, 3, 3], "size": 8}),
                       r"'depth\[6\]'"),
        "mask.json": (json.dumps({**EXAMPLE, "size": 8, "mask": [[1] * 8] * 8}),
                      r"'mask\[0\]\[1\]'"),
        "ragged_mask.json": (json.dumps({**EXAMPLE, "size": 8, "mask": [[1]] * 8}), "rows must"),
        "binary.json": (b"\xff\xfe\x00", "not valid JSON"),
    }
    for name, (text, pattern) in cases.items():
        path = tmp_path / name
        if isinstance(text, bytes):
            path.write_bytes(text)
        else:
            path.write_text(text)
        with pytest.raises(GrowmapError, match=pattern) as info:
            load_growmap(path)
        assert "\n" not in str(info.value) and str(path) in str(info.value)
