"""Tree sets: one tree per range of context lengths, chosen per prompt at decode time.

A verification forward costs more when more tokens are cached, and multi-token forwards
more so, so the fastest tree for a long prompt can be smaller than for a short one. A latency
table measured at several contexts (``treeopt profile latency --contexts 128,512,1024``)
lets the hardware-aware choice pick one tree per context
(``treeopt.search.hardware.choose_per_context``); ``treeopt tune`` and ``treeopt search``
then write a tree set, and every place that decodes with a tree (``treeopt generate --tree``,
``treeopt eval --tree``, ``--drafter SPEC@SHAPE``, ``treeopt.generate(..., tree=...)``)
accepts the tree set too and decodes each prompt with the tree of its bucket, by giving the
drafter that tree (``Drafter.reshaped``): the engine never sees the set.

Which bucket a prompt uses: its decode context, :func:`decode_context` =
``prompt tokens + max_new_tokens // 2``: the cached tokens at the middle of the generation,
the average context its steps see (the cache grows from the prompt length to prompt +
max_new_tokens). Bucket i serves decode contexts ``from_context[i]`` up to
``from_context[i + 1] - 1``; the first bucket starts at 0 and the last one has no end.

File format (JSON, one self-contained file; written atomically, never over a file of another
kind)::

    {"format": "treeopt-treeset", "version": 1,
     "rule": "prompt tokens + max_new_tokens // 2",
     "buckets": [
        {"from_context": 0,   "context": 128, "parents": [-1, 0, 0, 1, ...],
         "size": 8, "depth": 3, "predicted_speedup": 1.42, ...},
        {"from_context": 301, "context": 512, "parents": [-1, 0], "size": 2, "depth": 1, ...}],
     "meta": {"profile": "...", "draft_cost": "per-level", ...}}

Each bucket holds its tree as a parent list (node ids in BFS order, as ``Tree.from_parents``
reads; ``treeopt.growmap`` files hold the same shapes in Sequoia's format), the measured
``context`` it was chosen at and, optionally, plain figures (``size`` and ``depth`` must
match the tree when present; ``expected_tokens``, ``predicted_speedup``, ...). ``from_context``
values are integers, the first 0, strictly increasing. Reading checks every bucket and the
limits (at most ``MAX_BUCKETS`` buckets, ``MAX_TREE_NODES`` nodes per tree, plain metadata)
and gives a one-line :class:`TreeSetError` naming the file and the problem.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from treeopt.errors import TreeoptError
from treeopt.limits import MAX_TREE_NODES, atomic_write, check_plain, parse_json, show_number
from treeopt.tree import Tree, TreeError

JSON_FORMAT = "treeopt-treeset"
JSON_VERSION = 1
RULE = "prompt tokens + max_new_tokens // 2"
# At most this many buckets in one set, and a tree-set file at most this many bytes.
MAX_BUCKETS = 256
MAX_FILE_BYTES = 64 << 20


class TreeSetError(TreeoptError, ValueError):
    """A tree set that cannot be read, written or used; the one-line message says why."""


def decode_context(prompt_tokens: int, max_new_tokens: int) -> int:
    """The context that picks a prompt's bucket: ``prompt_tokens + max_new_tokens // 2``
    (the cached tokens at the middle of the generation)."""
    return int(prompt_tokens) + int(max_new_tokens) // 2


@dataclass(frozen=True)
class Bucket:
    """Decode contexts from ``start`` (inclusive) up to the next bucket's start use ``tree``;
    ``context``: the measured context it was chosen at (None when unknown); ``info``: plain
    figures (predicted speed-up, expected tokens, ...)."""

    start: int
    tree: Tree
    context: int | None = None
    info: dict = field(default_factory=dict)


@dataclass(frozen=True)
class TreeSet:
    """Trees by decode context (see the module docstring); ``buckets`` ascending by start,
    the first starting at 0."""

    buckets: tuple[Bucket, ...]
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        buckets = tuple(self.buckets)
        if not buckets:
            raise TreeSetError("a tree set needs at least one bucket")
        if len(buckets) > MAX_BUCKETS:
            raise TreeSetError(f"a tree set has at most {MAX_BUCKETS} buckets, got "
                               f"{len(buckets)}")
        if buckets[0].start != 0:
            raise TreeSetError(f"the first bucket must start at context 0, not "
                               f"{buckets[0].start}")
        for i in range(1, len(buckets)):
            if buckets[i].start <= buckets[i - 1].start:
                raise TreeSetError(f"bucket starts must increase, but bucket {i} starts at "
                                   f"{buckets[i].start} after {buckets[i - 1].start}")
        object.__setattr__(self, "buckets", buckets)

    def index_for(self, context: int) -> int:
        """The bucket serving decode context ``context``."""
        i = 0
        for j, b in enumerate(self.buckets):
            if b.start <= context:
                i = j
        return i

    def pick(self, prompt_tokens: int, max_new_tokens: int) -> tuple[int, Tree]:
        """(bucket index, tree) for a prompt of ``prompt_tokens`` tokens generating up to
        ``max_new_tokens`` (:func:`decode_context`)."""
        i = self.index_for(decode_context(prompt_tokens, max_new_tokens))
        return i, self.buckets[i].tree

    def end(self, i: int) -> int | None:
        """The first context after bucket ``i`` (None for the last bucket)."""
        return self.buckets[i + 1].start if i + 1 < len(self.buckets) else None

    def span(self, i: int) -> str:
        """``"0..300"`` / ``"301+"``: the decode contexts bucket ``i`` serves."""
        end = self.end(i)
        return f"{self.buckets[i].start}+" if end is None else f"{self.buckets[i].start}..{end - 1}"

    @property
    def trees(self) -> list[Tree]:
        return [b.tree for b in self.buckets]

    def to_dict(self) -> dict:
        buckets = []
        for b in self.buckets:
            d = {"from_context": b.start}
            if b.context is not None:
                d["context"] = b.context
            d.update({"parents": b.tree.to_parents(), "size": b.tree.size,
                      "depth": b.tree.depth})
            d.update({k: v for k, v in b.info.items() if k not in d})
            buckets.append(d)
        return {"format": JSON_FORMAT, "version": JSON_VERSION, "rule": RULE,
                "buckets": buckets, "meta": dict(self.meta)}

    @classmethod
    def from_dict(cls, d: Any, source: str = "tree set") -> "TreeSet":
        def fail(msg: str) -> TreeSetError:
            return TreeSetError(f"{source}: {msg}")

        if not isinstance(d, dict):
            raise fail(f"expected a JSON object, got {type(d).__name__}")
        if d.get("format") != JSON_FORMAT:
            raise fail(f"'format' is {d.get('format')!r}, expected {JSON_FORMAT!r}")
        if d.get("version") != JSON_VERSION:
            raise fail(f"unsupported tree-set version {d.get('version')!r} (this treeopt "
                       f"reads {JSON_VERSION})")
        rule = d.get("rule", RULE)
        if rule != RULE:
            raise fail(f"'rule' is {rule!r}; this treeopt picks buckets by {RULE!r}")
        raw = d.get("buckets")
        if not isinstance(raw, list) or not raw:
            raise fail("'buckets' must be a non-empty list")
        if len(raw) > MAX_BUCKETS:
            raise fail(f"{len(raw)} buckets, more than the limit {MAX_BUCKETS}")
        meta = d.get("meta", {})
        if not isinstance(meta, dict):
            raise fail("'meta' must be an object")
        check_plain(meta, "'meta'", fail)
        buckets = []
        for i, b in enumerate(raw):
            where = f"bucket {i}"
            if not isinstance(b, dict):
                raise fail(f"{where} must be an object")
            check_plain(b, where, fail)
            start = b.get("from_context")
            if isinstance(start, bool) or not isinstance(start, int) or start < 0:
                raise fail(f"{where}: 'from_context' = {show_number(start)} must be an integer "
                           ">= 0")
            parents = b.get("parents")
            if not isinstance(parents, list) or not parents:
                raise fail(f"{where}: 'parents' must be a non-empty list (node ids in BFS "
                           "order, -1 for the root)")
            if len(parents) > MAX_TREE_NODES:
                raise fail(f"{where}: {len(parents)} nodes exceed the limit of "
                           f"{MAX_TREE_NODES} tree nodes (MAX_TREE_NODES)")
            if any(isinstance(p, bool) or not isinstance(p, int) for p in parents):
                raise fail(f"{where}: 'parents' must hold integers")
            try:
                tree = Tree.from_parents(parents)
            except TreeError as exc:
                raise fail(f"{where}: bad 'parents': {exc}") from None
            for key, value in (("size", tree.size), ("depth", tree.depth)):
                if key in b and b[key] != value:
                    raise fail(f"{where}: '{key}' = {show_number(b[key])} but its tree has "
                               f"{key} {value}")
            context = b.get("context")
            if context is not None and (isinstance(context, bool)
                                        or not isinstance(context, int) or context < 0):
                raise fail(f"{where}: 'context' = {show_number(context)} must be an integer "
                           ">= 0")
            info = {k: v for k, v in b.items()
                    if k not in ("from_context", "context", "parents", "size", "depth")}
            buckets.append(Bucket(start, tree, context, info))
        try:
            return cls(tuple(buckets), dict(meta))
        except TreeSetError as exc:
            raise fail(str(exc)) from None

    def describe(self) -> list[str]:
        """One line per bucket: contexts served, measured context, size, depth, predicted
        speed-up when known."""
        lines = []
        for i, b in enumerate(self.buckets):
            at = f" (chosen at context {b.context})" if b.context is not None else ""
            speed = b.info.get("predicted_speedup")
            pred = f", predicted speed-up {speed:.2f}x" if isinstance(speed, (int, float)) \
                else ""
            lines.append(f"contexts {self.span(i):>11}{at}: size {b.tree.size}, depth "
                         f"{b.tree.depth}, width {b.tree.width}{pred}")
        return lines


# ---------------------------------------------------------------------------- files
def is_treeset_file(path: str | Path) -> bool:
    """Whether ``path`` is an existing .json file whose top level says it is a tree set
    (cheap: the file is read only when it is small enough to be one)."""
    path = Path(path)
    try:
        if path.suffix.lower() != ".json" or not path.is_file() \
                or path.stat().st_size > MAX_FILE_BYTES:
            return False
        d = parse_json(path.read_text(), TreeSetError)
    except (OSError, UnicodeDecodeError, TreeSetError):
        return False
    return isinstance(d, dict) and d.get("format") == JSON_FORMAT


def load_treeset(path: str | Path) -> TreeSet:
    """Read and check a tree-set file; one-line TreeSetError naming the file otherwise."""
    path = Path(path)
    if not path.is_file():
        raise TreeSetError(f"{path}: no such tree-set file")
    if path.stat().st_size > MAX_FILE_BYTES:
        raise TreeSetError(f"{path}: {path.stat().st_size} bytes, more than a tree set can "
                           f"hold ({MAX_FILE_BYTES}); not a tree-set file")
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        raise TreeSetError(f"{path}: not a JSON tree-set file (not text)") from None
    d = parse_json(text, lambda msg: TreeSetError(f"{path}: {msg}"))
    return TreeSet.from_dict(d, str(path))


def check_writable(path: str | Path) -> Path:
    """Check, before any work, that a tree set may be written to ``path``: a .json name, not
    a folder, and no existing file of another kind (an existing tree set or an empty file
    may be replaced). One-line TreeSetError otherwise."""
    path = Path(path)
    if path.suffix.lower() != ".json":
        raise TreeSetError(f"{path}: a tree set is written as .json")
    if path.is_dir():
        raise TreeSetError(f"{path}: is a folder, not a tree-set file")
    if path.exists() and path.stat().st_size > 0 and not is_treeset_file(path):
        raise TreeSetError(f"{path}: refusing to overwrite a file that is not a tree set; "
                           "choose another output path or remove the file")
    return path


def save_treeset(treeset: TreeSet, path: str | Path) -> Path:
    """Write ``treeset`` as JSON (atomically; see :func:`check_writable`)."""
    path = check_writable(path)
    text = json.dumps(treeset.to_dict(), indent=1) + "\n"
    atomic_write(path, lambda fh: fh.write(text), binary=False)
    return path


def from_choices(choices: Sequence, meta: dict | None = None) -> TreeSet:
    """A tree set from ``treeopt.search.hardware.choose_per_context`` buckets, each with its
    prediction at its measured context (expected tokens, step ms, tokens/s, speed-up)."""
    buckets = []
    for c in choices:
        ch = c.choice
        buckets.append(Bucket(int(c.start), ch.tree, int(c.context), {
            "expected_tokens": round(float(ch.expected_tokens), 6),
            "predicted_step_ms": round(float(ch.step_ms), 6),
            "predicted_tokens_per_s": round(float(ch.tokens_per_s), 6),
            "predicted_speedup": round(float(ch.speedup), 6)}))
    return TreeSet(tuple(buckets), dict(meta or {}))


__all__ = ["Bucket", "TreeSet", "TreeSetError", "decode_context", "from_choices",
           "is_treeset_file", "load_treeset", "save_treeset", "check_writable", "RULE"]
