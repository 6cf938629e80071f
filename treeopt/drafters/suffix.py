"""``suffix``: SuffixDecoding-style drafting from suffix tries over the request and past outputs.

Two count-annotated suffix tries, as in SuffixDecoding (Arctic Inference's ``suffix_tree.cc``,
vLLM's ``suffix`` method): one over the request (prompt + output so far, extended as tokens are
committed) and one *global* trie over the outputs of earlier requests in the same process (an
eval run, a chat conversation), bounded, optionally kept in a file (``file=PATH``).

Structure (:class:`SuffixTrie`): a trie of every substring of length <= ``depth`` of the
indexed documents; node count = occurrences of its substring. A document of N tokens is
appended one token at a time: the nodes of the open suffixes (at most ``depth``) each step to
their child by the new token, so appending costs O(depth) time and adds at most ``depth``
nodes; the match of a context suffix of length p costs O(p) (global trie) or O(1) (the
request trie keeps the open suffixes' nodes). Memory is O(N · depth) nodes in the worst case
(a path-compressed suffix tree is O(N); the bounded depth keeps this one simple and the
global trie is capped at ``global`` tokens, oldest outputs evicted by decrementing counts and
compacted when dead nodes outnumber live ones).

Drafting one step (after ``committed``):

1. Match: for every length p (1 .. depth - 1) of the context's suffix found in a trie, the
   node u_p. Nodes with the same count hold the same occurrences (hence the same
   continuations), so only the longest p of each count is drafted from.
2. Expand from u_p (tree mode, the default): best-first by the estimated probability of a
   path, Π count(child) / count(parent), while it is at least ``min_prob`` and within the
   node budget; path mode (``mode=path``) follows the most frequent child only. Each drafted
   node carries its features for the copy-acceptance table (``treeopt.profile.copytable``):
   sibling rank, match length p + (drafted tokens above it), count(child) / count(parent).
3. Size and choice among the candidates of all p and both tries:
   - ``len=auto`` (the default when ``table=`` is given): each candidate tree is cut to the
     parent-closed part maximising expected tokens per ms under the table and the measured
     latency (``treeopt.search.speclen``, exact), and the best ratio wins (possibly the root
     alone: a plain step);
   - ``len=alpha`` (SuffixDecoding's rule, the default without a table): the budget is
     ``min(max, floor(alpha · p + offset))`` drafted tokens and the candidate with the
     largest score (sum of its path probabilities) wins, ties to the longer match.
   A fixed shape (``suffix@chain:8``, or profiling's one-level trees) is filled with the
   ranked continuations instead, node by node.

Every proposal is a deterministic function of the text (and of earlier outputs), so it is
verified as point masses: greedy output equals the target's, sampled output follows the
target's distribution.
"""

from __future__ import annotations

import copy
import heapq
import json
from collections import deque
from pathlib import Path
from typing import Sequence

import torch

from treeopt.decode.drafter import (
    Drafter,
    DrafterError,
    Proposal,
    parse_options,
    proposal_from_paths,
    register_drafter,
    root_only,
)
from treeopt.decode.sampling import Sampling
from treeopt.drafters.copylen import StepSizer, bfs_subtree
from treeopt.limits import atomic_write, read_json
from treeopt.profile.copytable import CopyTable, Features
from treeopt.search.speclen import alpha_budget
from treeopt.tree import Tree

DEFAULT_DEPTH = 32
DEFAULT_MAX = 16
DEFAULT_MIN_PROB = 0.1
DEFAULT_GLOBAL = 16384
MAX_DEPTH_OPTION = 256
MAX_GLOBAL_TOKENS = 1 << 20
CACHE_FORMAT = "treeopt-suffix-cache"
CACHE_VERSION = 1
MAX_CACHE_BYTES = 64 << 20


