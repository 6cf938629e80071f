"""Cascades of drafters (CS-Drafting): one drafter built from others through the drafter
interface, with no decoding loop of its own.

- ``fallback:first=SPEC,then=SPEC`` (defaults: first=ngram, then=early-exit:4): the first
  drafter's proposal whenever it proposes anything beyond the root, else the second's. The
  combination asked for most: n-gram candidates where the text repeats itself, the draft
  model where the n-gram index has no match.
- ``horizontal:model=SPEC,levels=L,deep=SPEC`` (defaults: model=early-exit:4, levels=2,
  deep=ngram): CS-Drafting's horizontal cascade. The draft model drafts the first L levels
  of the shape (levels count the root: the model drafts depth 1 .. L-1) and a statistical
  drafter (``ngram``, ``datastore:PATH``, ``bigram:PATH``) the deeper, less likely nodes:
  every node of the model's last level is extended along the shape by the statistical
  drafter's ranked candidates after its path. Default shape: a chain of 4 drafted tokens.
- ``vertical:draft=SPEC,helper=SPEC`` (defaults: draft=early-exit:4, helper=ngram):
  CS-Drafting's vertical cascade. The draft model's own chain is drafted speculatively: the
  cheap helper guesses how the chain goes on, the draft model checks all guesses in one
  forward and keeps the longest agreeing prefix plus its own next token. Greedy: the chain
  is exactly the draft model's greedy chain (so acceptance is unchanged) in fewer draft
  forwards. Sampling: each guess g is accepted with probability Q(g) and otherwise the token
  is drawn from Q without g (the point-mass rule of ``verify_candidates``), so every chain
  token is still an exact sample of the draft's Q and Q is recorded for the verification
  rules. Chains only: a wider shape is drafted level by level as by a plain model drafter.

Nested specs with options of their own go in parentheses:
``fallback:first=(ngram:max=3,k=8),then=early-exit:4``. ``Proposal.forwards`` counts the
draft-model forwards of every drafter involved.

Shared caches. A model drafter's cache holds the committed tokens it has seen and its next
``propose`` feeds whatever was committed since, so a step drafted by another drafter (a
fallback step, or the levels a statistical drafter drafted) is simply fed on the model's next
turn. Only the drafter whose proposal was verified is told the accepted path; a first drafter
that proposed the root alone is told that its root was accepted.

Losslessness. Which drafter drafts, and every candidate, depends only on draft-side
information (the committed text, the draft's own tokens and distributions), never on the
target's verdict on this step: the verification rules stay exact (chi-square tests). Nodes
drafted by a statistical drafter carry no distribution and are verified as point masses.
"""

from __future__ import annotations

import copy
from typing import Callable, Sequence

import torch

from treeopt.decode.attention import compact, forward_tree
from treeopt.decode.drafter import (
    DEFAULT_CANDIDATE_SHAPE,
    Drafter,
    DrafterError,
    Proposal,
    build_drafter,
    parse_options,
    register_drafter,
)
from treeopt.decode.sampling import Sampling, sample, verify_candidates
from treeopt.drafters.egag import model_of
from treeopt.drafters.model import DEFAULT_CHAIN, ModelDrafter, truncate_tree
from treeopt.models.loading import DEFAULT_DRAFT_MODEL
from treeopt.shapes import chain
from treeopt.tree import Tree

DEFAULT_STATISTICAL = "ngram"
DEFAULT_LEVELS = 2


def _reshape(drafter: Drafter, shape: Tree) -> Drafter:
    """``drafter.reshaped(shape)``, or the drafter itself when it chooses its own tree."""
    return drafter if drafter.shape is None else drafter.reshaped(shape)


def _topk(drafter: Drafter, target_topk: torch.Tensor | None) -> torch.Tensor | None:
    return target_topk if drafter.wants_target_topk else None


def _candidates(drafter: Drafter, owner: str, key: str, spec: str) -> Drafter:
    """``drafter`` when it can give ranked candidates after any path (``path_candidates``),
    else a one-line DrafterError."""
    if not callable(getattr(drafter, "path_candidates", None)):
        raise DrafterError(f"drafter {owner!r}: {key}={spec} is not a statistical drafter; "
                           "give ngram[:...], datastore:PATH or bigram:PATH")
    return drafter


def _build(spec: str, owner: str, key: str, *, target, tokenizer, tree) -> Drafter:
    """A nested drafter; its errors are prefixed with where the spec was given."""
    try:
        drafter = build_drafter(spec, target=target, tokenizer=tokenizer, tree=tree)
    except DrafterError as exc:
        raise DrafterError(f"drafter {owner!r}: {key}={spec}: {exc}") from None
    if drafter is None:
        raise DrafterError(f"drafter {owner!r}: {key}= needs a drafter, got {spec!r}")
    return drafter


