"""Tree shapes as serving engines' settings: vLLM, SGLang and EAGLE-2 (and back).

vLLM, ``speculative_config["speculative_token_tree"]`` (vLLM's tree attention, from
vllm-project/vllm PR #20401: ``vllm/config/speculative.py``, ``vllm/v1/spec_decode/eagle.py``).
A string holding a Python list of tuples, one per drafted node: the 0-based sibling ranks of
the path from the root, root EXCLUDED (``"[(0,), (1,), (0, 0)]"``); vLLM parses it with
``ast.literal_eval``, sorts it breadth-first (``key=lambda t: (len(t), t)``) and expects
``num_speculative_tokens == len(tree)``. Any tree can be written so and read back exactly
(:func:`to_vllm` / :func:`from_vllm` round-trip). But vLLM's EAGLE tree drafter
(``propose_tree``) gives every node of a level the same number of children, the top
``num_drafts[level] // num_drafts[level - 1]`` of each (``child_drafts_per_level``): it drafts
exactly the ``uniform-per-level`` trees (``treeopt.search.family``) and, for any other shape,
other tokens than the ones the verifier's tree expects. :func:`to_vllm` therefore refuses a
non-uniform tree unless ``any_shape=True`` (for a drafter that fills any tree).

EAGLE-2 (SafeAILab/EAGLE ``eagle/model/cnets.py`` ``topK_genrate``, ``ea_model.py``
``EaModel.from_pretrained(total_token=60, depth=5|7, top_k=10)``): a DYNAMIC tree. The root's
top_k children form level 1; ``depth`` rounds each expand the top_k best-scoring nodes of the
last level with their top_k children; the ``total_token - 1`` best-scoring candidates are
verified (``self.total_tokens = total_tokens - 1``: total_token counts the root). So a tree
of D edges needs depth = D - 1. SGLang's EAGLE worker (``--speculative-num-steps``,
``--speculative-eagle-topk``, ``--speculative-num-draft-tokens``; sgl-project/sglang
``python/sglang/srt/speculative/eagle_utils.py`` ``organize_draft_results`` keeps
``num_draft_tokens - 1`` candidates, the verified root is the extra token; with topk 1 it sets
num_draft_tokens = num_steps + 1) is the same family with num_steps = D.

A static tree is therefore only APPROXIMATED by these knobs: :func:`to_eagle` / :func:`to_sglang`
give the smallest top_k whose trees can take the shape (children per node and expanded nodes
per level at most top_k), its depth and its size, and say so. With an acceptance profile they
look for a top_k whose static member (``treeopt.search.family.topk_tree``: the tree the engine
builds when the draft's confidence is the profile's acceptance) is this very tree, and then
say the knobs are exact under that profile. The reverse (:func:`from_eagle`,
:func:`from_sglang`) builds that member, so it needs a profile.

Every refusal is a one-line :class:`ExportError`.
"""

from __future__ import annotations

import ast
import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from treeopt.errors import TreeoptError
from treeopt.limits import MAX_TREE_NODES, parse_json, show_number
from treeopt.search.family import FamilyError, topk_tree
from treeopt.tree import Tree, TreeError

ENGINES = ("vllm", "sglang", "eagle")
FORMATS = ("json", "python", "cli")
#: The format each engine's settings are printed in by default.
DEFAULT_FORMAT = {"vllm": "json", "sglang": "cli", "eagle": "python"}
#: Longest text :func:`parse_settings` reads (a 4096-node tree literal is ~100 KB).
MAX_TEXT = 1 << 20
#: Largest top_k tried when looking for knobs that build a tree exactly.
MAX_EXACT_TOP_K = 64

SGLANG_KEYS = ("speculative_num_steps", "speculative_eagle_topk", "speculative_num_draft_tokens")
EAGLE_KEYS = ("total_token", "depth", "top_k")


class ExportError(TreeoptError, ValueError):
    """A tree an engine cannot take, or engine settings that cannot be read (one line)."""


