"""Growmap files: a tree shape on disk, in Sequoia's format (``.pt``) or as JSON (``.json``).

A growmap is a dict (Sequoia's verifier reads the first six keys; it ignores the others):

=============  ===========================  ===================================================
key            type                         meaning
=============  ===========================  ===================================================
roots          list[list[int]]              node ids at each depth (``roots[0] == [0]``; one
                                            list per level, the leaf-only last level included)
branches       list[list[int]]              number of children of each node of ``roots``
Successors     list[list[int]], size rows   child ids of each node, in sibling-rank order
mask           int64 tensor (size, size)    1 where column j is an ancestor of row i or j == i
depth          int64 tensor (size,)         depth of each node, root 0
size           int                          node count including the root
treeopt        dict of plain values         our metadata (profile, expected tokens, budget...)
=============  ===========================  ===================================================

Loading never unpickles code (``torch.load(weights_only=True)``) and checks every invariant,
so a broken, truncated, inconsistent or hostile file gives a one-line :class:`GrowmapError`
naming the file and the problem. In JSON the mask may be omitted (it is derived from the
shape) and ``depth``/``mask`` are plain lists.

Sizes are checked before anything is converted (``treeopt.limits``): ``size`` is at most
``MAX_TREE_NODES``; tensors must match it in shape and really store every element (an
"expanded" tensor, one stored value repeated, is refused); lists are counted before they are
copied, and the metadata must be plain values of bounded size. Reading a file therefore never
needs much more memory than the file's own size.

Writing is atomic (a temporary file in the same folder, fsync'ed, then renamed over the
target), so an interrupted write leaves the previous file intact, and an existing file is
only ever replaced by a growmap if it is a growmap itself (or empty).
"""

from __future__ import annotations

import json
import math
import pickle
import warnings
from pathlib import Path
from typing import Any

import torch

from treeopt.errors import TreeoptError, one_line
from treeopt.limits import (
    MAX_TREE_NODES,
    atomic_write,
    check_plain,
    check_tensor,
    parse_json,
    show_number,
)
from treeopt.tree import Tree, TreeError, ancestor_mask

REQUIRED_KEYS = ("roots", "branches", "Successors", "mask", "depth", "size")
META_KEY = "treeopt"
JSON_FORMAT = "treeopt-growmap"
JSON_VERSION = 1
MAX_SIZE = MAX_TREE_NODES  # the one tree-size cap (treeopt.limits)
SUFFIXES = (".pt", ".pth", ".json")
_INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool)


class GrowmapError(TreeoptError, ValueError):
    """A growmap file or dict that cannot be read or breaks an invariant (one-line message)."""


def growmap_dict(tree: Tree, meta: dict | None = None) -> dict:
    """Sequoia's growmap dict for ``tree`` plus ``meta`` (plain JSON-like values) under
    the ``"treeopt"`` key. ``mask`` is an int64 (size, size) tensor, ``depth`` int64 (size,)."""
    d = tree.to_growmap()
    if meta:
        d[META_KEY] = _plain_meta(meta, "meta")
    return d


def save_growmap(tree: Tree, path: str | Path, meta: dict | None = None, *,
                 json_mask: bool = False) -> Path:
    """Write ``tree`` to ``path``: ``.pt`` (``torch.save``, Sequoia-compatible) or ``.json``.

    ``meta`` is stored under ``"treeopt"``; its values must be plain (str, int, float, bool,
    None, lists and dicts of those) so that ``weights_only`` loading can read it back.
    ``json_mask`` also writes the (derivable) mask into a JSON file.

    The write is atomic (see the module docstring) and refuses, with a :class:`GrowmapError`,
    to replace an existing file that is not a growmap (:func:`check_writable`)."""
    path = check_writable(path)
    if tree.size > MAX_TREE_NODES:
        raise GrowmapError(f"{path}: the tree has {tree.size} nodes, more than the limit of "
                           f"{MAX_TREE_NODES} (MAX_TREE_NODES)")
    d = growmap_dict(tree, meta)
    if path.suffix.lower() == ".json":
        text = _to_json(d, json_mask)
        atomic_write(path, lambda fh: fh.write(text), binary=False)
    else:
        atomic_write(path, lambda fh: torch.save(d, fh))
    return path


