"""Acceptance profiler: which sibling rank does the verifier accept, per depth.

At many positions of real continuations, draft a width-W set of siblings and record which
rank (1..W) the verifier accepts, or none (rank 0 here):

- greedy (temperature 0): the siblings are the draft's top-W tokens; the accepted one is the
  sibling equal to the target's argmax.
- stochastic: W samples drawn from the draft distribution Q without replacement (with
  replacement for the SpecInfer rule), verified by ``treeopt.decode.sampling.verify_children``,
  the same code the decoding engine uses.

Counting (``count_ranks``). The flat counts (Sequoia's vector p[k]) use every position. The
per-depth counts p[d][k] replay what a decoding step with a W-ary tree of depth D sees
(``walk_steps``): a step starts at some position, depth d looks at the position d steps
later, the walk continues while a sibling is accepted, stops at the first "none" (the bonus
token then fills that position) or after D accepted levels (the bonus fills the next one);
the next step starts right after the bonus token. Step starts are therefore the positions
decoding itself starts steps at, not arbitrary ones.

Which continuation (teacher-forced mode). The positions come from a continuation of each
prompt; the choice decides what the estimate is unbiased for:

- ``"target"`` (default): the target's own continuation (greedy at temperature 0, sampled
  from the target's P at temperature T > 0). Speculative decoding is lossless, so its output
  has exactly this distribution: the contexts are the contexts decoding meets. At temperature
  0 the accepted sibling is the target's token itself, so the walk follows exactly the path
  decoding takes and the per-depth counts equal the online ones (tested). At T > 0 the walk
  continues along the sampled continuation rather than along the accepted draft sample (both
  are draws from P overall, but conditioned on an acceptance the accepted token leans toward
  what Q likes), so deeper rows are a close approximation there. A draft model runs along it
  as decoding runs it (``stepwise_logits``: the prompt in one forward, then a token per
  forward), not in one forward over the whole text: that is cheaper but, for a dynamically
  quantized draft, not the numbers decoding sees.
- ``"dataset"``: the dataset text itself (one target pass and one draft pass, fastest). Human
  text is not what the target writes, so drafts typically agree less (or differently) there:
  a biased estimate for decoding, useful as a cheap proxy.

Online mode runs the decoding engine with a full W-ary tree of depth D and reads the accepted
ranks per step from ``DecodeStats.steps``: exactly what decoding sees, at decoding's cost.

Profiles are written incrementally (atomically) every few prompts with the prompt index, so an
interrupted run keeps what it measured and ``resume=True`` continues from the file. Each
prompt's random draws depend only on (seed, prompt index), so a resumed run gives the same
counts as an uninterrupted one. The meta records a content hash of every measured prompt
(``prompt_hashes``); a resume goes on only when the measured prompts are exactly the first
ones it is given (so no prompt is counted twice or skipped), and refuses with one line
otherwise. A file that is not a treeopt profile is never overwritten.

Model window. Before measuring, every prompt and its continuation are fitted into the
smallest position window of the models (``max_position_embeddings``, GPT-2's ``n_positions``):
continuations longer than half the window are capped there and longer prompts cut from the
left (``fit_window``), with a warning saying how many prompts and tokens, recorded in
``meta["window"]``; no position past the window is run or measured.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from treeopt import __version__
from treeopt.api import as_drafter
from treeopt.decode.attention import forward_tree, new_cache, run_model
from treeopt.decode.drafter import Drafter
from treeopt.decode.engine import generate, model_window
from treeopt.decode.sampling import (
    CHAIN_RULES,
    GREEDY,
    RULES,
    WITH_REPLACEMENT,
    Sampling,
    draw_children,
    logits_to_probs,
    one_level_rule,
    verify_candidates,
    verify_children,
    verify_children_batch,
)
from treeopt.errors import TreeoptError
from treeopt.limits import integer, parse_json, read_text, show_number
from treeopt.profile import Profile
from treeopt.profile.model import (
    JSON_FORMAT,
    check_replaceable,
    write_json_atomic,
)
from treeopt.shapes import kary


class _NotText(TreeoptError):
    """A file that is not JSON text (binary, or past the size cap)."""


MODES = ("teacher-forced", "online")
CONTINUATIONS = ("target", "dataset")

# Settings that must match for --resume to add to an existing file.
RESUME_KEYS = ("mode", "continuation", "draft", "target", "dataset", "temperature", "top_k",
               "top_p", "rule", "width", "depth", "max_new_tokens", "seed", "chat_template")
# Largest full W-ary tree online mode will verify in one step.
MAX_ONLINE_TREE = 1024


class AcceptanceError(TreeoptError, ValueError):
    """Bad acceptance-profiling input; the message says what to change."""


# --------------------------------------------------------------------------- ranks at positions
def greedy_ranks(target_logits: torch.Tensor, draft_logits: torch.Tensor,
                 width: int) -> list[int]:
    """Rank of the target's argmax among the draft's top-``width`` tokens at each position.

    target_logits, draft_logits: (T, V). Returns T ints: 1..width, or 0 where the target's
    token is not among the draft's top ``width`` (no sibling accepted)."""
    if target_logits.shape != draft_logits.shape:
        raise AcceptanceError(f"target logits {tuple(target_logits.shape)} and draft logits "
                              f"{tuple(draft_logits.shape)} differ; the models need one vocabulary")
    if target_logits.shape[0] == 0:
        return []
    want = target_logits.argmax(dim=-1, keepdim=True)                        # (T, 1)
    top = draft_logits.topk(min(width, draft_logits.shape[-1]), dim=-1).indices  # (T, W)
    hit = top == want                                                       # (T, W)
    first = hit.float().argmax(dim=-1) + 1
    ranks = torch.where(hit.any(dim=-1), first, torch.zeros_like(first))
    return [int(r) for r in ranks.tolist()]