@dataclass
class Export:
    """One engine's settings for a tree: ``settings`` (the dict the engine takes), ``text``
    (them in the chosen format), ``exact`` (the engine drafts this very tree), ``notes``
    (what is exact and what approximates, one line each) and ``match`` (exact, equivalent
    or approximate)."""

    engine: str
    settings: dict
    text: str
    exact: bool
    notes: list[str] = field(default_factory=list)

    @property
    def match(self) -> str:
        """"exact", "equivalent" (same F under the profile) or "approximate"."""
        first = self.notes[0].split(":", 1)[0].split()[0] if self.notes else ""
        return "exact" if self.exact else (first if first == "equivalent" else "approximate")


# ---------------------------------------------------------------------------- checks
def _drafts(tree: Tree, engine: str) -> None:
    if tree.size < 2:
        raise ExportError(f"a tree of one node (the root) drafts nothing; {engine} needs at "
                          "least one drafted token (2 nodes)")
    if tree.size > MAX_TREE_NODES:
        raise ExportError(f"the tree has {tree.size} nodes, over the limit of "
                          f"{MAX_TREE_NODES} (MAX_TREE_NODES)")


def _nonuniform(tree: Tree) -> str | None:
    """Why vLLM's drafter cannot draft ``tree`` (None if it can)."""
    for depth, level in enumerate(tree.levels[:-1]):
        counts = [len(tree.children[n]) for n in level]
        if len(set(counts)) > 1:
            i = next(j for j in range(len(counts)) if counts[j] != counts[0])
            return (f"at depth {depth} node {level[0]} has {counts[0]} children and node "
                    f"{level[i]} has {counts[i]}")
    return None


# ---------------------------------------------------------------------------- vLLM
def to_vllm(tree: Tree, *, any_shape: bool = False) -> list[tuple[int, ...]]:
    """vLLM's ``speculative_token_tree`` for ``tree``: 0-based rank paths, root excluded,
    breadth-first (vLLM's own order). Exact and reversible (:func:`from_vllm`).

    Refuses (one-line ExportError) a root-only tree and, unless ``any_shape``, a tree that is
    not uniform per level: vLLM's EAGLE drafter would fill it with other tokens."""
    _drafts(tree, "vLLM")
    why = None if any_shape else _nonuniform(tree)
    if why:
        raise ExportError(f"vLLM's EAGLE tree drafter gives every node of a level the same "
                          f"number of children; here {why}, so vLLM would draft another tree; "
                          "search vLLM's family with `treeopt search --family "
                          "uniform-per-level`, or pass --any-shape to write it anyway")
    return sorted(tree.to_paths(), key=lambda t: (len(t), t))


def vllm_literal(paths: Sequence[Sequence[int]]) -> str:
    """The string vLLM takes: ``"[(0,), (1,), (0, 0)]"`` (what ``str()`` of a list of tuples
    gives, as vLLM writes its own default chain)."""
    return str([tuple(int(r) for r in p) for p in paths])


def vllm_config(tree: Tree, *, method: str = "eagle", model: str | None = None,
                any_shape: bool = False) -> dict:
    """``speculative_config`` for vLLM: method, (draft) model, num_speculative_tokens and
    speculative_token_tree."""
    paths = to_vllm(tree, any_shape=any_shape)
    config: dict[str, Any] = {"method": method}
    if model:
        config["model"] = model
    config["num_speculative_tokens"] = len(paths)
    config["speculative_token_tree"] = vllm_literal(paths)
    return config


