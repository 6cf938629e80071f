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

Engines that take a tree as it is today (versions checked against their sources and docs):

- UMbreLLa (Infini-AI-Lab, Sequoia's successor: ``StaticSpeculationEngine`` reads
  ``growmap_path``, a JSON file with Sequoia's keys roots, branches, Successors, mask, depth,
  size): any tree, exact (:func:`to_umbrella` / :func:`from_umbrella`).
- TensorRT-LLM's ``eagle_choices`` (Medusa-style root-to-node rank lists) is exact for any
  tree, but only in the releases that still have it (:data:`TRTLLM_CHOICES_VERSIONS`); its
  dynamic tree (``use_dynamic_tree``, ``dynamic_tree_max_topK``, ``max_draft_len``,
  ``max_total_draft_tokens``) is the EAGLE-2 / SGLang family above, labelled the same way.
- vLLM's ``speculative_token_tree`` exists only in :data:`VLLM_TREE_VERSIONS`; current vLLM
  and llama.cpp speculate chains: a chain exports exactly as their chain settings
  (:func:`chain_settings`), from the chain's length and, when given, a drafter spec (``ngram``
  becomes vLLM's ``ngram`` / llama.cpp's ``ngram-simple``, a model spec a draft model).

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
from treeopt.growmap import GrowmapError, growmap_dict, growmap_json, validate_growmap
from treeopt.limits import MAX_TREE_NODES, parse_json, quote, show_number
from treeopt.search.family import FamilyError, topk_tree
from treeopt.tree import Tree, TreeError

#: The engines whose tree families ``treeopt search --family`` knows.
ENGINES = ("vllm", "sglang", "eagle")
#: Every engine ``treeopt export`` writes settings for.
EXPORT_ENGINES = ("vllm", "sglang", "eagle", "tensorrt-llm", "umbrella", "llama.cpp")
FORMATS = ("json", "python", "cli")
ALL_FORMATS = ("json", "python", "cli", "yaml")
#: The formats each engine's settings can be written in; the first is the default.
ENGINE_FORMATS = {"vllm": ("json", "python", "cli"), "sglang": ("cli", "json", "python"),
                  "eagle": ("python", "json", "cli"), "tensorrt-llm": ("yaml", "json", "python"),
                  "umbrella": ("json",), "llama.cpp": ("cli",)}
#: The format each engine's settings are printed in by default.
DEFAULT_FORMAT = {e: f[0] for e, f in ENGINE_FORMATS.items()}
#: Which vLLM releases take ``speculative_token_tree``.
VLLM_TREE_VERSIONS = ("vLLM 0.10.1 to 0.20.x only: speculative_token_tree came with tree "
                      "attention (vllm-project/vllm PR #20401, first released in 0.10.1) and "
                      "went with it (PR #42121, merged 2026-05-08; 0.22 has no tree attention)")
#: Which TensorRT-LLM releases take ``eagle_choices``.
TRTLLM_CHOICES_VERSIONS = ("TensorRT-LLM up to 1.3.x, two-model EAGLE-3 (eagle3_one_model: "
                           "false); NVIDIA/TensorRT-LLM PR #18210 removed eagle_choices (not in "
                           "1.4.0rc1): newer releases take the dynamic tree (--dynamic)")
TRTLLM_DYNAMIC_VERSIONS = ("TensorRT-LLM releases whose Eagle3DecodingConfig has use_dynamic_tree "
                           "(1.3.0rc27 and 1.4)")
CHAIN_VERSIONS = {"vllm": "any vLLM release with the V1 engine (0.10 and later, current ones "
                          "included)",
                  "llama.cpp": "current llama.cpp (llama-server / llama-speculative)"}
UMBRELLA_VERSIONS = ("UMbreLLa's static engine (\"engine\": \"static\", \"growmap_path\": this "
                     "file)")
#: vLLM methods that draft with a model of their own (given as "model").
VLLM_MODEL_METHODS = ("draft_model", "eagle", "eagle3", "medusa", "mlp_speculator", "mtp")
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
    #: Which releases of the engine take these settings.
    versions: str = ""

    @property
    def match(self) -> str:
        """"exact", "equivalent" (same F under the profile) or "approximate"; the first note
        starts with the same word."""
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
            return (f"at depth {depth} node {level[0]} has {_children(counts[0])} and node "
                    f"{level[i]} has {_children(counts[i])}")
    return None


def _children(n: int) -> str:
    return f"{n} child" if n == 1 else f"{n} children"