def check_writable(path: str | Path) -> Path:
    """Check, before any work, that a growmap may be written to ``path``: a known extension,
    not a folder, and no existing file of another kind (a profile, a picture, anything that
    is not a growmap) in the way; an existing growmap or an empty file may be replaced.
    Returns ``path`` as a Path; raises a one-line :class:`GrowmapError` otherwise."""
    path = Path(path)
    if path.suffix.lower() not in SUFFIXES:
        raise GrowmapError(f"{path}: unknown growmap extension {path.suffix!r}; use .pt or .json")
    if path.is_dir():
        raise GrowmapError(f"{path}: is a folder, not a growmap file")
    if path.exists() and path.stat().st_size > 0:
        kind = file_kind(path)
        if kind != "growmap":
            raise GrowmapError(f"{path}: refusing to overwrite {kind} with a growmap; "
                               "choose another output path or remove the file")
    return path


def file_kind(path: str | Path) -> str:
    """What an existing file holds, for overwrite checks: ``"growmap"``, or a description for
    an error message (``"a 'treeopt-profile' file"``, ``"a tensor file (such as a Sequoia
    acceptance vector)"``, ``"a file that is not a growmap"``...). Only the top-level
    structure is looked at (a growmap is a dict with Sequoia's keys, or treeopt's growmap
    JSON); the file is never modified."""
    path = Path(path)
    try:
        if path.suffix.lower() == ".json" or _looks_like_json(path):
            d = parse_json(path.read_text(), GrowmapError)
        else:
            d = _read_torch(path)
    except (GrowmapError, OSError, UnicodeDecodeError):
        return "a file that is not a readable growmap"
    if isinstance(d, dict):
        if d.get("format") == JSON_FORMAT or all(k in d for k in REQUIRED_KEYS) or (
                "format" not in d and all(k in d for k in REQUIRED_KEYS if k != "mask")):
            return "growmap"
        if isinstance(d.get("format"), str):
            return f"a {d['format']!r} file"
    if isinstance(d, torch.Tensor) and d.dim() == 1:
        return "a tensor file (such as a Sequoia acceptance vector)"
    return "a file that is not a growmap"


