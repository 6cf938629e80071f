"""N-gram drafting: prompt lookup and NASD, model-free drafts from the text itself.

For input-grounded tasks (summarisation, retrieval-augmented answers, extraction,
translation with names and numbers, code editing) the output copies long spans of the prompt
and of what it has already written. An n-gram index over ``prompt + generated`` turns that into
drafts at no model cost: after the tokens ``... a b c`` propose what followed ``a b c``
earlier in the text, and let the target verify it. Proposals carry no distributions; the
engine verifies them as point masses, so the output is exactly the target's own (greedy or
sampled).

Ranking rule (:meth:`NgramIndex.candidates`): the longest suffix of the context (``max_n``
tokens down to ``min_n``) that occurred before with a continuation wins; its continuations
are ranked by how often they followed it, ties by the most recent occurrence; then the
target's own top-k predictions recorded at that n-gram (NASD's filler, optional); remaining
slots are filled from the next shorter suffixes by the same rule, each token listed once.

Cost model: drafting costs a few dictionary look-ups per tree node (microseconds) and indexing
is incremental (a handful of dictionary updates per committed token), so the only price of a
draft is verifying it. The default shape is a chain of three drafted tokens
(``treeopt.decode.drafter.DEFAULT_CANDIDATE_SHAPE``): with oneDNN-packed CPU weights a
4-token verification costs about 1.15x one token, and over Spec-Bench that chain was never
slower than plain decoding (README, drafters table); on a GPU wider trees verify almost for
free and pay off more often. The best length depends on the machine and the text: ``treeopt
tune --draft ngram`` measures it. A step without any match proposes the root alone: a
plain decoding step, no slower than not drafting.
"""

from __future__ import annotations

import heapq
from typing import Sequence

import torch

from treeopt.decode.drafter import (
    DEFAULT_CANDIDATE_SHAPE,
    Drafter,
    DrafterError,
    Proposal,
    parse_options,
    proposal_from_paths,
    register_drafter,
    root_only,
)
from treeopt.decode.sampling import Sampling
from treeopt.tree import Tree

DEFAULT_SHAPE = DEFAULT_CANDIDATE_SHAPE
_SORT_ALL = 32  # continuation lists up to this long are ranked fully and cached


def _rank_key(item):
    return item[1][0], item[1][1]


