"""Size limits on everything treeopt reads or builds, the checks that enforce them, and safe
file writing. Defined once here; every loader, shape builder, search and command uses them.

Why a node cap. A tree is verified by ONE target forward over all its nodes: its attention
mask is (size, size) and its positions run up to the prefix length + depth, so the engine can
use only trees that fit one forward of the model; the exact DP costs O(size^2) per depth level
and rank, and a growmap stores a (size, size) int64 mask. Published trees have at most some
hundreds of nodes (Medusa/EAGLE's default: 64; Sequoia's budgets: up to 512); at 4096 nodes the
mask already has 16.8 M entries (128 MiB in a growmap, 64 MiB as the float32 additive mask of
one forward), checking such a growmap takes 0.2-2.5 s and the DP (8 ranks, 12 levels) about
1 s on 2 CPU cores. Past that nothing is gained (tokens per step saturate long before) while
memory and time grow quadratically (the old cap, 32768 nodes, meant an 8 GiB mask), so 4096
is the cap: big enough for any tree that can pay off, small enough that no request can
exhaust a machine.

Everything a file holds is checked against these limits BEFORE it is converted: tensors by
shape, element count and storage (``torch.load`` happily returns an "expanded" tensor whose
one stored value stands for 10^9 elements: converting that costs gigabytes while the file is
2 KB). Peak memory of reading a file therefore stays proportional to the file's real size.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

from treeopt.errors import TreeoptError, one_line

#: Most nodes (root included) of any tree treeopt builds, reads, searches or verifies; see
#: the module docstring for why 4096.
MAX_TREE_NODES = 4096
#: Most levels counting the root (a tree of MAX_TREE_NODES nodes has at most that many).
MAX_TREE_LEVELS = MAX_TREE_NODES
#: Most ranks an acceptance profile may hold: a node of a tree within the cap has at most
#: MAX_TREE_NODES - 1 children, so further ranks could never be used.
MAX_PROFILE_WIDTH = MAX_TREE_NODES - 1
#: Most per-depth rows, latency points or other entries of one profile list.
MAX_PROFILE_ROWS = MAX_TREE_NODES
#: Largest raw count (2^53: every count up to it is exact as a float, and no profiling run
#: comes near it).
MAX_COUNT = 1 << 53
#: Largest token count of a latency point (tokens processed at once; 16 M is beyond every
#: model's context window).
MAX_LATENCY_TOKENS = 1 << 24
#: The exact DP's budget: float64 cells kept (T tables) and (max,+) additions performed.
#: 2 GiB of tables, 3e10 additions (under a minute on 2 cores at ~8e8 per second; the
#: default 12 levels at the node cap need 7.4e8).
MAX_DP_BYTES = 2 << 30
MAX_DP_OPS = 30_000_000_000
#: Metadata (the growmap's ``treeopt`` dict): most values in all and deepest nesting.
MAX_META_ITEMS = 100_000
MAX_META_DEPTH = 64


class LimitError(TreeoptError, ValueError):
    """Fallback error class of the checks here; callers pass their own module's class."""


#: What the checks raise: an exception class, or any callable turning the one-line message
#: into an exception (e.g. one that prefixes the file name).
ErrorFactory = Callable[[str], BaseException]