def from_vllm(value: Any) -> Tree:
    """The tree of a vLLM ``speculative_token_tree``: the string, a list of rank tuples (or
    lists), or a ``speculative_config`` dict holding it. Any order; duplicates, negative or
    non-integer ranks, a path whose parent or lower sibling rank is missing, and trees over
    ``MAX_TREE_NODES`` are refused with one line."""
    if isinstance(value, dict):
        if "speculative_token_tree" not in value:
            raise ExportError("the vLLM settings have no 'speculative_token_tree'")
        tree = from_vllm(value["speculative_token_tree"])
        n = value.get("num_speculative_tokens")
        if n is not None and n != tree.size - 1:
            raise ExportError(f"num_speculative_tokens = {show_number(n)} but the "
                              f"speculative_token_tree has {tree.size - 1} nodes; vLLM "
                              "needs them equal")
        return tree
    if isinstance(value, str):
        value = _literal(value, "speculative_token_tree")
    if not isinstance(value, (list, tuple)):
        raise ExportError(f"speculative_token_tree must be a list of rank tuples such as "
                          f"[(0,), (1,), (0, 0)], got {type(value).__name__}")
    if not value:
        raise ExportError("speculative_token_tree is empty: vLLM needs at least one node")
    if len(value) >= MAX_TREE_NODES:
        raise ExportError(f"speculative_token_tree has {len(value)} nodes; a tree has at most "
                          f"{MAX_TREE_NODES - 1} besides the root (MAX_TREE_NODES)")
    paths = []
    for i, path in enumerate(value):
        if not isinstance(path, (list, tuple)) or not path or len(path) >= MAX_TREE_NODES or \
                not all(isinstance(r, int) and not isinstance(r, bool) for r in path):
            raise ExportError(f"speculative_token_tree[{i}] = {_short(path)} is not a "
                              "non-empty tuple of integer ranks such as (0, 1)")
        if max(path) >= MAX_TREE_NODES:
            raise ExportError(f"speculative_token_tree[{i}] has rank {show_number(max(path))}; "
                              f"no node of a tree within {MAX_TREE_NODES} nodes has that many "
                              "siblings")
        paths.append(tuple(path))
    seen: set = set()
    for path in paths:
        if path in seen:
            raise ExportError(f"speculative_token_tree lists {path} twice")
        seen.add(path)
    try:
        return Tree.from_paths(paths)
    except TreeError as exc:
        raise ExportError(f"speculative_token_tree: {exc}") from None


# ---------------------------------------------------------------------------- EAGLE / SGLang
def topk_shape(tree: Tree) -> int:
    """The smallest top_k whose EAGLE-2 / SGLang trees can take this shape: most children of
    a node, and most nodes with children on one level (the beam expands top_k per level)."""
    expanded = max(sum(1 for n in level if tree.children[n]) for level in tree.levels)
    return max(tree.width, expanded)


def topk_knobs(tree: Tree, profile=None, top_k: int | None = None
               ) -> tuple[int, bool, list[str]]:
    """``(top_k, exact, notes)`` for ``tree`` in the EAGLE-2 / SGLang family.

    Without ``profile``: ``top_k`` (if given and large enough) or :func:`topk_shape`, and
    ``exact`` False. With a rank table ``profile``: the first top_k from that one up to
    ``MAX_EXACT_TOP_K`` whose static member (``topk_tree``) equals ``tree``, ``exact`` True;
    else the shape's top_k, ``exact`` False, and the F both trees have under the profile."""

    need = topk_shape(tree)
    start = max(need, top_k or 0)
    notes = []
    if profile is None:
        notes.append(f"approximate: the engine grows a new tree every step from its draft's "
                     f"confidence; top_k {start} is the smallest beam whose trees can take this "
                     "shape (at most that many children per node and expanded nodes per level)"
                     ", depth and size are the tree's; give --profile to check whether these "
                     "knobs build this very tree")
        return start, False, notes
    last = min(MAX_EXACT_TOP_K, tree.size - 1)
    value = tree.expected_tokens(profile)
    tie = None
    for k in range(start, max(start, last) + 1):
        try:
            member = topk_tree(profile, k, tree.depth, tree.size)
        except FamilyError:
            continue
        if member == tree:
            notes.append(f"exact under the profile: with the profile's acceptance as the "
                         f"draft's confidence, top_k {k} builds this very tree (the engine's "
                         "tree still follows its draft's confidence at run time)")
            return k, True, notes
        if tie is None and abs(member.expected_tokens(profile) - value) <= 1e-9 * value:
            tie = k
    if tie is not None:
        notes.append(f"equivalent under the profile: top_k {tie} builds a tree of the same "
                     f"size, depth and F ({value:.4f} tokens per step) that differs from this "
                     "one only between nodes the profile scores alike")
        return tie, False, notes
    member = topk_tree(profile, start, tree.depth, tree.size)
    notes.append(f"approximate: under the profile these knobs build another tree of the same "
                 f"size and depth (F {member.expected_tokens(profile):.6f} against this "
                 f"tree's {value:.6f} tokens per step); "
                 "`treeopt search --family topk-per-level` finds the best tree they can build")
    return start, False, notes


