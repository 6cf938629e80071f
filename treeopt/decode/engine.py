"""The decoding loop: prefill, then per step draft_tree -> verify_tree -> accept ->
update_caches -> commit, for any Hugging Face causal-LM pair sharing a vocabulary.

Autoregressive decoding (no draft, or a tree of size 1) and chains (width-1 trees) run through
the same loop. Cache invariants between steps, with C committed tokens (prompt + generated):
the target cache holds the first C - 1 (the last one, the root of the next tree, is fed with
the tree); the draft cache holds the first ``draft_len`` <= C, and its first forward of the next
step feeds the rest (the accepted leaf it never expanded and the bonus token).

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
from functools import lru_cache
from typing import Callable, Sequence

import torch

from treeopt.decode.attention import check_cache, new_cache
from treeopt.decode.draft import draft_tree
from treeopt.decode.sampling import check_settings, logits_to_probs, verify_children
from treeopt.decode.verify import accept, update_caches, verify_tree
from treeopt.tree import Tree

AR_TREE = Tree((-1,))


class DecodeError(ValueError):
    """Bad input to generate (shapes, lengths, mismatched models)."""


@dataclass
class StepStats:
    """One verification step: ``accepted`` draft tokens accepted by the rule (before any
    EOS / max_new_tokens cut), their sibling ``ranks`` by depth (1 = top choice), and
    ``tokens`` actually committed (accepted + bonus, after the cut)."""

    accepted: int
    ranks: list[int]
    tokens: int


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

    @property
    def tokens_per_step(self) -> float:
        if not self.target_forwards:
            return 0.0
        return sum(s.tokens for s in self.steps) / self.target_forwards

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / self.drafted_tokens if self.drafted_tokens else 0.0

    @property
    def other_s(self) -> float:
        return max(0.0, self.total_s - self.prefill_s - self.draft_s - self.verify_s)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(tokens_per_step=self.tokens_per_step, acceptance_rate=self.acceptance_rate,
                 other_s=self.other_s)
        return d


@dataclass
class Generation:
    """Generated token ids (prompt excluded) and the statistics of the run."""

    tokens: list[int]
    stats: DecodeStats


@lru_cache(maxsize=256)
def truncate_tree(tree: Tree, max_depth: int) -> Tree:
    """The subtree of nodes with depth <= max_depth (a prefix of the breadth-first ids)."""
    if tree.depth <= max_depth:
        return tree
    n = sum(1 for d in tree.depths if d <= max_depth)
    return Tree(tree.parents[:n])


def max_positions(*models) -> int | None:
    """Smallest ``max_position_embeddings`` among the models' configs (None if unknown)."""
    limits = [getattr(m.config, "max_position_embeddings", None) for m in models if m is not None]
    limits = [int(x) for x in limits if x]
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


def prefill(target, draft, input_ids: torch.Tensor, *, temperature: float, top_k: int,
            top_p: float, generator: torch.Generator | None):
    """Run the prompt through both models and pick the first new token.

    input_ids: (1, L). Returns (target cache holding L tokens, draft cache holding L tokens or
    None, first token). With a draft (tree decoding) both caches must allow per-token
    compaction (CacheError otherwise); autoregressive decoding works with any cache.
    """
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
    tcache = new_cache(target)
    logits = target(input_ids=input_ids, position_ids=positions, past_key_values=tcache,
                    use_cache=True, logits_to_keep=1).logits[0, -1]
    dcache = None
    if draft is not None:
        dcache = new_cache(draft)
        draft(input_ids=input_ids, position_ids=positions, past_key_values=dcache,
              use_cache=True, logits_to_keep=1)
        check_cache(tcache)
        check_cache(dcache)
    if temperature == 0:
        first = int(logits.argmax())
    else:
        _, first = verify_children(logits_to_probs(logits, temperature, top_k, top_p), None, [],
                                   generator=generator)
    return tcache, dcache, first


def check_inputs(target, draft, tree: Tree | None, input_ids: torch.Tensor,
                 max_new_tokens: int) -> tuple[Tree, object, torch.device, int | None]:
    """Validate generate's inputs; returns (tree, draft, device, context limit or None), with
    (AR_TREE, None) when decoding is autoregressive. Raises DecodeError."""
    if input_ids.dim() != 2 or input_ids.shape[0] != 1 or input_ids.shape[1] == 0:
        raise DecodeError(f"input_ids must have shape (1, L) with L >= 1, got "
                          f"{tuple(input_ids.shape)}")
    if max_new_tokens < 0:
        raise DecodeError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if tree is None or tree.size == 1 or draft is None:
        tree, draft = AR_TREE, None
    device = next(target.parameters()).device
    if draft is not None:
        if next(draft.parameters()).device != device:
            raise DecodeError("target and draft are on different devices; load both on one")
        vt = target.get_output_embeddings().weight.shape[0]
        vd = draft.get_output_embeddings().weight.shape[0]
        if vt != vd:
            raise DecodeError(f"target vocabulary ({vt}) and draft vocabulary ({vd}) differ; "
                              "use a draft with the same tokenizer")
        if tree.width > vd:
            raise DecodeError(f"tree width {tree.width} exceeds the vocabulary size {vd}")
    limit = max_positions(target, draft)
    if limit is not None and input_ids.shape[1] > limit:
        raise DecodeError(f"prompt has {input_ids.shape[1]} tokens but the model window is "
                          f"{limit}; shorten the prompt")
    return tree, draft, device, limit


