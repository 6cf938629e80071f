"""Dynamic per-step trees (EAGLE-2 style expansion and a per-step exact DP).

Two drafters grow a new tree every step from the draft model's own probabilities:

``dynamic:draft=SPEC,budget=N,depth=D,topk=K`` (EAGLE-2's dynamic tree). Every candidate v
gets a value: the product, over the edges from the root to v, of the draft's confidence in
that edge's token (its probability at the parent). Level by level, one draft forward per
level with the tree mask, the ``topk`` candidates of the level with the highest values are
fed to the draft, and each fed node gets ``topk`` children (the draft's top-k tokens in
greedy mode; in sampling mode children drawn from the processed draft distribution Q exactly
as the fixed-tree drafter draws them for the run's rule, ``treeopt.drafters.grow.
pick_children``), down to depth ``depth``. The ``budget`` candidates with the highest
values (root included; ties broken by the lower breadth-first id) are kept and renumbered
breadth-first.

``dynamic-dp:draft=SPEC,budget=N,depth=D,topk=K,profile=PATH`` (per-step exact DP). The same
expansion, but each edge's factor is the *calibrated acceptance* a(c) of the draft's
confidence c (``treeopt.profile.calibration``: the measured map from confidence to the
probability that the target accepts the candidate), so a candidate's value
V(v) = Π_{u on path(v)} a(u) is the probability that v is on the accepted path, and the
expected tokens of a step with kept set S is F(S) = Σ_{v∈S} V(v) (the root counts 1: the
bonus token). Per step it chooses S, parent-closed, |S| <= budget, depth <= D, maximising
F(S) / cost(|S|) where cost(n) = this step's draft time + t_verify(n) from the latency table
the calibration file carries (``treeopt.search.hardware``'s monotone envelopes), or F(S) at
|S| = budget when it carries none.

Why the per-step DP is a prefix scan (exact). Every factor is at most 1, so values never
grow along a path: V(child) <= V(parent). Order the candidates by (value descending,
breadth-first id ascending): a parent precedes each of its children (its value is at least
as large and its id smaller), so every prefix of that order is parent-closed, and the prefix
of length n holds the n largest values. Any parent-closed S of size n has F(S) <= the sum of
the n largest values = F(prefix n). So the best tree of each size n is the n-prefix and the
exact optimum over sizes is ``max_n F(prefix n) / cost(n)``: one sort and one cumulative sum
(tests check it against a brute force over every parent-closed subset). The same argument
makes ``dynamic``'s kept set parent-closed.

Losslessness in sampling mode. The verification rules stay exact when each node's children
are a prefix, in draw order, of the children drawn for it, and when whether a child is kept
(or fed) never depends on that child's own token, nor on the tokens of later siblings or of
anything below them (the decision is a stopping rule: taken before the draw it concerns).
Here a child's value uses the confidence of its *rank* (the j-th largest probability of Q at
its parent), not of the token drawn: in greedy mode that is the child's own probability
(EAGLE-2), in sampling mode it is known before the draw. Every decision about a candidate
(fed, kept) then depends only on candidates that precede it in the (value, id) order: its
ancestors and better nodes elsewhere, never its own subtree or later siblings', whose values
are no larger and whose ids are larger. Hence the kept set satisfies the condition and the
rules stay lossless (a chi-square test checks it; choosing children by the drawn token's own
probability fails the same test). The calibration map is monotone for the same reason: a
later sibling never outranks an earlier one. For ``dynamic-dp`` the exact size choice
``max_n F(n) / cost(n)`` looks at values after the n-th, which depend on tokens kept before
them; in sampling mode the size is therefore chosen by a stopping rule, the first local
maximum of F(n) / cost(n) (node n + 1 is added while the ratio does not fall), which decides
on node n + 1 from nodes 1..n + 1 only, and the draft time in cost(n) is that of full levels
(``topk`` nodes fed per level), not of the levels this step's draws happened to fill.

Cache. The drafter extends :class:`~treeopt.drafters.model.ModelDrafter`: the same
cache invariant, ``start`` and first forward (``feed_pending``); the fed tree nodes are
cached in the order they were fed and ``update`` keeps those on the accepted path with the
one compaction (``treeopt.decode.attention.compact``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from treeopt.decode.attention import forward_tree
from treeopt.decode.drafter import (
    DrafterError,
    Proposal,
    build_drafter,
    parse_options,
    register_drafter,
    root_only,
)
from treeopt.decode.sampling import Sampling
from treeopt.drafters.grow import feed_pending, pick_children
from treeopt.drafters.model import ModelDrafter
from treeopt.limits import MAX_TREE_NODES
from treeopt.models.loading import DEFAULT_DRAFT_MODEL
from treeopt.profile.calibration import Calibration, CalibrationError
from treeopt.search.hardware import monotone
from treeopt.tree import Tree

DEFAULT_BUDGET = 16
DEFAULT_DEPTH = 5
DEFAULT_TOPK = 4


# ---------------------------------------------------------------------------- choice
def best_order(values: np.ndarray) -> np.ndarray:
    """Candidate ids by (value descending, id ascending). values: (C,) float."""
    return np.argsort(-values, kind="stable")


def best_nodes(values: np.ndarray, budget: int) -> np.ndarray:
    """Ids (ascending) of the ``budget`` best candidates by (value desc, id asc).

    values: (C,) with values[child] <= values[parent] and parents numbered before children:
    the result is then closed under parents (see the module docstring)."""
    if budget >= values.shape[0]:
        return np.arange(values.shape[0])
    return np.sort(best_order(values)[:budget])


def best_size(path_values: np.ndarray, cost_ms: np.ndarray | None = None, *,
              stopping: bool = False) -> int:
    """The number n of best candidates to keep.

    path_values: (m,) candidate values in the best order (non-increasing; the root's 1
    first). cost_ms: (m,) step cost of a tree of n = 1..m nodes, or None (keep all m).
    Exact: argmax_n F(n) / cost(n), F(n) = sum of the first n values (the first maximum);
    ``stopping``: the first local maximum instead (the lossless stopping rule of sampling
    mode, see the module docstring)."""
    m = path_values.shape[0]
    if cost_ms is None or m <= 1:
        return m
    ratio = np.cumsum(path_values) / cost_ms[:m]
    if stopping:
        falls = np.flatnonzero(np.diff(ratio) < 0)
        return int(falls[0]) + 1 if falls.size else m
    return int(np.argmax(ratio)) + 1


def choose(values: np.ndarray, budget: int, cost_ms: np.ndarray | None = None, *,
           stopping: bool = False) -> np.ndarray:
    """Kept candidate ids (ascending, parent-closed): the best ``budget`` by value, or the
    prefix of the best order that maximises F(n) / cost(n) (n <= budget) when ``cost_ms``
    (by n = 1..budget) is given (:func:`best_size`)."""
    if cost_ms is None:
        return best_nodes(values, budget)
    order = best_order(values)[:budget]
    n = best_size(values[order], cost_ms, stopping=stopping)
    return np.sort(order[:n])


def renumber(parents: np.ndarray, kept: np.ndarray) -> np.ndarray:
    """Parent array of the kept tree, breadth-first (candidate ids are breadth-first, so
    the ascending kept ids are). parents: (C,) candidate parents (root -1); kept: (n,)
    ascending ids, kept[0] = 0. Returns (n,) int64."""
    inv = np.full(parents.shape[0] + 1, -1, dtype=np.int64)  # inv[-1] stays -1 for the root
    inv[kept] = np.arange(kept.shape[0])
    return inv[parents[kept]]


# ---------------------------------------------------------------------------- expansion
class Expansion:
    """One step's candidate tree, grown level by level (bookkeeping only, no model).

    Candidate ids are breadth-first: level by level, and within a level by (parent id, rank)
    because each level's fed nodes are taken in id order. Arrays (numpy, CPU): ``parent``,
    ``depth``, ``value`` (path value), ``fed`` (offset among the fed tree nodes, -1 if not
    fed), ``qrow`` (row of the node's Q among all Q rows computed this step, -1 if none).
    ``anc[v, f]``: fed node f is v or an ancestor of v (the tree mask of a fed level).
    ``tokens``: (capacity,) int64 torch tensor on the model device.
    """

    def __init__(self, depth: int, topk: int, budget: int, root_token: torch.Tensor):
        self.topk, self.budget = topk, budget
        cap = 1 + topk + max(depth - 1, 0) * topk * topk
        fed_cap = max(depth - 1, 0) * topk
        self.parent = np.full(cap, -1, dtype=np.int64)
        self.depth = np.zeros(cap, dtype=np.int64)
        self.value = np.zeros(cap, dtype=np.float64)
        self.fed = np.full(cap, -1, dtype=np.int64)
        self.qrow = np.full(cap, -1, dtype=np.int64)
        self.anc = np.zeros((cap, max(fed_cap, 1)), dtype=bool)
        self.tokens = torch.empty(cap, dtype=torch.int64, device=root_token.device)
        self.tokens[0] = root_token
        self.value[0] = 1.0
        self.n = 1
        self.n_fed = 0
        self.n_q = 0
        self.level_start = [0, 1]  # ids of depth d are level_start[d] .. level_start[d+1]-1

    def frontier(self, d: int) -> np.ndarray:
        """Ids (ascending) of the depth-d candidates to feed: the ``topk`` best of the level
        by (value, id), among those that can still have a kept child (fewer than budget - 1
        candidates, the root included, precede them in the best order; later candidates only
        add to that count)."""
        lo, hi = self.level_start[d], self.level_start[d + 1]
        if hi <= lo:
            return np.zeros(0, dtype=np.int64)
        rank = np.empty(self.n, dtype=np.int64)
        rank[best_order(self.value[:self.n])] = np.arange(self.n)
        ids = np.arange(lo, hi)
        ids = ids[rank[lo:hi] <= self.budget - 2]
        if ids.size > self.topk:
            ids = ids[np.argsort(rank[ids], kind="stable")[:self.topk]]
        return np.sort(ids)

    def feed(self, ids: np.ndarray) -> np.ndarray:
        """Mark ``ids`` as fed (next offsets); returns their (e, fed + e) tree mask over
        every fed node so far."""
        e = ids.shape[0]
        offsets = np.arange(self.n_fed, self.n_fed + e)
        self.fed[ids] = offsets
        self.anc[ids, offsets] = True
        self.n_fed += e
        return self.anc[ids, :self.n_fed]

    def add_children(self, ids: np.ndarray, tokens: torch.Tensor, factors: np.ndarray,
                     with_q: bool) -> None:
        """Give each node of ``ids`` (e,) its k children: tokens (e, k) on the device,
        factors (e, k) edge factors in [0, 1] (child value = parent value x factor).
        ``with_q``: the nodes' Q rows are the next e rows of the step's Q."""
        e, k = factors.shape
        if with_q:
            self.qrow[ids] = np.arange(self.n_q, self.n_q + e)
            self.n_q += e
        lo, hi = self.n, self.n + e * k
        par = np.repeat(ids, k)
        self.parent[lo:hi] = par
        self.depth[lo:hi] = self.depth[ids[0]] + 1
        self.value[lo:hi] = (self.value[ids][:, None] * factors).ravel()
        self.anc[lo:hi] = self.anc[par]
        self.tokens[lo:hi] = tokens.reshape(-1)
        self.n = hi
        self.level_start.append(hi)

    def select(self, budget: int, cost_ms: np.ndarray | None = None, *,
               stopping: bool = False) -> np.ndarray:
        """Kept ids (ascending, parent-closed), see :func:`choose`."""
        return choose(self.value[:self.n], budget, cost_ms, stopping=stopping)


def edge_confidence(logits: torch.Tensor, q: torch.Tensor | None, k: int) -> torch.Tensor:
    """(e, k) confidence of the children by rank: the k largest probabilities of the draft's
    softmax (greedy mode, q None: the top-k children's own probabilities) or of Q (sampling
    mode: known before the children are drawn). logits: (e, V)."""
    probs = torch.softmax(logits.float(), dim=-1) if q is None else q
    return probs.topk(k, dim=-1).values


# ---------------------------------------------------------------------------- drafter
class DynamicDrafter(ModelDrafter):
    """A draft model growing a new tree every step (see the module docstring).

    model: the draft causal LM; budget: nodes kept, root included (1 = plain decoding);
    depth: deepest level in edges; topk: nodes fed per level and children per fed node;
    calibration: a ``treeopt.profile.calibration.Calibration`` (``dynamic-dp``) or None
    (``dynamic``: edge factor = the draft's confidence)."""

    name = "dynamic"

    def __init__(self, model, *, budget: int = DEFAULT_BUDGET, depth: int = DEFAULT_DEPTH,
                 topk: int = DEFAULT_TOPK, calibration=None):
        super().__init__(model)
        self.shape = None
        check_params(budget, depth, topk, self.name)
        self.budget, self.depth, self.topk = budget, depth, topk
        self.calibration = calibration
        self.verify_ms = self.draft_curve = None
        latency = getattr(calibration, "latency", None)
        if latency is not None:
            target = monotone(latency.target)
            self.verify_ms = np.array([target(n) for n in range(1, budget + 1)])
            self.draft_curve = monotone(latency.draft)
        if calibration is not None:
            self.name = "dynamic-dp"
        # Decided once, from the calibration and the latency alone (so still lossless): when
        # no tree can pay even at the best calibrated acceptance, every step is plain decoding
        # and the draft is never run.
        self.never_pays = not self.can_pay()
        self._fed: list[int] | None = None
        self.last_draft_ms = 0.0

    def children_per_node(self) -> tuple[int, str]:
        return self.topk, f"{self.name}: topk="

    def confidence(self, logits: torch.Tensor, q: torch.Tensor | None,
                   children: torch.Tensor) -> torch.Tensor:
        """(e, k) confidence of the children (e, k) of the fed nodes with draft logits
        (e, V) and Q (e, V) or None: :func:`edge_confidence`, which depends on the ranks
        only, not on the tokens drawn."""
        return edge_confidence(logits, q, children.shape[1])

    def factors(self, confidence: torch.Tensor) -> np.ndarray:
        """(e, k) float64 edge factors, non-increasing along each row: the confidence
        (``dynamic``) or its calibrated acceptance (``dynamic-dp``)."""
        c = confidence.detach().double().cpu().numpy()
        if self.calibration is None:
            return c
        # non-increasing along each row (the ranks), also where interpolation rounds
        return np.minimum.accumulate(self.calibration.acceptance(c), axis=1)

    def can_pay(self) -> bool:
        """Whether any step's tree can beat plain decoding under the calibrated costs: an
        upper bound with every candidate at the highest calibrated acceptance a (the
        ``topk**d`` nodes of depth d worth ``a**d``) and the cheapest draft work (one
        one-token draft forward) against a plain step, verify(1). True without a latency
        table (nothing to weigh)."""
        if self.verify_ms is None or self.calibration is None:
            return True
        best = float(self.factors(torch.ones(1, 1))[0, 0])
        values = [1.0]
        for d in range(1, self.depth + 1):
            values += [best ** d] * min(self.topk ** d, self.budget)
            if len(values) >= self.budget:
                break
        f = np.cumsum(values[:self.budget])
        n = np.arange(1, f.shape[0] + 1)
        speculative = f[1:] / (self._draft_ms([1]) + self.verify_ms[n[1:] - 1])
        return bool(speculative.size) and float(speculative.max()) > 1.0 / self.verify_ms[0]

    def start(self, prompt_ids: torch.Tensor) -> None:
        if not self.never_pays:  # a draft that never drafts needs no cache
            super().start(prompt_ids)

    def _draft_ms(self, widths: list[int]) -> float:
        curve = self.draft_curve
        return 0.0 if curve is None else float(sum(curve(w) for w in widths))

    def propose(self, committed: Sequence[int], max_depth: int, sampling: Sampling,
                generator: torch.Generator | None = None) -> Proposal:
        self._fed = None
        if self.never_pays:
            return root_only(committed, next(self.model.parameters()).device)
        device = self.cache.layers[0].keys.device if self.cache.layers else torch.device("cpu")
        depth = min(self.depth, max_depth)
        if depth < 1 or self.budget == 1:
            return root_only(committed, device)
        root_pos, pending = self.begin_step(committed, device)
        k = self.topk
        tree = Expansion(depth, k, self.budget, pending[0, -1])
        logits = feed_pending(self.model, self.cache, pending, root_pos)
        self.mark_fed(committed)
        widths = [pending.shape[1]]
        qs: list[torch.Tensor] = []
        ids = np.zeros(1, dtype=np.int64)
        for d in range(depth):
            if d > 0:
                ids = tree.frontier(d)
                if ids.size == 0:
                    break
                mask = torch.from_numpy(tree.feed(ids)).to(device)
                tokens = tree.tokens[torch.from_numpy(ids).to(device)][None]
                positions = torch.full_like(tokens, root_pos + d)
                logits = forward_tree(self.model, tokens, positions, mask, self.cache)[0]
                widths.append(ids.size)
            pick, q = pick_children(logits, k, sampling, generator)
            if q is not None:
                qs.append(q)
            tree.add_children(ids, pick, self.factors(self.confidence(logits, q, pick)),
                              q is not None)
        self.last_draft_ms = self._draft_ms(widths)
        cost = None
        if self.verify_ms is not None:
            # sampling: the draft cost of full levels, fixed before any draw (module docstring)
            draft = self.last_draft_ms if sampling.greedy else \
                self._draft_ms(widths[:1] + [k] * (depth - 1))
            cost = draft + self.verify_ms
        kept = tree.select(self.budget, cost, stopping=not sampling.greedy)
        return self.build_proposal(tree, kept, qs, len(widths))

    def build_proposal(self, tree: Expansion, kept: np.ndarray, qs: list[torch.Tensor],
                       forwards: int) -> Proposal:
        """The Proposal of the kept candidates (ascending ids): their tree renumbered
        breadth-first, tokens, and in sampling mode (``qs``: each forward's Q, rows in the
        order the nodes got them) the Q rows of the kept nodes that have kept children.
        Records which fed offset each node has for ``update``."""
        parents = renumber(tree.parent, kept)
        shape = Tree(tuple(parents.tolist()))
        device = tree.tokens.device
        tokens = tree.tokens[torch.from_numpy(kept).to(device)]
        self._fed = tree.fed[kept].tolist()
        if not qs:
            return Proposal(shape, tokens, None, None, forwards, fixed_shape=False)
        has_child = np.zeros(kept.shape[0], dtype=bool)
        has_child[parents[1:]] = True
        depths = tree.depth[kept]
        q_all = torch.cat(qs)
        q_row = np.full(kept.shape[0], -1, dtype=np.int64)
        q = []
        for d in range(int(depths.max())):  # nodes with children lie above the deepest
            nodes = np.flatnonzero((depths == d) & has_child)
            q_row[nodes] = np.arange(nodes.shape[0])
            rows = torch.from_numpy(tree.qrow[kept[nodes]]).to(q_all.device)
            q.append(q_all.index_select(0, rows))
        return Proposal(shape, tokens, q, q_row.tolist(), forwards, fixed_shape=False)

    def fed_index(self) -> Sequence[int] | None:
        """Offsets of the fed nodes of the last proposal (nodes are fed level by level, so
        they increase along the accepted path); ModelDrafter.update compacts the cache."""
        fed, self._fed = self._fed, None
        return fed


# ---------------------------------------------------------------------------- specs
def check_params(budget, depth, topk, name: str = "dynamic") -> None:
    """One-line DrafterError for out-of-range parameters."""
    for key, value, low in (("budget", budget, 1), ("depth", depth, 1), ("topk", topk, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise DrafterError(f"drafter {name!r}: {key} must be an integer >= {low}, "
                               f"got {value!r}")
    if budget > MAX_TREE_NODES:
        raise DrafterError(f"drafter {name!r}: budget {budget} exceeds the limit of "
                           f"{MAX_TREE_NODES} nodes")


OPTIONS = {"draft": str, "budget": int, "depth": int, "topk": int}


def _build(name: str, options: str, target, tokenizer, tree, allowed: dict) -> DynamicDrafter:
    if tree is not None:
        raise DrafterError(f"drafter {name!r} grows its own tree every step; drop the @SHAPE")
    opts = parse_options(options, allowed, name)
    check_params(opts.get("budget", DEFAULT_BUDGET), opts.get("depth", DEFAULT_DEPTH),
                 opts.get("topk", DEFAULT_TOPK), name)
    calibration = None
    if name == "dynamic-dp":
        if not opts.get("profile"):
            raise DrafterError("drafter 'dynamic-dp' needs profile=PATH, a calibration file "
                               "from treeopt profile calibration")
        try:
            calibration = Calibration.load(Path(opts["profile"]).expanduser())
        except CalibrationError as exc:
            raise DrafterError(f"drafter 'dynamic-dp': {exc}") from None
    spec = opts.get("draft", DEFAULT_DRAFT_MODEL)
    inner = build_drafter(spec, target=target, tokenizer=tokenizer)
    if not isinstance(inner, ModelDrafter):
        raise DrafterError(f"drafter {name!r}: draft={spec!r} is not a draft model; use "
                           "early-exit:K or a model with the target's tokenizer")
    return DynamicDrafter(inner.model, budget=opts.get("budget", DEFAULT_BUDGET),
                          depth=opts.get("depth", DEFAULT_DEPTH),
                          topk=opts.get("topk", DEFAULT_TOPK), calibration=calibration)


@register_drafter("dynamic", "EAGLE-2-style tree grown each step from the draft's path "
                             "probabilities (dynamic:draft=SPEC,budget=N,depth=D,topk=K)")
def _dynamic(options: str, *, target, tokenizer, tree):
    return _build("dynamic", options, target, tokenizer, tree, OPTIONS)


@register_drafter("dynamic-dp", "per-step exact DP over the dynamic tree, acceptance "
                                "calibrated by a measured profile (dynamic-dp:draft=SPEC,"
                                "budget=N,depth=D,topk=K,profile=PATH)")
def _dynamic_dp(options: str, *, target, tokenizer, tree):
    return _build("dynamic-dp", options, target, tokenizer, tree, {**OPTIONS, "profile": str})


__all__ = ["DynamicDrafter", "Expansion", "best_nodes", "best_order", "best_size", "choose",
           "edge_confidence", "renumber"]