def show_number(x: Any) -> str:
    """``x`` for an error message, never failing and never longer than ~30 characters
    (Python refuses to print integers of more than 4300 digits)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        text = repr(x)
        return text if len(text) <= 30 else text[:27] + "..."
    if isinstance(x, int) and x.bit_length() > 64:
        return f"about 10^{int(x.bit_length() * math.log10(2))}"
    return repr(x)


def check_nodes(n: Any, what: str, error: ErrorFactory = LimitError, *,
                limit: int = MAX_TREE_NODES) -> int:
    """Return ``n`` if it is an int within ``1..limit`` (the tree-node cap), else raise
    ``error`` with one line naming ``what``, the value and the limit. Works for any value:
    huge ints, ``inf``, ``nan``, strings."""
    if isinstance(n, bool) or not isinstance(n, int):
        if isinstance(n, float) and n.is_integer():
            n = int(n)
        else:
            raise error(f"{what} must be an integer, got {show_number(n)}")
    if n > limit:
        raise error(f"{what} = {show_number(n)} exceeds the limit of {limit} tree nodes "
                    "(MAX_TREE_NODES: the engine verifies every node in one forward)")
    return n


def check_width(width: Any, what: str, error: ErrorFactory = LimitError, *,
                vocab_size: int | None = None) -> int:
    """A profile width (ranks measured, the most children a node may have): an int in
    ``1..MAX_PROFILE_WIDTH`` and, where the vocabulary is known, at most ``vocab_size`` (a
    draft cannot propose more distinct tokens than it has)."""
    width = integer(width, what, error, minimum=1, maximum=MAX_PROFILE_WIDTH)
    if vocab_size is not None and width > vocab_size:
        raise error(f"{what} = {width} exceeds the vocabulary ({vocab_size} tokens): a draft "
                    "cannot propose more distinct tokens than it has")
    return width


def integer(x: Any, what: str, error: ErrorFactory = LimitError, *, minimum: int = 0,
            maximum: int | None = None) -> int:
    """``x`` as an int if it is an integer (an int, or an integral finite float such as JSON's
    ``8.0``) within ``minimum..maximum``; else one-line ``error``. Never overflows."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise error(f"{what} = {show_number(x)} must be an integer")
    if isinstance(x, float):
        if not math.isfinite(x) or not x.is_integer():
            raise error(f"{what} = {show_number(x)} must be an integer")
        x = int(x)
    if x < minimum:
        raise error(f"{what} = {show_number(x)} must be >= {minimum}")
    if maximum is not None and x > maximum:
        raise error(f"{what} = {show_number(x)} exceeds the limit {maximum}")
    return x


def check_tensor(t: Any, what: str, error: ErrorFactory = LimitError, *,
                 max_numel: int, shape: tuple[int, ...] | None = None,
                 ndim: int | None = None) -> None:
    """Check a tensor read from a file BEFORE anything converts it.

    Refuses, with one line naming ``what``: a non-tensor; a sparse or other non-strided
    layout; the wrong number of dimensions (``ndim``) or shape (``shape``); more than
    ``max_numel`` elements; and storage that does not really hold every element — expanded
    (a stride 0 over a dimension of size > 1), overlapping or otherwise non-contiguous
    layouts, or a storage smaller than ``numel * element_size``. Reading only metadata
    (shape, strides, storage size), it costs nothing whatever the tensor claims to be."""
    import torch

    if not isinstance(t, torch.Tensor):
        raise error(f"{what} must be a tensor, got {type(t).__name__}")
    if t.layout != torch.strided:
        raise error(f"{what} is a {t.layout} tensor; only dense tensors are read")
    dims = tuple(int(s) for s in t.shape)
    if ndim is not None and len(dims) != ndim:
        raise error(f"{what} must be {ndim}-D, got shape {dims}")
    if shape is not None and dims != tuple(shape):
        raise error(f"{what} has shape {dims}, expected {tuple(shape)}")
    numel = math.prod(dims)
    if numel > max_numel:
        raise error(f"{what} has {show_number(numel)} elements (shape {dims}), more than the "
                    f"limit {max_numel}")
    if any(stride == 0 and size > 1 for stride, size in zip(t.stride(), dims)):
        raise error(f"{what} is stored expanded (one stored value repeated, strides "
                    f"{tuple(t.stride())}); refused: save a contiguous tensor "
                    "(tensor.contiguous())")
    if not t.is_contiguous():
        raise error(f"{what} is not contiguous (strides {tuple(t.stride())}); refused: "
                    "save a contiguous tensor (tensor.contiguous())")
    try:
        stored = t.untyped_storage().nbytes() - t.storage_offset() * t.element_size()
    except (RuntimeError, NotImplementedError):  # pragma: no cover - storage-less tensors
        raise error(f"{what} has no readable storage") from None
    if stored < numel * t.element_size():
        raise error(f"{what} claims {numel} elements but its storage holds only "
                    f"{max(stored, 0) // max(t.element_size(), 1)}")


