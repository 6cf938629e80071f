"""``auto``: the drafter that decides, step by step, whether and how far to speculate.

Candidates: plain decoding (the root alone), the model-free copy drafters (``ngram`` at three
strictnesses, and ``suffix`` when it is registered), the corpus the user gives
(``auto:datastore=PATH``: the ``datastore`` drafter over a ``treeopt datastore build`` index,
a copy candidate like the others) and the draft model the user gives (``auto:draft=SPEC``).
Each drafts a chain (at most ``max=16`` tokens).

The rule, per step (expected tokens per unit of cost, SuffixDecoding's and Sequoia's common
criterion): for every copy candidate c offering a chain of a tokens now, and every k <= a,

    rate(c, k) = (1 + f(c) * E[min(m, k) | c, state(c), bucket(a)]) / T(k + 1)

where m is how many of c's tokens the target would have accepted and T(n) is the target's
forward time over n tokens after the step's context (``treeopt.models.dtype.latency_curve``:
measured once per model, machine and dtype after 128 and after 1024 cached tokens, then
cached; a step after c tokens is priced linearly between the two, and beyond 1024 along the
same line: attention over the cache grows with it, and more for several tokens than for
one). Plain decoding's rate is 1 / T(1). The best rate wins if it
beats plain decoding's by ``margin`` (3 %); otherwise the step is plain. A draft model's chain
of k costs k draft forwards more and its acceptance is a product of per-depth rates.

Acceptance is observed online, for every copy candidate at every step whichever drafted: its
proposal is compared with the tokens the target then committed (greedy output is the target's
own, and a deterministic proposal's match length against a sampled continuation has the
distribution of its accepted length under verification). The observations are kept per
candidate and per key (state, bucket of a): the bucket of 1, 2, 3-4, 5-8, 9-16 offered tokens
(how far the drafter's copy goes, its own confidence) and the candidate's state, what its
previous proposal says about the text now (it offered nothing; it missed a token committed
since; it matched every token committed since: the text follows the copy). Acceptance along
a copy is strongly correlated, and a text changes phase (code restated from the prompt, then
prose): pooled over states, the rates learnt while an answer restated its prompt kept the
``suffix`` candidate drafting 15-token copies through the prose after it, which failed dozens
of steps in a row (Qwen2.5-Coder answers to HumanEval prompts). The rates are shrunk in
three levels by ``prior`` pseudo-observations: a key's rate towards its state's rate at that
depth, that towards the candidate's pooled rate, and that towards one half.

A candidate that reports its drafted tokens' copy features (``suffix``: each token's rank, the
length of the copy it continues, its frequency-estimated probability;
``treeopt.profile.copytable``) is estimated finer: its shadow proposals are counted by
feature cell in a :class:`~treeopt.profile.copytable.CopyTable` of its own, and a chain's
expected tokens are the products of its tokens' cell estimates (shrunk towards coarser cells
and one half, as for tune's copy tables). A chain that continues a long, frequent copy is then
told from a guess after a one-token match, which the (state, bucket) key mixes: replayed along
Qwen2.5-Coder-1.5B's greedy HumanEval answers with a float32 AVX2 curve, the (state, bucket)
estimates drafted on a fifth of the steps where the suffix drafter's per-step lengths from
tune's copy table drafted on two fifths, and decoded faster. Where a greedy ``tune --draft
suffix`` ran for the same target, machine and dtype, the ``suffix`` candidate's table starts
from the counts it measured on its prompts (cached by :func:`remember_copy_table`) instead of
from nothing: a short answer in a fresh process then drafts from the first step what the
tune's prompts taught, and the counts go on from there.

Shadow statistics score every candidate at every step, but a candidate drafts where its
estimate beat the others': the winner of several noisy estimates is over-estimated. Each copy
candidate's expected tokens are therefore scaled by its own record on the steps it drafted
(tokens accepted over tokens expected, ``CALIBRATION`` expected tokens of pseudo-evidence at
1): that is f(c). A candidate estimated by feature cell keeps f(c) = 1: its cells already
separate the proposals it wins with from the rest (replayed along SmolLM2's Spec-Bench
answers the scale only made it draft less, and slower; along Qwen's HumanEval answers it
changed nothing). The draft model's statistics come from its own steps only and need no
such scale.

Where drafting is nearly free (bfloat16 verification of a few tokens costs what one does),
a first guess of one half makes the first copies worth drafting and the evidence arrives at
once; where verifying two tokens costs more than 1.46 times one (1.5 / 1.03), the guess
alone never pays and a step is plain until the counts say otherwise. Costs are read from
the latency curve's non-decreasing envelope (``treeopt.search.hardware.MonotoneCurve``): a
noisy dip never makes drafting look cheaper than plain decoding. A draft model is tried on
its first ``explore`` steps, then kept only while its predicted rate beats plain decoding;
one that cannot (from the start, under a tune result's acceptance) is dropped before its
prefill: no step would choose it, and its prefill costs a share of the target's.

The decisions depend only on the cached latency curves and the tokens decoded, so two runs
from the same cache decide alike. A curve cached while the machine was busy decides badly
all the same (drafting that cannot pay looks free when one token was timed at several times
its cost), so ``auto`` also times its steps as decoding runs them (from its proposal to its
update: the target's verification and the engine's work) against the curve's price of the
same steps; over ``STALE_STEPS`` steps more than ``STALE`` times off, its choice line says
so and how to re-time the curve (``--remeasure``). The timing never changes a decision.
Every step is verified by the engine as usual: the output is the target's own
(greedy-exact; sampled outputs follow its distribution).
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import torch

from treeopt.decode.drafter import (
    Drafter,
    DrafterError,
    Proposal,
    build_drafter,
    parse_options,
    register_drafter,
    registered,
    root_only,
)
from treeopt.decode.sampling import Sampling
from treeopt.drafters.datastore import DatastoreDrafter
from treeopt.limits import atomic_write
from treeopt.models.cache import cache_dir
from treeopt.models.dtype import (
    CONTEXT,
    cache_file,
    check_curve,
    interpolate,
    latency_curve,
    machine,
    model_key,
    timed_context,
)
from treeopt.profile.copytable import CopyTable, Features, cell
from treeopt.profile.model import LatencyCurve
from treeopt.search.hardware import MonotoneCurve
from treeopt.shapes import chain
from treeopt.tree import Tree

MAX_DRAFT = 16
#: The second context the target's latency curve is timed after (the first: ``CONTEXT``).
LONG_CONTEXT = 1024
#: Copy candidates: (name in the choice, drafter spec). ``suffix`` joins when registered.
COPY_CANDIDATES = (("ngram", "ngram"), ("ngram2", "ngram:min=2,max=4"),
                   ("ngram3", "ngram:min=3,max=6"))
SUFFIX = ("suffix", "suffix")
BUCKETS = (1, 2, 4, 8, 16)
MARGIN = 0.03
PRIOR = 2.0
PRIOR_MEAN = 0.5
EXPLORE = 8
MODEL_CHAIN = 8
CALIBRATION = 4.0
#: Decoding's steps timed over at least STALE_STEPS steps, more than STALE times off the
#: latency curve's price of them: the cached curve is stale (``AutoDrafter.stale``).
STALE = 2.0
STALE_STEPS = 16


def at_context(short: Mapping[int, float], long: Mapping[int, float] | None,
               contexts: tuple[int, int], context: int) -> dict[int, float]:
    """The curve after ``context`` cached tokens, from ``short`` timed after ``contexts[0]``
    and ``long`` after ``contexts[1]``, at the sizes of either: linear in the context between
    and beyond them (a size never cheaper than in ``short``), ``short`` itself at or below
    ``contexts[0]`` or without ``long``."""
    c0, c1 = contexts
    if long is None or context <= c0 or c1 <= c0:
        return dict(short)
    w = (context - c0) / (c1 - c0)
    out = {}
    for n in sorted(set(short) | set(long)):
        ms = interpolate(short, n)
        out[n] = ms + w * max(0.0, interpolate(long, n) - ms)
    return out


def envelope(curve: Mapping[int, float]) -> dict[int, float]:
    """The curve at its measured sizes, read through its non-decreasing envelope (each size
    costs at least what the dearest smaller measured size does)."""
    sizes = sorted(curve)
    env = MonotoneCurve(LatencyCurve(tokens=sizes, ms=[curve[n] for n in sizes]))
    return {n: float(env(n)) for n in sizes}


def bucket(offered: int) -> int:
    """Index of the bucket of a proposal offering ``offered`` tokens (1, 2, 3-4, 5-8,
    9-16, more)."""
    for i, top in enumerate(BUCKETS):
        if offered <= top:
            return i
    return len(BUCKETS)


#: What a copy candidate's previous proposal (at the previous step's root) says about the
#: text now: it offered nothing (or this is the request's first step), it missed a token the
#: target has committed since, or it matched every token committed since (the text is
#: following the copy). Acceptance along a copy is strongly correlated: a candidate that
#: just missed usually misses again, and one on a copy usually goes on matching.
FRESH, MISSED, ON_COPY = 0, 1, 2


@dataclass
class MatchStats:
    """Per key (state, offer bucket) and depth d (1..MAX_DRAFT): ``tries[key][d]``, proposals
    whose first d - 1 tokens the target accepted and whose d-th token it has decided on, and
    ``hits[key][d]``, those whose d-th token it accepted too. A proposal counts at a depth as
    soon as the committed tokens reach it (a censored observation, as in a Kaplan-Meier
    estimate), so evidence about short chains arrives at once and about long ones as the copy
    goes on."""

    tries: dict[tuple[int, int], list[int]] = field(default_factory=dict)
    hits: dict[tuple[int, int], list[int]] = field(default_factory=dict)
    # running sums over every key, and over the keys of each state: (tries, hits) by depth
    # (``rate`` reads them at every step for every candidate and depth)
    pooled: tuple[list[int], list[int]] = field(
        default_factory=lambda: ([0] * (MAX_DRAFT + 1), [0] * (MAX_DRAFT + 1)), repr=False)
    by_state: dict[int, tuple[list[int], list[int]]] = field(default_factory=dict, repr=False)

    def add(self, key: tuple[int, int], d: int, hit: bool) -> None:
        if key not in self.tries:
            self.tries[key] = [0] * (MAX_DRAFT + 1)
            self.hits[key] = [0] * (MAX_DRAFT + 1)
        if key[0] not in self.by_state:
            self.by_state[key[0]] = ([0] * (MAX_DRAFT + 1), [0] * (MAX_DRAFT + 1))
        for tries, hits in ((self.tries[key], self.hits[key]), self.pooled,
                            self.by_state[key[0]]):
            tries[d] += 1
            hits[d] += bool(hit)

    @staticmethod
    def _shrunk(counts: tuple[list[int], list[int]], d: int, prior: float,
                towards: float) -> float:
        return (counts[1][d] + prior * towards) / (counts[0][d] + prior)

    def rate(self, key: tuple[int, int], d: int, prior: float) -> float:
        """Estimated P(depth d accepted | depth d - 1 accepted) for ``key`` = (state,
        bucket), shrunk in three levels (empirical Bayes, ``prior`` pseudo-observations at
        each): the key's counts towards its state's rate at depth d over all buckets, that
        towards the candidate's pooled rate over every key, and that towards
        ``PRIOR_MEAN``. With no observations at all the rate is ``PRIOR_MEAN``."""
        pooled = self._shrunk(self.pooled, d, prior, PRIOR_MEAN)
        same = self.by_state.get(key[0])
        state = self._shrunk(same, d, prior, pooled) if same is not None else pooled
        if key not in self.tries:
            return state
        return self._shrunk((self.tries[key], self.hits[key]), d, prior, state)

    def expected(self, key: tuple[int, int], k: int, prior: float) -> list[float]:
        """[E[accepted tokens of a chain of j] for j = 0..k] for ``key``."""
        return chain_sums(self.rate(key, d, prior) for d in range(1, k + 1))


def chain_sums(rates) -> list[float]:
    """[E[accepted tokens of a chain of j] for j = 0..len(rates)] from each depth's
    acceptance given its parent's: the running sums of their running products."""
    out, p = [0.0], 1.0
    for r in rates:
        p *= r
        out.append(out[-1] + p)
    return out