def _looks_like_json(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            head = fh.read(64).lstrip()
    except OSError:
        return False
    return head[:1] in (b"{", b"[")


def load_growmap(path: str | Path) -> tuple[Tree, dict]:
    """Read and fully validate a growmap file; returns ``(tree, meta)`` where ``meta`` is the
    ``"treeopt"`` dict ({} for files written by Sequoia)."""
    path = Path(path)
    if not path.is_file():
        raise GrowmapError(f"{path}: no such growmap file")
    if path.suffix.lower() == ".json":
        d = _read_json(path)
    else:
        d = _read_torch(path)
    tree = validate_growmap(d, source=str(path))
    return tree, dict(d.get(META_KEY) or {})


def validate_growmap(d: Any, source: str = "growmap") -> Tree:
    """Check every invariant of a growmap dict and return its :class:`Tree`.

    ``mask`` and ``depth`` may be tensors (as in ``.pt`` files) or nested lists (JSON); in a
    dict that came from JSON, ``mask`` may be absent. ``source`` names the file in errors.

    Order matters for hostile input: ``size`` is checked against the cap first, then every
    tensor's shape, element count and storage and every list's length against ``size``, all
    before anything is converted or copied; masks are compared as booleans."""

    def fail(msg: str) -> GrowmapError:
        return GrowmapError(f"{source}: {msg}")

    if not isinstance(d, dict):
        raise fail(f"expected a dict with keys {', '.join(REQUIRED_KEYS)}, "
                   f"got {type(d).__name__}")
    from_json = d.get("format") == JSON_FORMAT
    required = [k for k in REQUIRED_KEYS if not (from_json and k == "mask")]
    missing = [k for k in required if k not in d]
    if missing:
        raise fail(f"missing key(s) {', '.join(repr(k) for k in missing)}; "
                   "not a growmap (Sequoia format)")

    size = d["size"]
    if isinstance(size, torch.Tensor):
        check_tensor(size, "'size'", fail, max_numel=1)
        if size.dim() == 0 and not size.is_floating_point() and size.dtype != torch.bool:
            size = int(size)
    if not _is_int(size):
        raise fail(f"'size' must be an int, got {type(size).__name__}")
    if size < 1:
        raise fail(f"'size' = {size} is outside 1..{MAX_TREE_NODES}")
    if size > MAX_TREE_NODES:
        raise fail(f"'size' = {show_number(size)} is outside 1..{MAX_TREE_NODES}: more nodes "
                   f"than the limit of {MAX_TREE_NODES} (MAX_TREE_NODES: the engine verifies "
                   "every node in one forward)")

    # Lengths and tensors (shape, element count, storage) before any conversion.
    if isinstance(d["Successors"], (list, tuple)) and len(d["Successors"]) != size:
        raise fail(f"'Successors' has {len(d['Successors'])} rows but size is {size}")
    if isinstance(d["depth"], torch.Tensor):
        _check_int_tensor(d["depth"], "'depth'", (size,), fail)
    if isinstance(d.get("mask"), torch.Tensor):
        _check_int_tensor(d["mask"], "'mask'", (size, size), fail)
    if META_KEY in d and d[META_KEY] is not None:
        if not isinstance(d[META_KEY], dict):
            raise fail(f"'{META_KEY}' metadata must be a dict, got {type(d[META_KEY]).__name__}")
        check_plain(d[META_KEY], f"'{META_KEY}' metadata", fail)

    successors = _int_rows(d["Successors"], "Successors", fail, rows=size, total=size - 1)
    try:
        tree = Tree.from_successors(successors)
    except TreeError as exc:
        raise fail(f"bad 'Successors': {exc}") from None

    roots = _int_rows(d["roots"], "roots", fail, total=size)
    if not roots or roots[0] != [0]:
        raise fail(f"'roots[0]' must be [0] (the root), got {roots[0] if roots else 'nothing'}")
    branches = _int_rows(d["branches"], "branches", fail, total=size)
    if [len(r) for r in branches] != [len(r) for r in roots]:
        raise fail("'branches' and 'roots' have different shapes "
                   f"({_shape(branches)} vs {_shape(roots)})")
    levels = [list(level) for level in tree.levels]
    if roots != levels:
        level = next((i for i in range(max(len(roots), len(levels)))
                      if i >= len(roots) or i >= len(levels) or roots[i] != levels[i]), 0)
        got = _short(roots[level]) if level < len(roots) else "nothing"
        want = _short(levels[level]) if level < len(levels) else "nothing"
        raise fail(f"'roots[{level}]' = {got} but Successors put {want} at depth {level}")
    for i, level in enumerate(levels):
        for j, node in enumerate(level):
            if branches[i][j] != len(tree.children[node]):
                raise fail(f"'branches[{i}][{j}]' = {show_number(branches[i][j])} but node "
                           f"{node} has {len(tree.children[node])} children in Successors")

    depth = _int_vector(d["depth"], "depth", size, fail)
    if depth != list(tree.depths):
        node = next(i for i in range(size) if depth[i] != tree.depths[i])
        raise fail(f"'depth[{node}]' = {show_number(depth[node])} but node {node} is at depth "
                   f"{tree.depths[node]}")

    if "mask" in d:
        _check_mask(d["mask"], tree, fail)
    return tree


# ---------------------------------------------------------------------------- reading
def _read_torch(path: Path) -> Any:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc).lower()
        if "unsupported global" in text or "unsupported class" in text:
            raise GrowmapError(f"{path}: refused to load: the file holds objects other than "
                               "plain data and tensors (possibly code); a growmap never does"
                               ) from None
        if "weights only" in text:
            raise GrowmapError(f"{path}: refused to load: not a torch-saved growmap (corrupt "
                               "bytes, or a raw pickle the safe loader cannot read)") from None
        raise GrowmapError(f"{path}: not a readable torch file ({one_line(exc, 160)})") from None
    except Exception as exc:  # truncated zip, empty file, garbage bytes, ...
        raise GrowmapError(f"{path}: not a readable torch file, truncated or corrupt "
                           f"({one_line(exc, 160)})") from None


