"""Per-step speculation size for copy drafters, shared by ``ngram`` and ``suffix``.

A :class:`StepSizer` holds a copy-acceptance table (``treeopt.profile.copytable``) and the
target's verification cost by tokens (a measured latency curve, read through its
non-decreasing envelope, ``treeopt.search.hardware.monotone``). Given a candidate tree and the
features the drafter knew about each node, it keeps the parent-closed part that maximises
expected tokens per ms (``treeopt.search.speclen.choose_nodes``; exact), possibly the root
alone (a plain step). The candidate tree is a deterministic function of the committed text, so
keeping part of it keeps decoding lossless (point-mass verification, greedy or sampled).

``len=auto,table=PATH`` (drafter options): PATH is a profile JSON written by
``treeopt tune --draft ngram|suffix`` (its ``"copy"`` section and its ``"latency"``), or a
copy table file plus ``latency=PATH`` (a profile JSON with a latency section).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from treeopt.decode.drafter import DrafterError
from treeopt.profile.copytable import CopyTable, CopyTableError, Features, cell, read_document
from treeopt.profile.model import Latency, ProfileError
from treeopt.search.hardware import monotone
from treeopt.search.speclen import StepChoice, choose_nodes, cost_table
from treeopt.tree import Tree


class StepSizer:
    """Chooses each step's verified nodes from a copy table and a verification-cost curve.

    table: the copy-acceptance counts; verify_ms: callable n -> ms of verifying n tokens
    (non-decreasing); max_nodes: the cost table's first size (it grows with larger trees)."""

    def __init__(self, table: CopyTable, verify_ms, max_nodes: int, draft_ms: float = 0.0):
        self.table = table
        self.verify_ms = verify_ms
        self.draft_ms = float(draft_ms)
        self.max_nodes = int(max_nodes)
        self.cost = cost_table(verify_ms, self.max_nodes, self.draft_ms)
        self._est = table.estimate()

    def costs(self, n: int):
        """(n,) cost of verifying 1..n nodes (extended on demand)."""
        if n > len(self.cost):
            self.cost = cost_table(self.verify_ms, n, self.draft_ms)
        return self.cost

    @classmethod
    def from_files(cls, table: str | Path, latency: str | Path | None, max_nodes: int,
                   drafter: str) -> "StepSizer":
        """Table and latency from files (latency from the table's file when None); one-line
        DrafterError naming ``drafter`` when either cannot be used."""
        try:
            copy = CopyTable.load(table)
            doc = read_document(latency if latency is not None else table)
        except CopyTableError as exc:
            raise DrafterError(f"drafter {drafter!r}: {exc}") from None
        if doc.get("latency") is None:
            raise DrafterError(f"drafter {drafter!r}: {latency or table} has no latency "
                               "section; give latency=PROFILE.json (treeopt profile latency)")
        try:
            lat = Latency.from_dict(doc["latency"])
        except ProfileError as exc:
            raise DrafterError(f"drafter {drafter!r}: {latency or table}: {exc}") from None
        return cls(copy, monotone(lat.target), max_nodes)

    def accept(self, parents: Sequence[int], features: Sequence[Features | None]) -> list[float]:
        """a(v) for every node (1.0 for the root)."""
        est, depth, out = self._est, [0] * len(parents), [1.0]
        for v in range(1, len(parents)):
            depth[v] = depth[parents[v]] + 1
            r, q, m, d = cell(features[v], depth[v])
            out.append(float(est[r - 1, q, m, d - 1]))
        return out

    def choose(self, parents: Sequence[int], features: Sequence[Features | None]) -> StepChoice:
        """The nodes worth verifying (ids ascending, root first) and their prediction."""
        return choose_nodes(parents, self.accept(parents, features), self.costs(len(parents)))


def bfs_subtree(parents: Sequence[int], order_key: Sequence, keep: Sequence[int]
                ) -> tuple[Tree, list[int]]:
    """The kept nodes of a candidate tree renumbered as a :class:`Tree` (breadth-first,
    children of a node consecutive, in ``order_key`` order: the drafter's rank). ``keep``
    must be parent-closed and hold the root. Returns (tree, old id of each new node)."""
    kept = set(int(v) for v in keep)
    kids: dict[int, list[int]] = {}
    for v in sorted(kept):
        if v:
            if parents[v] not in kept:
                raise DrafterError(f"internal: kept node {v} without its parent")
            kids.setdefault(parents[v], []).append(v)
    old, new_parent = [0], [-1]
    i = 0
    while i < len(old):
        u = old[i]
        for v in sorted(kids.get(u, ()), key=lambda x: order_key[x]):
            old.append(v)
            new_parent.append(i)
        i += 1
    return Tree(tuple(new_parent)), old


__all__ = ["StepSizer", "bfs_subtree"]