def is_chain(tree: Tree) -> bool:
    """Whether every node has at most one child (a chain of ``tree.size - 1`` drafted
    tokens)."""
    return tree.width <= 1


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
    lists), or a ``speculative_config`` dict holding it (a dict with only
    ``num_speculative_tokens`` is a chain). Any order; duplicates, negative or non-integer
    ranks, a path whose parent or lower sibling rank is missing, and trees over
    ``MAX_TREE_NODES`` are refused with one line."""
    if isinstance(value, dict):
        if "speculative_token_tree" not in value:
            if "num_speculative_tokens" in value:
                return from_chain(value, "vllm")
            raise ExportError("the vLLM settings have no 'speculative_token_tree' and no "
                              "'num_speculative_tokens'")
        tree = from_vllm(value["speculative_token_tree"])
        n = value.get("num_speculative_tokens")
        if n is not None and n != tree.size - 1:
            raise ExportError(f"num_speculative_tokens = {show_number(n)} but the "
                              f"speculative_token_tree has {tree.size - 1} nodes; vLLM "
                              "needs them equal")
        return tree
    if isinstance(value, str):
        value = _literal(value, "speculative_token_tree")
    return _tree_of_paths(value, "speculative_token_tree")


def _tree_of_paths(value: Any, what: str) -> Tree:
    """The tree of a list of 0-based rank paths (root excluded), checked with one-line
    errors."""
    if not isinstance(value, (list, tuple)):
        raise ExportError(f"{what} must be a list of rank tuples such as "
                          f"[(0,), (1,), (0, 0)], got {type(value).__name__}")
    if not value:
        raise ExportError(f"{what} is empty: the engine needs at least one node")
    if len(value) >= MAX_TREE_NODES:
        raise ExportError(f"{what} has {len(value)} nodes; a tree has at most "
                          f"{MAX_TREE_NODES - 1} besides the root (MAX_TREE_NODES)")
    paths = []
    for i, path in enumerate(value):
        if not isinstance(path, (list, tuple)) or not path or len(path) >= MAX_TREE_NODES or \
                not all(isinstance(r, int) and not isinstance(r, bool) for r in path):
            raise ExportError(f"{what}[{i}] = {_short(path)} is not a "
                              "non-empty tuple of integer ranks such as (0, 1)")
        if max(path) >= MAX_TREE_NODES:
            raise ExportError(f"{what}[{i}] has rank {show_number(max(path))}; "
                              f"no node of a tree within {MAX_TREE_NODES} nodes has that many "
                              "siblings")
        paths.append(tuple(path))
    seen: set = set()
    for path in paths:
        if path in seen:
            raise ExportError(f"{what} lists {path} twice")
        seen.add(path)
    try:
        return Tree.from_paths(paths)
    except TreeError as exc:
        raise ExportError(f"{what}: {exc}") from None


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


# ---------------------------------------------------------------------------- UMbreLLa
def to_umbrella(tree: Tree) -> dict:
    """UMbreLLa's growmap for ``tree``: Sequoia's keys as plain JSON values (the mask as a
    list of rows: UMbreLLa's static engine reads it from the file). Exact for any tree."""
    _drafts(tree, "UMbreLLa")
    d = growmap_dict(tree)
    return {"roots": d["roots"], "branches": d["branches"], "Successors": d["Successors"],
            "mask": d["mask"].tolist(), "depth": d["depth"].tolist(), "size": d["size"]}


def from_umbrella(value: Any) -> Tree:
    """The tree of an UMbreLLa growmap (a dict with Sequoia's keys), fully validated."""
    try:
        return validate_growmap(value, source="UMbreLLa growmap")
    except GrowmapError as exc:
        raise ExportError(str(exc)) from None


# ---------------------------------------------------------------------------- TensorRT-LLM
def trtllm_config(tree: Tree, profile=None, *, dynamic: bool = False, model: str | None = None,
                  top_k: int | None = None) -> tuple[dict, bool, list[str]]:
    """TensorRT-LLM's ``speculative_config`` (PyTorch backend, EAGLE-3) for ``tree``:
    ``eagle_choices`` (each drafted node's 0-based rank path from the root, breadth-first, as
    lists) with ``max_draft_len`` = depth and ``max_total_draft_tokens`` = size - 1: exact for
    any tree. ``dynamic``: the dynamic tree's knobs instead (``use_dynamic_tree``,
    ``dynamic_tree_max_topK`` from :func:`topk_knobs`), labelled as SGLang's are."""
    _drafts(tree, "TensorRT-LLM")
    config: dict[str, Any] = {"decoding_type": "Eagle3"}
    if model:
        config["speculative_model"] = model
    config["max_draft_len"] = tree.depth
    config["max_total_draft_tokens"] = tree.size - 1
    if dynamic:
        k, exact, notes = topk_knobs(tree, profile, top_k)
        config.update(use_dynamic_tree=True, dynamic_tree_max_topK=k)
        return config, exact, notes
    config["eagle_choices"] = [list(p) for p in sorted(tree.to_paths(),
                                                       key=lambda t: (len(t), t))]
    config["eagle3_one_model"] = False
    notes = ["exact: eagle_choices lists every drafted node, so TensorRT-LLM drafts and "
             "verifies this very tree"]
    return config, True, notes


def from_trtllm(value: Any, profile=None) -> Tree:
    """The tree of TensorRT-LLM settings: ``eagle_choices`` exactly, or a dynamic tree's knobs
    (``use_dynamic_tree``) as the static member they build under ``profile``. The settings may
    be wrapped in ``speculative_config``."""
    if isinstance(value, dict) and isinstance(value.get("speculative_config"), dict):
        value = value["speculative_config"]
    if not isinstance(value, dict):
        raise ExportError("TensorRT-LLM settings must be a speculative_config object with "
                          "eagle_choices or use_dynamic_tree")
    if "eagle_choices" in value:
        tree = _tree_of_paths(value["eagle_choices"], "eagle_choices")
        total = value.get("max_total_draft_tokens")
        if total is not None and total != tree.size - 1:
            raise ExportError(f"max_total_draft_tokens = {show_number(total)} but eagle_choices "
                              f"has {tree.size - 1} nodes; TensorRT-LLM needs them equal")
        return tree
    if value.get("use_dynamic_tree"):
        knobs = {"steps": value.get("max_draft_len"), "top_k": value.get("dynamic_tree_max_topK"),
                 "total": value.get("max_total_draft_tokens")}
        steps, k, total = _knobs(knobs, ("steps", "top_k", "total"), "TensorRT-LLM")
        return _member(profile, k, steps, total + 1, "TensorRT-LLM")
    raise ExportError("the TensorRT-LLM settings have neither eagle_choices nor "
                      "use_dynamic_tree")


# ---------------------------------------------------------------------------- chains
def _drafter_parts(spec: str | None) -> tuple[str, dict]:
    """``("ngram", {"min": "2", ...})``, ``("model", {"path": X})`` or ``("", {})`` for a
    drafter spec (text only: the drafters themselves are not loaded here)."""
    if not spec:
        return "", {}
    text = str(spec).strip()
    name, sep, options = text.partition(":")
    name = name.strip().lower()
    if name == "ngram":
        opts = {}
        for part in filter(None, (x.strip() for x in options.split(","))):
            key, eq, val = part.partition("=")
            if not eq:
                raise ExportError(f"drafter spec {text!r}: option {part!r} is not key=value")
            opts[key.strip().lower()] = val.strip()
        return "ngram", opts
    if name == "model":
        return "model", {"path": options.strip()}
    if name == "none":
        return "", {}
    if name in ("early-exit", "datastore", "bigram", "dynamic", "dynamic-dp", "egag",
                "fallback", "horizontal", "vertical"):
        raise ExportError(f"drafter {name!r} has no counterpart in vLLM's or llama.cpp's "
                          "speculation; give --draft ngram[:min=,max=] or a draft model")
    return "model", {"path": text}


def _ngram_lengths(opts: dict) -> tuple[int, int]:
    try:
        low, high = int(opts.get("min", 1)), int(opts.get("max", 4))
    except ValueError:
        raise ExportError("ngram options min= and max= must be integers") from None
    if not 1 <= low <= high:
        raise ExportError(f"ngram needs 1 <= min <= max, got min={low}, max={high}")
    return low, high


def chain_settings(tree: Tree, engine: str, *, method: str | None = None,
                   draft: str | None = None, model: str | None = None
                   ) -> tuple[dict, bool, list[str]]:
    """The chain settings of current vLLM or llama.cpp for a chain ``tree`` (N drafted
    tokens): ``(settings, exact, notes)``.

    vLLM: ``{"method": ..., "num_speculative_tokens": N}``; an ``ngram`` drafter spec gives
    method ngram with ``prompt_lookup_min`` / ``prompt_lookup_max`` (its min= / max=), a model
    spec (or ``model``) method draft_model with ``"model"``; ``method`` may name any vLLM
    method (suffix: SuffixDecoding, whose length varies up to N: approximate).
    llama.cpp: ``--draft-max N --draft-min 0 --draft-p-min 0`` (a draft model drafts all N
    tokens; ``-md`` names it), or for ``ngram`` ``--spec-type ngram-simple`` with
    ``--spec-ngram-simple-size-n`` (the longest n-gram looked up) and ``-size-m`` N."""
    if not is_chain(tree):
        raise ExportError(f"{engine} drafts chains only; this tree has a node with "
                          f"{_children(tree.width)}: export a chain (chain:N), or the tree to "
                          "umbrella, tensorrt-llm or sglang")
    _drafts(tree, engine)
    n = tree.size - 1
    kind, opts = _drafter_parts(draft)
    if kind == "model" and not model:
        model = opts["path"]
    notes: list[str] = []
    if engine == "vllm":
        method = method or ("ngram" if kind == "ngram" else "draft_model" if model else "eagle")
        settings: dict[str, Any] = {"method": method}
        if method == "ngram":
            low, high = _ngram_lengths(opts)
            settings.update(prompt_lookup_min=low, prompt_lookup_max=high)
        elif model and method in VLLM_MODEL_METHODS:
            settings["model"] = model
        settings["num_speculative_tokens"] = n
        if method == "suffix":
            notes.append(f"approximate: SuffixDecoding drafts as many tokens as its match "
                         f"supports, up to num_speculative_tokens = {n} (and trees in its tree "
                         "mode); the chain's length is only its cap")
            return settings, False, notes
        notes.append(f"exact: vLLM drafts a chain of {n} tokens per step ({method}), this very "
                     "shape" + ("; its prompt lookup may pick another match than treeopt's "
                                "ngram ranking" if method == "ngram" else ""))
        if method in VLLM_MODEL_METHODS and "model" not in settings:
            notes.append("add your draft model as \"model\" (--draft-model NAME)")
        return settings, True, notes
    if kind == "ngram":
        low, high = _ngram_lengths(opts)
        settings = {"spec_type": "ngram-simple", "spec_ngram_simple_size_n": high,
                    "spec_ngram_simple_size_m": n, "draft_max": n}
        notes.append(f"approximate: llama.cpp's ngram-simple drafts up to {n} tokens after a "
                     f"match of exactly {high} tokens, where treeopt's ngram falls back from "
                     f"{high} to {low}")
        return settings, False, notes
    settings = {}
    if model:
        settings["model_draft"] = model
    settings.update(draft_max=n, draft_min=0, draft_p_min=0.0)
    notes.append(f"exact: with --draft-p-min 0 the draft model drafts all {n} tokens every "
                 "step (llama.cpp's default 0.75 stops early: shorter chains)")
    if not model:
        notes.append("add your draft model with -md FILE.gguf")
    return settings, True, notes


def from_chain(value: Any, engine: str) -> Tree:
    """The chain of vLLM chain settings (``num_speculative_tokens``) or llama.cpp flags
    (``draft_max``, or ``spec_ngram_simple_size_m``)."""
    keys = (("num_speculative_tokens",) if engine == "vllm" else
            ("draft_max", "spec_ngram_simple_size_m"))
    if not isinstance(value, dict):
        raise ExportError(f"{engine} settings must be an object or flags with {keys[0]}")
    for key in keys:
        if key in value:
            n = value[key]
            if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n < MAX_TREE_NODES:
                raise ExportError(f"{engine} setting {key} must be an integer from 1 to "
                                  f"{MAX_TREE_NODES - 1}, got {show_number(n)}")
            return Tree(tuple(range(-1, n)))
    raise ExportError(f"the {engine} settings have no {' or '.join(keys)}")


# ---------------------------------------------------------------------------- formatting
def export_tree(tree: Tree, engine: str, fmt: str | None = None, *, profile=None,
                method: str | None = None, model: str | None = None, any_shape: bool = False,
                top_k: int | None = None, draft: str | None = None,
                dynamic: bool = False) -> Export:
    """``tree`` as ``engine``'s settings in format ``fmt`` (``ENGINE_FORMATS[engine]``;
    default the first):

    - vllm: a chain becomes current vLLM's chain settings (:func:`chain_settings`, from
      ``method`` / ``draft`` / ``model``); any other tree the ``speculative_token_tree`` of
      :data:`VLLM_TREE_VERSIONS`. json = the ``speculative_config`` object; python =
      ``speculative_config = {...}`` (for ``LLM(speculative_config=...)``); cli =
      ``--speculative-config '{...}'`` for ``vllm serve``. ``method``: vLLM's method (eagle,
      eagle3, ngram, suffix, draft_model, ...); ``model``: the draft.
    - sglang: cli = the ``--speculative-*`` server flags (``--speculative-algorithm`` from
      ``method``, upper-cased); json = the same as an object; python = ``speculative_kwargs
      = {...}`` for ``sglang.Engine(**...)``.
    - eagle: python = ``eagle_kwargs = {...}`` for ``EaModel.from_pretrained(**...)``; json =
      an object; cli = ``--total-token N --depth D --top-k K`` of EAGLE's evaluation scripts.
    - tensorrt-llm: yaml = ``speculative_config:`` for ``--extra_llm_api_options`` /
      ``--config``; json; python = ``speculative_config = {...}``. ``dynamic``: the dynamic
      tree's knobs instead of ``eagle_choices``.
    - umbrella: json = the growmap file for UMbreLLa's ``growmap_path``.
    - llama.cpp: cli = the ``--draft-*`` / ``--spec-*`` flags of a chain.

    ``profile`` (a rank table) lets top-k knobs be checked for exactness; ``top_k`` is a hint
    (e.g. recorded by ``treeopt search --family topk-per-level``)."""
    if engine not in EXPORT_ENGINES:
        raise ExportError(f"unknown engine {engine!r}; use one of {', '.join(EXPORT_ENGINES)}")
    fmt = fmt or DEFAULT_FORMAT[engine]
    if fmt not in ENGINE_FORMATS[engine]:
        raise ExportError(f"{engine} settings are written as {', '.join(ENGINE_FORMATS[engine])}"
                          f", not {fmt!r}")
    if engine == "vllm":
        return _export_vllm(tree, fmt, method=method, model=model, any_shape=any_shape,
                            draft=draft)
    if engine == "llama.cpp":
        settings, exact, notes = chain_settings(tree, engine, draft=draft, model=model)
        text = " ".join(f"--{k.replace('_', '-')} {_flag(v)}" for k, v in settings.items())
        return Export(engine, settings, text, exact, notes, CHAIN_VERSIONS[engine])
    if engine == "umbrella":
        to_umbrella(tree)  # the checks
        notes = ["exact: UMbreLLa's static engine drafts and verifies this very tree (its "
                 "growmap); set \"engine\": \"static\" and \"growmap_path\" to this file in "
                 "its config"]
        return Export(engine, to_umbrella(tree), growmap_json(tree).rstrip("\n"), True, notes,
                      UMBRELLA_VERSIONS)
    if engine == "tensorrt-llm":
        config, exact, notes = trtllm_config(tree, profile, dynamic=dynamic, model=model,
                                             top_k=top_k)
        text = {"yaml": _yaml({"speculative_config": config}),
                "json": json.dumps(config),
                "python": f"speculative_config = {config!r}"}[fmt]
        return Export(engine, config, text, exact, notes,
                      TRTLLM_DYNAMIC_VERSIONS if dynamic else TRTLLM_CHOICES_VERSIONS)
    if engine == "sglang":
        knobs, exact, notes = to_sglang(tree, profile, top_k)
        settings = {"speculative_algorithm": (method or "eagle").upper(), **knobs}
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


def _export_vllm(tree: Tree, fmt: str, *, method, model, any_shape, draft) -> Export:
    if is_chain(tree) and tree.size >= 2:
        settings, exact, notes = chain_settings(tree, "vllm", method=method, draft=draft,
                                                model=model)
        versions = CHAIN_VERSIONS["vllm"]
    else:
        if draft:
            raise ExportError("--draft describes a chain drafter; this tree is not a chain "
                              "(current vLLM drafts chains only)")
        settings = vllm_config(tree, method=method or "eagle", model=model, any_shape=any_shape)
        exact = _nonuniform(tree) is None
        versions = VLLM_TREE_VERSIONS
        if exact:
            notes = ["exact: the tree round-trips through speculative_token_tree and vLLM's "
                     "EAGLE tree drafter drafts this shape as it is (top-k per level, uniform)"]
        else:
            notes = ["approximate: vLLM verifies this tree exactly (it round-trips through "
                     "speculative_token_tree), but its EAGLE drafter gives every node of a "
                     "level the same number of children and would fill this shape with other "
                     "tokens (written with --any-shape)"]
        notes.append("current vLLM drafts chains only (tree attention was removed): export a "
                     "chain, or this tree to umbrella or tensorrt-llm")
        if not model:
            notes.append("add your draft model as \"model\" to the speculative_config")
        notes.append("vLLM drafts trees with its tree attention backend (TREE_ATTN)")
    payload = json.dumps(settings)
    python = f"speculative_config = {settings!r}"
    if "speculative_token_tree" in settings:
        python = f"# {VLLM_TREE_VERSIONS}\n{python}"
    text = {"json": payload, "python": python,
            "cli": f"--speculative-config {shlex.quote(payload)}"}[fmt]
    return Export("vllm", settings, text, exact, notes, versions)


def _flag(value: Any) -> str:
    return shlex.quote(str(value)) if isinstance(value, str) else str(value)


def _yaml(d: dict, indent: int = 0) -> str:
    """Block YAML for a dict of scalars, lists (written in flow style: JSON) and dicts."""
    lines = []
    for key, value in d.items():
        pad = " " * indent
        if isinstance(value, dict):
            lines.append(f"{pad}{key}:")
            lines.append(_yaml(value, indent + 2))
        elif isinstance(value, bool):
            lines.append(f"{pad}{key}: {'true' if value else 'false'}")
        elif isinstance(value, (int, float, list)):
            lines.append(f"{pad}{key}: {json.dumps(value)}")
        else:
            lines.append(f"{pad}{key}: {json.dumps(str(value))}")
    return "\n".join(lines)


def _read_yaml(text: str) -> dict:
    """The YAML :func:`_yaml` writes (and hand-edited files of that shape: ``key: value``
    lines nested by indentation, flow-style or JSON values, ``#`` comments) as a dict."""
    root: dict = {}
    stack: list[tuple[int, dict]] = [(-1, root)]
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split(" #", 1)[0].rstrip()
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        indent = len(line) - len(line.lstrip(" "))
        key, sep, value = line.strip().partition(":")
        if not sep or not key:
            raise ExportError(f"YAML line {number} is not 'key: value': {_short(line.strip())}")
        while indent <= stack[-1][0]:
            stack.pop()
        target = stack[-1][1]
        value = value.strip()
        if not value:
            target[key] = {}
            stack.append((indent, target[key]))
            continue
        lowered = value.lower()
        if lowered in ("true", "false"):
            target[key] = lowered == "true"
        elif lowered in ("null", "~"):
            target[key] = None
        else:
            try:
                target[key] = json.loads(value)
            except ValueError:
                try:
                    target[key] = ast.literal_eval(value)
                except (ValueError, SyntaxError, MemoryError, RecursionError):
                    target[key] = value.strip("'\"")
    return root


# ---------------------------------------------------------------------------- reading back
def read_settings(engine: str, source: str, profile=None) -> Tree:
    """The tree of engine settings given as text or as a file holding it: any format
    :func:`export_tree` writes (JSON, a Python literal or assignment, command-line flags,
    YAML), or a bare vLLM tree literal. Top-k knobs (SGLang, EAGLE, TensorRT-LLM's dynamic
    tree) need ``profile`` (:func:`from_eagle`)."""
    if engine not in EXPORT_ENGINES:
        raise ExportError(f"unknown engine {engine!r}; use one of {', '.join(EXPORT_ENGINES)}")
    text = _source_text(source)
    stripped = text.strip()
    if engine == "tensorrt-llm" and stripped and not stripped.startswith(("{", "[", "--")) \
            and "=" not in stripped.split("\n", 1)[0]:
        return from_trtllm(_read_yaml(text), profile)
    value = parse_settings(text)
    if engine == "vllm":
        if isinstance(value, dict) and "speculative_config" in value:
            value = value["speculative_config"]
        if isinstance(value, str):
            value = _literal(value, "speculative_config")
        return from_vllm(value)
    if engine == "tensorrt-llm":
        return from_trtllm(value, profile)
    if engine == "umbrella":
        return from_umbrella(value)
    if engine == "llama.cpp":
        return from_chain(value, engine)
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
    text = "\n".join(line for line in text.strip().splitlines()
                     if not line.lstrip().startswith("#")).strip()  # comment lines
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
    return quote(x, 60, plain=True)