# ---------------------------------------------------------------------------- fallback
class FallbackDrafter(Drafter):
    """``first``'s proposal when it has one beyond the root, else ``then``'s."""

    name = "fallback"

    def __init__(self, first: Drafter, then: Drafter):
        self.first, self.then = first, then
        self.shape = first.shape
        self.wants_target_topk = max(first.wants_target_topk, then.wants_target_topk)
        self._used: Drafter | None = None
        self.used_first = 0  # steps drafted by ``first`` / by ``then``, per generation
        self.used_then = 0

    def reshaped(self, shape: Tree) -> "FallbackDrafter":
        new = copy.copy(self)
        new.first, new.then = _reshape(self.first, shape), _reshape(self.then, shape)
        new.shape = new.first.shape
        return new

    def check(self, target) -> None:
        self.first.check(target)
        self.then.check(target)

    def start(self, prompt_ids: torch.Tensor) -> None:
        self.first.start(prompt_ids)
        self.then.start(prompt_ids)
        self._used = None
        self.used_first = self.used_then = 0

    def propose(self, committed: Sequence[int], max_depth: int, sampling: Sampling,
                generator: torch.Generator | None = None) -> Proposal:
        proposal = self.first.propose(committed, max_depth, sampling, generator)
        if proposal.tree.size > 1 or max_depth < 1:
            self._used = self.first
            self.used_first += proposal.tree.size > 1
            return proposal
        other = self.then.propose(committed, max_depth, sampling, generator)
        other.forwards += proposal.forwards
        self._used = self.then
        self.used_then += 1
        return other

    def update(self, path: Sequence[int], committed: Sequence[int],
               target_topk: torch.Tensor | None = None) -> None:
        used, self._used = self._used, None
        if used is None:
            return
        used.update(path, committed, _topk(used, target_topk))
        if used is self.then:
            # ``first`` proposed its root alone, and the root is always accepted.
            top = _topk(self.first, target_topk)
            self.first.update([0], committed, None if top is None else top[:1])

    def __repr__(self) -> str:
        return f"FallbackDrafter(first={self.first!r}, then={self.then!r})"


# ---------------------------------------------------------------------------- horizontal
class HorizontalDrafter(Drafter):
    """The model drafter drafts the first ``levels`` levels of ``shape`` (depth up to
    levels - 1), the statistical ``deep`` drafter every deeper node (see the module
    docstring)."""

    name = "horizontal"

    def __init__(self, model_drafter: ModelDrafter, deep: Drafter, levels: int, shape: Tree):
        if levels < 2:
            raise DrafterError(f"drafter 'horizontal': levels={levels} must be >= 2 (levels "
                               "count the root: 2 = the model drafts depth 1)")
        _candidates(deep, "horizontal", "deep", getattr(deep, "name", "?"))
        self.levels = int(levels)
        self.shape = shape
        self.model_drafter = _reshape(model_drafter, truncate_tree(shape, levels - 1))
        self.deep = _reshape(deep, shape)
        self.model = self.model_drafter.model
        self._model_size = 0

    def reshaped(self, shape: Tree) -> "HorizontalDrafter":
        new = copy.copy(self)
        new.shape = shape
        new.model_drafter = _reshape(self.model_drafter, truncate_tree(shape, self.levels - 1))
        new.deep = _reshape(self.deep, shape)
        return new

    def check(self, target) -> None:
        self.model_drafter.check(target)
        self.deep.check(target)

    def start(self, prompt_ids: torch.Tensor) -> None:
        self.model_drafter.start(prompt_ids)
        self.deep.start(prompt_ids)
        self._model_size = 0

    def propose(self, committed: Sequence[int], max_depth: int, sampling: Sampling,
                generator: torch.Generator | None = None) -> Proposal:
        top = self.levels - 1
        head = self.model_drafter.propose(committed, min(max_depth, top), sampling, generator)
        self._model_size = head.tree.size
        if head.tree.size == 1 or max_depth <= top:
            return head
        tree, tokens = head.tree, head.tokens.tolist()
        shape = self.shape
        # The shape node of each proposal node, by sibling ranks (a model drafter fills a
        # truncation of the shape; other drafters a rank-consistent part of it).
        at: list[int | None] = [0]
        paths: list[tuple[int, ...]] = [()]
        for v in range(1, tree.size):
            u = at[tree.parents[v]]
            kids = shape.children[u] if u is not None else ()
            at.append(kids[tree.ranks[v] - 1] if tree.ranks[v] <= len(kids) else None)
            paths.append(paths[tree.parents[v]] + (tokens[v],))
        children = self.deep.path_candidates(committed)
        parents = list(tree.parents)
        level = [v for v in tree.levels[top]] if tree.depth >= top else []
        depth = top
        while level and depth < max_depth:
            nxt = []
            for v in level:
                kids = shape.children[at[v]] if at[v] is not None else ()
                if not kids:
                    continue
                cands = children(paths[v])
                for rank, c in enumerate(kids[:len(cands)], start=1):
                    nxt.append(len(parents))
                    parents.append(v)
                    at.append(c)
                    tok = int(cands[rank - 1])
                    tokens.append(tok)
                    paths.append(paths[v] + (tok,))
            level, depth = nxt, depth + 1
        if len(parents) == tree.size:
            return head
        q_row = None
        if head.q is not None:
            q_row = list(head.q_row) + [-1] * (len(parents) - tree.size)
        # q_row[v] == -1: children drafted by the statistical drafter (point masses).
        return Proposal(Tree(tuple(parents)),
                        torch.tensor(tokens, dtype=torch.int64, device=head.tokens.device),
                        head.q, q_row, head.forwards, fixed_shape=False)

    def update(self, path: Sequence[int], committed: Sequence[int],
               target_topk: torch.Tensor | None = None) -> None:
        head = [v for v in path if v < self._model_size]
        top = _topk(self.model_drafter, target_topk)
        self.model_drafter.update(head, committed, None if top is None else top[:len(head)])

    @property
    def wants_target_topk(self) -> int:  # type: ignore[override]
        return self.model_drafter.wants_target_topk

    def __repr__(self) -> str:
        return (f"HorizontalDrafter(levels={self.levels}, shape={self.shape.size} nodes, "
                f"model={self.model_drafter!r}, deep={self.deep!r})")