def stochastic_ranks(target_probs: torch.Tensor, draft_probs: torch.Tensor, width: int, *,
                     rule: str = "sequoia", generator: torch.Generator | None = None) -> list[int]:
    """Accepted sibling rank at each position under stochastic verification.

    target_probs, draft_probs: (T, V) distributions P and Q (temperature/top-k/top-p already
    applied). At each position ``width`` children are drawn from Q (without replacement for
    the Sequoia rule, with replacement for SpecInfer) and verified against P, with the
    engine's own ``draw_children`` and ``verify_children_batch`` (``verify_children`` on all
    positions at once). Returns T ints in 0..width (0 = none accepted). Verification is
    sequential, so the first b of the W drawn siblings give the outcome a width-b tree would
    have with the same draws. The sequence-level rules verify a one-level tree exactly as
    their token-level counterpart does (``one_level_rule``: traversal and block as sequoia),
    so their one-level profiles are measured with it."""

    if rule not in RULES:
        raise AcceptanceError(f"unknown verification rule {rule!r}; use one of "
                              f"{', '.join(RULES)}")
    if target_probs.shape[0] == 0:
        return []
    children = draw_children(draft_probs, width, replacement=rule in WITH_REPLACEMENT,
                             generator=generator)
    accepted, _ = verify_children_batch(target_probs, draft_probs, children,
                                        one_level_rule(rule), generator)
    return [int(a) + 1 for a in accepted.tolist()]


# --------------------------------------------------------------------------- counting
def walk_steps(ranks: Sequence[int], depth: int, start: int = 0) -> list[list[int]]:
    """Replay decoding steps with a full W-ary tree of ``depth`` levels over per-position ranks.

    ranks[t] is the accepted sibling rank at position t (0 = none). A step starting at t
    accepts ranks[t], ranks[t+1], ... until a 0 or ``depth`` accepted levels; the next step
    starts after the bonus token. Returns the accepted ranks of each step (the same form as
    ``StepStats.ranks``); a step running past the last position is cut there and ends the walk.
    """
    steps: list[list[int]] = []
    t = start
    n = len(ranks)
    while t < n:
        accepted: list[int] = []
        while len(accepted) < depth and t + len(accepted) < n and ranks[t + len(accepted)] > 0:
            accepted.append(int(ranks[t + len(accepted)]))
        steps.append(accepted)
        t += len(accepted) + 1
    return steps


@dataclass
class RankCounts:
    """Raw acceptance counts for width W and D depths.

    counts[k-1]: positions whose accepted rank is k (flat, every position); none_count: no
    sibling accepted; depth_counts[d][k-1] / depth_none[d]: the same for siblings under an
    accepted parent at depth d, along decoding-like walks (``walk_steps``); empty: positions
    where the drafter had no candidate at all (counted in none_count too; model drafters
    always have one); step_empty: walk steps that started at such a position (counted in
    depth_none[0] too): decoding steps that propose nothing."""

    width: int
    depth: int
    counts: list[int] = field(default_factory=list)
    none_count: int = 0
    depth_counts: list[list[int]] = field(default_factory=list)
    depth_none: list[int] = field(default_factory=list)
    empty: int = 0
    step_empty: int = 0

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * self.width
        if not self.depth_counts:
            self.depth_counts = [[0] * self.width for _ in range(self.depth)]
        if not self.depth_none:
            self.depth_none = [0] * self.depth

    @property
    def positions(self) -> int:
        return sum(self.counts) + self.none_count

    def add_positions(self, ranks: Sequence[int]) -> None:
        """Add per-position ranks (0 = none) to the flat counts."""
        for r in ranks:
            if r:
                self.counts[r - 1] += 1
            else:
                self.none_count += 1

    def add_steps(self, steps: Sequence[Sequence[int]],
                  complete: Sequence[bool] | None = None) -> None:
        """Add decoding steps (accepted ranks per step) to the per-depth counts. A step with
        fewer than ``depth`` accepted ranks counts a "none" at the next depth unless
        ``complete[i]`` is False (the step was cut by the end of the text)."""
        for i, step in enumerate(steps):
            for d, r in enumerate(step[: self.depth]):
                self.depth_counts[d][r - 1] += 1
            if len(step) < self.depth and (complete is None or complete[i]):
                self.depth_none[len(step)] += 1

    def add(self, other: "RankCounts") -> None:
        if (other.width, other.depth) != (self.width, self.depth):
            raise AcceptanceError(f"cannot add counts of width {other.width} depth {other.depth} "
                                  f"to width {self.width} depth {self.depth}")
        self.counts = [a + b for a, b in zip(self.counts, other.counts)]
        self.none_count += other.none_count
        self.depth_counts = [[a + b for a, b in zip(r, s)]
                             for r, s in zip(self.depth_counts, other.depth_counts)]
        self.depth_none = [a + b for a, b in zip(self.depth_none, other.depth_none)]
        self.empty += other.empty
        self.step_empty += other.step_empty

    def to_profile(self, meta: dict | None = None):
        """Profile with these counts, a Wilson 95 % interval and the sample size per entry
        in ``meta["ci95"]``. Depth rows nobody reached (no samples) are left out: rows past
        the end reuse the last one."""

        if self.positions == 0:
            raise AcceptanceError("no positions were measured; give longer prompts or more "
                                  "--max-new-tokens")
        rows = [d for d in range(self.depth)
                if sum(self.depth_counts[d]) + self.depth_none[d] > 0]
        keep = len(rows) if rows == list(range(len(rows))) else 0
        depth_counts = [list(r) for r in self.depth_counts[:keep]] or None
        depth_none = list(self.depth_none[:keep]) or None
        prof = Profile.from_counts(list(self.counts), self.none_count, depth_counts=depth_counts,
                                   depth_none=depth_none, meta=dict(meta or {}))
        return with_intervals(prof)