class NgramIndex:
    """An incremental n-gram continuation index over one growing token sequence.

    For every position i of the sequence and every n in [min_n, max_n] it records that the
    n tokens before i were followed by token i, keeping per (n-gram, next token) a count and
    the last position seen. ``candidates(context, k)`` ranks the continuations of the
    context's suffixes (see the module docstring); ``add_filler`` records the target's own
    ranked predictions after a context, listed after the observed continuations.
    """

    __slots__ = ("min_n", "max_n", "_tokens", "_table", "_ranked", "_filler", "_floor")

    def __init__(self, min_n: int = 1, max_n: int = 4):
        try:
            min_n, max_n = int(min_n), int(max_n)
        except (TypeError, ValueError):
            raise DrafterError(f"n-gram sizes must be integers, got min={min_n!r}, "
                               f"max={max_n!r}") from None
        if not 1 <= min_n <= max_n:
            raise DrafterError(f"n-gram sizes need 1 <= min <= max, got min={min_n}, "
                               f"max={max_n}")
        self.min_n = min_n
        self.max_n = max_n
        self.reset()

    def reset(self) -> None:
        """Forget every token, continuation and filler."""
        self._tokens: list[int] = []
        # n-gram tuple -> {next token: [count, last position]}
        self._table: dict[tuple[int, ...], dict[int, list[int]]] = {}
        # n-gram tuple -> (ranked tokens, complete?) ; dropped when the n-gram is updated
        self._ranked: dict[tuple[int, ...], tuple[tuple[int, ...], bool]] = {}
        # n-gram tuple -> the target's latest ranked predictions after it
        self._filler: dict[tuple[int, ...], tuple[int, ...]] = {}
        self._floor = 0  # n-grams never start before this position (see ``boundary``)

    def __len__(self) -> int:
        return len(self._tokens)

    @property
    def tokens(self) -> list[int]:
        """A copy of the indexed sequence."""
        return list(self._tokens)

    def boundary(self) -> None:
        """The next tokens start a new text: no n-gram will span this point."""
        self._floor = len(self._tokens)

    def extend(self, tokens: Sequence[int]) -> None:
        """Append ``tokens`` to the sequence and index the n-grams ending before each."""
        if isinstance(tokens, torch.Tensor):
            tokens = tokens.reshape(-1).tolist()
        seq, table, ranked = self._tokens, self._table, self._ranked
        lo, hi, floor = self.min_n, self.max_n, self._floor
        for t in tokens:
            t = int(t)
            i = len(seq)
            start = i - hi if i - hi > floor else floor
            width = i - start
            if width >= lo:
                window = tuple(seq[start:i])
                for n in range(lo, width + 1):
                    key = window[width - n:]
                    conts = table.get(key)
                    if conts is None:
                        table[key] = {t: [1, i]}
                    else:
                        rec = conts.get(t)
                        if rec is None:
                            conts[t] = [1, i]
                        else:
                            rec[0] += 1
                            rec[1] = i
                        if key in ranked:
                            del ranked[key]
            seq.append(t)

    def add_filler(self, context: Sequence[int], tokens: Sequence[int]) -> None:
        """Record that the target predicted ``tokens`` (best first) after ``context``: for
        each suffix n-gram of the context they become its filler (the latest list wins)."""
        ctx = tuple(int(t) for t in context[len(context) - self.max_n:]) \
            if len(context) > self.max_n else tuple(int(t) for t in context)
        fill = tuple(dict.fromkeys(int(t) for t in tokens))
        for n in range(self.min_n, len(ctx) + 1):
            self._filler[ctx[len(ctx) - n:]] = fill

    def _ranked_for(self, key: tuple[int, ...], k: int) -> tuple[int, ...]:
        """At least the top ``k`` continuations of ``key`` (all of them when fewer)."""
        hit = self._ranked.get(key)
        if hit is not None and (hit[1] or len(hit[0]) >= k):
            return hit[0]
        conts = self._table.get(key)
        if not conts:
            return ()
        if len(conts) <= _SORT_ALL:
            out = tuple(t for t, _ in sorted(conts.items(), key=_rank_key, reverse=True))
            self._ranked[key] = (out, True)
        else:
            out = tuple(t for t, _ in heapq.nlargest(k, conts.items(), key=_rank_key))
            self._ranked[key] = (out, False)
        return out

    def candidates(self, context: Sequence[int], k: int) -> list[int]:
        """Up to ``k`` distinct next-token candidates after ``context`` (only its last
        ``max_n`` tokens matter), best first; [] when no suffix of it was seen."""
        if k <= 0:
            return []
        n_ctx = len(context)
        if n_ctx > self.max_n:
            context = context[n_ctx - self.max_n:]
            n_ctx = self.max_n
        ctx = context if type(context) is tuple else tuple(int(t) for t in context)
        out: list[int] = []
        table, filler = self._table, self._filler
        for n in range(n_ctx, self.min_n - 1, -1):
            key = ctx[n_ctx - n:]
            for source in ((self._ranked_for(key, k) if key in table else ()),
                           filler.get(key, ())):
                for t in source:
                    if t not in out:
                        out.append(t)
                        if len(out) == k:
                            return out
        return out

    def __repr__(self) -> str:
        return (f"NgramIndex(min_n={self.min_n}, max_n={self.max_n}, tokens={len(self)}, "
                f"ngrams={len(self._table)}, fillers={len(self._filler)})")