def best_chain(expected_at: Sequence[float], offered: int, curve, extra_ms=None
               ) -> tuple[int, float]:
    """(k, rate) maximising (1 + expected_at[k]) / (T(k + 1) + extra_ms(k)) over 1 <= k <=
    ``offered`` (``expected_at[k]``: expected accepted tokens of a chain of k; ``curve``:
    target ms by tokens); ties keep the shorter chain. (0, 1 / T(1)) is plain decoding."""
    best_k, best = 0, 1.0 / interpolate(curve, 1)
    for k in range(1, offered + 1):
        cost = interpolate(curve, k + 1) + (extra_ms(k) if extra_ms else 0.0)
        rate = (1.0 + expected_at[k]) / cost
        if rate > best + 1e-12:
            best_k, best = k, rate
    return best_k, best


def truncated(proposal: Proposal, k: int) -> Proposal:
    """The first k drafted tokens of a chain proposal."""
    if proposal.tree.size <= k + 1:
        return proposal
    return Proposal(Tree(proposal.tree.parents[:k + 1]), proposal.tokens[:k + 1],
                    None if proposal.q is None else list(proposal.q)[:k],
                    None if proposal.q_row is None else list(proposal.q_row)[:k] + [-1],
                    proposal.forwards, fixed_shape=False)