def with_intervals(profile):
    """The profile with ``meta["ci95"]``: sample sizes and Wilson 95 % intervals of every
    p[k] (and every per-depth p[d][k]) computed from its raw counts."""
    import dataclasses

    if profile.counts is None:
        return profile

    def block(intervals, n):
        return {"samples": n, "ci95": [[round(lo, 6), round(hi, 6)] for lo, hi in intervals]}

    ci = {"p": block(profile.ci95(), sum(profile.counts) + profile.none_count)}
    if profile.depth_counts is not None:
        ci["by_depth"] = [block(profile.ci95(d), sum(c) + n)
                          for d, (c, n) in enumerate(zip(profile.depth_counts, profile.depth_none))]
    meta = dict(profile.meta)
    meta["ci95"] = ci
    return dataclasses.replace(profile, meta=meta)


def count_ranks(ranks: Sequence[int], width: int, depth: int, start: int = 0,
                empty: Sequence[bool] | None = None) -> RankCounts:
    """Flat counts over every position plus per-depth counts along ``walk_steps``;
    ``empty[t]``: the drafter had no candidate at position t (counted from ``start``, and at
    the walk's step starts)."""
    counts = RankCounts(width, depth)
    counts.add_positions(ranks[start:])
    steps = walk_steps(ranks, depth, start)
    ends, t = [], start
    for s in steps:
        if empty is not None and empty[t]:
            counts.step_empty += 1
        t += len(s) + 1
        ends.append(len(s) == depth or t <= len(ranks))
    counts.add_steps(steps, ends)
    if empty is not None:
        counts.empty = sum(bool(x) for x in empty[start:])
    return counts


# --------------------------------------------------------------------------- model passes
def _logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    """Full-sequence logits (1, L) -> (L, V) float32 on CPU."""
    with torch.no_grad():
        out = model(input_ids=input_ids, use_cache=False)
    return out.logits[0].float().cpu()


def stepwise_logits(model, prompt_ids: Sequence[int], tokens: Sequence[int]) -> torch.Tensor:
    """A draft model's logits for the last prompt position and each of ``tokens`` after it,
    (1 + len(tokens), V) float32 on CPU, computed as decoding computes them: the prompt in one
    forward (the drafter's ``start``), then one token per forward on the cache (along an
    accepted path each draft level feeds one token). One forward over the whole sequence is
    cheaper but not the same numbers for every draft: a dynamically quantized one (int8)
    scales its activations per forward, and over a whole sequence it agreed with the target
    less than the same draft does while decoding (the Qwen2.5-Coder pair's int8 draft; README,
    "Regret and prediction error")."""
    device = _device(model)
    prompt = torch.tensor([list(prompt_ids)], dtype=torch.long, device=device)
    cache = new_cache(model)
    with torch.inference_mode():
        rows = [forward_tree(model, prompt, torch.arange(prompt.shape[1], device=device)[None],
                             None, cache, logits_to_keep=1)[0, -1:].float().cpu()]
        for i, token in enumerate(tokens):
            one = torch.tensor([[int(token)]], dtype=torch.long, device=device)
            pos = torch.tensor([[prompt.shape[1] + i]], device=device)
            rows.append(forward_tree(model, one, pos, None, cache)[0, -1:].float().cpu())
    return torch.cat(rows)


def _device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


#: Greedy continuations computed so far, per loaded model (weakly held): (prompt, max new
#: tokens, EOS) -> tokens. ``tune`` profiles a model-free drafter along these continuations
#: and then replays it along the same ones (``treeopt.profile.replay``); they are computed
#: once. At most ``_SEEN_MAX`` per model.
_SEEN: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_SEEN_MAX = 4096