class NgramDrafter(Drafter):
    """Prompt-lookup / NASD drafter: fills ``shape`` from an n-gram index over the prompt and
    the text generated so far.

    shape: the largest tree drafted per step (default: a chain of 3 drafted tokens); nodes
    without a candidate are left out, so a step may draft less or nothing. min_n, max_n: the
    n-gram sizes matched (longest first). k: candidates asked per node (default: the shape's
    width). topk: when > 0, the target's top-``topk`` tokens at every accepted node are kept
    as filler candidates (NASD). keep: keep the index across generations (``start`` otherwise
    resets it). device: where proposal tokens live until ``start`` sees the prompt's device.
    """

    name = "ngram"

    def __init__(self, shape: Tree | None = None, *, min_n: int = 1, max_n: int = 4,
                 k: int | None = None, topk: int = 0, keep: bool = False,
                 device: torch.device | str = "cpu"):
        self.shape = shape if shape is not None else DEFAULT_SHAPE
        if not isinstance(self.shape, Tree):
            raise DrafterError(f"drafter 'ngram': shape must be a Tree, got "
                               f"{type(self.shape).__name__}")
        try:
            self.index = NgramIndex(min_n, max_n)
        except DrafterError as exc:
            raise DrafterError(f"drafter 'ngram': {exc}") from None
        self._k_option = None if k is None else int(k)  # None: follow the shape's width
        if k is None:
            k = max(1, self.shape.width)
        if int(k) < 1:
            raise DrafterError(f"drafter 'ngram': k (candidates per node) must be >= 1, got {k}")
        if int(topk) < 0:
            raise DrafterError(f"drafter 'ngram': topk must be >= 0, got {topk}")
        self.k = int(k)
        self.topk = int(topk)
        self.wants_target_topk = self.topk
        self.keep = bool(keep)
        self.device = torch.device(device)
        self._base = 0  # index position where this generation's committed tokens begin
        self._seen = 0  # committed tokens already indexed
        self._last: tuple[int, list[int]] | None = None  # (len(committed), tokens) proposed

    def reshaped(self, shape: Tree) -> "NgramDrafter":
        """A copy filling ``shape``, with an index of its own (so copies never disturb each
        other) and, unless ``k`` was given, ``k`` = the new shape's width."""
        new = super().reshaped(shape)
        new.index = NgramIndex(self.min_n, self.max_n)
        new.k = self._k_option or max(1, shape.width)
        new._base = new._seen = 0
        new._last = None
        return new

    @property
    def min_n(self) -> int:
        return self.index.min_n

    @property
    def max_n(self) -> int:
        return self.index.max_n

    def _restart(self) -> None:
        if self.keep:
            self.index.boundary()
        else:
            self.index.reset()
        self._base = len(self.index)
        self._seen = 0
        self._last = None

    def start(self, prompt_ids: torch.Tensor) -> None:
        self.device = prompt_ids.device
        self._restart()
        tokens = prompt_ids.reshape(-1).tolist()
        self.index.extend(tokens)
        self._seen = len(tokens)

    def _sync(self, committed: Sequence[int]) -> None:
        """Index the committed tokens not indexed yet (reindex if ``committed`` is not an
        extension of what was indexed)."""
        seen, base = self._seen, self._base
        prefix = committed[:seen]
        if not isinstance(prefix, list):
            prefix = list(prefix)
        if len(committed) < seen or prefix != self.index._tokens[base:base + seen]:
            self._restart()
            seen = 0
        if len(committed) > seen:
            self.index.extend(committed[seen:])
            self._seen = len(committed)

    def propose(self, committed: Sequence[int], max_depth: int, sampling: Sampling,
                generator: torch.Generator | None = None) -> Proposal:
        if isinstance(committed, torch.Tensor):
            committed = committed.reshape(-1).tolist()
        self._sync(committed)
        self._last = None
        if max_depth < 1 or self.shape.size == 1:
            return root_only(committed, self.device)
        tail = tuple(int(t) for t in committed[-self.index.max_n:])
        candidates, k = self.index.candidates, self.k
        proposal = proposal_from_paths(committed, lambda path: candidates(tail + path, k),
                                       self.shape, max_depth, self.device)
        if self.topk:
            self._last = (len(committed), proposal.tokens.tolist())
        return proposal

    def path_candidates(self, committed: Sequence[int]):
        """``children(path)``: the ranked candidates (at most ``k``) after ``committed`` +
        ``path`` (drafted tokens below the root), the callback ``propose`` fills its shape
        with; indexes ``committed`` first. Cascades (``treeopt.drafters.cascade``) draft
        through it."""
        if isinstance(committed, torch.Tensor):
            committed = committed.reshape(-1).tolist()
        self._sync(committed)
        tail = tuple(int(t) for t in committed[-self.index.max_n:])
        candidates, k = self.index.candidates, self.k
        return lambda path: candidates(tail + tuple(path), k)

    def update(self, path: Sequence[int], committed: Sequence[int],
               target_topk: torch.Tensor | None = None) -> None:
        if not self.topk or target_topk is None or len(path) == 0:
            return
        rows = target_topk.tolist() if isinstance(target_topk, torch.Tensor) else target_topk
        max_n = self.index.max_n
        last, self._last = self._last, None
        if last is not None and last[0] <= len(committed):
            # the proposal is remembered: exact even when the engine cut the accepted tokens
            old_len, tokens = last
            head = list(committed[max(0, old_len - max_n):old_len])
            seq = head + [tokens[v] for v in path[1:]]
        else:
            # committed = old committed + accepted path tokens (root excluded) + bonus
            old_len = len(committed) - len(path)
            if old_len < 1:
                return
            head = list(committed[max(0, old_len - max_n):old_len])
            seq = list(committed[max(0, old_len - max_n):])
        for j in range(len(path)):
            end = len(head) + j  # the context ending at path node j is seq[:end]
            self.index.add_filler(seq[max(0, end - max_n):end], rows[j][:self.topk])

    def __repr__(self) -> str:
        return (f"NgramDrafter(shape={self.shape.size} nodes, min_n={self.min_n}, "
                f"max_n={self.max_n}, k={self.k}, topk={self.topk}, keep={self.keep})")


@register_drafter("ngram", "n-gram / prompt lookup tree from the prompt and the text so far "
                           "(options min=, max=, k=, topk=, keep=)")
def _build_ngram(options: str, *, target, tokenizer=None, tree: Tree | None = None
                 ) -> NgramDrafter:
    opts = parse_options(options, {"min": int, "max": int, "k": int, "topk": int,
                                   "keep": bool}, "ngram")
    device = next(target.parameters()).device if target is not None else "cpu"
    min_n = opts.get("min", 1)
    max_n = opts.get("max", 4)
    if min_n > max_n and "max" not in opts:
        raise DrafterError(f"drafter 'ngram': min={min_n} is above the default max=4; "
                           f"give max= as well")
    return NgramDrafter(tree, min_n=min_n, max_n=max_n, k=opts.get("k"),
                        topk=opts.get("topk", 0), keep=opts.get("keep", False), device=device)


__all__ = ["NgramDrafter", "NgramIndex", "DEFAULT_SHAPE"]