def check_plain(value: Any, what: str, error: ErrorFactory = LimitError, *,
                max_items: int = MAX_META_ITEMS, max_depth: int = MAX_META_DEPTH) -> None:
    """Check that ``value`` is plain data (None, bool, int, float, str, lists/tuples and
    dicts with str keys) of at most ``max_items`` values and ``max_depth`` levels, without
    recursion. A pickle can make one list appear a million times at no cost in bytes; this
    walk counts every appearance, so what passes is cheap to copy, print or save."""
    stack = [(value, 0)]
    seen = 0
    while stack:
        x, depth = stack.pop()
        seen += 1
        if seen > max_items:
            raise error(f"{what} holds more than {max_items} values; refused as too large")
        if x is None or isinstance(x, (bool, int, float, str)):
            continue
        if depth >= max_depth:
            raise error(f"{what} is nested more than {max_depth} levels deep; refused")
        if isinstance(x, (list, tuple)):
            stack.extend((v, depth + 1) for v in x)
        elif isinstance(x, dict):
            for k, v in x.items():
                if not isinstance(k, str):
                    raise error(f"{what} has a key of type {type(k).__name__}; keys must be "
                                "strings")
                stack.append((v, depth + 1))
        else:
            raise error(f"{what} holds a {type(x).__name__}; only plain values (str, int, "
                        "float, bool, None, lists and dicts of those) are allowed")


def read_json(path: str | Path, error: ErrorFactory = LimitError) -> Any:
    """``json.loads`` of a file, every failure a one-line ``error`` (message without the
    path: callers add it): invalid JSON or text, nesting too deep for the parser
    (RecursionError), integers too long to convert."""
    try:
        text = Path(path).read_text()
    except UnicodeDecodeError as exc:
        raise error(f"not valid JSON ({one_line(exc, 160)})") from None
    return parse_json(text, error)


def parse_json(text: str, error: ErrorFactory = LimitError) -> Any:
    """``json.loads(text)`` with every failure a one-line ``error`` (see :func:`read_json`)."""
    try:
        return json.loads(text)
    except RecursionError:
        raise error("not valid JSON: nested too deeply") from None
    except (json.JSONDecodeError, ValueError) as exc:  # ValueError: ints beyond 4300 digits
        raise error(f"not valid JSON ({one_line(exc, 160)})") from None


def positive_ints(text: str, what: str, example: str, error=ValueError, *,
                  sort: bool = True) -> list[int]:
    """The one parser of comma-separated integers >= 1 (``"1,2,4"`` -> [1, 2, 4]; sorted and
    unique with ``sort``, in the given order without). ``error(message)`` is raised naming
    ``what`` (e.g. "--tokens") and an ``example`` when the text is not such a list; numbers
    longer than 30 digits are refused before they are converted."""
    where = f"{what} " if what else ""
    parts = [x.strip() for x in str(text).split(",") if x.strip()]
    try:
        if any(len(x) > 30 for x in parts):
            raise ValueError
        values = [int(x) for x in parts]
    except ValueError:
        raise error(f"{where}{_short_text(text)!r} is not a comma-separated list of integers, "
                    f"e.g. {example}") from None
    if not values or min(values) < 1:
        raise error(f"{where}{_short_text(text)!r} needs integers >= 1, e.g. {example}")
    return sorted(set(values)) if sort else values


def _short_text(text: str, limit: int = 60) -> str:
    text = str(text)
    return text if len(text) <= limit else text[:limit - 3] + "..."


# ---------------------------------------------------------------------------- writing
def atomic_write(path: str | Path, write: Callable[[Any], None], *, binary: bool = True) -> Path:
    """Write a file so that an interruption never destroys the previous one: ``write(fh)``
    fills a temporary file in the same folder, which is flushed, fsync'ed and then renamed
    over ``path`` (``os.replace``, atomic on POSIX and Windows). On any failure the temporary
    file is removed and ``path`` is left as it was. The new file gets the old one's
    permissions, or the usual ones (0o666 minus the umask) for a new file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb" if binary else "w") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, _file_mode(path))
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(path.parent)
    return path


def _file_mode(path: Path) -> int:
    try:
        return path.stat().st_mode & 0o777
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (best effort: not every platform opens folders)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