def to_eagle(tree: Tree, profile=None, top_k: int | None = None) -> tuple[dict, bool, list[str]]:
    """EAGLE-2's ``EaModel.from_pretrained`` knobs for ``tree``: ``{"total_token": size,
    "depth": tree depth - 1, "top_k": k}``, whether they are exact, and notes
    (:func:`topk_knobs`)."""
    _drafts(tree, "EAGLE")
    k, exact, notes = topk_knobs(tree, profile, top_k)
    return {"total_token": tree.size, "depth": tree.depth - 1, "top_k": k}, exact, notes


def to_sglang(tree: Tree, profile=None, top_k: int | None = None
              ) -> tuple[dict, bool, list[str]]:
    """SGLang's EAGLE knobs for ``tree``: ``{"speculative_num_steps": depth,
    "speculative_eagle_topk": k, "speculative_num_draft_tokens": size}``, whether they are
    exact, and notes (:func:`topk_knobs`)."""
    _drafts(tree, "SGLang")
    k, exact, notes = topk_knobs(tree, profile, top_k)
    return {"speculative_num_steps": tree.depth, "speculative_eagle_topk": k,
            "speculative_num_draft_tokens": tree.size}, exact, notes


def from_eagle(knobs: dict, profile=None) -> Tree:
    """The static tree EAGLE-2's knobs build under ``profile`` (its acceptance as the draft's
    confidence; ``treeopt.search.family.topk_tree``). Refused without a profile."""
    total, depth, k = _knobs(knobs, EAGLE_KEYS, "EAGLE")
    return _member(profile, k, depth + 1, total, "EAGLE")


def from_sglang(knobs: dict, profile=None) -> Tree:
    """The static tree SGLang's EAGLE knobs build under ``profile`` (see :func:`from_eagle`)."""
    steps, k, total = _knobs(knobs, SGLANG_KEYS, "SGLang")
    return _member(profile, k, steps, total, "SGLang")


def _knobs(knobs: Any, keys: Sequence[str], engine: str) -> list[int]:
    if not isinstance(knobs, dict):
        raise ExportError(f"{engine} settings must be a dict with {', '.join(keys)}")
    missing = [k for k in keys if k not in knobs]
    if missing:
        raise ExportError(f"{engine} settings lack {', '.join(missing)} (need "
                          f"{', '.join(keys)})")
    out = []
    for key in keys:
        v = knobs[key]
        lowest = 0 if key == "depth" else 1
        if isinstance(v, bool) or not isinstance(v, int) or v < lowest:
            raise ExportError(f"{engine} setting {key} must be an integer >= {lowest}, got "
                              f"{show_number(v)}")
        out.append(v)
    return out