def copy_features(drafter: Drafter, offered: int) -> list[Features] | None:
    """The copy features (``treeopt.profile.copytable``: rank, match length, estimated
    probability) of the ``offered`` drafted tokens of the chain ``drafter`` has just
    proposed, depth 1 first, when it reports them (``last_draft``: ``suffix`` does at every
    proposal; ``ngram`` only while it sizes or records its steps); else None."""
    last = getattr(drafter, "last_draft", None)
    if last is None:
        return None
    parents, feats = last
    if list(parents) != list(range(-1, offered)) or any(f is None for f in feats[1:]):
        return None
    return list(feats[1:])


def chain_expected(table: CopyTable, feats: Sequence[Features]) -> list[float]:
    """[E[accepted tokens of a chain of j] for j = 0..len(feats)]: the products of the
    table's acceptance a(cell) of each drafted token given its parent's, depth by depth."""
    return chain_sums(table.rate(cell(f, d)) for d, f in enumerate(feats, start=1))


class AutoDrafter(Drafter):
    """See the module docstring. ``copies``: (name, drafter) copy candidates drafting chains;
    ``model``: a ModelDrafter over a chain, or None; ``curve`` / ``draft_curve``: target and
    draft forward ms by tokens; ``long_curve``: the target's after ``contexts[1]`` cached
    tokens where ``curve`` is after ``contexts[0]`` (steps are priced at their context,
    :func:`at_context`; None: ``curve`` at every context)."""

    name = "auto"
    shape = None

    def __init__(self, copies: Sequence[tuple[str, Drafter]], curve: dict[int, float], *,
                 model: Drafter | None = None, draft_curve: dict[int, float] | None = None,
                 max_draft: int = MAX_DRAFT, margin: float = MARGIN, prior: float = PRIOR,
                 explore: int = EXPLORE, dtype: str = "",
                 model_prior: Sequence[float] | None = None, prior_weight: float = 8.0,
                 long_curve: dict[int, float] | None = None,
                 contexts: tuple[int, int] = (CONTEXT, LONG_CONTEXT),
                 tables: Mapping[str, CopyTable] | None = None):
        check_curve(curve, "auto drafter: target latency curve")
        if long_curve is not None:
            check_curve(long_curve, "auto drafter: target latency curve at a long context")
        if model is not None:
            check_curve(draft_curve or {}, "auto drafter: draft latency curve")
        if not 1 <= max_draft <= MAX_DRAFT:
            raise DrafterError(f"drafter 'auto': max must be in 1..{MAX_DRAFT}, got {max_draft}")
        self.copies = list(copies)
        self.curve = envelope(curve)
        self.long_curve = None if long_curve is None else envelope(long_curve)
        self.contexts = (int(contexts[0]), int(contexts[1]))
        self.model = None if model is None else getattr(model, "model", None)
        self.model_drafter = model
        self.draft_curve = dict(draft_curve or {})
        self.max_draft = int(max_draft)
        self.margin, self.prior, self.explore = float(margin), float(prior), int(explore)
        self.dtype = dtype
        # a tune result's top-1 acceptance by depth for the draft model (pseudo-counts of
        # weight ``prior_weight`` per depth): no exploration needed
        self.model_prior = None if model_prior is None else [float(x) for x in model_prior]
        self.prior_weight = float(prior_weight)
        if self.model_prior is not None:
            self.explore = 0
        self.stats = {name: MatchStats() for name, _ in self.copies}
        self.model_tries = [0] * (MODEL_CHAIN + 1)  # steps that reached depth d
        self.model_hits = [0] * (MODEL_CHAIN + 1)  # of which depth d was accepted
        self.model_steps = 0
        self.model_dropped = model is None
        # per copy candidate that reports its drafted tokens' copy features: their
        # acceptance by feature cell, counted online (``copy_features``), from the counts of
        # ``tables`` (a tune's, :func:`read_copy_table`) where given
        self.start_tables = dict(tables or {})
        self.tables: dict[str, CopyTable] = copy.deepcopy(self.start_tables)
        # shadow proposals not yet scored: (candidate, (state, bucket) or None, root, tokens,
        # done, the tokens' features or None)
        self._pending: list[tuple[str, tuple[int, int] | None, int, list[int], int,
                                  list[Features] | None]] = []
        self._last: dict[str, tuple[int, list[int]]] = {}  # candidate -> (root, tokens)
        # (candidate, k, expected accepted as estimated) of the last proposal
        self._used: tuple[str, int, float] | None = None
        # per copy candidate: [tokens accepted, tokens expected] over the steps it drafted
        self.realized: dict[str, list[float]] = {name: [0.0, 0.0] for name, _ in self.copies}
        self.steps: dict[str, int] = {}  # per generation: steps per candidate ("plain")
        self.drafted: dict[str, int] = {}
        self.run_steps: dict[str, int] = {}  # over every generation of this drafter
        # (perf_counter, the curve's price) of the last proposal, and over this drafter's
        # run: ms its steps took from proposal to update, ms the curve prices them at, steps
        self._proposed: tuple[float, float] | None = None
        self.timed = [0.0, 0.0, 0]

    def reshaped(self, shape: Tree | None) -> "AutoDrafter":
        """A fresh auto drafter whose chains are at most ``shape``'s (a chain: ``chain:N``
        caps the drafted tokens at N - 1; what ``eval --chain`` asks of the default
        drafter; None: this one's cap). Trees are refused: auto drafts chains."""
        if shape is None:
            shape = chain(draft_tokens=self.max_draft)
        if shape.width > 1:
            raise DrafterError("the auto drafter drafts chains that it sizes itself; give it "
                               "a chain (chain:N caps it) or choose a tree drafter such as "
                               "--draft ngram or a draft model")
        cap = max(1, min(shape.depth, MAX_DRAFT))
        copies = [(n, d.reshaped(chain(draft_tokens=cap))) for n, d in self.copies]
        return AutoDrafter(copies, self.curve, model=self.model_drafter,
                           draft_curve=self.draft_curve or None, max_draft=cap,
                           margin=self.margin, prior=self.prior, explore=self.explore,
                           dtype=self.dtype, model_prior=self.model_prior,
                           prior_weight=self.prior_weight, long_curve=self.long_curve,
                           contexts=self.contexts, tables=self.start_tables)

    def forked(self) -> "AutoDrafter":
        """A copy with this drafter's statistics so far, copied, and forked copy candidates:
        what either decodes from now on never reaches the other."""
        new = self.reshaped(None)
        new.copies = [(n, d.forked()) for n, d in self.copies]  # their pending outputs too
        new.stats = copy.deepcopy(self.stats)
        new.tables = copy.deepcopy(self.tables)
        new.model_tries, new.model_hits = list(self.model_tries), list(self.model_hits)
        new.model_steps, new.model_dropped = self.model_steps, self.model_dropped
        new.realized = copy.deepcopy(self.realized)
        new.timed = list(self.timed)
        return new

    def check(self, target) -> None:
        for _, d in self.copies:
            d.check(target)
        if self.model_drafter is not None:
            self.model_drafter.check(target)

    # ------------------------------------------------------------------ bookkeeping
    def _observe(self, committed: Sequence[int]) -> None:
        """Score the pending shadow proposals against the committed tokens, depth by depth
        as far as the committed tokens reach; a proposal leaves at its first miss or end."""
        keep = []
        for name, key, root, tokens, done, feats in self._pending:
            known = committed[root + 1:root + 1 + len(tokens)]
            missed = False
            while done < len(known):
                hit = known[done] == tokens[done]
                done += 1
                if feats is None:
                    self.stats[name].add(key, done, hit)
                else:
                    self.tables[name].add(cell(feats[done - 1], done), hit)
                if not hit:
                    missed = True
                    break
            if not missed and done < len(tokens):
                keep.append((name, key, root, tokens, done, feats))
        self._pending = keep

    def start(self, prompt_ids: torch.Tensor) -> None:
        self._pending = []
        self._last = {}
        self._used = None
        self.steps, self.drafted = {}, {}
        for _, d in self.copies:
            d.start(prompt_ids)
        if not self.model_dropped and self.model_steps >= self.explore \
                and not self._model_pays():
            # its statistics change only on its own steps, and none comes: drop it before
            # its prefill (a tune prior that says it never pays, say)
            self.model_dropped = True
        if not self.model_dropped:
            self.model_drafter.start(prompt_ids)

    def curve_at(self, context: int) -> dict[int, float]:
        """The target's forward ms by tokens after ``context`` cached tokens
        (:func:`at_context`, read through the envelope)."""
        if self.long_curve is None or context <= self.contexts[0]:
            return self.curve
        return envelope(at_context(self.curve, self.long_curve, self.contexts, context))

    def _model_pays(self) -> bool:
        """Whether the draft model's best chain is predicted to beat plain decoding by the
        margin (at the short context): a step chooses it only then (copies only raise the
        bar)."""
        _, rate = self._model_rate(min(self.max_draft, MODEL_CHAIN), self.curve)
        return rate > (1 + self.margin) / interpolate(self.curve, 1)

    def calibration(self, name: str) -> float:
        """Tokens ``name`` got accepted over tokens it was expected to, on the steps it
        drafted (``CALIBRATION`` expected tokens of pseudo-evidence at 1). The shadow
        statistics score every candidate at every step, but a candidate drafts where its
        estimate beat the others': the winner of several noisy estimates is over-estimated
        (most where candidates are alike), which only its own steps reveal."""
        got, expected = self.realized.get(name, (0.0, 0.0))
        return (got + CALIBRATION) / (expected + CALIBRATION)

    def _state(self, name: str, committed: Sequence[int]) -> int:
        """``name``'s state now: FRESH when it proposed nothing at the previous step (or this
        is the request's first), ON_COPY when that proposal matched every token committed
        since, MISSED otherwise."""
        last = self._last.get(name)
        if last is None:
            return FRESH
        root, tokens = last
        known = list(committed[root + 1:root + 1 + len(tokens)])
        return ON_COPY if known == tokens[:len(known)] else MISSED

    def _model_rate(self, offered: int, curve: Mapping[int, float]) -> tuple[int, float]:
        """(k, rate) of the draft model's best chain (k <= offered). A depth no chain has
        reached yet keeps what the deepest reached one learned: without a prior its rate,
        with one its ratio to the prior (a chain drafted 4 deep where the draft accepts more
        than tune measured would otherwise never learn that 6 deep pays)."""
        rates = []
        rate, ratio = 0.5, 1.0
        prior = self.model_prior
        for d in range(1, offered + 1):
            if prior:
                q = prior[min(d, len(prior)) - 1]
                tries = self.model_tries[d] if d <= MODEL_CHAIN else 0
                hits = self.model_hits[d] if d <= MODEL_CHAIN else 0
                if tries:
                    rate = (hits + self.prior_weight * q) / (tries + self.prior_weight)
                    ratio = rate / q if q > 0 else 1.0
                else:
                    rate = min(1.0, q * ratio)
            elif d <= MODEL_CHAIN and self.model_tries[d]:
                rate = (self.model_hits[d] + 1.0) / (self.model_tries[d] + 2.0)
            rates.append(rate)
        per_level = interpolate(self.draft_curve, 1)
        return best_chain(chain_sums(rates), offered, curve, lambda k: k * per_level)

    def propose(self, committed: Sequence[int], max_depth: int, sampling: Sampling,
                generator: torch.Generator | None = None) -> Proposal:
        if isinstance(committed, torch.Tensor):
            committed = committed.reshape(-1).tolist()
        self._used = None
        limit = min(max_depth, self.max_draft)
        root = len(committed) - 1
        curve = self.curve_at(len(committed))
        plain_rate = 1.0 / interpolate(curve, 1)
        best = ("plain", 0, plain_rate * (1 + self.margin), None, 0.0)
        for name, d in self.copies:
            if limit < 1:
                break
            prop = d.propose(committed, limit, sampling, generator)
            offered = prop.tree.size - 1
            if offered < 1:
                self._last.pop(name, None)
                continue
            tokens = prop.tokens.tolist()[1:]
            feats = copy_features(d, offered)
            # the (state, bucket) key only for a candidate its features do not estimate
            key = None if feats is not None else \
                (self._state(name, committed), bucket(offered))
            self._pending.append((name, key, root, tokens, 0, feats))
            self._last[name] = (root, tokens)
            if feats is None:
                exp = self.stats[name].expected(key, offered, self.prior)
                f = self.calibration(name)
            else:  # each token's own cell: no winner's scale (see the module docstring)
                table = self.tables.get(name)
                if table is None:  # (not setdefault: a CopyTable's arrays cost 0.1 ms)
                    table = self.tables[name] = CopyTable()
                exp = chain_expected(table, feats)
                f = 1.0
            k, rate = best_chain([e * f for e in exp], offered, curve)
            if k and rate > best[2]:
                best = (name, k, rate, prop, exp[k])
        if not self.model_dropped and limit >= 1:
            depth = min(limit, MODEL_CHAIN)
            exploring = self.model_steps < self.explore
            k, rate = self._model_rate(depth, curve)
            if exploring:  # its first ``explore`` steps, whatever the copies offer
                k, rate = min(4, depth), best[2]
            if exploring or (k and rate > best[2]):
                prop = self.model_drafter.propose(committed, k, sampling, generator)
                best = ("model", prop.tree.size - 1, rate, prop, 0.0)
        name, k, _, prop, expected = best
        self.steps[name] = self.steps.get(name, 0) + 1
        self.run_steps[name] = self.run_steps.get(name, 0) + 1
        if prop is None or k < 1:
            out = root_only(committed, self._device(committed))
        else:
            self._used = (name, k, expected)
            self.drafted[name] = self.drafted.get(name, 0) + k
            out = truncated(prop, k)
        self._proposed = (time.perf_counter(), interpolate(curve, out.tree.size))
        return out

    def _device(self, committed) -> torch.device:
        for _, d in self.copies:
            dev = getattr(d, "device", None)
            if dev is not None:
                return torch.device(dev)
        return torch.device("cpu")

    def update(self, path: Sequence[int], committed: Sequence[int],
               target_topk: torch.Tensor | None = None) -> None:
        if self._proposed is not None:
            started, priced = self._proposed
            self.timed[0] += 1000.0 * (time.perf_counter() - started)
            self.timed[1] += priced
            self.timed[2] += 1
            self._proposed = None
        if isinstance(committed, torch.Tensor):
            committed = committed.reshape(-1).tolist()
        self._observe(committed)
        used, self._used = self._used, None
        if used is None:
            return
        name, k, expected = used
        if name == "model":
            self.model_drafter.update(path, committed, target_topk)
            accepted = len(path) - 1
            self.model_steps += 1
            for d in range(1, min(k, MODEL_CHAIN) + 1):
                if d <= accepted + 1:
                    self.model_tries[d] += 1
                    self.model_hits[d] += d <= accepted
            if self.model_steps >= self.explore and not self._model_pays():
                self.model_dropped = True  # never pays: no more draft prefills
        else:
            dict(self.copies)[name].update(path, committed, target_topk)
            self.realized[name][0] += len(path) - 1
            self.realized[name][1] += expected

    # ------------------------------------------------------------------ reporting
    def stale(self) -> float | None:
        """Decoding's step time over the curve's price of the same steps, over this drafter's
        steps so far, when at least ``STALE_STEPS`` were timed and it is more than ``STALE``
        times off (either way); else None. (A replay's steps, which run no target, are
        never reported: only the engine's steps reach :meth:`choice`.)"""
        took, priced, steps = self.timed
        if steps < STALE_STEPS or priced <= 0:
            return None
        ratio = took / priced
        return ratio if not 1.0 / STALE <= ratio <= STALE else None

    def choice(self) -> str:
        """One line: what this generation drafted with, step by step."""
        total = sum(self.steps.values())
        if not total:
            return "auto: no steps"
        parts = []
        for name, n in sorted(self.steps.items(), key=lambda x: (-x[1], x[0])):
            if name == "plain":
                parts.append(f"plain {n}/{total} steps")
            else:
                parts.append(f"{name} {n}/{total} steps ({self.drafted.get(name, 0) / n:.1f} "
                             "drafted)")
        extra = f", {self.dtype}" if self.dtype else ""
        for name, table in sorted(self.start_tables.items()):
            extra += f", {name} from tune's copy table ({table.total_trials} trials)"
        ms = interpolate(self.curve, 1)
        dropped = "" if self.model_drafter is None else (
            ", draft model dropped" if self.model_dropped else ", draft model kept")
        line = f"auto: {', '.join(parts)} (T(1) {ms:.0f} ms{extra}{dropped})"
        if self.stale() is not None:
            line += ("; its steps took under half or over twice what the cached latency "
                     "curve says: re-time it with --remeasure")
        return line

    def __repr__(self) -> str:
        names = ", ".join(n for n, _ in self.copies)
        return f"AutoDrafter(copies=[{names}], model={self.model_drafter is not None})"