def greedy_continuation(target, prompt_ids: Sequence[int], max_new_tokens: int,
                        eos_token_id: int | None = None) -> list[int]:
    """The tokens of :func:`target_continuation` at temperature 0, read from what this
    process already computed for the same model, prompt, length and EOS when it can be."""
    key = _key(prompt_ids, max_new_tokens, eos_token_id)
    try:
        known = _SEEN.get(target, {}).get(key)
    except TypeError:  # a model that cannot be weakly referenced
        known = None
    if known is not None:
        return list(known)
    return target_continuation(target, key[0], max_new_tokens, eos_token_id=eos_token_id)[0]


def _key(prompt_ids: Sequence[int], max_new_tokens: int, eos_token_id: int | None) -> tuple:
    return tuple(int(t) for t in prompt_ids), int(max_new_tokens), eos_token_id


def _remember(target, key: tuple, tokens: list[int]) -> None:
    try:
        seen = _SEEN.setdefault(target, {})
    except TypeError:
        return
    if len(seen) < _SEEN_MAX:
        seen[key] = tuple(tokens)


def target_continuation(target, prompt_ids: Sequence[int], max_new_tokens: int, *,
                        temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                        generator: torch.Generator | None = None,
                        eos_token_id: int | None = None) -> tuple[list[int], torch.Tensor]:
    """The target's own continuation of a prompt and its logits at every position.

    Greedy at temperature 0, sampled from the target's P otherwise (the distribution
    speculative decoding reproduces). Returns (tokens (T,), logits (T, V) float32 CPU) where
    logits[t] is the target's prediction for tokens[t]; stops after ``eos_token_id``."""
    from transformers import DynamicCache

    device = _device(target)
    ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=device)
    cache = DynamicCache(config=target.config)
    tokens: list[int] = []
    rows: list[torch.Tensor] = []
    with torch.no_grad():
        for _ in range(max_new_tokens):  # the last row only: a long prompt costs no L x V
            out = run_model(target, ids, cache, logits_to_keep=1)
            row = out.logits[0, -1].float().cpu()
            if temperature > 0:
                probs = logits_to_probs(row, temperature, top_k, top_p)
                tok = int(torch.multinomial(probs, 1, generator=generator))
            else:
                tok = int(row.argmax())
            rows.append(row)
            tokens.append(tok)
            if eos_token_id is not None and tok == eos_token_id:
                break
            ids = torch.tensor([[tok]], dtype=torch.long, device=device)
    logits = torch.stack(rows) if rows else torch.zeros(0, 0)
    if temperature <= 0:
        _remember(target, _key(prompt_ids, max_new_tokens, eos_token_id), tokens)
    return tokens, logits


def candidate_ranks(drafter, prompt_ids: Sequence[int], tokens: Sequence[int],
                    target_logits: torch.Tensor, width: int, *, temperature: float = 0.0,
                    top_k: int = 0, top_p: float = 1.0, rule: str = "sequoia",
                    generator: torch.Generator | None = None) -> tuple[list[int], int]:
    """Accepted rank at each position of a continuation for a drafter without a model
    (n-gram, datastore, ...): at position t the drafter, having seen ``prompt_ids +
    tokens[:t]``, proposes a one-level tree of up to ``width`` ranked candidates; greedy: the
    rank of ``tokens[t]`` among them; stochastic: the candidate the point-mass rule accepts
    against the target's P (``verify_candidates``, as in decoding), or ``rule`` against the
    proposal's Q where it has one (a cascade's model-drafted positions). target_logits:
    (T, V), row t predicting tokens[t]. Returns (ranks, per position: whether the drafter
    had no candidate)."""

    sampling = Sampling(temperature, top_k, top_p, rule)
    one_level = drafter.reshaped(kary(width, 1))
    device = _device_of_drafter(drafter)
    committed = [int(t) for t in prompt_ids]
    # As in decoding, the drafter starts on the text before the root (a model drafter then
    # feeds the root with its first proposal).
    one_level.start(torch.tensor([committed[:-1] or committed], dtype=torch.int64,
                                 device=device))
    ranks, empty = [], []
    for t, tok in enumerate(tokens):
        proposal = one_level.propose(committed, 1, sampling, generator)
        children = proposal.tokens[1:].tolist()
        empty.append(not children)
        if not children:
            ranks.append(0)
        elif sampling.greedy:
            ranks.append(children.index(tok) + 1 if tok in children else 0)
        else:
            p, q = sampling.probs(target_logits[t]), proposal.q_at(0)
            if q is None:
                i, _ = verify_candidates(p, children, generator)
            else:
                i, _ = verify_children(p, q.to(p.device), children, one_level_rule(rule),
                                       generator)
            ranks.append(0 if i is None else i + 1)
        committed.append(int(tok))
        one_level.update([0], committed)
    return ranks, empty


def _device_of_drafter(drafter) -> torch.device:
    model = getattr(drafter, "model", None)
    return _device(model) if model is not None else torch.device("cpu")


