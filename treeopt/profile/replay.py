"""Greedy replay: what decoding with a model-free drafter would do, without running the target.

At temperature 0 the engine commits the target's own greedy continuation, whatever the
drafter proposes: a step's accepted path is the greedy walk of the proposed tree along that
continuation (``treeopt.profile.copy.greedy_path``), and it commits the path's tokens plus the
bonus token. A drafter whose proposal depends only on the committed text (``ngram``,
``suffix``, ``datastore``: no model, no target top-k) therefore proposes exactly what it would
propose in real decoding when :func:`replay` feeds it that continuation step by step. So
replay reproduces every step of a real greedy run, the nodes verified and the tokens committed,
at the cost of drafting alone; with the target's latency curve it predicts tokens/s
(:func:`predict_replay`)::

    tokens/s = sum(tokens committed) / sum(t_verify(nodes verified) + drafting time)

where t_verify is the curve's non-decreasing envelope (``treeopt.search.hardware.monotone``)
and the drafting time is measured during the replay (the drafter's own propose and update
calls, wall clock). No acceptance model sits in between: copies, their lengths and the
per-step length rule are seen exactly as decoding sees them, which the positional profile
(Sequoia's p[depth][rank]) cannot do for copy drafters. ``treeopt tune`` chooses among shapes
and the per-step rule by it (:func:`choose_replayed`).

Beside it, the Optuna search's ``replay`` objective (``treeopt.search.optuna_search``) walks
fixed trees along recorded *rank traces* (the target token's rank in the drafter's top-W at
every position): any drafter, one draft pass per position, exact for drafters whose
candidates below an accepted node are those they would propose standing there. This module
runs the drafter itself instead: any shape and any per-step rule, with the drafter's own
state (its index, its global trie) as decoding builds it. Model-free drafters cost next to
nothing to replay; a drafter that runs a model (a draft model, ``auto:draft=``) replays just
as exactly at temperature 0 — it keeps a cache of its own and sees only the committed text —
but runs its model at every step (``replay(..., models=True)``), so ``tune`` replays it in a
few configurations only: its tuned tree, and ``auto`` choosing per step between it and the
copies (``treeopt.tuning.model_candidates``).

What it does not see: the engine's own work per step beyond the target forward and the
drafter (building tree buffers, trimming the cache), and the cache's growth beyond the
curve's context. The prompts it replays are the tune prompts, not those decoded later.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from treeopt.decode.drafter import Drafter, DrafterError
from treeopt.decode.sampling import GREEDY
from treeopt.errors import TreeoptError
from treeopt.profile.acceptance import greedy_continuation
from treeopt.profile.copy import greedy_path
from treeopt.search.hardware import Prediction, monotone
from treeopt.shapes import chain
from treeopt.tree import Tree


class ReplayError(TreeoptError, ValueError):
    """A replay that cannot run (a drafter that needs the target); one line."""


def runs_model(drafter: Drafter) -> bool:
    """Whether ``drafter`` runs a model of its own (a draft model, an early exit, or
    ``auto`` with a draft model among its candidates)."""
    return getattr(drafter, "model", None) is not None or \
        getattr(drafter, "model_drafter", None) is not None


def replayable(drafter: Drafter, *, models: bool = False) -> str | None:
    """None when ``drafter`` can be replayed, else why not (one line). A drafter that runs a
    model (a draft model, an early exit, ``auto:draft=``) only with ``models``: at
    temperature 0 its proposals depend on the committed text alone too (it keeps a cache of
    its own), but replaying it runs the model at every step, which costs what drafting
    costs in decoding; ``tune`` replays such drafters in a few configurations only."""
    if runs_model(drafter) and not models:
        return f"the {drafter.name} drafter runs a model: its proposals need the model's cache"
    if getattr(drafter, "wants_target_topk", 0):
        return f"the {drafter.name} drafter learns from the target's top-k predictions"
    return None


def private(drafter: Drafter, shape: Tree | None = None, *, sized: bool = True) -> Drafter:
    """A copy of ``drafter`` (filling ``shape`` when given) whose state is its own: a fresh
    request index, no recorder, and an empty global suffix trie of its own that keeps no
    file (the drafter's may already hold the very continuations being replayed: ``tune``
    profiled them; a replay builds it from its own prompts, as a fresh run does). An
    ``auto`` drafter is rebuilt with fresh statistics, no cached copy table to start from
    (for the same reason) and its copy candidates made private the same way.
    ``sized=False`` drops a per-step sizer (a fixed shape drafted whole)."""
    try:  # ``auto`` reshaped to its own (None) shape: fresh statistics and candidates
        new = drafter.reshaped(shape if shape is not None else drafter.shape)
    except DrafterError:
        if shape is not None:
            raise
        new = copy.copy(drafter)  # a drafter that sizes itself and takes no shape
    if not sized and getattr(new, "sizer", None) is not None:
        new.sizer = None
        if getattr(new, "length", None) == "auto":
            new.length = "alpha"
    _own_state(new)
    return new


def _own_state(drafter: Drafter) -> None:
    """No recorder and an empty global trie of its own, for ``drafter`` and for the copy
    candidates of an ``auto`` drafter, and no copy table an ``auto`` drafter would start from
    (a tune's, measured on the prompts ``tune`` replays)."""
    if hasattr(drafter, "recorder"):
        drafter.recorder = None
    if getattr(drafter, "start_tables", None):
        drafter.start_tables, drafter.tables = {}, {}
    if hasattr(getattr(drafter, "cache", None), "empty_copy"):  # a global suffix trie
        drafter.cache = drafter.cache.empty_copy()
    for _, candidate in getattr(drafter, "copies", None) or ():
        _own_state(candidate)


def continuations(target, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                  eos_token_id: int | None = None) -> list[list[int]]:
    """The target's greedy continuation of every prompt (token id lists): what plain
    decoding, and so every greedy speculative run, commits (those the acceptance profile
    computed already are not computed again: ``greedy_continuation``)."""
    return [greedy_continuation(target, ids, max_new_tokens, eos_token_id) for ids in prompts]


@dataclass
class Replay:
    """Every replayed step: nodes verified (root included) and tokens committed, with the
    drafting time measured per step (ms)."""

    nodes: list[int] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    draft_ms: list[float] = field(default_factory=list)

    @property
    def steps(self) -> int:
        return len(self.nodes)

    def predict(self, verify_ms: Callable[[int], float], plain_ms: float | None = None,
                depth: int = 0) -> Prediction:
        """Tokens/s and speed-up over plain decoding (``plain_ms``, default verify_ms(1))
        of these steps under the verification cost ``verify_ms`` (n -> ms)."""
        if not self.nodes:
            raise ReplayError("nothing replayed: the continuations are too short")
        plain = float(verify_ms(1)) if plain_ms is None else float(plain_ms)
        v = sum(float(verify_ms(n)) for n in self.nodes) / self.steps
        d = sum(self.draft_ms) / self.steps
        f = sum(self.tokens) / self.steps
        step = v + d
        return Prediction(size=max(self.nodes), depth=depth, expected_tokens=f, draft_ms=d,
                          verify_ms=v, step_ms=step, tokens_per_s=1000.0 * f / step,
                          plain_ms=plain, speedup=plain * f / step)


def replay(drafter: Drafter, prompts: Sequence[Sequence[int]],
           conts: Sequence[Sequence[int]], *, models: bool = False) -> Replay:
    """Greedy decoding of every prompt with ``drafter`` (used as given: pass a
    :func:`private` copy), the target replaced by its known continuation ``conts[i]``.
    Steps mirror ``treeopt.decode.engine.generate``: the first token comes from the prefill,
    then each step proposes (at most the tokens left), walks the tree along the continuation
    and commits the path's tokens and the bonus. ``models``: drafters that run a model are
    replayed too (:func:`replayable`); their forwards are timed with the drafting."""
    why = replayable(drafter, models=models)
    if why is not None:
        raise ReplayError(f"cannot replay: {why}")
    out = Replay()
    for ids, cont in zip(prompts, conts):
        ids, cont = [int(t) for t in ids], [int(t) for t in cont]
        if not cont:
            continue
        drafter.start(torch.tensor([ids], dtype=torch.int64))
        committed, done = ids + [cont[0]], 1
        while done < len(cont):
            t0 = time.perf_counter()
            proposal = drafter.propose(committed, len(cont) - done - 1, GREEDY)
            tokens = proposal.tokens.tolist()
            path = greedy_path(proposal.tree.parents, tokens, cont[done:])
            new = [tokens[v] for v in path[1:]] + [cont[done + len(path) - 1]]
            committed += new
            done += len(new)
            drafter.update(path, committed, None)
            out.draft_ms.append(1000.0 * (time.perf_counter() - t0))
            out.nodes.append(proposal.tree.size)
            out.tokens.append(len(new))
        finish = getattr(drafter, "finish", None)
        if callable(finish):
            finish()
    return out


@dataclass
class ReplayChoice:
    """The best candidate by replay: ``label`` (as listed), its ``drafter`` (a private copy,
    unused), ``tree`` (the shape it fills; None when it sizes itself), ``prediction`` and
    the predictions of every candidate (label -> Prediction) and the ones skipped (label ->
    why)."""

    label: str
    drafter: Drafter
    tree: Tree | None
    prediction: Prediction
    predictions: dict = field(default_factory=dict)
    skipped: dict = field(default_factory=dict)
    prompts: list = field(default_factory=list, repr=False)
    conts: list = field(default_factory=list, repr=False)
    latency: object = None
    replays: dict = field(default_factory=dict, repr=False)  # label -> Replay
    options: dict = field(default_factory=dict)  # drafter-spec options of the kept one
    prefer: list = field(default_factory=list)  # labels kept unless beaten by > margin
    margin: float = 0.0

    @property
    def sizes_itself(self) -> bool:
        """The kept drafter builds each step's tree itself: no fixed shape decodes it."""
        return getattr(self.drafter, "shape", 0) is None

    def shape_for(self, label: str, prediction: Prediction) -> Tree:
        """The tree to save and report for candidate ``label``: the shape it fills, else its
        largest replayed step as a chain."""
        shape = self.shapes.get(label)
        return shape if shape is not None else chain(draft_tokens=max(1, prediction.size - 1))
    shapes: dict = field(default_factory=dict, repr=False)  # label -> Tree or None

    def best_under(self, latency) -> tuple[str, Prediction]:
        """(label, prediction) of the candidate chosen when steps are priced with another
        latency curve (another dtype's, say; the same preference and margin): the replayed
        steps do not depend on it."""
        curve = monotone(latency.target)
        preds = {k: r.predict(curve, depth=self.shapes[k].depth if self.shapes.get(k)
                              is not None else 0) for k, r in self.replays.items()}
        label = preferred({k: p.tokens_per_s for k, p in preds.items()}, self.prefer,
                          self.margin)
        return label, preds[label]

    def predict(self, drafter: Drafter, tree: Tree | None = None) -> Prediction:
        """Replay one more configuration (a :func:`private` drafter) on the same
        continuations and price it with the same curve."""
        return replay(drafter, self.prompts, self.conts).predict(
            monotone(self.latency.target), depth=tree.depth if tree is not None else 0)


def choose_replayed(candidates: Sequence[tuple], prompts: Sequence[Sequence[int]],
                    conts: Sequence[Sequence[int]], latency, *, models: bool = False,
                    prefer: Sequence[str] = (), margin: float = 0.0) -> ReplayChoice:
    """Replay every candidate (label, factory of a private drafter, its shape, ...) on the
    continuations and keep the one with the most predicted tokens/s (ties: the one listed
    first). ``latency``: a ``treeopt.profile.Latency`` (its target curve prices steps).
    ``models``: candidates that run a model are replayed too (:func:`replay`). ``prefer``:
    labels kept unless another candidate replays more than ``margin`` faster (the fastest
    of them; :func:`preferred`)."""
    curve = monotone(latency.target)
    preds, skipped, replays, shapes, made = {}, {}, {}, {}, {}
    for label, make, tree, *_ in candidates:
        try:
            drafter = make()
        except DrafterError as exc:
            skipped[label] = str(exc)
            continue
        replays[label] = replay(drafter, prompts, conts, models=models)
        shapes[label] = tree if tree is not None else getattr(drafter, "shape", None)
        preds[label] = replays[label].predict(curve, depth=tree.depth if tree is not None
                                              else 0)
        made[label] = (drafter, tree)
    if not preds:
        raise ReplayError("no candidate could be replayed: " + "; ".join(
            f"{k}: {v}" for k, v in skipped.items()))
    label = preferred({k: p.tokens_per_s for k, p in preds.items()}, prefer, margin)
    best = ReplayChoice(label, made[label][0], made[label][1], preds[label])
    best.predictions, best.skipped = preds, skipped
    best.prompts, best.conts, best.latency = list(prompts), list(conts), latency
    best.replays, best.shapes = replays, shapes
    best.prefer, best.margin = [k for k in prefer if k in preds], float(margin)
    return best


def preferred(rates: dict[str, float], prefer: Sequence[str] = (), margin: float = 0.0
              ) -> str:
    """The label of the highest rate (ties: the first), unless the highest rate among the
    ``prefer`` labels is within ``margin`` of it (``best <= (1 + margin) * theirs``): then
    that preferred label."""
    best = max(rates, key=rates.get)  # max keeps the first of equal rates
    liked = [k for k in rates if k in prefer]
    if liked:
        top = max(liked, key=rates.get)
        if rates[best] <= (1.0 + margin) * rates[top]:
            return top
    return best


__all__ = ["Replay", "ReplayChoice", "ReplayError", "choose_replayed", "continuations",
           "preferred", "private", "replay", "replayable", "runs_model"]