# ------------------------------------------------------------------ tune results
def tuned_path(target, draft: str, folder: Path, kind: str = "tuned") -> tuple[Path, dict]:
    """(file, identity) of the tune result for (target as loaded, draft spec, machine,
    dtype) in treeopt's cache folder (``kind``: ``tuned``, a draft model's acceptance;
    ``copytable``, a copy drafter's table)."""
    params = next(target.parameters())
    ident = {"target": model_key(target), "draft": str(draft).strip(),
             "dtype": str(params.dtype).removeprefix("torch."),
             "machine": machine(params.device)}
    return cache_file(folder, kind, ident), ident


def _store(path: Path, ident: dict, fields: dict, indent: int | None = None) -> Path:
    """Write ``fields`` to the cache file ``path`` as version 1 of identity ``ident``
    (atomically): what :func:`_cached` reads back."""
    text = json.dumps({"version": 1, "identity": ident, **fields}, indent=indent) + "\n"
    atomic_write(path, lambda fh: fh.write(text), binary=False)
    return path


def remember_tune(target, draft: str, rank_table, prediction, tree, folder: Path) -> Path:
    """Cache what ``tune`` found for (target, draft, machine, dtype): the top-1 acceptance
    by depth, the predicted speed-up and the tree's shape (written atomically)."""
    p1 = [float(row[0]) if len(row) else 0.0 for row in rank_table]
    return _store(*tuned_path(target, draft, folder),
                  {"p1_by_depth": p1, "predicted_speedup": float(prediction.speedup),
                   "size": tree.size, "depth": tree.depth}, indent=1)


