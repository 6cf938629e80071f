"""A faithful pure-Python port of the loop DP in Sequoia's ``tree_search.py``.

Used only to cross-check ``treeopt.search.dp`` and to measure the speed-up in
``scripts/bench_dp.py``. It keeps the reference's loop order, its tie-breaking (first strict
maximum over ``y``, first maximum over ``b``), its table layout ``T[m][l][b]`` and its
``l`` = number of levels counting the root. The only deliberate difference: Python floats
(float64) instead of float32 tensors, and plain lists instead of tensor indexing.
"""

from __future__ import annotations

NEG = float("-inf")


def _max(row: list[float]) -> float:
    return max(row)


def _argmax(row: list[float]) -> int:
    best, arg = row[0], 0
    for i, v in enumerate(row):
        if v > best:
            best, arg = v, i
    return arg


def reference_dp(p: list[float], max_budget: int, max_depth: int):
    """Sequoia's DP. ``p`` is the rank profile p[1..W] (1-D, no leading 0, no "none").

    Returns ``(T, branch_map)``: ``T[m][l][b]`` = best expected tokens of a tree of exactly
    m nodes, at most l levels (root counted), b root children (-inf where impossible);
    ``branch_map[(m, l, b)]`` = the (m', l-1, b') states of the root's children in rank order.
    """
    pv = [0.0] + [float(x) for x in p]  # Sequoia's vector minus its trailing "none" entry
    max_branch = len(pv) - 1
    T = [[[NEG] * (max_branch + 1) for _ in range(max_depth + 1)] for _ in range(max_budget + 1)]
    branch_map: dict = {}
    for l in range(1, max_depth + 1):
        T[1][l][0] = 1.0
        branch_map[(1, l, 0)] = []
    for m in range(2, max_budget + 1):
        for l in range(2, max_depth + 1):
            T[m][l][1] = 1 + pv[1] * _max(T[m - 1][l - 1])
            if T[m][l][1] > 0:
                branch_map[(m, l, 1)] = [(m - 1, l - 1, _argmax(T[m - 1][l - 1]))]
            for b in range(2, max_branch + 1):
                max_value = NEG
                new_y = -1
                for y in range(1, m):
                    new_value = T[y][l][b - 1] + pv[b] * _max(T[m - y][l - 1])
                    if new_value > max_value:
                        max_value = new_value
                        new_y = y
                    max_value = max(max_value, new_value)
                T[m][l][b] = max_value
                if max_value >= 0:
                    new_branch = _argmax(T[m - new_y][l - 1])
                    new_list = list(branch_map[(new_y, l, b - 1)])
                    new_list.append((m - new_y, l - 1, new_branch))
                    branch_map[(m, l, b)] = new_list
    return T, branch_map


def reference_results(T) -> list[list[float]]:
    """``results[m][l] = max_b T[m][l][b]`` (Sequoia's ``T.max(dim=2).values``)."""
    return [[_max(row) for row in plane] for plane in T]


def reference_parents(T, branch_map, m: int, l: int) -> list[int]:
    """Breadth-first parent array of the tree Sequoia builds for state (m, l)."""
    states = [(m, l, _argmax(T[m][l]))]
    parents = [-1]
    i = 0
    while i < len(states):
        children = branch_map[states[i]]
        parents.extend([i] * len(children))
        states.extend(children)
        i += 1
    return parents