def _read_json(path: Path) -> dict:
    try:
        text = path.read_text()
    except UnicodeDecodeError as exc:
        raise GrowmapError(f"{path}: not valid JSON ({one_line(exc, 160)})") from None
    d = parse_json(text, lambda msg: GrowmapError(f"{path}: {msg}"))
    if not isinstance(d, dict):
        raise GrowmapError(f"{path}: expected a JSON object with growmap keys, "
                           f"got {type(d).__name__}")
    fmt = d.get("format", JSON_FORMAT)
    if fmt == "treeopt-treeset":  # treeopt.treeset: one tree per context range
        raise GrowmapError(f"{path}: a tree set (one tree per context range), not a growmap; "
                           "decoding (generate, eval --tree) takes it, other commands need "
                           "one growmap (treeopt search --context N writes the tree for N)")
    if fmt != JSON_FORMAT:
        raise GrowmapError(f"{path}: 'format' is {fmt!r}, expected {JSON_FORMAT!r}")
    version = d.get("version", JSON_VERSION)
    if version != JSON_VERSION:
        raise GrowmapError(f"{path}: unsupported growmap version {version!r} "
                           f"(this treeopt reads version {JSON_VERSION})")
    d["format"] = JSON_FORMAT
    return d


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _int_rows(value: Any, key: str, fail, *, total: int, rows: int | None = None
              ) -> list[list[int]]:
    """A list of lists of ints, copied only after its lengths are checked: exactly ``rows``
    rows when given (else at most ``total``) and at most ``total`` ints in all. (A pickle can
    repeat one long list any number of times at no cost in bytes; counting first keeps the
    copy as small as the limits.)"""
    if not isinstance(value, (list, tuple)):
        raise fail(f"'{key}' must be a list of lists of ints, got {type(value).__name__}")
    if rows is not None and len(value) != rows:
        raise fail(f"'{key}' has {len(value)} rows but size is {rows}")
    if rows is None and len(value) > total:
        raise fail(f"'{key}' has {len(value)} rows, more than the {total} nodes of the tree")
    count = 0
    for i, row in enumerate(value):
        if not isinstance(row, (list, tuple)):
            raise fail(f"'{key}[{i}]' must be a list of ints, got {type(row).__name__}")
        count += len(row)
        if count > total:
            raise fail(f"'{key}' holds more than {total} node ids in all; a tree of this size "
                       "has fewer")
    out = []
    for i, row in enumerate(value):
        for j, x in enumerate(row):
            if not _is_int(x):
                raise fail(f"'{key}[{i}][{j}]' must be an int, got {type(x).__name__}")
        out.append(list(row))
    return out


def _shape(rows: list[list[int]]) -> str:
    return _short([len(r) for r in rows])


def _short(values: list) -> str:
    """A list for an error message, cut after 12 entries."""
    if len(values) <= 12:
        return str([show_number(v) if isinstance(v, int) else v for v in values]
                   ).replace("'", "")
    return "[" + ", ".join(str(v) for v in values[:12]) + f", ... ({len(values)} in all)]"


def _check_int_tensor(t: torch.Tensor, what: str, shape: tuple[int, ...], fail) -> None:
    """Dtype, shape, element count and storage of a growmap tensor, before any conversion."""
    if t.dtype not in _INT_DTYPES:
        if what == "'mask'":
            raise fail(f"'mask' must be an integer (int64) tensor, got {t.dtype}")
        raise fail(f"{what} must be a 1-D integer tensor, got {t.dtype} "
                   f"with shape {tuple(t.shape)}")
    if t.dim() != len(shape):
        if what == "'depth'":
            raise fail(f"'depth' must be a 1-D integer tensor, got {t.dtype} "
                       f"with shape {tuple(t.shape)}")
        raise fail(f"{what} has shape {tuple(t.shape)}, expected {shape}")
    if tuple(t.shape) != shape:
        if what == "'depth'":
            raise fail(f"'depth' has {show_number(t.numel())} entries but size is {shape[0]}")
        raise fail(f"{what} has shape {tuple(t.shape)}, expected {shape}")
    check_tensor(t, what, fail, max_numel=MAX_TREE_NODES * MAX_TREE_NODES, shape=shape)


def _int_vector(value: Any, key: str, size: int, fail) -> list[int]:
    if isinstance(value, torch.Tensor):
        _check_int_tensor(value, f"'{key}'", (size,), fail)  # before .tolist()
        return value.tolist()
    if not isinstance(value, (list, tuple)):
        raise fail(f"'{key}' must be an int64 tensor or a list of ints, "
                   f"got {type(value).__name__}")
    if len(value) != size:
        raise fail(f"'{key}' has {len(value)} entries but size is {size}")
    if not all(_is_int(x) for x in value):
        raise fail(f"'{key}' must be an int64 tensor or a list of ints, "
                   f"got {type(value).__name__}")
    return list(value)