# ---------------------------------------------------------------------------- vertical
class VerticalDrafter(ModelDrafter):
    """A draft model whose chain is itself drafted speculatively by a cheap ``helper`` (see
    the module docstring)."""

    name = "vertical"

    def __init__(self, model, helper: Drafter, tree: Tree | None = None):
        super().__init__(model, tree)
        self.helper = _candidates(helper, "vertical", "helper", getattr(helper, "name", "?"))
        self._chain_fed: int | None = None  # drafted tokens fed to the draft (chain steps)
        self.helper_tokens = 0  # helper guesses the draft model kept, per generation

    def check(self, target) -> None:
        super().check(target)
        self.helper.check(target)

    def start(self, prompt_ids: torch.Tensor) -> None:
        super().start(prompt_ids)
        self.helper.start(prompt_ids)
        self._chain_fed = None
        self.helper_tokens = 0

    def propose(self, committed: Sequence[int], max_depth: int, sampling: Sampling,
                generator: torch.Generator | None = None) -> Proposal:
        tree = truncate_tree(self.shape, max_depth)
        self._chain_fed = None
        if tree.width > 1 or tree.size == 1:
            return super().propose(committed, max_depth, sampling, generator)
        self._tree = tree
        return self._draft_chain(committed, tree, sampling, generator)

    def _draft_chain(self, committed: Sequence[int], tree: Tree, sampling: Sampling,
                     generator: torch.Generator | None) -> Proposal:
        n = tree.depth
        device = self.cache.layers[0].keys.device if self.cache.layers else torch.device("cpu")
        root_pos, pending = self.begin_step(committed, device)
        guesses: Callable = self.helper.path_candidates(committed)
        unfed = pending[0].tolist()
        pos = self.cached  # position of unfed[0]
        drafted: list[int] = []
        qs: list[torch.Tensor] | None = None if sampling.greedy else []
        forwards = 0
        while len(drafted) < n:
            guess: list[int] = []
            while len(guess) < n - len(drafted) - 1:
                cands = guesses(tuple(drafted + guess))
                if not len(cands):
                    break
                guess.append(int(cands[0]))
            ids = torch.tensor([unfed + guess], dtype=torch.int64, device=device)
            positions = torch.arange(pos, pos + ids.shape[1], device=device)[None]
            logits = forward_tree(self.model, ids, positions, None, self.cache,
                                  logits_to_keep=len(guess) + 1)[0]
            forwards += 1
            new: list[int] = []
            if qs is None:
                best = logits.argmax(-1).tolist()
                for j, tok in enumerate(best):
                    new.append(int(tok))
                    if j == len(guess) or tok != guess[j]:
                        break
            else:
                probs = sampling.probs(logits)
                for j in range(len(guess) + 1):
                    qs.append(probs[j])
                    if j < len(guess):
                        _, tok = verify_candidates(probs[j], [guess[j]], generator)
                    else:
                        tok = int(sample(probs[j][None], 1, generator))
                    new.append(int(tok))
                    if j == len(guess) or tok != guess[j]:
                        break
            kept = len(new) - 1  # guesses the draft agreed with (fed, and kept cached)
            self.helper_tokens += kept
            pos += len(unfed) + kept
            compact(self.cache, pos, [])
            drafted += new
            unfed = [new[-1]]
        self.mark_fed(committed)
        self._chain_fed = pos - (root_pos + 1)
        tokens = torch.tensor([int(committed[-1])] + drafted, dtype=torch.int64, device=device)
        q = None if qs is None else [row[None] for row in qs]
        q_row = None if qs is None else [0] * n + [-1]
        return Proposal(tree, tokens, q, q_row, forwards, fixed_shape=True)

    def update(self, path: Sequence[int], committed: Sequence[int],
               target_topk: torch.Tensor | None = None) -> None:
        fed, self._chain_fed = self._chain_fed, None
        if fed is None:
            super().update(path, committed, target_topk)
            return
        self.keep_fed(range(min(len(path) - 1, fed)))

    def __repr__(self) -> str:
        return f"VerticalDrafter(shape={self.shape.size} nodes, helper={self.helper!r})"