def _cached(path: Path, ident: dict, max_bytes: int, parse):
    """``parse(data)`` of the cache file ``path`` when it is version 1 of identity ``ident``
    and at most ``max_bytes``; None when absent, larger, damaged or foreign, or when
    ``parse`` finds its values out of range (it raises ValueError, TypeError or KeyError)."""
    try:
        if not path.is_file() or path.stat().st_size > max_bytes:
            return None
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict) or data.get("version") != 1 \
                or data.get("identity") != ident:
            return None
        return parse(data)
    except (OSError, ValueError, TypeError, KeyError, UnicodeDecodeError):
        return None


def read_tuned(target, draft: str, folder: Path) -> dict | None:
    """The cached tune result for (target, draft, machine, dtype), or None (absent, damaged,
    another identity, values out of range)."""
    def parse(data):
        p1 = [float(x) for x in data["p1_by_depth"]]
        if not p1 or not all(0.0 <= x <= 1.0 for x in p1):
            return None
        return {"p1_by_depth": p1, "predicted_speedup": float(data["predicted_speedup"])}

    return _cached(*tuned_path(target, draft, folder), 1 << 16, parse)


#: Largest cached copy table read (a full table is about 0.5 MiB of JSON).
MAX_TABLE_BYTES = 4 << 20