# ---------------------------------------------------------------------------- the trie
class SuffixTrie:
    """Count-annotated trie of every substring of length <= ``depth`` of its documents.

    Node 0 is the root; ``count[v]`` = occurrences of v's substring (the root: tokens
    indexed). ``open`` holds, for the document being appended, the nodes of its suffixes of
    length 1 .. depth - 1 (longest first): the nodes the next token extends."""

    __slots__ = ("depth", "count", "kids", "dep", "open", "dead")

    def __init__(self, depth: int = DEFAULT_DEPTH):
        self.depth = int(depth)
        self.count = [0]
        self.kids: list[dict[int, int] | None] = [None]
        self.dep = [0]
        self.open: list[int] = []
        self.dead = 0

    def __len__(self) -> int:
        """Live nodes, root included."""
        return len(self.count) - self.dead

    def begin(self) -> None:
        """The next appended token starts a new document (no substring spans the boundary)."""
        self.open = []

    def append(self, tokens: Sequence[int]) -> None:
        """Extend the current document by ``tokens``: O(depth) per token."""
        count, kids, dep, depth = self.count, self.kids, self.dep, self.depth
        for t in tokens:
            t = int(t)
            count[0] += 1
            nxt = []
            for u in self.open + [0]:
                ku = kids[u]
                if ku is None:
                    ku = kids[u] = {}
                c = ku.get(t)
                if c is None:
                    c = ku[t] = len(count)
                    count.append(0)
                    kids.append(None)
                    dep.append(dep[u] + 1)
                count[c] += 1
                if dep[c] < depth:
                    nxt.append(c)
            self.open = nxt

    def add(self, tokens: Sequence[int]) -> None:
        """Index one whole document."""
        self.begin()
        self.append(tokens)
        self.begin()

    def remove(self, tokens: Sequence[int]) -> None:
        """Un-index a document added before (counts decremented; a node whose count reaches
        0 is detached with its subtree, which holds only this document's occurrences)."""
        count, kids, dep, depth = self.count, self.kids, self.dep, self.depth
        walk: list[int] = []
        for t in tokens:
            t = int(t)
            count[0] -= 1
            nxt = []
            for u in walk + [0]:
                ku = kids[u]
                c = ku.get(int(t)) if ku else None
                if c is None:  # below a detached node: already gone
                    continue
                count[c] -= 1
                if count[c] == 0:
                    del ku[t]
                    self.dead += self._size(c)
                    continue
                if dep[c] < depth:
                    nxt.append(c)
            walk = nxt

    def _size(self, v: int) -> int:
        n, stack = 0, [v]
        while stack:
            u = stack.pop()
            n += 1
            if self.kids[u]:
                stack.extend(self.kids[u].values())
        return n

    def find(self, pattern: Sequence[int]) -> int:
        """The node of ``pattern`` (-1 if it does not occur or is longer than the depth)."""
        u, kids = 0, self.kids
        for t in pattern:
            ku = kids[u]
            if not ku:
                return -1
            u = ku.get(int(t), -1)
            if u < 0:
                return -1
        return u

    def matches(self, context: Sequence[int]) -> list[tuple[int, int]]:
        """(p, node) for every p >= 1 such that the last p tokens of ``context`` occur,
        p <= depth - 1, ascending in p (walks from the root: O(p^2) in all)."""
        out = []
        n = len(context)
        for p in range(1, min(n, self.depth - 1) + 1):
            u = self.find(context[n - p:])
            if u < 0:
                break
            out.append((p, u))
        return out

    def extended(self, matches: list[tuple[int, int]], token: int) -> list[tuple[int, int]]:
        """``matches(context + [token])`` from ``matches`` = ``matches(context)``: O(p), one
        step down from each match (a suffix of p + 1 tokens occurs only if its first p do)."""
        kids, cap = self.kids, self.depth - 1
        first = kids[0].get(int(token), -1) if kids[0] else -1
        if first < 0 or cap < 1:
            return []
        out = [(1, first)]
        for p, u in matches:
            if p + 1 > cap:
                break
            ku = kids[u]
            c = ku.get(int(token), -1) if ku else -1
            if c < 0:
                break
            out.append((p + 1, c))
        return out

    def open_matches(self) -> list[tuple[int, int]]:
        """(p, node) of the current document's own open suffixes, ascending in p (O(1) each:
        the request trie matches its own text this way)."""
        return sorted(((self.dep[u], u) for u in self.open), key=lambda x: x[0])

    def ranked(self, u: int) -> list[tuple[int, int]]:
        """(token, child) of node u by count descending, token ascending."""
        ku = self.kids[u]
        if not ku:
            return []
        count = self.count
        return sorted(ku.items(), key=lambda kv: (-count[kv[1]], kv[0]))