def _member(profile, k: int, steps: int, nodes: int, engine: str) -> Tree:
    if profile is None:
        raise ExportError(f"{engine}'s knobs describe a dynamic tree; the static tree they "
                          "build depends on the draft's confidence: give an acceptance "
                          "profile (--profile)")
    if nodes < 2:
        raise ExportError(f"{engine}'s tree needs at least 2 nodes (the root and one drafted "
                          f"token), got {nodes}")
    if steps < 1:
        raise ExportError(f"{engine}'s tree needs at least one step (level), got {steps}")
    try:
        return topk_tree(profile, k, steps, nodes)
    except FamilyError as exc:
        raise ExportError(f"{engine} settings: {exc}") from None


# ---------------------------------------------------------------------------- formatting
def export_tree(tree: Tree, engine: str, fmt: str | None = None, *, profile=None,
                method: str = "eagle", model: str | None = None, any_shape: bool = False,
                top_k: int | None = None) -> Export:
    """``tree`` as ``engine``'s settings in format ``fmt`` (``FORMATS``; default
    ``DEFAULT_FORMAT[engine]``):

    - vllm: json = the ``speculative_config`` object; python = ``speculative_config = {...}``
      (for ``LLM(speculative_config=...)``); cli = ``--speculative-config '{...}'`` for
      ``vllm serve``. ``method``: vLLM's method (eagle, eagle3, ...); ``model``: the draft.
    - sglang: cli = the ``--speculative-*`` server flags (``--speculative-algorithm`` from
      ``method``, upper-cased); json = the same as an object; python = ``speculative_kwargs
      = {...}`` for ``sglang.Engine(**...)``.
    - eagle: python = ``eagle_kwargs = {...}`` for ``EaModel.from_pretrained(**...)``; json =
      an object; cli = ``--total-token N --depth D --top-k K`` of EAGLE's evaluation scripts.

    ``profile`` (a rank table) lets EAGLE/SGLang knobs be checked for exactness; ``top_k`` is
    a hint (e.g. recorded by ``treeopt search --family topk-per-level``)."""
    if engine not in ENGINES:
        raise ExportError(f"unknown engine {engine!r}; use one of {', '.join(ENGINES)}")
    fmt = fmt or DEFAULT_FORMAT[engine]
    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
    if engine == "vllm":
        settings = vllm_config(tree, method=method, model=model, any_shape=any_shape)
        exact = _nonuniform(tree) is None
        notes = ["exact: the tree round-trips through speculative_token_tree"]
        if exact:
            notes.append("vLLM's EAGLE tree drafter drafts this shape as it is (top-k per "
                         "level, uniform)")
        else:
            notes.append("written with --any-shape: vLLM verifies any tree, but its EAGLE "
                         "drafter gives every node of a level the same number of children "
                         "and would fill this shape with other tokens")
        if not model:
            notes.append("add your draft model as \"model\" to the speculative_config")
        notes.append("vLLM drafts trees with its tree attention backend (TREE_ATTN)")
        payload = json.dumps(settings)
        text = {"json": payload,
                "python": f"speculative_config = {settings!r}",
                "cli": f"--speculative-config {shlex.quote(payload)}"}[fmt]
        return Export(engine, settings, text, exact, notes)
    if engine == "sglang":
        knobs, exact, notes = to_sglang(tree, profile, top_k)
        settings = {"speculative_algorithm": method.upper(), **knobs}
        text = {"json": json.dumps(settings),
                "python": f"speculative_kwargs = {settings!r}",
                "cli": " ".join(f"--{k.replace('_', '-')} {v}" for k, v in settings.items())
                }[fmt]
        return Export(engine, settings, text, exact, notes)
    knobs, exact, notes = to_eagle(tree, profile, top_k)
    text = {"json": json.dumps(knobs),
            "python": f"eagle_kwargs = {knobs!r}",
            "cli": " ".join(f"--{k.replace('_', '-')} {v}" for k, v in knobs.items())}[fmt]
    return Export(engine, knobs, text, exact, notes)


