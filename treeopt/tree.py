"""Token-tree topology: the one place a tree shape and its verification buffers are defined.

A tree has ``size`` nodes including node 0, the root (the last accepted token). Nodes are
numbered breadth-first and the children of a node have consecutive ids; the i-th child of a
node (sibling rank i, counted from 1) is the draft's i-th choice at that node. Those two rules
are exactly "``parents`` is non-decreasing and ``parents[i] < i``", which is how a tree is
stored and validated here.

Conversions: parent arrays, growmap dicts (Sequoia's ``Successors``), Medusa/EAGLE rank paths
(0-based ranks, root excluded, e.g. ``[(0,), (1,), (0, 0)]``).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property, lru_cache
from typing import TYPE_CHECKING, Iterable, Sequence

from treeopt.errors import TreeoptError

if TYPE_CHECKING:  # torch is imported where buffers are built, so the CLI starts fast
    import torch


class TreeError(TreeoptError, ValueError):
    """A tree description that violates an invariant; the message says which and where."""


Profile1D = Sequence[float]
Profile2D = Sequence[Sequence[float]]


@dataclass(frozen=True)
class Tree:
    """An immutable token-tree shape, stored as a parent array (``parents[0] == -1``)."""

    parents: tuple[int, ...]

    def __post_init__(self) -> None:
        parents = tuple(int(p) for p in self.parents)
        object.__setattr__(self, "parents", parents)
        if not parents:
            raise TreeError("a tree needs at least the root node")
        if parents[0] != -1:
            raise TreeError(f"node 0 must be the root (parent -1), got parent {parents[0]}")
        for i in range(1, len(parents)):
            p = parents[i]
            if not 0 <= p < i:
                raise TreeError(f"node {i} has parent {p}; parents must precede their children "
                                "(ids breadth-first, root 0)")
            if i > 1 and p < parents[i - 1]:
                raise TreeError(f"node {i} (parent {p}) comes after node {i - 1} "
                                f"(parent {parents[i - 1]}): ids must be breadth-first with "
                                "consecutive siblings")

    # ---------------------------------------------------------------- constructors
    @classmethod
    def from_parents(cls, parents: Iterable[int]) -> "Tree":
        return cls(tuple(parents))

    @classmethod
    def from_successors(cls, successors: Sequence[Sequence[int]]) -> "Tree":
        """From Sequoia's ``Successors``: child ids of each node, in sibling-rank order."""
        size = len(successors)
        parents = [-2] * size
        parents[0] = -1
        for node, kids in enumerate(successors):
            for k in kids:
                k = int(k)
                if not 0 < k < size:
                    raise TreeError(f"Successors[{node}] names node {k}, outside 1..{size - 1}")
                if parents[k] != -2:
                    raise TreeError(f"node {k} has two parents ({parents[k]} and {node})")
                parents[k] = node
        missing = [i for i, p in enumerate(parents) if p == -2]
        if missing:
            raise TreeError(f"node {missing[0]} is nobody's child (unreachable from the root)")
        tree = cls(tuple(parents))
        for node, kids in enumerate(successors):
            if [int(k) for k in kids] != list(tree.children[node]):
                raise TreeError(f"Successors[{node}] = {list(kids)} is not in sibling-rank "
                                f"order {list(tree.children[node])}")
        return tree

    @classmethod
    def from_paths(cls, paths: Iterable[Sequence[int]]) -> "Tree":
        """From Medusa/EAGLE-style rank paths: ``(0,)`` is the root's top-1 child, ``(0, 1)``
        that child's second choice. The root (empty path) may be given or omitted."""
        uniq = {tuple(int(r) for r in path) for path in paths}
        uniq.discard(())
        for path in uniq:
            if min(path) < 0:
                raise TreeError(f"path {list(path)} has a negative rank")
            if len(path) > 1 and path[:-1] not in uniq:
                raise TreeError(f"path {list(path)} has no parent path {list(path[:-1])}")
            if path[-1] > 0 and path[:-1] + (path[-1] - 1,) not in uniq:
                raise TreeError(f"path {list(path)} present but sibling rank {path[-1] - 1} "
                                "is missing (ranks must be consecutive from 0)")
        ordered = sorted(uniq, key=lambda q: (len(q), q))
        index = {(): 0}
        parents = [-1]
        for path in ordered:
            index[path] = len(parents)
            parents.append(index[path[:-1]])
        return cls(tuple(parents))

    @classmethod
    def from_growmap(cls, growmap: dict) -> "Tree":
        """From a growmap dict (only ``Successors`` is read here; ``treeopt.growmap``
        checks the other keys against it)."""
        if "Successors" not in growmap:
            raise TreeError("growmap has no 'Successors' key")
        return cls.from_successors(growmap["Successors"])

    # ---------------------------------------------------------------- derived shape
    @property
    def size(self) -> int:
        return len(self.parents)

    @cached_property
    def children(self) -> tuple[tuple[int, ...], ...]:
        kids: list[list[int]] = [[] for _ in self.parents]
        for i, p in enumerate(self.parents[1:], start=1):
            kids[p].append(i)
        return tuple(tuple(k) for k in kids)

    @cached_property
    def depths(self) -> tuple[int, ...]:
        d = [0] * self.size
        for i in range(1, self.size):
            d[i] = d[self.parents[i]] + 1
        return tuple(d)

    @property
    def depth(self) -> int:
        """Depth of the deepest node (a chain of size n has depth n - 1)."""
        return self.depths[-1]

    @cached_property
    def ranks(self) -> tuple[int, ...]:
        """Sibling rank of each node, from 1; the root has rank 0."""
        r = [0] * self.size
        for kids in self.children:
            for j, k in enumerate(kids, start=1):
                r[k] = j
        return tuple(r)

    @cached_property
    def levels(self) -> tuple[tuple[int, ...], ...]:
        """Node ids at each depth (``levels[0] == (0,)``); ids are consecutive per level."""
        out: list[list[int]] = [[] for _ in range(self.depth + 1)]
        for i, d in enumerate(self.depths):
            out[d].append(i)
        return tuple(tuple(x) for x in out)

    @cached_property
    def leaves(self) -> tuple[int, ...]:
        return tuple(i for i, k in enumerate(self.children) if not k)

    def path_to(self, node: int) -> tuple[int, ...]:
        """Node ids from the root to ``node``, both included."""
        out = [node]
        while self.parents[out[-1]] != -1:
            out.append(self.parents[out[-1]])
        return tuple(reversed(out))

    @property
    def width(self) -> int:
        """Largest number of children of any node."""
        return max(len(k) for k in self.children)

    # ---------------------------------------------------------------- exports
    def to_parents(self) -> list[int]:
        return list(self.parents)

    def to_successors(self) -> list[list[int]]:
        return [list(k) for k in self.children]

    def to_paths(self) -> list[tuple[int, ...]]:
        """0-based rank paths of every node but the root, in node-id order."""
        paths: list[tuple[int, ...]] = [()]
        for i in range(1, self.size):
            paths.append(paths[self.parents[i]] + (self.ranks[i] - 1,))
        return paths[1:]

    def to_choices(self) -> list[list[int]]:
        """Medusa/EAGLE ``choices`` list (paste-able into their configs)."""
        return [list(p) for p in self.to_paths()]

    def to_growmap(self) -> dict:
        """Sequoia's growmap dict: roots, branches, Successors, mask, depth, size."""
        import torch

        return {
            "roots": [list(level) for level in self.levels],
            "branches": [[len(self.children[n]) for n in level] for level in self.levels],
            "Successors": self.to_successors(),
            "mask": ancestor_mask(self).to(torch.int64),
            "depth": torch.tensor(self.depths, dtype=torch.int64),
            "size": self.size,
        }

    # ---------------------------------------------------------------- expectation
    def path_probs(self, p: Profile1D | Profile2D) -> list[float]:
        """Probability that each node is reached (is on the accepted path), root 1.

        ``p`` is a rank profile ``p[k-1]`` = P(rank k accepted), or a depth-aware profile
        ``p[d][k-1]`` for a parent at depth d (rows past the end reuse the last row);
        ranks beyond the profile have probability 0."""
        table = as_depth_table(p)
        probs = [1.0] * self.size
        for i in range(1, self.size):
            row = table[min(self.depths[i] - 1, len(table) - 1)]
            k = self.ranks[i]
            probs[i] = probs[self.parents[i]] * (row[k - 1] if k <= len(row) else 0.0)
        return probs

    def expected_tokens(self, p: Profile1D | Profile2D) -> float:
        """Expected tokens per target forward F(tree): accepted drafts plus the bonus."""
        return float(sum(self.path_probs(p)))

    def buffers(self, device: torch.device | str | None = None) -> "TreeBuffers":
        return tree_buffers(self, str(device) if device is not None else "cpu")

    def __repr__(self) -> str:
        return f"Tree(size={self.size}, depth={self.depth}, parents={list(self.parents)})"


