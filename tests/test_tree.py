import pytest
import torch

from treeopt.tree import Tree, TreeError

# DESIGN.md's size-8 example.
SUCC = [[1, 2, 3], [4, 5], [6], [], [7], [], [], []]
PARENTS = [-1, 0, 0, 0, 1, 1, 2, 4]


def test_design_example_structure():
    t = Tree.from_successors(SUCC)
    assert list(t.parents) == PARENTS
    assert t.depths == (0, 1, 1, 1, 2, 2, 2, 3)
    assert t.ranks == (0, 1, 2, 3, 1, 2, 1, 1)
    assert t.levels == ((0,), (1, 2, 3), (4, 5, 6), (7,))
    assert t.leaves == (3, 5, 6, 7)
    assert t.size == 8 and t.depth == 3 and t.width == 3
    g = t.to_growmap()
    assert g["roots"] == [[0], [1, 2, 3], [4, 5, 6], [7]]
    assert g["branches"] == [[3], [2, 1, 0], [1, 0, 0], [0]]
    assert g["Successors"] == SUCC
    assert g["depth"].tolist() == [0, 1, 1, 1, 2, 2, 2, 3]
    assert g["mask"].dtype == torch.int64 and g["size"] == 8


def test_expected_tokens_by_hand():
    t = Tree.from_parents(PARENTS)
    p = [0.5, 0.2, 0.1]
    # root 1; depth 1: .5 + .2 + .1; node4 .5*.5, node5 .5*.2, node6 .2*.5; node7 .5*.5*.5
    by_hand = 1 + 0.8 + 0.25 + 0.1 + 0.1 + 0.125
    assert t.expected_tokens(p) == pytest.approx(by_hand)
    # depth-aware: root's children use row 0, deeper edges row 1 (and rows past the end reuse it)
    p2 = [[0.5, 0.2, 0.1], [0.9, 0.05]]
    by_hand2 = 1 + 0.8 + 0.5 * 0.9 + 0.5 * 0.05 + 0.2 * 0.9 + 0.5 * 0.9 * 0.9
    assert t.expected_tokens(p2) == pytest.approx(by_hand2)
    # ranks beyond the profile contribute nothing
    assert t.expected_tokens([0.5]) == pytest.approx(1 + 0.5 + 0.25 + 0.125)


def test_round_trips():
    t = Tree.from_parents(PARENTS)
    assert Tree.from_paths(t.to_paths()) == t
    assert Tree.from_paths(reversed(t.to_choices())) == t
    assert Tree.from_successors(t.to_successors()) == t
    assert Tree.from_growmap(t.to_growmap()) == t
    assert t.to_choices()[:4] == [[0], [1], [2], [0, 0]]


def test_buffers_invariants():
    t = Tree.from_parents(PARENTS)
    b = t.buffers()
    assert torch.equal(b.mask.sum(1) - 1, b.depth)  # depth == mask row sum - 1
    assert b.retrieve.shape == (4, 4)
    for row, leaf in zip(b.retrieve.tolist(), t.leaves):
        path = [x for x in row if x >= 0]
        assert path == list(t.path_to(leaf))
        for i in path:
            assert all(b.mask[i, j] for j in t.path_to(i))
    assert t.buffers() is b  # built once per shape


@pytest.mark.parametrize("parents, fragment", [
    ([], "at least the root"),
    ([0, 0], "root"),
    ([-1, 1], "parents must precede"),
    ([-1, 0, 1, 0], "breadth-first"),
])
def test_invalid_parents(parents, fragment):
    with pytest.raises(TreeError, match=fragment):
        Tree.from_parents(parents)


@pytest.mark.parametrize("succ, fragment", [
    ([[1], [1]], "two parents"),
    ([[1], []], None),
    ([[2, 1], [], []], "sibling-rank order"),
    ([[1], [], []], "nobody's child"),
    ([[5]], "outside"),
])
def test_invalid_successors(succ, fragment):
    if fragment is None:
        assert Tree.from_successors(succ).size == 2
        return
    with pytest.raises(TreeError, match=fragment):
        Tree.from_successors(succ)


def test_invalid_paths():
    with pytest.raises(TreeError, match="no parent path"):
        Tree.from_paths([(0, 0)])
    with pytest.raises(TreeError, match="sibling rank"):
        Tree.from_paths([(0,), (2,)])
    with pytest.raises(TreeError, match="negative"):
        Tree.from_paths([(-1,)])