# ---------------------------------------------------------------------------- reading back
def read_settings(engine: str, source: str, profile=None) -> Tree:
    """The tree of engine settings given as text or as a file holding it: any format
    :func:`export_tree` writes (JSON, a Python literal or assignment, command-line flags), or
    a bare vLLM tree literal. EAGLE/SGLang knobs need ``profile`` (:func:`from_eagle`)."""
    if engine not in ENGINES:
        raise ExportError(f"unknown engine {engine!r}; use one of {', '.join(ENGINES)}")
    text = _source_text(source)
    value = parse_settings(text)
    if engine == "vllm":
        if isinstance(value, dict) and "speculative_config" in value:
            value = value["speculative_config"]
        if isinstance(value, str):
            value = _literal(value, "speculative_config")
        return from_vllm(value)
    if not isinstance(value, dict):
        raise ExportError(f"{engine} settings must be an object with "
                          f"{', '.join(SGLANG_KEYS if engine == 'sglang' else EAGLE_KEYS)}")
    if engine == "sglang":
        return from_sglang(value, profile)
    return from_eagle(value, profile)


def parse_settings(text: str) -> Any:
    """Engine settings from text: JSON, a Python literal (optionally ``name = literal``), or
    ``--flag value`` pairs (``--speculative-config '{...}'`` included); flags become a dict
    with ``_`` for ``-``, integer values as ints."""
    text = text.strip()
    if not text:
        raise ExportError("no engine settings given (empty text)")
    if len(text) > MAX_TEXT:
        raise ExportError(f"engine settings of {len(text)} characters; at most {MAX_TEXT} are "
                          "read")
    if text.startswith("--"):
        return _flags(text)
    name, sep, rest = text.partition("=")
    if sep and name.strip().isidentifier() and not text.startswith(("{", "[")):
        text = rest.strip()
    if text.startswith("{"):
        try:
            return json.loads(text)
        except (ValueError, RecursionError):
            pass
    return _literal(text, "engine settings")


def _flags(text: str) -> dict:
    try:
        words = shlex.split(text)
    except ValueError as exc:
        raise ExportError(f"cannot split the command-line flags ({exc})") from None
    out: dict[str, Any] = {}
    i = 0
    while i < len(words):
        word = words[i]
        if not word.startswith("--") or i + 1 >= len(words):
            raise ExportError(f"expected '--flag value' pairs, got {_short(word)!s} "
                              + ("without a value" if word.startswith("--") else ""))
        key, value = word[2:].replace("-", "_"), words[i + 1]
        if key == "speculative_config":
            out[key] = parse_settings(value)
        else:
            try:
                out[key] = int(value)
            except ValueError:
                out[key] = value
        i += 2
    return out


def _literal(text: str, what: str) -> Any:
    if len(text) > MAX_TEXT:
        raise ExportError(f"{what} of {len(text)} characters; at most {MAX_TEXT} are read")
    try:
        return ast.literal_eval(text.strip())
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        try:
            return parse_json(text, ExportError)
        except ExportError:
            raise ExportError(f"{what} {_short(text)!r} is neither a file, a Python literal "
                              "nor JSON") from None


def _source_text(source: str) -> str:
    """The text of the file ``source`` names, or ``source`` itself when it names none."""
    path = Path(source)
    try:
        is_file = "\n" not in source and path.is_file()
    except (OSError, ValueError):  # names too long for the file system, NUL bytes
        is_file = False
    if is_file:
        if path.stat().st_size > MAX_TEXT:
            raise ExportError(f"{path}: {path.stat().st_size} bytes; engine settings are at "
                              f"most {MAX_TEXT}")
        try:
            return path.read_text()
        except UnicodeDecodeError:
            raise ExportError(f"{path}: not a text file") from None
    return source


def _short(x: Any) -> str:
    try:
        text = repr(x) if not isinstance(x, str) else x
    except ValueError:  # integers beyond Python's 4300-digit conversion limit
        text = f"a {type(x).__name__} too large to print"
    return text if len(text) <= 60 else text[:57] + "..."