def as_depth_table(p: Profile1D | Profile2D) -> list[list[float]]:
    """Normalise a rank profile (1-D) or depth-aware profile (2-D) to a list of rows."""
    rows = list(p)
    if not rows:
        return [[]]
    try:
        float(rows[0])
    except TypeError:
        return [[float(x) for x in r] for r in rows]
    return [[float(x) for x in rows]]


def ancestor_mask(tree: Tree) -> torch.Tensor:
    """(size, size) bool: ``mask[i, j]`` is True where j is an ancestor of i or j == i.

    Vectorised: one scatter per level, walking every node's ancestor pointer up at once."""
    import torch

    n = tree.size
    parents = torch.tensor(tree.parents, dtype=torch.int64)
    rows = torch.arange(n)
    mask = torch.eye(n, dtype=torch.bool)
    anc = parents.clone()
    live = anc >= 0
    while bool(live.any()):
        mask[rows[live], anc[live]] = True
        anc = torch.where(live, parents[anc.clamp_min(0)], anc)
        live = anc >= 0
    return mask


@dataclass(frozen=True)
class TreeBuffers:
    """Everything verification needs about one shape, built once and cached.

    mask:     (size, size) bool, ancestor-or-self.
    depth:    (size,) int64, root 0 (position offset of each node after the prefix).
    parent:   (size,) int64, root -1.
    rank:     (size,) int64, sibling rank from 1, root 0.
    retrieve: (n_leaves, depth + 1) int64, node ids root→leaf, padded with -1.
    """

    mask: torch.Tensor
    depth: torch.Tensor
    parent: torch.Tensor
    rank: torch.Tensor
    retrieve: torch.Tensor