# ---------------------------------------------------------------------------- factories
@register_drafter("fallback", "the first drafter's candidates, the second's where the first "
                              "has none (options first=, then=; default n-gram then "
                              "early-exit:4)")
def _fallback(options: str, *, target, tokenizer, tree: Tree | None):
    opts = parse_options(options, {"first": str, "then": str}, "fallback")
    first = _build(opts.get("first", DEFAULT_STATISTICAL), "fallback", "first", target=target,
                   tokenizer=tokenizer, tree=tree)
    then = _build(opts.get("then", DEFAULT_DRAFT_MODEL), "fallback", "then", target=target,
                  tokenizer=tokenizer, tree=tree)
    return FallbackDrafter(first, then)


@register_drafter("horizontal", "the draft model drafts the first levels of the tree, a "
                                "statistical drafter the deeper ones (options model=, "
                                "levels=, deep=)")
def _horizontal(options: str, *, target, tokenizer, tree: Tree | None):
    opts = parse_options(options, {"model": str, "levels": int, "deep": str}, "horizontal")
    shape = tree if tree is not None else chain(draft_tokens=DEFAULT_CHAIN)
    levels = opts.get("levels", DEFAULT_LEVELS)
    if levels < 2:
        raise DrafterError(f"drafter 'horizontal': levels={levels} must be >= 2 (levels count "
                           "the root: 2 = the model drafts depth 1)")
    if levels > shape.depth:
        raise DrafterError(f"drafter 'horizontal': levels={levels} leaves no level for deep= "
                           f"in a tree of depth {shape.depth} ({shape.depth + 1} levels); give "
                           f"levels <= {shape.depth} or a deeper tree")
    spec = opts.get("model", DEFAULT_DRAFT_MODEL)
    head = _build(spec, "horizontal", "model", target=target, tokenizer=tokenizer,
                  tree=truncate_tree(shape, levels - 1))
    model_of(head, spec, "horizontal", "model")
    deep_spec = opts.get("deep", DEFAULT_STATISTICAL)
    deep = _candidates(_build(deep_spec, "horizontal", "deep", target=target,
                              tokenizer=tokenizer, tree=shape), "horizontal", "deep", deep_spec)
    return HorizontalDrafter(head, deep, levels, shape)


@register_drafter("vertical", "the draft model's chain drafted speculatively by a cheaper "
                              "helper: the draft's own chain in fewer draft forwards "
                              "(options draft=, helper=)")
def _vertical(options: str, *, target, tokenizer, tree: Tree | None):
    opts = parse_options(options, {"draft": str, "helper": str}, "vertical")
    spec = opts.get("draft", DEFAULT_DRAFT_MODEL)
    model = model_of(_build(spec, "vertical", "draft", target=target, tokenizer=tokenizer,
                            tree=None), spec, "vertical", "draft")
    helper_spec = opts.get("helper", DEFAULT_STATISTICAL)
    helper = _candidates(_build(helper_spec, "vertical", "helper", target=target,
                                tokenizer=tokenizer, tree=DEFAULT_CANDIDATE_SHAPE),
                         "vertical", "helper", helper_spec)
    return VerticalDrafter(model, helper, tree)


__all__ = ["FallbackDrafter", "HorizontalDrafter", "VerticalDrafter"]