def _cut(new: list[int], budget: int, eos: frozenset[int]) -> tuple[list[int], bool]:
    """Truncate new tokens to the budget and just after the first EOS; (tokens, hit_eos)."""
    new = new[:budget]
    for i, t in enumerate(new):
        if t in eos:
            return new[:i + 1], True
    return new, False


def generate(target, draft, tree: Tree | None, input_ids: torch.Tensor, *, max_new_tokens: int,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
             rule: str = "sequoia", eos_token_id: int | Sequence[int] | None = None,
             seed: int | None = None, on_tokens: Callable[[list[int]], None] | None = None,
             timing: bool = False) -> Generation:
    """Speculative tree decoding (lossless: the output follows the target's own distribution).

    target, draft: causal LMs with the same vocabulary on the same device (draft None = plain
    autoregressive decoding); tree: the shape drafted each step (None or size 1 =
    autoregressive); input_ids: (1, L) prompt ids. temperature 0 = greedy (token-exact with the
    target's greedy decoding), otherwise sampling with top_k / top_p applied to both models and
    verification by ``rule`` ("sequoia": children drawn without replacement, "specinfer": with).
    Stops after ``max_new_tokens`` tokens (never more), after an EOS token (included), or when
    the next tree would not fit the context window (``stats.stop_reason`` says which); near the
    window the tree is cut to the depth that fits. ``on_tokens`` receives each batch of newly
    committed tokens. ``timing`` synchronises CUDA between stages so the draft / verify split is
    exact (CPU timings are exact either way).
    """
    check_settings(temperature, top_k, top_p, rule)
    tree, draft, device, limit = check_inputs(target, draft, tree, input_ids, max_new_tokens)
    input_ids = input_ids.to(device=device, dtype=torch.int64)
    if eos_token_id is None:
        eos = frozenset()
    elif isinstance(eos_token_id, (list, tuple, set, frozenset)):
        eos = frozenset(int(t) for t in eos_token_id)
    else:
        eos = frozenset([int(eos_token_id)])
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    stats = DecodeStats()
    out: list[int] = []
    start = time.perf_counter()
    if max_new_tokens == 0:
        stats.stop_reason = "max_new_tokens"
        return Generation(out, stats)

    clock = _Clock(device, timing)
    with torch.inference_mode():
        tcache, dcache, first = prefill(target, draft, input_ids, temperature=temperature,
                                        top_k=top_k, top_p=top_p, generator=generator)
        committed = input_ids[0].tolist() + [first]
        draft_len = input_ids.shape[1]
        stats.prefill_s = clock.lap()
        new, hit_eos = _cut([first], max_new_tokens, eos)
        out += new
        if on_tokens is not None:
            on_tokens(new)
        stats.stop_reason = "eos" if hit_eos else ""
        while not hit_eos and len(out) < max_new_tokens:
            root_pos = len(committed) - 1
            depth_cap = max_new_tokens - len(out) - 1
            if limit is not None:
                if root_pos >= limit:
                    stats.stop_reason = "context"
                    break
                depth_cap = min(depth_cap, limit - 1 - root_pos)
            step_tree = truncate_tree(tree, depth_cap)
            buffers = step_tree.buffers(device)

            # draft_tree
            clock.lap()
            drafted = None
            if step_tree.size > 1:
                pending = torch.tensor([committed[draft_len:]], dtype=torch.int64,
                                       device=device)
                drafted = draft_tree(draft, dcache, pending, root_pos, step_tree,
                                     temperature=temperature, top_k=top_k, top_p=top_p,
                                     replacement=rule == "specinfer", generator=generator)
                draft_len = len(committed)
                tokens = drafted.tokens
                stats.draft_forwards += drafted.forwards
                stats.drafted_tokens += step_tree.size - 1
            else:
                tokens = torch.tensor([committed[-1]], dtype=torch.int64, device=device)
            stats.draft_s += clock.lap()

            # verify_tree
            logits = verify_tree(target, tcache, tokens, root_pos, step_tree, buffers)
            stats.target_forwards += 1
            stats.verify_s += clock.lap()

            # accept
            token_list = tokens.tolist()
            path, ranks, bonus = accept(logits, token_list, step_tree, drafted,
                                        temperature=temperature, top_k=top_k, top_p=top_p,
                                        rule=rule, generator=generator)

            # update_caches
            draft_len += update_caches(tcache, dcache if drafted is not None else None,
                                       root_pos, path, step_tree)

            # commit
            new, hit_eos = _cut([token_list[v] for v in path[1:]] + [bonus],
                                max_new_tokens - len(out), eos)
            committed += new
            out += new
            stats.accepted_tokens += len(path) - 1
            stats.steps.append(StepStats(len(path) - 1, ranks, len(new)))
            if on_tokens is not None:
                on_tokens(new)
        if not stats.stop_reason:
            stats.stop_reason = "eos" if hit_eos else "max_new_tokens"
    stats.generated_tokens = len(out)
    stats.total_s = time.perf_counter() - start
    return Generation(out, stats)