def build_buffers(tree: Tree, device: str = "cpu") -> TreeBuffers:
    """The verification buffers of ``tree``, built with vectorised tensor ops (cheap enough
    for a tree proposed fresh every step)."""
    import torch

    mask = ancestor_mask(tree)
    n = tree.size
    parent = torch.tensor(tree.parents, dtype=torch.int64)
    depth = mask.sum(1) - 1
    # Siblings are consecutive: rank = id - (id of the parent's first child) + 1.
    first_child = torch.searchsorted(parent[1:].contiguous(), parent.clamp_min(0)) + 1
    rank = torch.where(parent >= 0, torch.arange(n) - first_child + 1, 0)
    has_child = torch.zeros(n, dtype=torch.bool)
    has_child[parent[1:]] = True
    leaves = (~has_child).nonzero().squeeze(1)
    # Ancestors of a node have smaller ids and smaller depths: sorting the ancestor ids of
    # each leaf row gives its root->leaf path.
    ids = torch.where(mask[leaves], torch.arange(n), n)
    retrieve = ids.sort(dim=1).values[:, : int(depth.max()) + 1]
    retrieve = torch.where(retrieve == n, -1, retrieve)
    return TreeBuffers(mask=mask.to(device), depth=depth.to(device), parent=parent.to(device),
                       rank=rank.to(device), retrieve=retrieve.to(device))


@lru_cache(maxsize=256)
def tree_buffers(tree: Tree, device: str = "cpu") -> TreeBuffers:
    """Cached ``build_buffers`` for the fixed shapes a run uses again and again."""
    return build_buffers(tree, device)