def naive_count(docs: Sequence[Sequence[int]], pattern: Sequence[int]) -> int:
    """Occurrences of ``pattern`` in ``docs`` by direct comparison (for tests)."""
    k = len(pattern)
    pat = list(pattern)
    return sum(1 for d in docs for i in range(len(d) - k + 1) if list(d[i:i + k]) == pat)


# ---------------------------------------------------------------------------- drafts
class Draft:
    """A candidate tree from one match: parents (-1 root), tokens (root = last committed),
    features per node (None at the root), path probabilities, sibling ranks."""

    __slots__ = ("parents", "tokens", "features", "probs", "ranks", "match", "score", "source")

    def __init__(self, root: int, match: int, source: int):
        self.parents = [-1]
        self.tokens = [int(root)]
        self.features: list[Features | None] = [None]
        self.probs = [1.0]
        self.ranks = [0]
        self.match = match
        self.score = 0.0
        self.source = source

    def add(self, parent: int, token: int, rank: int, cond: float, prob: float) -> int:
        depth_above = 0
        u = parent
        while u > 0:
            depth_above += 1
            u = self.parents[u]
        self.parents.append(parent)
        self.tokens.append(int(token))
        self.features.append(Features(rank, self.match + depth_above, cond))
        self.probs.append(prob)
        self.ranks.append(rank)
        self.score += prob
        return len(self.tokens) - 1

    @property
    def size(self) -> int:
        return len(self.tokens)


def expand_tree(trie: SuffixTrie, u: int, draft: Draft, budget: int, min_prob: float) -> Draft:
    """Best-first expansion from node ``u`` by path probability (SuffixDecoding's tree mode):
    at most ``budget`` drafted nodes, none below ``min_prob``. Ties: lower push order."""
    count = trie.count
    heap: list = []
    tie = 0

    def push(node: int, parent: int, prob: float) -> None:
        nonlocal tie
        for rank, (tok, c) in enumerate(trie.ranked(node), 1):
            cond = count[c] / count[node]
            q = prob * cond
            if q < min_prob:
                break  # ranked by count: the rest are lower still
            heapq.heappush(heap, (-q, tie, c, parent, tok, rank, cond))
            tie += 1

    push(u, 0, 1.0)
    while heap and draft.size - 1 < budget:
        negq, _, c, parent, tok, rank, cond = heapq.heappop(heap)
        v = draft.add(parent, tok, rank, cond, -negq)
        push(c, v, -negq)
    return draft


def expand_path(trie: SuffixTrie, u: int, draft: Draft, budget: int, min_prob: float) -> Draft:
    """SuffixDecoding's path mode: follow the most frequent child while the path probability
    stays >= ``min_prob``, at most ``budget`` tokens."""
    count, prob, parent = trie.count, 1.0, 0
    while draft.size - 1 < budget:
        ranked = trie.ranked(u)
        if not ranked:
            break
        tok, c = ranked[0]
        cond = count[c] / count[u]
        if prob * cond < min_prob:
            break
        prob *= cond
        parent = draft.add(parent, tok, 1, cond, prob)
        u = c
    return draft


