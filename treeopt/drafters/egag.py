"""Entropy-adaptive draft length (EGAG): the draft stops growing a branch where its own
distribution says the next guess is unlikely to be accepted.

Spec: ``egag:draft=SPEC,gamma_min=G1,gamma_max=G2,ema=A[,tree=SHAPE][,threshold=H]``
(defaults: draft=early-exit:4, gamma_min=1, gamma_max=6 or gamma_min if larger, ema=0.9, no
threshold; a value holding commas is wrapped in parentheses, e.g. ``tree=(specinfer:4,2,1)``
or ``draft=(early-exit:4,quant=int8)``). The draft is a model
(``early-exit:K``, a folder, a .gguf file, a hub id); it drafts a chain of at most
``gamma_max`` tokens, or with ``tree=SHAPE`` (or a method's ``@SHAPE``) the nodes of SHAPE,
each branch at most ``gamma_max`` deep.

The rule (EGAG's entropy-guided gamma, applied per position and per branch). EGAG computes
the normalised entropy of the draft's current distribution, h = H(q) / log V in [0, 1], and
drafts gamma = floor((1 - h) * gamma_max) tokens, clamped to [gamma_min, gamma_max], with an
EMA to keep gamma from jittering. Here the draft is grown level by level, one draft forward
per level, and at every node v of depth d (d tokens drafted above it) the distribution q_v
its children would be drawn from is already at hand; v gets children when

- d < gamma_min: always (every branch drafts at least gamma_min tokens);
- d >= gamma_max, or SHAPE has no child there: never;
- otherwise when floor((1 - h_v) * G) >= d + 1 -- EGAG's formula evaluated at the node
  itself, so a chain whose entropy stays at h stops after floor((1 - h) * G) tokens -- or,
  with ``threshold=H``, when h_v <= H and d + 1 <= G.

G is the acceptance-adapted budget G = gamma_min + 1 + a * (gamma_max - gamma_min - 1),
where a is the exponential moving average of the acceptance signal: after each step that
drafted, a <- ema * a + (1 - ema) * r with r = accepted tokens / depth of the proposal
(the accepted fraction of a chain). a starts at 1 with every generation, so the first step
uses EGAG's gamma_max; a run of rejections shrinks G towards gamma_min + 1 (never below, so a
confident draft keeps drafting and the signal keeps coming), good steps grow it back. ``ema``
is the weight of the past (EGAG's smoothing factor, 0.9 in its examples): close to 1 adapts
slowly. q is the run's processed draft distribution when sampling (what children are drawn
from) and the draft's softmax at temperature 1 in greedy mode (whose one-hot Q has no
entropy).

Losslessness. The shape of every step depends only on draft-side information: the draft's
own distributions along the drafted paths and the outcomes of earlier steps. Children are
still drawn from Q (sampling) or are Q's top-k (greedy), and Q is recorded for every node
that has children, so the verification rules stay exact (tested with a chi-square test).

Cost. A node whose entropy stops it was fed to the draft (its distribution was needed), so a
chain stopped by entropy after g tokens costs g + 1 draft forwards, one more than a fixed
chain of g; a chain that reaches gamma_max (or the engine's depth limit) costs g, like a fixed
one. ``Proposal.forwards`` counts them; the fed nodes on the accepted path stay in the draft's
cache, the others are dropped in ``update``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from treeopt.decode.attention import forward_tree
from treeopt.decode.drafter import (
    Drafter,
    DrafterError,
    Proposal,
    build_drafter,
    parse_options,
    register_drafter,
    root_only,
)
from treeopt.decode.sampling import GREEDY, Sampling
from treeopt.drafters.grow import feed_pending, pick_children
from treeopt.drafters.model import ModelDrafter, truncate_tree
from treeopt.errors import TreeoptError
from treeopt.limits import MAX_TREE_NODES
from treeopt.models.loading import DEFAULT_DRAFT_MODEL
from treeopt.shapes import chain, from_name
from treeopt.tree import Tree

DEFAULT_GAMMA_MIN = 1
DEFAULT_GAMMA_MAX = 6
DEFAULT_EMA = 0.9

#: expand(depth, normalised entropy) -> whether a node at that depth gets its children.
Expand = Callable[[int, float], bool]


def normalised_entropy(probs: torch.Tensor) -> torch.Tensor:
    """H(p) / log V per row of probs (..., V), in [0, 1] (0: one token; 1: uniform)."""
    v = probs.shape[-1]
    if v < 2:
        return torch.zeros(probs.shape[:-1], device=probs.device)
    return torch.special.entr(probs.float()).sum(-1) / math.log(v)


@dataclass
class GrownTree:
    """A tree grown level by level: ``tree`` and its ``tokens`` (size,) int64 (node 0 = the
    root); ``q`` per depth, (e_d, V) draft probabilities of that depth's nodes with children
    (None in greedy mode) and ``q_row`` (size,) their rows (-1: no children); ``fed[v]``: the
    position of node v among the tree nodes fed to the draft (-1 for the root and unfed
    leaves); ``forwards``: draft forwards run."""

    tree: Tree
    tokens: torch.Tensor
    q: list[torch.Tensor] | None
    q_row: list[int] | None
    fed: list[int]
    forwards: int


def grow_tree(draft, cache, pending: torch.Tensor, root_pos: int, shape: Tree, expand: Expand,
              *, sampling: Sampling = GREEDY, generator: torch.Generator | None = None
              ) -> GrownTree:
    """Grow a subtree of ``shape`` with the draft model, one forward per level, asking
    ``expand(depth, h)`` at every node that has children in ``shape`` whether to give them
    (h: the normalised entropy of the node's draft distribution, see the module docstring).

    draft, cache, pending, root_pos: as for ``treeopt.drafters.grow.draft_tree`` (the cache
    holds the committed tokens before ``pending``; pending (1, p) ends with the root at
    ``root_pos``). Nodes that may get children are fed to the draft (their distribution is
    needed), leaves of ``shape`` are not. After the call the cache holds every committed
    token followed by the fed nodes in ``GrownTree.fed`` order. Children are the draft's
    top-k (greedy) or drawn from Q = ``sampling.probs`` (with replacement for the SpecInfer
    rule), as in fixed-shape drafting.
    """
    device = pending.device
    greedy = sampling.greedy
    logits = feed_pending(draft, cache, pending, root_pos)
    forwards = 1
    parents, of_shape, tokens = [-1], [0], [int(pending[0, -1])]
    fed, q_row = [-1], [-1]
    qs: list[torch.Tensor] | None = None if greedy else []
    fed_nodes: list[int] = []
    level, depth, chain_so_far = [0], 0, True
    while level:
        probs = torch.softmax(logits.float(), -1) if greedy else sampling.probs(logits)
        h = normalised_entropy(probs).tolist()
        grow = [i for i, v in enumerate(level)
                if shape.children[of_shape[v]] and expand(depth, h[i])]
        if not grow:
            break
        k = max(len(shape.children[of_shape[level[i]]]) for i in grow)
        picked, q = pick_children(logits[torch.tensor(grow, device=logits.device)], k,
                                  sampling, generator)
        pick = picked.tolist()
        if qs is not None:
            qs.append(q)
        nxt = []
        for r, i in enumerate(grow):
            v = level[i]
            if qs is not None:
                q_row[v] = r
            for j, c in enumerate(shape.children[of_shape[v]]):
                nxt.append(len(parents))
                parents.append(v)
                of_shape.append(c)
                tokens.append(int(pick[r][j]))
                fed.append(-1)
                q_row.append(-1)
        depth += 1
        feed = [v for v in nxt if shape.children[of_shape[v]]]
        if not feed:
            break
        chain_so_far = chain_so_far and len(feed) == 1 and len(nxt) == 1
        mask = None
        if not chain_so_far:
            # Ancestor-or-self mask over the fed tree nodes and this level (every ancestor
            # of depth >= 1 has children, so it was fed).
            n_fed = len(fed_nodes)
            mask = torch.zeros(len(feed), n_fed + len(feed), dtype=torch.bool)
            for i, v in enumerate(feed):
                mask[i, n_fed + i] = True
                u = parents[v]
                while u > 0:
                    mask[i, fed[u]] = True
                    u = parents[u]
            mask = mask.to(device)
        for v in feed:
            fed[v] = len(fed_nodes)
            fed_nodes.append(v)
        ids = torch.tensor([[tokens[v] for v in feed]], dtype=torch.int64, device=device)
        positions = torch.full_like(ids, root_pos + depth)
        logits = forward_tree(draft, ids, positions, mask, cache)[0]
        forwards += 1
        level = feed
    tree = Tree(tuple(parents))
    return GrownTree(tree, torch.tensor(tokens, dtype=torch.int64, device=device), qs,
                     None if qs is None else q_row, fed, forwards)


def check_gammas(gamma_min: int, gamma_max: int, ema: float, threshold: float | None,
                 drafter: str = "egag") -> None:
    """Raise DrafterError (one line) unless 0 <= gamma_min <= gamma_max, gamma_max >= 1,
    ema in (0, 1) and threshold (when given) in (0, 1]."""
    name = f"drafter {drafter!r}"
    for key, value in (("gamma_min", gamma_min), ("gamma_max", gamma_max)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise DrafterError(f"{name}: {key} must be an integer, got {value!r}")
    if gamma_min < 0:
        raise DrafterError(f"{name}: gamma_min={gamma_min} must be >= 0 (the fewest tokens a "
                           "step drafts; 0 lets an unsure draft propose nothing)")
    if not 1 <= gamma_max < MAX_TREE_NODES:
        raise DrafterError(f"{name}: gamma_max={gamma_max} must be in 1..{MAX_TREE_NODES - 1} "
                           "(the most tokens a branch drafts)")
    if gamma_min > gamma_max:
        raise DrafterError(f"{name}: gamma_min={gamma_min} is above gamma_max={gamma_max}; "
                           "give gamma_min <= gamma_max")
    if not (isinstance(ema, (int, float)) and 0 < ema < 1):
        raise DrafterError(f"{name}: ema={ema!r} must be in (0, 1) (the weight of the past "
                           "in the moving average of the acceptance, e.g. 0.9)")
    if threshold is not None and not (isinstance(threshold, (int, float))
                                      and 0 < threshold <= 1):
        raise DrafterError(f"{name}: threshold={threshold!r} must be in (0, 1] (normalised "
                           "entropy H / log V above which a branch stops)")


class EgagDrafter(ModelDrafter):
    """A draft model whose chain (or tree ``shape``) stops where its entropy is high; see the
    module docstring for the rule. ``acceptance`` is the moving average ``a``; ``budget``
    the budget G it gives."""

    name = "egag"

    def __init__(self, model, tree: Tree | None = None, *, gamma_min: int = DEFAULT_GAMMA_MIN,
                 gamma_max: int = DEFAULT_GAMMA_MAX, ema: float = DEFAULT_EMA,
                 threshold: float | None = None):
        check_gammas(gamma_min, gamma_max, ema, threshold)
        super().__init__(model, tree if tree is not None else chain(draft_tokens=gamma_max))
        self.gamma_min, self.gamma_max = gamma_min, gamma_max
        self.ema = float(ema)
        self.threshold = None if threshold is None else float(threshold)
        self.acceptance = 1.0
        self._fed: list[int] | None = None
        self._depth = 0

    @property
    def budget(self) -> float:
        """G = gamma_min + 1 + a * (gamma_max - gamma_min - 1), at least gamma_min."""
        g_min, g_max = self.gamma_min, self.gamma_max
        if g_max <= g_min:
            return float(g_max)
        return g_min + 1 + self.acceptance * (g_max - g_min - 1)

    def expands(self, depth: int, entropy: float) -> bool:
        """Whether a node of ``depth`` whose draft distribution has normalised ``entropy``
        gets children (the rule of the module docstring, the shape aside)."""
        if depth < self.gamma_min:
            return True
        if depth >= self.gamma_max:
            return False
        g = self.budget
        if self.threshold is not None:
            return entropy <= self.threshold and depth + 1 <= g
        return (1.0 - entropy) * g >= depth + 1

    def observe(self, accepted: int, depth: int) -> None:
        """Fold one step's acceptance (``accepted`` tokens of a proposal ``depth`` deep) into
        the moving average; steps that drafted nothing say nothing."""
        if depth > 0:
            r = min(1.0, accepted / depth)
            self.acceptance = self.ema * self.acceptance + (1.0 - self.ema) * r

    def start(self, prompt_ids: torch.Tensor) -> None:
        super().start(prompt_ids)
        self.acceptance = 1.0
        self._fed = None

    def propose(self, committed: Sequence[int], max_depth: int, sampling: Sampling,
                generator: torch.Generator | None = None) -> Proposal:
        device = self.cache.layers[0].keys.device if self.cache.layers else torch.device("cpu")
        shape = truncate_tree(self.shape, min(max_depth, self.gamma_max))
        self._fed = None
        if shape.size == 1:
            return root_only(committed, device)
        root_pos, pending = self.begin_step(committed, device)
        grown = grow_tree(self.model, self.cache, pending, root_pos, shape, self.expands,
                          sampling=sampling, generator=generator)
        self.mark_fed(committed)
        self._fed = grown.fed
        self._depth = grown.tree.depth
        return Proposal(grown.tree, grown.tokens, grown.q, grown.q_row, grown.forwards,
                        fixed_shape=grown.tree.width <= 1)

    def update(self, path: Sequence[int], committed: Sequence[int],
               target_topk: torch.Tensor | None = None) -> None:
        """Keep the fed nodes on the accepted path in the draft's cache and fold the step's
        acceptance into the moving average."""
        fed, self._fed = self._fed, None
        if fed is None:
            return
        self.keep_fed([fed[v] for v in path[1:] if fed[v] >= 0])
        self.observe(len(path) - 1, self._depth)

    def __repr__(self) -> str:
        return (f"EgagDrafter(shape={self.shape.size} nodes, gamma_min={self.gamma_min}, "
                f"gamma_max={self.gamma_max}, ema={self.ema}, threshold={self.threshold})")


def model_of(drafter: Drafter | None, spec: str, owner: str, key: str):
    """The draft model of a drafter built from a nested spec; DrafterError when the spec is
    not a model drafter (``early-exit:K``, a folder, a .gguf file, a hub id)."""
    if not isinstance(drafter, ModelDrafter):
        raise DrafterError(f"drafter {owner!r}: {key}={spec} is not a draft model; give "
                           "early-exit:K or a model (folder, .gguf file, hub id)")
    return drafter.model


def shape_option(text: str, owner: str) -> Tree:
    """A shape spec or growmap file given as a drafter option, as a Tree (one-line
    DrafterError when it cannot be read)."""

    try:
        return from_name(text)
    except TreeoptError as exc:
        raise DrafterError(f"drafter {owner!r}: tree={text}: {exc}") from None


@register_drafter("egag", "entropy-adaptive draft length: a draft model's chain (or tree) "
                          "stops where its entropy is high (options draft=, gamma_min=, "
                          "gamma_max=, ema=, tree=, threshold=)")
def _egag(options: str, *, target, tokenizer, tree: Tree | None):
    opts = parse_options(options, {"draft": str, "gamma_min": int, "gamma_max": int,
                                   "ema": float, "tree": str, "threshold": float}, "egag")
    gamma_min = opts.get("gamma_min", DEFAULT_GAMMA_MIN)
    gamma_max = opts.get("gamma_max", max(DEFAULT_GAMMA_MAX, gamma_min))
    threshold = opts.get("threshold")
    check_gammas(gamma_min, gamma_max, opts.get("ema", DEFAULT_EMA), threshold)
    shape = tree
    if "tree" in opts:
        if tree is not None:
            raise DrafterError("drafter 'egag': the tree is given twice (tree= and a method's "
                               "@SHAPE); give one")
        shape = shape_option(opts["tree"], "egag")
    spec = opts.get("draft", DEFAULT_DRAFT_MODEL)
    inner = build_drafter(spec, target=target, tokenizer=tokenizer)
    return EgagDrafter(model_of(inner, spec, "egag", "draft"), shape, gamma_min=gamma_min,
                       gamma_max=gamma_max, ema=opts.get("ema", DEFAULT_EMA),
                       threshold=threshold)


__all__ = ["EgagDrafter", "GrownTree", "check_gammas", "grow_tree", "model_of",
           "normalised_entropy", "shape_option"]