def remember_copy_table(target, name: str, table: CopyTable, folder: Path) -> Path:
    """Cache the copy table a greedy ``tune --draft NAME`` measured on its prompts, for
    (target, drafter name, machine, dtype): ``auto``'s candidate of that name starts its
    counts from it (written atomically)."""
    return _store(*tuned_path(target, name, folder, "copytable"), {"copy": table.to_dict()})


def read_copy_table(target, name: str, folder: Path) -> CopyTable | None:
    """The cached copy table for (target, drafter name, machine, dtype), or None (absent,
    damaged, too large, another identity)."""
    return _cached(*tuned_path(target, name, folder, "copytable"), MAX_TABLE_BYTES,
                   lambda data: CopyTable.from_dict(data["copy"]))


def candidate_specs() -> list[tuple[str, str]]:
    """The copy candidates: the three n-gram strictnesses, and ``suffix`` when a module
    registered it."""
    return list(COPY_CANDIDATES) + ([SUFFIX] if SUFFIX[0] in registered() else [])


#: The name of the candidate ``auto:datastore=PATH`` adds (in the choice line too): the
#: ``datastore`` drafter's registered name.
DATASTORE = DatastoreDrafter.name


@register_drafter("auto", "chooses per step among plain decoding, n-gram / suffix copies, "
                          "a corpus (auto:datastore=PATH) and a draft model (auto:draft=SPEC) "
                          "by expected tokens per cost (options draft=, datastore=, max=, "
                          "margin=)")