def teacher_forced_ranks(target, draft, prompt_ids: Sequence[int], *, width: int,
                         max_new_tokens: int = 64, continuation: str = "target",
                         temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                         rule: str = "sequoia", generator: torch.Generator | None = None,
                         eos_token_id: int | None = None) -> tuple[list[int], int]:
    """Accepted rank at each position of one continuation (see the module docstring).

    ``draft``: a draft model, or a Drafter (its model when it has one, else its ranked
    candidates, ``candidate_ranks``). Returns (ranks, start): ranks[t] in 0..width for each
    continuation position, and the position a decoding walk starts at (1 for the target's
    continuation, whose first token comes from the prefill forward as in decoding; 0 for
    dataset text)."""
    ranks, start, _ = _teacher_forced(target, draft, prompt_ids, width=width,
                                      max_new_tokens=max_new_tokens, continuation=continuation,
                                      temperature=temperature, top_k=top_k, top_p=top_p,
                                      rule=rule, generator=generator, eos_token_id=eos_token_id)
    return ranks, start


def _teacher_forced(target, draft, prompt_ids: Sequence[int], *, width: int,
                    max_new_tokens: int, continuation: str, temperature: float, top_k: int,
                    top_p: float, rule: str, generator: torch.Generator | None,
                    eos_token_id: int | None) -> tuple[list[int], int, int]:
    """``teacher_forced_ranks`` plus, per position, whether the drafter had no candidate
    (None for model drafters)."""

    if isinstance(draft, Drafter):
        model = getattr(draft, "model", None)
        if model is None:
            return _candidates_forced(target, draft, prompt_ids, width=width,
                                      max_new_tokens=max_new_tokens, continuation=continuation,
                                      temperature=temperature, top_k=top_k, top_p=top_p,
                                      generator=generator, eos_token_id=eos_token_id,
                                      rule=rule)
        draft = model
    if continuation not in CONTINUATIONS:
        raise AcceptanceError(f"unknown continuation {continuation!r}; use target or dataset")
    prompt_ids = list(prompt_ids)
    if continuation == "target":
        tokens, p_logits = target_continuation(
            target, prompt_ids, max_new_tokens, temperature=temperature, top_k=top_k,
            top_p=top_p, generator=generator, eos_token_id=eos_token_id)
        if not tokens:
            return [], 0, None
        q_logits = stepwise_logits(draft, prompt_ids, tokens[:-1])
        start = 1
    else:
        if len(prompt_ids) < 2:
            return [], 0, None
        ids = torch.tensor([prompt_ids], device=_device(target))
        p_logits = _logits(target, ids)[:-1]
        q_logits = _logits(draft, ids.to(_device(draft)))[:-1]
        start = 0
    if p_logits.shape[-1] != q_logits.shape[-1]:
        raise AcceptanceError(f"target vocabulary {p_logits.shape[-1]} != draft vocabulary "
                              f"{q_logits.shape[-1]}; the pair must share a tokenizer")
    if temperature <= 0:
        return greedy_ranks(p_logits, q_logits, width), start, None

    p = logits_to_probs(p_logits, temperature, top_k, top_p)
    q = logits_to_probs(q_logits, temperature, top_k, top_p)
    return stochastic_ranks(p, q, width, rule=rule, generator=generator), start, None


def _candidates_forced(target, drafter, prompt_ids: Sequence[int], *, width: int,
                       max_new_tokens: int, continuation: str, temperature: float, top_k: int,
                       top_p: float, generator: torch.Generator | None,
                       eos_token_id: int | None, rule: str = "sequoia"
                       ) -> tuple[list[int], int, int]:
    """Teacher-forced ranks of a model-free drafter along the chosen continuation."""
    if continuation not in CONTINUATIONS:
        raise AcceptanceError(f"unknown continuation {continuation!r}; use target or dataset")
    prompt_ids = [int(t) for t in prompt_ids]
    if continuation == "target":
        tokens, p_logits = target_continuation(
            target, prompt_ids, max_new_tokens, temperature=temperature, top_k=top_k,
            top_p=top_p, generator=generator, eos_token_id=eos_token_id)
        context, start = prompt_ids, 1
    else:
        if len(prompt_ids) < 2:
            return [], 0, None
        p_logits = _logits(target, torch.tensor([prompt_ids], device=_device(target)))[:-1]
        context, tokens, start = prompt_ids[:1], prompt_ids[1:], 0
    if not tokens:
        return [], 0, None
    ranks, empty = candidate_ranks(drafter, context, tokens, p_logits, width,
                                   temperature=temperature, top_k=top_k, top_p=top_p,
                                   rule=rule, generator=generator)
    return ranks, start, empty