def _check_mask(value: Any, tree: Tree, fail) -> None:
    """The mask must be 1 exactly where the column is an ancestor of the row or the row
    itself, 0 elsewhere. Compared as booleans (no int64 copy of an (n, n) tensor), the first
    wrong entry (row-major) is found by row, without listing every wrong entry."""
    n = tree.size
    want = ancestor_mask(tree)  # (n, n) bool
    if isinstance(value, torch.Tensor):
        _check_int_tensor(value, "'mask'", (n, n), fail)
        if value.dtype == torch.bool:
            wrong = value ^ want
        else:
            wrong = (value != 0) ^ want
            wrong |= (value != 0) & (value != 1)
        if not bool(wrong.any()):
            return
        i = int(wrong.any(dim=1).to(torch.uint8).argmax())
        j = int(wrong[i].to(torch.uint8).argmax())
        got = int(value[i, j])
    elif isinstance(value, (list, tuple)):
        if len(value) != n:
            raise fail(f"'mask' has shape ({len(value)}, ...), expected ({n}, {n})")
        if any(not isinstance(r, (list, tuple)) or len(r) != n for r in value):
            raise fail(f"'mask' rows must all have {n} entries")
        for i, row in enumerate(value):  # row by row: memory O(n), not O(n^2)
            want_row = want[i].to(torch.int64).tolist()
            if list(row) == want_row and set(map(type, row)) <= {int}:
                continue
            for j, x in enumerate(row):
                if not _is_int(x):
                    raise fail(f"'mask[{i}][{j}]' must be an int, got {type(x).__name__}")
                if x != want_row[j]:
                    got = x
                    break
            break
        else:
            return
    else:
        raise fail(f"'mask' must be an int64 tensor, got {type(value).__name__}")
    raise fail(f"'mask[{i}][{j}]' = {show_number(got)} but should be {int(want[i, j])} "
               "(mask must be 1 exactly where the column is an ancestor of the row or "
               "itself)")


# ---------------------------------------------------------------------------- writing
def _plain_meta(meta: Any, where: str) -> Any:
    """Check that ``meta`` is JSON-like (so weights_only loading can read it); tuples become
    lists."""
    if meta is None or isinstance(meta, (str, bool, int)):
        return meta
    if isinstance(meta, float):
        return meta
    if isinstance(meta, (list, tuple)):
        return [_plain_meta(x, f"{where}[{i}]") for i, x in enumerate(meta)]
    if isinstance(meta, dict):
        out = {}
        for k, v in meta.items():
            if not isinstance(k, str):
                raise GrowmapError(f"{where} key {k!r} must be a string")
            out[k] = _plain_meta(v, f"{where}.{k}")
        return out
    if hasattr(meta, "item") and getattr(meta, "ndim", 1) == 0:  # numpy / torch scalar
        return _plain_meta(meta.item(), where)
    raise GrowmapError(f"{where} holds a {type(meta).__name__}; metadata must be plain "
                       "(str, int, float, bool, None, lists and dicts of those)")


def _to_json(d: dict, with_mask: bool) -> str:
    """Readable, diff-friendly JSON: one key per line, each level/row on one line."""

    def dump(x: Any) -> str:
        return json.dumps(x, separators=(", ", ": "))

    def rows(x: list) -> str:
        return "[\n    " + ",\n    ".join(dump(r) for r in x) + "\n  ]"

    def finite(x: Any) -> Any:
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, list):
            return [finite(v) for v in x]
        if isinstance(x, dict):
            return {k: finite(v) for k, v in x.items()}
        return x

    parts = [f'  "format": {dump(JSON_FORMAT)}', f'  "version": {JSON_VERSION}',
             f'  "size": {d["size"]}', f'  "roots": {rows(d["roots"])}',
             f'  "branches": {rows(d["branches"])}', f'  "Successors": {rows(d["Successors"])}',
             f'  "depth": {dump(d["depth"].tolist())}']
    if with_mask:
        parts.append(f'  "mask": {rows(d["mask"].tolist())}')
    if META_KEY in d:
        parts.append(f'  "{META_KEY}": {dump(finite(d[META_KEY]))}')
    return "{\n" + ",\n".join(parts) + "\n}\n"
