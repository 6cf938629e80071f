"""Pictures: layout, dot text, and smoke tests writing png/svg/pdf."""

import re

import pytest

from treeopt.profile import Profile
from treeopt.shapes import chain, from_name, independent_chains, kary
from treeopt.tree import Tree
from treeopt.viz import (
    VizError,
    draw_tree,
    expected_vs_size,
    layout,
    plot_expected_vs_size,
    to_dot,
    to_graph,
    tree_summary,
)

EXAMPLE = Tree.from_successors([[1, 2, 3], [4, 5], [6], [], [7], [], [], []])
P = [0.6, 0.1, 0.05]


def test_layout_is_layered_and_parents_centred():
    pos = layout(EXAMPLE)
    assert all(pos[n][1] == -EXAMPLE.depths[n] for n in range(8))
    leaves_x = sorted(pos[n][0] for n in EXAMPLE.leaves)
    assert leaves_x == [0.0, 1.0, 2.0, 3.0]
    for n, kids in enumerate(EXAMPLE.children):
        if kids:
            assert pos[n][0] == (pos[kids[0]][0] + pos[kids[-1]][0]) / 2
            assert [pos[k][0] for k in kids] == sorted(pos[k][0] for k in kids)


def test_graph_attributes():
    g = to_graph(EXAMPLE, P)
    assert g.number_of_nodes() == 8 and g.number_of_edges() == 7
    assert g.nodes[7]["rank"] == 1 and g.nodes[7]["depth"] == 3
    assert g.nodes[7]["prob"] == pytest.approx(0.216)
    assert g.edges[0, 2]["prob"] == pytest.approx(0.1)


def test_summary():
    # F = 1 + .75 + .42 + .06 + .216 (DESIGN's size-8 tree under p = .6, .1, .05)
    assert tree_summary(EXAMPLE, P) == ("size 8, depth 3, width 3, 4 leaves, "
                                        "F = 2.4460 tokens/step")
    assert tree_summary(chain(3)) == "size 3, depth 2, width 1, 1 leaf"


@pytest.mark.parametrize("tree", [EXAMPLE, kary(2, 3), chain(1)])
def test_dot_counts(tree, tmp_path):
    path = draw_tree(tree, tmp_path / "t.dot", profile=Profile(P), title='a "quoted" title')
    text = path.read_text()
    assert text.startswith("digraph tree {") and text.rstrip().endswith("}")
    nodes = re.findall(r"^\s+n(\d+) \[label=", text, flags=re.M)
    edges = re.findall(r"^\s+n(\d+) -> n(\d+)", text, flags=re.M)
    assert sorted(int(n) for n in nodes) == list(range(tree.size))
    assert sorted((int(a), int(b)) for a, b in edges) == [(tree.parents[i], i)
                                                           for i in range(1, tree.size)]
    assert '\\"quoted\\"' in text


def test_dot_without_profile_has_no_probabilities():
    text = to_dot(EXAMPLE)
    assert "tooltip" not in text and "penwidth" not in text
    assert text.count("->") == 7


@pytest.mark.parametrize("suffix", [".png", ".svg", ".pdf"])
def test_draw_images(suffix, tmp_path):
    path = draw_tree(EXAMPLE, tmp_path / f"t{suffix}", profile=Profile(P), title="example")
    assert path.stat().st_size > 1000
    if suffix == ".svg":
        assert "<svg" in path.read_text()
    if suffix == ".png":
        assert path.read_bytes()[:4] == b"\x89PNG"


def test_draw_large_tree_without_profile(tmp_path):
    tree = from_name("mc_sim_7b_63")
    path = draw_tree(tree, tmp_path / "big.png")
    assert path.stat().st_size > 1000
    draw_tree(independent_chains(127, 1), tmp_path / "wide.svg", profile=P)


def test_unknown_format(tmp_path):
    with pytest.raises(VizError, match="unknown picture format"):
        draw_tree(EXAMPLE, tmp_path / "t.gif")


def test_expected_vs_size_curves():
    pytest.importorskip("treeopt.search.dp")
    curves = expected_vs_size(P, [1, 2, 4, 8, 15])
    dp = dict(curves["DP optimum"])
    # every baseline is a tree of at most that size, so the DP is at least as good
    for name, pts in curves.items():
        for n, f in pts:
            best = max(v for m, v in dp.items() if m <= n) if n in dp else None
            if best is not None:
                assert f <= best + 1e-9, (name, n)
    assert dict(curves["chain"])[4] == pytest.approx(1 + 0.6 + 0.36 + 0.216)
    assert dict(curves["2-ary"]) == {3: pytest.approx(1.7), 7: pytest.approx(1 + 0.7 + 0.49),
                                     15: pytest.approx(1 + 0.7 + 0.49 + 0.343)}
    # p non-increasing: the greedy is optimal
    assert [f for _, f in curves["Medusa greedy"]] == pytest.approx(list(dp.values()))
    limited = expected_vs_size(P, [8], max_depth=1)
    assert dict(limited["DP optimum"])[8] == pytest.approx(1.75)  # depth 1: all 3 ranks


def test_plot_expected_vs_size(tmp_path):
    pytest.importorskip("treeopt.search.dp")
    path = plot_expected_vs_size(Profile(P), [1, 2, 4, 8, 16], tmp_path / "f.png",
                                 points={"chain:4": (4, 2.176), "other": (4, 2.176)})
    assert path.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(VizError):
        plot_expected_vs_size(P, [4], tmp_path / "f.dot")