def distinct_matches(trie: SuffixTrie, matches: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The longest p of each run of equal counts among matches with continuations (nodes
    with equal counts hold the same occurrences, so they draft the same tokens)."""
    out: list[tuple[int, int]] = []
    count, kids = trie.count, trie.kids
    for p, u in matches:
        if not kids[u]:
            continue
        if out and count[out[-1][1]] == count[u]:
            out[-1] = (p, u)
        else:
            out.append((p, u))
    return out


# ---------------------------------------------------------------------------- global cache
class SuffixCache:
    """The bounded global trie over earlier outputs (at most ``max_tokens`` tokens, oldest
    evicted), optionally kept in a JSON file (written atomically, validated on load)."""

    def __init__(self, depth: int, max_tokens: int, path: str | Path | None = None,
                 vocab_size: int | None = None):
        self.trie = SuffixTrie(depth)
        self.max_tokens = int(max_tokens)
        self.docs: deque[list[int]] = deque()
        self.tokens = 0
        self.path = Path(path) if path is not None else None
        self.vocab_size = vocab_size
        if self.path is not None and self.path.exists():
            for doc in load_cache(self.path, depth, vocab_size):
                self.add(doc, save=False)

    def add(self, doc: Sequence[int], save: bool = True) -> None:
        doc = [int(t) for t in doc][-self.max_tokens:] if self.max_tokens else []
        if not doc:
            return
        self.docs.append(doc)
        self.trie.add(doc)
        self.tokens += len(doc)
        while self.tokens > self.max_tokens:
            old = self.docs.popleft()
            self.trie.remove(old)
            self.tokens -= len(old)
        if self.trie.dead > len(self.trie):
            self._rebuild()
        if save and self.path is not None:
            self.save()

    def forked(self) -> "SuffixCache":
        """A copy holding the same documents that keeps no file: later outputs added to
        either never reach the other."""
        new = SuffixCache(self.trie.depth, self.max_tokens, None, self.vocab_size)
        for doc in self.docs:
            new.add(doc, save=False)
        return new

    def empty_copy(self) -> "SuffixCache":
        """A new, empty global trie with these settings that keeps no file: what a fresh
        process starts from, for measurements that must not see outputs already indexed (the
        same prompts decoded by an earlier measurement)."""
        return SuffixCache(self.trie.depth, self.max_tokens, None, self.vocab_size)

    def _rebuild(self) -> None:
        trie = SuffixTrie(self.trie.depth)
        for d in self.docs:
            trie.add(d)
        self.trie = trie

    def save(self) -> Path:
        doc = {"format": CACHE_FORMAT, "version": CACHE_VERSION, "depth": self.trie.depth,
               "max_tokens": self.max_tokens, "vocab_size": self.vocab_size,
               "docs": [list(d) for d in self.docs]}
        text = json.dumps(doc, separators=(",", ":")) + "\n"
        return atomic_write(self.path, lambda fh: fh.write(text), binary=False)


def load_cache(path: Path, depth: int, vocab_size: int | None) -> list[list[int]]:
    """The documents of a suffix cache file, checked (format, sizes, token ids); one-line
    DrafterError otherwise."""
    where = f"drafter 'suffix': cache {path}"
    try:
        size = path.stat().st_size
    except OSError:
        raise DrafterError(f"{where}: cannot be read") from None
    if size > MAX_CACHE_BYTES:
        raise DrafterError(f"{where}: {size} bytes, more than {MAX_CACHE_BYTES}")
    doc = read_json(path, lambda msg: DrafterError(f"{where}: {msg}"))
    if not isinstance(doc, dict) or doc.get("format") != CACHE_FORMAT:
        raise DrafterError(f"{where}: not a {CACHE_FORMAT} file; choose another file=")
    if doc.get("version") != CACHE_VERSION:
        raise DrafterError(f"{where}: unsupported version {doc.get('version')!r}")
    if vocab_size is not None and doc.get("vocab_size") not in (None, vocab_size):
        raise DrafterError(f"{where}: written for a vocabulary of {doc.get('vocab_size')} "
                           f"tokens, the target has {vocab_size}; use another file=")
    docs = doc.get("docs")
    if not isinstance(docs, list):
        raise DrafterError(f"{where}: 'docs' must be a list of token lists")
    limit = vocab_size if vocab_size is not None else 1 << 31
    out = []
    for i, d in enumerate(docs):
        if not isinstance(d, list) or not all(type(t) is int and 0 <= t < limit for t in d):
            raise DrafterError(f"{where}: docs[{i}] must be a list of token ids in "
                               f"[0, {limit})")
        out.append(d)
    return out


# ---------------------------------------------------------------------------- the drafter
class SuffixDrafter(Drafter):
    """SuffixDecoding drafter (see the module docstring).

    shape: a fixed tree to fill with ranked continuations, or None (the default: the drafter
    sizes each step itself, by ``len``). len: "auto" (needs ``sizer``) or "alpha". max: the
    most drafted tokens per step. alpha, offset: SuffixDecoding's budget rule. min_prob:
    stop expanding below this path probability. mode: "tree" or "path". depth: trie depth.
    cache: the shared global trie (None: no global trie). recorder: a CopyTable that counts
    each step's outcome (online measurement)."""

    name = "suffix"

    def __init__(self, shape: Tree | None = None, *, length: str = "alpha",
                 sizer: StepSizer | None = None, max_tokens: int = DEFAULT_MAX,
                 alpha: float = 1.0, offset: float = 0.0, min_prob: float = DEFAULT_MIN_PROB,
                 mode: str = "tree", depth: int = DEFAULT_DEPTH,
                 cache: SuffixCache | None = None, recorder: CopyTable | None = None,
                 device: torch.device | str = "cpu"):
        if shape is not None and not isinstance(shape, Tree):
            raise DrafterError("drafter 'suffix': shape must be a Tree")
        if length not in ("auto", "alpha"):
            raise DrafterError(f"drafter 'suffix': len={length!r}; use auto or alpha")
        if length == "auto" and sizer is None:
            raise DrafterError("drafter 'suffix': len=auto needs table=PROFILE.json (a copy "
                               "table with latency, from `treeopt tune --draft suffix`)")
        if mode not in ("tree", "path"):
            raise DrafterError(f"drafter 'suffix': mode={mode!r}; use tree or path")
        if not 2 <= int(depth) <= MAX_DEPTH_OPTION:
            raise DrafterError(f"drafter 'suffix': depth must be in 2..{MAX_DEPTH_OPTION}, "
                               f"got {depth}")
        if not 1 <= int(max_tokens) < 4096:
            raise DrafterError(f"drafter 'suffix': max must be in 1..4095, got {max_tokens}")
        if not 0.0 <= float(min_prob) <= 1.0:
            raise DrafterError(f"drafter 'suffix': min_prob must be in [0, 1], got {min_prob}")
        if float(alpha) < 0:
            raise DrafterError(f"drafter 'suffix': alpha must be >= 0, got {alpha}")
        self.shape = shape
        self.length = length
        self.sizer = sizer
        self.max_tokens = int(max_tokens)
        self.alpha, self.offset = float(alpha), float(offset)
        self.min_prob = float(min_prob)
        self.mode = mode
        self.depth = int(depth)
        self.cache = cache
        self.recorder = recorder
        self.device = torch.device(device)
        self.request = SuffixTrie(self.depth)
        self._prompt_len = 0
        self._seen: list[int] = []
        # (parents, features) of the last proposal: what ``update`` records
        self.last_draft: tuple[list[int], list] | None = None

    def reshaped(self, shape: Tree) -> "SuffixDrafter":
        """A copy filling the fixed ``shape`` (profiling's one-level trees, ``suffix@SHAPE``),
        with a request trie of its own; the global trie is shared."""
        new = copy.copy(self)
        new.shape = shape
        new.request = SuffixTrie(self.depth)
        new._seen, new.last_draft, new._prompt_len = [], None, 0
        return new

    def forked(self) -> "SuffixDrafter":
        """A copy with a request trie and a global trie of its own (the global one starting
        from this one's documents, the last request's output included, which this drafter
        adds only when its next request starts; writing no file): it decodes its next request
        exactly as this one would."""
        new = self.reshaped(self.shape)
        if new.cache is not None:
            new.cache = new.cache.forked()
            if out := self._pending():
                new.cache.add(out, save=False)
        return new

    def _pending(self) -> list[int]:
        """The current request's output, which the global trie gets when the next request
        starts (or at ``finish``)."""
        return self._seen[self._prompt_len:]

    # -------------------------------------------------------------- text
    def start(self, prompt_ids: torch.Tensor) -> None:
        self.device = prompt_ids.device
        if self.cache is not None and (out := self._pending()):
            self.cache.add(out)
        tokens = prompt_ids.reshape(-1).tolist()
        self.request = SuffixTrie(self.depth)
        self.request.append(tokens)
        self._seen = list(tokens)
        self._prompt_len = len(tokens)
        self.last_draft = None

    def finish(self) -> None:
        """Add the current output to the global trie now (``start`` does it otherwise when
        the next request begins) and write the cache file if there is one."""
        if self.cache is not None and (out := self._pending()):
            self.cache.add(out)
            self._prompt_len = len(self._seen)

    def _sync(self, committed: Sequence[int]) -> None:
        """Index the committed tokens not indexed yet (afresh when ``committed`` is not an
        extension of the indexed text)."""
        seen = self._seen
        n = len(seen)
        if len(committed) >= n and list(committed[:n]) == seen:
            if len(committed) > n:
                new = [int(t) for t in committed[n:]]
                self.request.append(new)
                seen.extend(new)
            return
        self.request = SuffixTrie(self.depth)
        self._seen = [int(t) for t in committed]
        self._prompt_len = len(self._seen)
        self.request.append(self._seen)

    # -------------------------------------------------------------- drafting
    def _tries(self) -> list[tuple[SuffixTrie, list[tuple[int, int]]]]:
        out = [(self.request, self.request.open_matches())]
        if self.cache is not None and self.cache.tokens:
            out.append((self.cache.trie, self.cache.trie.matches(self._seen)))
        return out

    def candidates(self, committed: Sequence[int], budget: int) -> list[Draft]:
        """Every candidate draft (one per distinct match and trie) with ``budget`` drafted
        tokens at most, as the ``len`` rule sizes it (alpha: per match length)."""
        root = int(committed[-1])
        expand = expand_tree if self.mode == "tree" else expand_path
        out = []
        for source, (trie, matches) in enumerate(self._tries()):
            for p, u in distinct_matches(trie, matches):
                b = budget
                if self.length == "alpha":
                    b = min(budget, alpha_budget(p, self.alpha, self.offset, self.max_tokens))
                if b <= 0:
                    continue
                d = expand(trie, u, Draft(root, p, source), b, self.min_prob)
                if d.size > 1:
                    out.append(d)
        return out

    def propose(self, committed: Sequence[int], max_depth: int, sampling: Sampling,
                generator: torch.Generator | None = None) -> Proposal:
        if isinstance(committed, torch.Tensor):
            committed = committed.reshape(-1).tolist()
        self._sync(committed)
        self.last_draft = None
        if max_depth < 1:
            return root_only(committed, self.device)
        if self.shape is not None:
            return self._fill_shape(committed, max_depth)
        budget = self.max_tokens
        best, best_key, keep = None, None, None
        for d in self.candidates(committed, budget):
            if self.length == "auto":
                choice = self.sizer.choose(d.parents, d.features)
                key = (choice.tokens_per_ms, d.match, -d.source)
                nodes = choice.nodes
            else:
                key = (d.score, d.match, -d.source)
                nodes = list(range(d.size))
            if best_key is None or key > best_key:
                best, best_key, keep = d, key, nodes
        if best is None or len(keep) == 1:
            self.last_draft = ([-1], [None])
            return root_only(committed, self.device)
        keep = [v for v in keep if _depth(best.parents, v) <= max_depth]
        tree, old = bfs_subtree(best.parents, best.ranks, keep)
        self.last_draft = (list(tree.parents), [best.features[v] for v in old])
        tokens = torch.tensor([best.tokens[v] for v in old], dtype=torch.int64,
                              device=self.device)
        return Proposal(tree, tokens, fixed_shape=False)

    def ranked_after(self, context: Sequence[int]) -> tuple[list[int], list[Features]]:
        """Ranked continuation tokens (and their features) after ``context``: from the
        longest match with continuations in either trie (the request trie on ties)."""
        return self._ranked([(trie, trie.matches(context)) for trie in self._shape_tries()])

    def _shape_tries(self) -> list[SuffixTrie]:
        return [self.request] + ([self.cache.trie] if self.cache is not None
                                 and self.cache.tokens else [])

    @staticmethod
    def _ranked(found: list[tuple[SuffixTrie, list[tuple[int, int]]]]
                ) -> tuple[list[int], list[Features]]:
        """:meth:`ranked_after` from each trie's matches of the context."""
        best = None
        for trie, matches in found:
            for p, u in reversed(matches):
                if trie.kids[u]:
                    if best is None or p > best[0]:
                        best = (p, u, trie)
                    break
        if best is None:
            return [], []
        p, u, trie = best
        ranked = trie.ranked(u)
        total = trie.count[u]
        return ([t for t, _ in ranked],
                [Features(r, p, trie.count[c] / total) for r, (_, c) in enumerate(ranked, 1)])

    def _fill_shape(self, committed: Sequence[int], max_depth: int) -> Proposal:
        tail = tuple(int(t) for t in committed[-(self.depth - 1):])
        feats: dict[tuple[int, ...], list[Features]] = {}
        # each path's matches in each trie, from its parent path's (one step down each); the
        # request trie holds the committed text itself: its matches are its open suffixes
        found = {(): [(trie, trie.open_matches() if trie is self.request else
                       trie.matches(tail)) for trie in self._shape_tries()]}

        def children(path):
            if path not in found:
                found[path] = [(trie, trie.extended(m, path[-1]))
                               for trie, m in found[path[:-1]]]
            toks, fs = self._ranked(found[path])
            feats[tuple(path)] = fs
            return toks

        proposal = proposal_from_paths(committed, children, self.shape, max_depth, self.device)
        tree, toks = proposal.tree, proposal.tokens.tolist()
        paths: list[tuple[int, ...]] = [()]
        fl: list[Features | None] = [None]
        for v in range(1, tree.size):
            u = tree.parents[v]
            paths.append(paths[u] + (toks[v],))
            fl.append(feats[paths[u]][tree.ranks[v] - 1])
        self.last_draft = (list(tree.parents), fl)
        return proposal

    def update(self, path: Sequence[int], committed: Sequence[int],
               target_topk: torch.Tensor | None = None) -> None:
        if self.recorder is not None and self.last_draft is not None:
            parents, features = self.last_draft
            self.recorder.record(parents, features, path)
        self.last_draft = None
        if isinstance(committed, torch.Tensor):
            committed = committed.reshape(-1).tolist()
        self._sync(committed)  # so that the last step's tokens reach the global trie too

    def __repr__(self) -> str:
        size = "auto" if self.length == "auto" else f"alpha={self.alpha},offset={self.offset}"
        return (f"SuffixDrafter(len={size}, max={self.max_tokens}, mode={self.mode}, "
                f"depth={self.depth}, global={self.cache.max_tokens if self.cache else 0})")


def _depth(parents: Sequence[int], v: int) -> int:
    d = 0
    while v > 0:
        v = parents[v]
        d += 1
    return d


def _vocab_size(target) -> int | None:
    emb = target.get_output_embeddings() if target is not None else None
    return int(emb.weight.shape[0]) if emb is not None else None


OPTIONS = {"len": str, "table": str, "latency": str, "max": int, "alpha": float,
           "offset": float, "min_prob": float, "mode": str, "depth": int, "global": int,
           "file": str}


@register_drafter("suffix", "SuffixDecoding: suffix tries over the request and earlier outputs,"
                            " per-step size (options len=auto|alpha, table=, max=, alpha=, "
                            "offset=, min_prob=, mode=tree|path, depth=, global=, file=)")
def _build_suffix(options: str, *, target, tokenizer=None, tree: Tree | None = None
                  ) -> SuffixDrafter:
    opts = parse_options(options, OPTIONS, "suffix")
    device = next(target.parameters()).device if target is not None else "cpu"
    depth = opts.get("depth", DEFAULT_DEPTH)
    max_tokens = opts.get("max", DEFAULT_MAX)
    length = opts.get("len", "auto" if "table" in opts else "alpha")
    sizer = None
    if "table" in opts:
        sizer = StepSizer.from_files(opts["table"], opts.get("latency"), max_tokens + 1,
                                     "suffix")
    elif length == "auto":
        raise DrafterError("drafter 'suffix': len=auto needs table=PROFILE.json (from "
                           "`treeopt tune --draft suffix`)")
    n_global = opts.get("global", DEFAULT_GLOBAL)
    if not 0 <= n_global <= MAX_GLOBAL_TOKENS:
        raise DrafterError(f"drafter 'suffix': global must be in 0..{MAX_GLOBAL_TOKENS} tokens,"
                           f" got {n_global}")
    if "file" in opts and n_global == 0:
        raise DrafterError("drafter 'suffix': file= keeps the global trie; it needs global > 0")
    if not 2 <= depth <= MAX_DEPTH_OPTION:
        raise DrafterError(f"drafter 'suffix': depth must be in 2..{MAX_DEPTH_OPTION}, got "
                           f"{depth}")
    cache = SuffixCache(depth, n_global, opts.get("file"), _vocab_size(target)) \
        if n_global else None
    return SuffixDrafter(tree, length=length, sizer=sizer, max_tokens=max_tokens,
                         alpha=opts.get("alpha", 1.0), offset=opts.get("offset", 0.0),
                         min_prob=opts.get("min_prob", DEFAULT_MIN_PROB),
                         mode=opts.get("mode", "tree"), depth=depth, cache=cache,
                         device=device)


__all__ = ["SuffixCache", "SuffixDrafter", "SuffixTrie", "expand_path", "expand_tree",
           "naive_count"]