def _auto(options: str, *, target, tokenizer=None, tree: Tree | None = None) -> AutoDrafter:
    opts = parse_options(options, {"draft": str, "datastore": str, "max": int,
                                   "margin": float}, "auto")
    max_draft = opts.get("max", MAX_DRAFT)
    if not 1 <= max_draft <= MAX_DRAFT:
        raise DrafterError(f"drafter 'auto': max must be in 1..{MAX_DRAFT}, got {max_draft}")
    if not 0 <= opts.get("margin", MARGIN) <= 1:
        raise DrafterError("drafter 'auto': margin must be in [0, 1]")
    model = prior = None
    if opts.get("draft"):
        model = build_drafter(opts["draft"], target=target, tokenizer=tokenizer,
                              tree=chain(draft_tokens=MODEL_CHAIN))
        if getattr(model, "model", None) is None:
            raise DrafterError(f"drafter 'auto': draft={opts['draft']!r} is not a draft model; "
                               "the copy drafters are candidates already")
        tuned = read_tuned(target, opts["draft"], cache_dir())
        prior = None if tuned is None else tuned["p1_by_depth"]
    corpus = None
    if "datastore" in opts:
        if not opts["datastore"].strip():
            raise DrafterError("drafter 'auto': datastore= needs a file from `treeopt datastore "
                               "build` (auto:datastore=PATH)")
        corpus = build_drafter(f"{DATASTORE}:{opts['datastore']}", target=target,
                               tokenizer=tokenizer)
    return auto_drafter(target, tokenizer, model=model, model_prior=prior, max_draft=max_draft,
                        margin=opts.get("margin", MARGIN), corpus=corpus)