def online_steps(target, draft, prompt_ids: Sequence[int], *, width: int, depth: int,
                 max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, rule: str = "sequoia", seed: int | None = None,
                 eos_token_id: int | None = None) -> tuple[list[list[int]], list[bool]]:
    """Accepted ranks per decoding step of the engine run with a full ``width``-ary tree of
    ``depth`` levels (what decoding actually sees).

    Returns (ranks per step, complete per step). Near ``max_new_tokens`` the engine cuts the
    tree to the depth that still fits; a step that accepted its whole cut tree says nothing
    about the next depth, so it is marked incomplete (no "none" is counted for it)."""

    size = sum(width ** d for d in range(depth + 1))
    if size > MAX_ONLINE_TREE:
        raise AcceptanceError(f"online mode verifies a full {width}-ary tree of depth {depth} "
                              f"({size} nodes, limit {MAX_ONLINE_TREE}); lower --width "
                              "or --depth, or use --mode teacher-forced")
    tree = kary(width, depth)
    ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=_device(target))
    gen = generate(target, as_drafter(draft, target, tree=tree), ids,
                   max_new_tokens=max_new_tokens,
                   sampling=Sampling(temperature, top_k, top_p, rule, seed),
                   eos_token_id=eos_token_id)
    steps, complete = [], []
    produced = 1  # the first token comes from the prefill forward
    for s in gen.stats.steps:
        cap = min(depth, max_new_tokens - produced - 1)
        steps.append(list(s.ranks))
        complete.append(len(s.ranks) < cap or len(s.ranks) == depth)
        produced += s.tokens
    return steps, complete


# --------------------------------------------------------------------------- whole runs
@dataclass
class AcceptanceRun:
    """Settings of one profiling run (stored in the profile's meta)."""

    width: int = 8
    depth: int = 6
    sampling: Sampling = GREEDY
    mode: str = "teacher-forced"
    continuation: str = "target"
    max_new_tokens: int = 64
    seed: int = 0
    draft: str | None = None
    target: str | None = None
    dataset: str | None = None
    chat_template: bool = True

    # Read-only views of ``sampling`` (the one place the settings live).
    temperature = property(lambda self: self.sampling.temperature)
    top_k = property(lambda self: self.sampling.top_k)
    top_p = property(lambda self: self.sampling.top_p)
    rule = property(lambda self: self.sampling.rule)

    def check(self) -> None:
        if self.width < 1 or self.depth < 1:
            raise AcceptanceError(f"width and depth must be >= 1, got {self.width} and "
                                  f"{self.depth}")
        if self.mode not in MODES:
            raise AcceptanceError(f"unknown mode {self.mode!r}; use teacher-forced or online")
        if self.continuation not in CONTINUATIONS:
            raise AcceptanceError(f"unknown continuation {self.continuation!r}; use target or "
                                  "dataset")
        if not isinstance(self.sampling, Sampling):  # a Sampling checks itself when made
            raise AcceptanceError(f"sampling must be a Sampling, got "
                                  f"{type(self.sampling).__name__}")
        if self.rule in CHAIN_RULES and self.width > 1:
            raise AcceptanceError(f"rule {self.rule!r} verifies chains (one child per node): "
                                  f"profile it with width 1, not {self.width}")
        if self.max_new_tokens < 2:
            raise AcceptanceError(f"max_new_tokens must be >= 2, got {self.max_new_tokens}")

    def meta(self) -> dict:
        return {k: getattr(self, k) for k in RESUME_KEYS}


def prompt_generator(seed: int, index: int) -> torch.Generator:
    """Each prompt's random stream depends only on (seed, prompt index)."""
    return torch.Generator().manual_seed(int(seed) * 1_000_003 + int(index))


def measure_prompt(target, draft, prompt_ids: Sequence[int], run: AcceptanceRun, index: int,
                   eos_token_id: int | None = None, traces: list | None = None) -> RankCounts:
    """Counts from one prompt under ``run``'s settings. ``traces`` (teacher-forced mode): a
    list that receives this prompt's per-position accepted ranks (0 = none; see
    ``teacher_forced_ranks``)."""
    if run.mode == "online":
        steps, complete = online_steps(
            target, draft, prompt_ids, width=run.width, depth=run.depth,
            max_new_tokens=run.max_new_tokens, temperature=run.temperature, top_k=run.top_k,
            top_p=run.top_p, rule=run.rule, seed=run.seed * 1_000_003 + index,
            eos_token_id=eos_token_id)
        counts = RankCounts(run.width, run.depth)
        counts.add_steps(steps, complete)
        counts.counts = list(counts.depth_counts[0])
        counts.none_count = counts.depth_none[0]
        return counts
    ranks, start, empty = _teacher_forced(
        target, draft, prompt_ids, width=run.width, max_new_tokens=run.max_new_tokens,
        continuation=run.continuation, temperature=run.temperature, top_k=run.top_k,
        top_p=run.top_p, rule=run.rule, generator=prompt_generator(run.seed, index),
        eos_token_id=eos_token_id)
    if traces is not None:
        traces.append(list(ranks))
    return count_ranks(ranks, run.width, run.depth, start, empty)


