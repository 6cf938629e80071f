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
"""

from __future__ import annotations

import json
import math
import pickle
import warnings
from pathlib import Path
from typing import Any

import torch

from treeopt.tree import Tree, TreeError, ancestor_mask

REQUIRED_KEYS = ("roots", "branches", "Successors", "mask", "depth", "size")
META_KEY = "treeopt"
JSON_FORMAT = "treeopt-growmap"
JSON_VERSION = 1
MAX_SIZE = 1 << 15  # far beyond any useful tree; guards against absurd (hostile) sizes
_INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool)


class GrowmapError(ValueError):
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
    ``json_mask`` also writes the (derivable) mask into a JSON file."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".pt", ".pth", ".json"):
        raise GrowmapError(f"{path}: unknown growmap extension {path.suffix!r}; use .pt or .json")
    d = growmap_dict(tree, meta)
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".json":
        path.write_text(_to_json(d, json_mask))
    else:
        torch.save(d, path)
    return path


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
    dict that came from JSON, ``mask`` may be absent. ``source`` names the file in errors."""

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
    if isinstance(size, torch.Tensor) and size.dim() == 0 and not size.is_floating_point():
        size = int(size)
    if not _is_int(size):
        raise fail(f"'size' must be an int, got {type(size).__name__}")
    if not 1 <= size <= MAX_SIZE:
        raise fail(f"'size' = {size} is outside 1..{MAX_SIZE}")

    successors = _int_rows(d["Successors"], "Successors", fail)
    if len(successors) != size:
        raise fail(f"'Successors' has {len(successors)} rows but size is {size}")
    try:
        tree = Tree.from_successors(successors)
    except TreeError as exc:
        raise fail(f"bad 'Successors': {exc}") from None

    roots = _int_rows(d["roots"], "roots", fail)
    if not roots or roots[0] != [0]:
        raise fail(f"'roots[0]' must be [0] (the root), got {roots[0] if roots else 'nothing'}")
    branches = _int_rows(d["branches"], "branches", fail)
    if [len(r) for r in branches] != [len(r) for r in roots]:
        raise fail("'branches' and 'roots' have different shapes "
                   f"({[len(r) for r in branches]} vs {[len(r) for r in roots]})")
    levels = [list(level) for level in tree.levels]
    if roots != levels:
        level = next((i for i in range(max(len(roots), len(levels)))
                      if i >= len(roots) or i >= len(levels) or roots[i] != levels[i]), 0)
        got = roots[level] if level < len(roots) else "nothing"
        want = levels[level] if level < len(levels) else "nothing"
        raise fail(f"'roots[{level}]' = {got} but Successors put {want} at depth {level}")
    for i, level in enumerate(levels):
        for j, node in enumerate(level):
            if branches[i][j] != len(tree.children[node]):
                raise fail(f"'branches[{i}][{j}]' = {branches[i][j]} but node {node} has "
                           f"{len(tree.children[node])} children in Successors")

    depth = _int_vector(d["depth"], "depth", size, fail)
    if depth != list(tree.depths):
        node = next(i for i in range(size) if depth[i] != tree.depths[i])
        raise fail(f"'depth[{node}]' = {depth[node]} but node {node} is at depth "
                   f"{tree.depths[node]}")

    if "mask" in d:
        _check_mask(d["mask"], tree, fail)

    if META_KEY in d and d[META_KEY] is not None and not isinstance(d[META_KEY], dict):
        raise fail(f"'{META_KEY}' metadata must be a dict, got {type(d[META_KEY]).__name__}")
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
        raise GrowmapError(f"{path}: not a readable torch file ({_first_line(exc)})") from None
    except Exception as exc:  # truncated zip, empty file, garbage bytes, ...
        raise GrowmapError(f"{path}: not a readable torch file, truncated or corrupt "
                           f"({_first_line(exc)})") from None


def _read_json(path: Path) -> dict:
    try:
        d = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise GrowmapError(f"{path}: not valid JSON ({_first_line(exc)})") from None
    if not isinstance(d, dict):
        raise GrowmapError(f"{path}: expected a JSON object with growmap keys, "
                           f"got {type(d).__name__}")
    fmt = d.get("format", JSON_FORMAT)
    if fmt != JSON_FORMAT:
        raise GrowmapError(f"{path}: 'format' is {fmt!r}, expected {JSON_FORMAT!r}")
    version = d.get("version", JSON_VERSION)
    if version != JSON_VERSION:
        raise GrowmapError(f"{path}: unsupported growmap version {version!r} "
                           f"(this treeopt reads version {JSON_VERSION})")
    d["format"] = JSON_FORMAT
    return d


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    return line if len(line) <= 160 else line[:157] + "..."


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _int_rows(value: Any, key: str, fail) -> list[list[int]]:
    if not isinstance(value, (list, tuple)):
        raise fail(f"'{key}' must be a list of lists of ints, got {type(value).__name__}")
    rows = []
    for i, row in enumerate(value):
        if not isinstance(row, (list, tuple)):
            raise fail(f"'{key}[{i}]' must be a list of ints, got {type(row).__name__}")
        for j, x in enumerate(row):
            if not _is_int(x):
                raise fail(f"'{key}[{i}][{j}]' must be an int, got {type(x).__name__}")
        rows.append(list(row))
    return rows


def _int_vector(value: Any, key: str, size: int, fail) -> list[int]:
    if isinstance(value, torch.Tensor):
        if value.dtype not in _INT_DTYPES or value.dim() != 1:
            raise fail(f"'{key}' must be a 1-D integer tensor, got {value.dtype} "
                       f"with shape {tuple(value.shape)}")
        out = value.tolist()
    elif isinstance(value, (list, tuple)) and all(_is_int(x) for x in value):
        out = list(value)
    else:
        raise fail(f"'{key}' must be an int64 tensor or a list of ints, "
                   f"got {type(value).__name__}")
    if len(out) != size:
        raise fail(f"'{key}' has {len(out)} entries but size is {size}")
    return out


def _check_mask(value: Any, tree: Tree, fail) -> None:
    n = tree.size
    if isinstance(value, torch.Tensor):
        if value.dtype not in _INT_DTYPES:
            raise fail(f"'mask' must be an integer (int64) tensor, got {value.dtype}")
        mask = value
    elif isinstance(value, (list, tuple)):
        rows = _int_rows(value, "mask", fail)
        if any(len(r) != n for r in rows):
            raise fail(f"'mask' rows must all have {n} entries")
        mask = torch.tensor(rows, dtype=torch.int64) if rows else torch.zeros(0, n)
    else:
        raise fail(f"'mask' must be an int64 tensor, got {type(value).__name__}")
    if tuple(mask.shape) != (n, n):
        raise fail(f"'mask' has shape {tuple(mask.shape)}, expected ({n}, {n})")
    mask = mask.to(torch.int64)
    want = ancestor_mask(tree).to(torch.int64)
    if not torch.equal(mask, want):
        i, j = (mask != want).nonzero()[0].tolist()
        raise fail(f"'mask[{i}][{j}]' = {mask[i, j].item()} but should be {want[i, j].item()} "
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
