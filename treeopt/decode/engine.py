"""The decoding loop: prefill, then per step propose -> verify_tree -> accept -> keep ->
commit, for a target and any drafter behind the ``Drafter`` interface.

The engine knows a target, a ``Drafter`` (None = plain autoregressive decoding) and one
``Sampling``. Plain decoding, chains and trees run through the same loop; a step whose
proposal is the root alone is a plain decoding step. Cache invariant between steps, with C
committed tokens (prompt + generated): the target cache holds the first C - 1 (the last one,
the root of the next tree, is fed with the tree). Drafters keep their own state (a model
drafter its cache, an n-gram drafter its index) and learn what was accepted in ``update``.

Statistics (``DecodeStats``): ``target_forwards`` counts verification forwards only (the
prefill forward is timed separately as ``prefill_s``); the first generated token comes from
the prefill forward and counts in ``generated_tokens`` but not in ``steps``.
``tokens_per_step`` = tokens committed by verification steps / target_forwards (accepted draft
tokens + the bonus; exactly 1.0 for autoregressive decoding); ``acceptance_rate`` = accepted
draft tokens / drafted tokens.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import torch

from treeopt.decode.attention import check_cache, new_cache, run_model
from treeopt.decode.drafter import Drafter, Proposal, root_only
from treeopt.decode.sampling import GREEDY, Sampling, check_rule_shape, sample
from treeopt.decode.verify import DecodeError, accept, greedy_choice, keep, verify_tree


@dataclass
class StepStats:
    """One verification step: ``accepted`` draft tokens accepted by the rule (before any
    EOS / max_new_tokens cut), their sibling ``ranks`` by depth (1 = top choice), ``tokens``
    actually committed (accepted + bonus, after the cut), and the size of the verified tree:
    ``nodes`` (root included; 1 = a plain decoding step) and ``depth`` (edges below the
    root). Adaptive drafters change the last two from step to step."""

    accepted: int
    ranks: list[int]
    tokens: int
    nodes: int = 1
    depth: int = 0


@dataclass
class DecodeStats:
    """Returned with every generation; see the module docstring for the definitions.

    Times in seconds (``time.perf_counter``): ``prefill_s`` (both prompt forwards and the
    first token), ``draft_s`` (drafting: draft forwards and child selection), ``verify_s``
    (target tree forwards), ``other_s`` (acceptance walk, cache compaction, bookkeeping) and
    ``total_s``. ``stop_reason``: "max_new_tokens", "eos" or "context" (window full).
    """

    steps: list[StepStats] = field(default_factory=list)
    generated_tokens: int = 0
    target_forwards: int = 0
    draft_forwards: int = 0
    drafted_tokens: int = 0
    accepted_tokens: int = 0
    prefill_s: float = 0.0
    draft_s: float = 0.0
    verify_s: float = 0.0
    total_s: float = 0.0
    stop_reason: str = ""
    choice: str = ""  # what a choosing drafter (``auto``) chose, one line (Drafter.choice)

    def record(self, proposal, path: Sequence[int], ranks: list[int], new_tokens: int) -> None:
        """Count one verification step: its proposal, accepted path and the number of tokens
        it committed (``new_tokens``: the accepted ones and the bonus token)."""
        self.target_forwards += 1
        self.draft_forwards += proposal.forwards
        self.drafted_tokens += proposal.drafted
        self.accepted_tokens += len(path) - 1
        self.steps.append(StepStats(len(path) - 1, ranks, new_tokens, proposal.tree.size,
                                    proposal.tree.depth))

    @property
    def num_steps(self) -> int:
        """Verification steps (one target forward each)."""
        return len(self.steps)

    @property
    def step_tokens(self) -> int:
        """Tokens the verification steps committed (accepted ones and bonus tokens)."""
        return sum(s.tokens for s in self.steps)

    @property
    def tokens_per_step(self) -> float:
        if not self.target_forwards:
            return 0.0
        return self.step_tokens / self.target_forwards

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / self.drafted_tokens if self.drafted_tokens else 0.0

    @property
    def other_s(self) -> float:
        return max(0.0, self.total_s - self.prefill_s - self.draft_s - self.verify_s)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(tokens_per_step=self.tokens_per_step, acceptance_rate=self.acceptance_rate,
                 other_s=self.other_s, num_steps=self.num_steps, step_tokens=self.step_tokens)
        return d


@dataclass
class Generation:
    """Generated token ids (prompt excluded) and the statistics of the run."""

    tokens: list[int]
    stats: DecodeStats


def model_window(*models) -> int | None:
    """treeopt's one model-window rule: the smallest position window
    (``max_position_embeddings``, GPT-2's ``n_positions``) of the given models or drafters (a
    drafter's model is used; model-free drafters and models without one are skipped); None
    when none is known."""
    limits = []
    for m in models:
        config = getattr(m, "config", None)
        if config is None:
            config = getattr(getattr(m, "model", None), "config", None)
        for key in ("max_position_embeddings", "n_positions"):
            value = getattr(config, key, None) if config is not None else None
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                limits.append(value)
                break
    return min(limits) if limits else None


class _Clock:
    """Stage timer; synchronises CUDA only when asked to (``sync``)."""

    def __init__(self, device: torch.device, sync: bool):
        self.sync = sync and device.type == "cuda"
        self.t = time.perf_counter()

    def lap(self) -> float:
        if self.sync:
            torch.cuda.synchronize()
        now = time.perf_counter()
        dt, self.t = now - self.t, now
        return dt


def prefill(target, drafter: Drafter | None, input_ids: torch.Tensor, sampling: Sampling,
            generator: torch.Generator | None):
    """Run the prompt through the target (and start the drafter) and pick the first token.

    input_ids: (1, L). Returns (target cache holding L tokens, first token)."""
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
    cache = new_cache(target)
    logits = run_model(target, input_ids, cache, position_ids=positions,
                       logits_to_keep=1).logits[0, -1]
    if drafter is not None:
        check_cache(cache)
        drafter.start(input_ids)
    if sampling.greedy:
        where = f"the last prompt position ({input_ids.shape[1] - 1}, prefill)"
        return cache, int(greedy_choice(logits, where))
    return cache, int(sample(sampling.probs(logits)[None], 1, generator))


def check_inputs(target, drafter: Drafter | None, input_ids: torch.Tensor,
                 max_new_tokens: int) -> tuple[torch.device, int | None]:
    """Validate generate's inputs; returns (device, context limit or None). Raises
    DecodeError (or the drafter's own error)."""
    if input_ids.dim() != 2 or input_ids.shape[0] != 1 or input_ids.shape[1] == 0:
        raise DecodeError(f"input_ids must have shape (1, L) with L >= 1, got "
                          f"{tuple(input_ids.shape)}")
    if max_new_tokens < 0:
        raise DecodeError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    device = next(target.parameters()).device
    if drafter is not None:
        drafter.check(target)
    limit = model_window(target, drafter)
    if limit is not None and input_ids.shape[1] > limit:
        raise DecodeError(f"prompt has {input_ids.shape[1]} tokens but the model window is "
                          f"{limit}; shorten the prompt")
    return device, limit


def propose(drafter: Drafter | None, committed: list[int], max_depth: int, sampling: Sampling,
            generator: torch.Generator | None, device: torch.device) -> Proposal:
    """Stage 1: the drafter's proposal for this step, its tokens on ``device`` (the root
    alone without a drafter: a plain decoding step)."""
    if drafter is None:
        return root_only(committed, device)
    proposal = drafter.propose(committed, max_depth, sampling, generator)
    if proposal.tokens.device != device:
        proposal.tokens = proposal.tokens.to(device)
    return proposal


def commit(proposal: Proposal, path: Sequence[int], bonus: int, budget: int,
           eos: frozenset[int]) -> tuple[list[int], bool]:
    """Stage 5: the tokens this step adds, the accepted path's (root excluded) and the bonus,
    cut to ``budget`` and just after the first EOS; returns (tokens, hit_eos)."""
    tokens = proposal.tokens.tolist()
    return _cut([tokens[v] for v in path[1:]] + [bonus], budget, eos)


def _cut(new: list[int], budget: int, eos: frozenset[int]) -> tuple[list[int], bool]:
    """Truncate new tokens to the budget and just after the first EOS; (tokens, hit_eos)."""
    new = new[:budget]
    for i, t in enumerate(new):
        if t in eos:
            return new[:i + 1], True
    return new, False


def generate(target, drafter: Drafter | None, input_ids: torch.Tensor, *, max_new_tokens: int,
             sampling: Sampling = GREEDY, eos_token_id: int | Sequence[int] | None = None,
             on_tokens: Callable[[list[int]], None] | None = None,
             timing: bool = False) -> Generation:
    """Speculative tree decoding (lossless: the output follows the target's own distribution).

    target: a causal LM; drafter: proposes the tree of each step (None = plain autoregressive
    decoding); input_ids: (1, L) prompt ids; sampling: greedy (token-exact with the target's
    greedy decoding) or temperature / top-k / top-p sampling verified by its rule.
    Stops after ``max_new_tokens`` tokens (never more), after an EOS token (included), or when
    the next tree would not fit the context window (``stats.stop_reason`` says which); near the
    window the drafter is asked for a shallower tree. ``on_tokens`` receives each batch of
    newly committed tokens. ``timing`` synchronises CUDA between stages so the draft / verify
    split is exact (CPU timings are exact either way).
    """
    device, limit = check_inputs(target, drafter, input_ids, max_new_tokens)
    if drafter is not None:  # a chain-only rule and a branching tree: refuse before any work
        check_rule_shape(sampling.rule, drafter.shape)
    input_ids = input_ids.to(device=device, dtype=torch.int64)
    if eos_token_id is None:
        eos = frozenset()
    elif isinstance(eos_token_id, (list, tuple, set, frozenset)):
        eos = frozenset(int(t) for t in eos_token_id)
    else:
        eos = frozenset([int(eos_token_id)])
    generator = sampling.generator(device)
    stats = DecodeStats()
    out: list[int] = []
    start = time.perf_counter()
    if max_new_tokens == 0:
        stats.stop_reason = "max_new_tokens"
        return Generation(out, stats)

    clock = _Clock(device, timing)
    topk = drafter.wants_target_topk if drafter is not None else 0
    with torch.inference_mode():
        tcache, first = prefill(target, drafter, input_ids, sampling, generator)
        committed = input_ids[0].tolist() + [first]
        stats.prefill_s = clock.lap()
        new, hit_eos = _cut([first], max_new_tokens, eos)
        out += new
        if on_tokens is not None:
            on_tokens(new)
        stats.stop_reason = "eos" if hit_eos else ""
        while not hit_eos and len(out) < max_new_tokens:
            root_pos = len(committed) - 1
            max_depth = max_new_tokens - len(out) - 1
            if limit is not None:
                if root_pos >= limit:
                    stats.stop_reason = "context"
                    break
                max_depth = min(max_depth, limit - 1 - root_pos)

            clock.lap()
            proposal = propose(drafter, committed, max_depth, sampling, generator, device)
            stats.draft_s += clock.lap()
            logits = verify_tree(target, tcache, proposal, root_pos)
            stats.verify_s += clock.lap()
            path, ranks, bonus = accept(logits, proposal, sampling, generator,
                                        where=f"verification step {stats.target_forwards + 1}"
                                              f" (tree rooted at position {root_pos})")
            keep(tcache, root_pos, path, proposal.tree)
            new, hit_eos = commit(proposal, path, bonus, max_new_tokens - len(out), eos)

            committed += new
            out += new
            if drafter is not None:
                top = logits[path].topk(topk, dim=-1).indices if topk else None
                drafter.update(path, committed, top)
            stats.record(proposal, path, ranks, len(new))
            if on_tokens is not None:
                on_tokens(new)
        if not stats.stop_reason:
            stats.stop_reason = "eos" if hit_eos else "max_new_tokens"
    stats.generated_tokens = len(out)
    stats.choice = drafter.choice() if drafter is not None else ""
    stats.total_s = time.perf_counter() - start
    return Generation(out, stats)