def _resume_state(path: Path, run: AcceptanceRun,
                  hashes: Sequence[str]) -> tuple[RankCounts, int, float]:
    """Counts, prompts done and seconds stored in ``path``, after checking that it was
    measured with ``run``'s settings on prompts whose content hashes (``prompt_hash``) are
    the first ones of ``hashes``: a resume never counts a prompt twice or skips one."""

    prof = Profile.load(path)
    meta = prof.meta or {}
    settings = meta.get("settings", {})
    if not isinstance(settings, dict):
        raise AcceptanceError(f"--resume: {path.name}: meta.settings is not a JSON object; "
                              "use another --out")
    for key in RESUME_KEYS:
        if key in settings and settings[key] != getattr(run, key):
            raise AcceptanceError(f"--resume: {path.name} was measured with {key}="
                                  f"{show_number(settings[key])}, not {getattr(run, key)!r}; "
                                  "use the same settings or another --out")

    def count(key: str) -> int:
        return integer(meta.get(key, 0), f"--resume: {path.name}: meta.{key}", AcceptanceError)

    done = count("prompts_done")
    if done > len(hashes):
        raise AcceptanceError(f"--resume: {path.name} already covers {done} prompts but only "
                              f"{len(hashes)} were given; pass the same prompts")
    recorded = meta.get("prompt_hashes")
    if not (isinstance(recorded, list) and len(recorded) == done
            and all(isinstance(h, str) for h in recorded)):
        raise AcceptanceError(f"--resume: {path.name} does not record which prompts were "
                              "measured (written by an older treeopt or edited), so continuing "
                              "could count prompts twice or skip some; use another --out")
    for i, (was, now) in enumerate(zip(recorded, hashes)):
        if was != now:
            raise AcceptanceError(f"--resume: prompt {i + 1} of this selection is not the one "
                                  f"measured in {path.name} (its first {done} prompts must be "
                                  "the same: same --dataset, --categories, --seed and chat "
                                  "template); use another --out")
    seconds = meta.get("seconds", 0.0)
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or \
            not 0 <= seconds <= 1e12:
        raise AcceptanceError(f"--resume: {path.name}: meta.seconds = {show_number(seconds)} "
                              "must be a number of seconds >= 0")
    counts = RankCounts(run.width, run.depth)
    if prof.counts is not None:
        counts.counts = list(prof.counts)
        counts.none_count = int(prof.none_count or 0)
        counts.empty = count("no_candidate")
        counts.step_empty = count("no_candidate_steps")
    for d, row in enumerate((prof.depth_counts or [])[: run.depth]):
        counts.depth_counts[d] = list(row)
        counts.depth_none[d] = int(prof.depth_none[d])
    return counts, done, float(seconds)


def write_atomic(profile, path: Path) -> None:
    """Save a profile atomically (``Profile.save``); a latency section the existing ``.json``
    file holds is kept when the profile has none. An existing file of another kind (a
    growmap, results, any JSON that is not a treeopt profile, a binary file) is never
    replaced: one-line ``ProfileError``. Permissions are ordinary (``atomic_write``)."""
    path = Path(path)
    if path.suffix.lower() != ".json" or getattr(profile, "latency", None) is not None:
        profile.save(path)
        return
    doc = profile.to_dict()
    try:
        old = parse_json(read_text(path, _NotText), AcceptanceError)
    except _NotText:  # binary (a torch growmap, a picture, ...) or too large
        check_replaceable(path)
        old = None
    except (OSError, AcceptanceError):
        old = None  # nothing (readable) to keep: the profile replaces it
    if old is not None and not (isinstance(old, dict) and old.get("format") == JSON_FORMAT):
        check_replaceable(path)  # a growmap, results, any JSON that is not a profile: refused
    if isinstance(old, dict) and old.get("latency"):
        doc["latency"] = old["latency"]
    write_json_atomic(path, doc)


def prompt_hash(prompt_ids: Sequence[int]) -> str:
    """A short content hash of one prompt's token ids (recorded per measured prompt in the
    profile's meta, ``prompt_hashes``, so a resume can check it continues the same prompts)."""
    blob = json.dumps([int(t) for t in prompt_ids], separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]