def auto_drafter(target, tokenizer=None, *, model: Drafter | None = None,
                 model_prior: Sequence[float] | None = None, max_draft: int = MAX_DRAFT,
                 margin: float = MARGIN, corpus: Drafter | None = None) -> AutoDrafter:
    """An ``auto`` drafter for ``target``: the copy candidates (chains of at most
    ``max_draft`` tokens), the target's cached latency curves (after ``CONTEXT`` and after
    ``LONG_CONTEXT`` cached tokens, or the window's end), and optionally the draft model
    drafter ``model`` (drafting chains of ``MODEL_CHAIN``; the model is shared) with its
    cached curve, starting from ``model_prior`` (top-1 acceptance by depth, as a tune
    measured it). ``auto:draft=SPEC`` builds it from the cached tune result; ``tune`` from
    the acceptance it has just measured, to replay it. The ``suffix`` candidate starts from
    the cached copy table of a greedy ``tune --draft suffix`` (:func:`read_copy_table`),
    when there is one. ``corpus``: a ``datastore`` drafter (its store shared), one more copy
    candidate (``DATASTORE``)."""
    shape = chain(draft_tokens=max_draft)
    copies = [(name, build_drafter(spec, target=target, tokenizer=tokenizer, tree=shape))
              for name, spec in candidate_specs()]
    if corpus is not None:
        copies.append((DATASTORE, corpus.reshaped(shape)))
    folder = cache_dir()
    curve = latency_curve(target, folder)
    contexts = (timed_context(target, CONTEXT), timed_context(target, LONG_CONTEXT))
    long_curve = latency_curve(target, folder, context=contexts[1]) \
        if contexts[1] > contexts[0] else None
    draft_curve = None
    if model is not None:
        model = model.reshaped(chain(draft_tokens=MODEL_CHAIN))
        draft_curve = latency_curve(model.model, folder)
    dtype = str(next(target.parameters()).dtype).removeprefix("torch.")
    table = read_copy_table(target, SUFFIX[0], folder) \
        if any(name == SUFFIX[0] for name, _ in copies) else None
    tables = {SUFFIX[0]: table} if table is not None and table.total_trials else {}
    return AutoDrafter(copies, curve, model=model, draft_curve=draft_curve,
                       max_draft=max_draft, margin=margin, dtype=dtype,
                       model_prior=model_prior, long_curve=long_curve, contexts=contexts,
                       tables=tables)


__all__ = ["DATASTORE", "LONG_CONTEXT", "STALE", "STALE_STEPS", "AutoDrafter", "MatchStats",
           "at_context", "auto_drafter", "best_chain", "bucket", "candidate_specs",
           "chain_expected", "chain_sums", "copy_features", "envelope", "read_copy_table",
           "read_tuned", "remember_copy_table", "remember_tune"]