def fit_window(prompts: Sequence[Sequence[int]], run: "AcceptanceRun", window: int | None
               ) -> tuple[list[list[int]], "AcceptanceRun", dict]:
    """Fit every prompt and its continuation into the model window, so no position past it is
    ever run or measured: (prompts, the run to measure with, what was cut).

    Along a continuation (the target's, or online decoding) a prompt of L tokens and T new
    tokens use positions 0..L+T-1: the continuation is capped at half the window (only when
    --max-new-tokens exceeds that) and longer prompts keep their last window - T tokens (a
    left cut: the end the continuation follows stays). Along the dataset text the text itself
    is cut to its last ``window`` tokens. The dict (``meta["window"]``): limit,
    max_new_tokens (used), prompts_cut, prompt_tokens_cut; empty when no window is known."""
    prompts = [list(p) for p in prompts]
    if window is None:
        return prompts, run, {}
    tokens = run.max_new_tokens
    if run.mode == "teacher-forced" and run.continuation == "dataset":
        keep = window
    else:
        tokens = min(tokens, window // 2)
        keep = window - tokens
        if tokens < 2:
            raise AcceptanceError(f"the model window ({window} positions) is too small to "
                                  "measure a continuation of at least 2 tokens")
    cut = [max(0, len(p) - keep) for p in prompts]
    fitted = [p[c:] for p, c in zip(prompts, cut)]
    measured = run if tokens == run.max_new_tokens else \
        dataclasses.replace(run, max_new_tokens=tokens)
    info = {"limit": window, "max_new_tokens": tokens,
            "prompts_cut": sum(1 for c in cut if c), "prompt_tokens_cut": sum(cut)}
    return fitted, measured, info


def window_note(window: dict, n_prompts: int, run: "AcceptanceRun") -> str:
    """One line: what ``fit_window`` cut to fit the model window."""
    parts = []
    if window.get("max_new_tokens", run.max_new_tokens) < run.max_new_tokens:
        parts.append(f"continuations capped at {window['max_new_tokens']} tokens (half the "
                     f"window; --max-new-tokens {run.max_new_tokens})")
    if window.get("prompts_cut"):
        n = window["prompts_cut"]
        parts.append(f"{n} prompt{'s' if n != 1 else ''} of {n_prompts} cut from the left "
                     f"({window['prompt_tokens_cut']} tokens in all)")
    return (f"the model window is {window['limit']} positions: " + "; ".join(parts)
            + "; nothing past the window is measured")


def profile_acceptance(target, draft, prompts: Sequence[Sequence[int]], run: AcceptanceRun, *,
                       out: str | os.PathLike | None = None, resume: bool = False,
                       save_every: int = 1, eos_token_id: int | None = None,
                       progress: bool = False, max_positions: int | None = None,
                       on_prompt: Callable[[int, RankCounts], None] | None = None,
                       traces: list | None = None):
    """Measure an acceptance profile over ``prompts`` (token-id lists) and return a Profile.

    With ``out``, the profile is (re)written atomically every ``save_every`` prompts and when
    interrupted (KeyboardInterrupt is re-raised after saving); ``resume`` continues from the
    counts and prompt index stored there. ``on_prompt(index, total_counts)`` runs after each
    prompt. ``progress`` shows a tqdm bar with ETA on stderr. ``max_positions`` stops after
    the prompt that brings the flat sample size to at least that many positions.
    ``traces`` (teacher-forced mode): a list that receives, for each prompt measured in this
    call, its per-position accepted ranks, on which other trees' decoding steps can be
    replayed (``treeopt.search.optuna_search.replay_steps``)."""
    run.check()
    path = Path(out) if out is not None else None
    total = RankCounts(run.width, run.depth)
    done, seconds = 0, 0.0
    hashes = [prompt_hash(p) for p in prompts]
    if resume:
        if path is None or not path.exists():
            raise AcceptanceError("--resume needs an existing --out profile to continue")
        total, done, seconds = _resume_state(path, run, hashes)
    elif path is not None:
        check_replaceable(path)  # never measure for minutes and then refuse to write
    prompts, measured, window = fit_window(prompts, run, model_window(target, draft))
    if window.get("prompts_cut") or window.get("max_new_tokens", run.max_new_tokens) \
            < run.max_new_tokens:
        print(f"treeopt profile: warning: {window_note(window, len(prompts), run)}",
              file=sys.stderr, flush=True)

    def snapshot(n_done: int, secs: float):
        meta = {"kind": "acceptance", "settings": run.meta(), "prompts_done": n_done,
                "prompts_total": len(prompts), "prompt_hashes": hashes[:n_done],
                "positions": total.positions,
                "steps": sum(total.depth_counts[0]) + total.depth_none[0],
                "no_candidate": total.empty,
                "no_candidate_steps": total.step_empty,
                "seconds": round(secs, 3), "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "treeopt_version": _version()}
        if window:
            meta["window"] = dict(window)
        return total.to_profile(meta)

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(prompts), initial=done, desc="acceptance", unit="prompt",
                   dynamic_ncols=True)
    t0 = time.perf_counter()
    counted = done
    try:
        for index in range(done, len(prompts)):
            counts = measure_prompt(target, draft, prompts[index], measured, index,
                                    eos_token_id, traces)
            total.add(counts)
            counted = index + 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(positions=total.positions, p1=_p1(total))
            due = (counted - done) % save_every == 0 or counted == len(prompts)
            if path is not None and total.positions and due:
                write_atomic(snapshot(counted, seconds + time.perf_counter() - t0), path)
            if on_prompt is not None:
                on_prompt(index, total)
            if max_positions is not None and total.positions >= max_positions:
                if path is not None and not due:
                    write_atomic(snapshot(counted, seconds + time.perf_counter() - t0), path)
                break
    except KeyboardInterrupt:
        if path is not None and total.positions:
            write_atomic(snapshot(counted, seconds + time.perf_counter() - t0), path)
        raise
    finally:
        if bar is not None:
            bar.close()
    return snapshot(counted, seconds + time.perf_counter() - t0)


def _p1(counts: RankCounts) -> str:
    n = counts.positions
    return f"{counts.counts[0] / n:.3f}" if n else "-"


def _version() -> str:
    return __version__
