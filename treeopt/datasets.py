"""Evaluation prompts: the shipped benchmarks, users' own files, and Hugging Face datasets.

``load_prompts(spec, categories=None, n=None, seed=0, turns="first")`` returns a list of
:class:`Prompt`. ``spec`` is one of

- ``"spec_bench"``: Spec-Bench, 480 prompts in 13 categories (shipped, Apache-2.0);
- ``"mt_bench"``: MT-Bench = Spec-Bench's first 80 prompts, 8 categories, two turns each;
- ``"humaneval"``: HumanEval's 164 code prompts (shipped, MIT), category ``"humaneval"``;
- a path: ``.jsonl`` / ``.jsonl.gz`` (FastChat questions with ``turns``, or objects with a
  ``prompt`` or ``text`` field), ``.json`` (a list of such objects), or any other file read as
  text (one prompt per line, or consecutive continuation windows over the whole file with
  ``window=`` characters or tokens);
- ``"hf:NAME[:split]"``: a Hugging Face dataset via the optional ``datasets`` package.

A bad file raises :class:`DatasetError` naming the file and the line.
"""

from __future__ import annotations

import gzip
import json
import random
import zlib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Sequence

from treeopt.errors import TreeoptError, one_line
from treeopt.limits import MAX_DATASET_BYTES

SHIPPED = ("spec_bench", "mt_bench", "humaneval")
MT_BENCH_SIZE = 80
TEXT_FIELDS = ("prompt", "text")
HF_TEXT_FIELDS = ("turns", "prompt", "text", "question", "instruction", "input", "content")


class DatasetError(TreeoptError, ValueError):
    """A dataset that cannot be read; the one-line message names the file and the line."""


@dataclass(frozen=True)
class Prompt:
    """One evaluation prompt.

    id:        unique within its dataset (``question_id``, ``task_id`` or the line number).
    category:  the dataset's category, or the file's stem where it has none.
    text:      the first (or only) user turn.
    turns:     every user turn to run, in order (``(text,)`` for single-turn prompts).
    token_ids: the prompt already tokenised (token-window prompts), else None.
    """

    id: str
    category: str
    text: str
    turns: tuple[str, ...] = ()
    token_ids: tuple[int, ...] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "id", str(self.id))
        object.__setattr__(self, "turns", tuple(self.turns) or (self.text,))


def load_prompts(spec: str | Path, categories: Sequence[str] | str | None = None,
                 n: int | None = None, seed: int = 0, turns: str = "first", *,
                 window: int | None = None, window_unit: str = "chars",
                 tokenizer: Any = None) -> list[Prompt]:
    """Load prompts and select some.

    categories: keep only these (a list, or a comma-separated string); unknown names raise.
    n, seed:    keep ``n`` prompts drawn deterministically with ``seed``; when several
                categories are present the draw is stratified (as equal a share per category
                as their sizes allow). Dataset order is kept. ``n=None`` keeps all.
    turns:      ``"first"`` (one user turn per prompt) or ``"both"`` (every turn, for
                multi-turn data such as MT-Bench).
    window, window_unit, tokenizer: for text files, cut the whole file into consecutive
                windows of ``window`` characters (``window_unit="chars"``) or tokens
                (``"tokens"``, needs ``tokenizer`` with ``encode``/``decode``) instead of
                taking one prompt per line.
    """
    if turns not in ("first", "both"):
        raise DatasetError(f"turns must be 'first' or 'both', got {turns!r}")
    if window_unit not in ("chars", "tokens"):
        raise DatasetError(f"window unit must be 'chars' or 'tokens', got {window_unit!r}")
    spec_s = str(spec)
    if spec_s in SHIPPED:
        prompts = _load_shipped(spec_s)
    elif spec_s.startswith("hf:"):
        prompts = _load_hf(spec_s)
    else:
        prompts = _load_file(Path(spec_s), window, window_unit, tokenizer)
    if turns == "first":
        prompts = [Prompt(p.id, p.category, p.text, (p.text,), p.token_ids) for p in prompts]
    return select(prompts, categories=categories, n=n, seed=seed, source=spec_s)


def list_categories(prompts: Iterable[Prompt]) -> list[str]:
    """Categories in order of first appearance."""
    return list(dict.fromkeys(p.category for p in prompts))


def select(prompts: list[Prompt], categories: Sequence[str] | str | None = None,
           n: int | None = None, seed: int = 0, source: str = "dataset",
           order: str = "dataset") -> list[Prompt]:
    """Filter by category and draw ``n`` prompts, stratified across categories.

    The draw is one fixed sequence per (prompts, seed): each category's prompts shuffled with
    ``seed``, then taken round-robin over the categories (equal shares, leftovers to the
    categories with more prompts); ``n`` prompts are its first ``n``. ``order="dataset"``
    (default) returns them in dataset order; ``order="draw"`` in draw order, which is
    prefix-stable: the first k of a draw of n are the draw of k (what a resumed run that
    asks for more prompts needs). Both orders select the same prompts."""
    if order not in ("dataset", "draw"):
        raise DatasetError(f"order must be 'dataset' or 'draw', got {order!r}")
    if isinstance(categories, str):
        categories = [c.strip() for c in categories.split(",") if c.strip()]
    if categories:
        known = list_categories(prompts)
        unknown = [c for c in categories if c not in known]
        if unknown:
            raise DatasetError(f"{source}: unknown category {unknown[0]!r}; "
                               f"available: {', '.join(known)}")
        wanted = set(categories)
        prompts = [p for p in prompts if p.category in wanted]
    if n is not None and n < 1 and n < len(prompts):
        raise DatasetError(f"number of prompts must be at least 1, got {n}")
    if order == "dataset" and (n is None or n >= len(prompts)):
        return list(prompts)
    chosen = _draw(prompts, len(prompts) if n is None else min(n, len(prompts)), seed)
    if order == "dataset":
        chosen = sorted(chosen)
    return [prompts[i] for i in chosen]


def _draw(prompts: list[Prompt], n: int, seed: int) -> list[int]:
    """Indices of the first ``n`` prompts of the stratified draw, in draw order."""
    rng = random.Random(seed)
    by_cat: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        by_cat.setdefault(p.category, []).append(i)
    for idx in by_cat.values():
        rng.shuffle(idx)
    # Round-robin over categories: equal shares, leftovers go to categories with more prompts.
    chosen: list[int] = []
    pos = {c: 0 for c in by_cat}
    while len(chosen) < n:
        for c, idx in by_cat.items():
            if len(chosen) < n and pos[c] < len(idx):
                chosen.append(idx[pos[c]])
                pos[c] += 1
    return chosen


# ---------------------------------------------------------------------------- shipped data
def _data_file(*parts: str):
    return resources.files("treeopt").joinpath("data", *parts)


def _load_shipped(name: str) -> list[Prompt]:
    if name == "humaneval":
        res = _data_file("humaneval", "HumanEval.jsonl.gz")
        with resources.as_file(res) as path:
            return _load_jsonl(path, "humaneval")
    res = _data_file("spec_bench", "question.jsonl")
    with resources.as_file(res) as path:
        prompts = _load_jsonl(path, "spec_bench")
    return prompts[:MT_BENCH_SIZE] if name == "mt_bench" else prompts


# ---------------------------------------------------------------------------- files
def _load_file(path: Path, window: int | None, unit: str, tokenizer: Any) -> list[Prompt]:
    if not path.exists():
        raise DatasetError(f"{path}: no such file; give spec_bench, mt_bench, humaneval, "
                           "hf:NAME or a .jsonl/.json/.txt path")
    if path.is_dir():
        raise DatasetError(f"{path}: is a folder; give a .jsonl, .json or text file")
    name = path.name.lower()
    if window is not None and (name.endswith(".jsonl") or name.endswith(".jsonl.gz")
                               or name.endswith(".json")):
        raise DatasetError(f"{path}: windows apply to plain text files, not JSON")
    if name.endswith(".jsonl") or name.endswith(".jsonl.gz"):
        return _load_jsonl(path, _stem(path))
    if name.endswith(".json"):
        return _load_json_list(path, _stem(path))
    return _load_text(path, _stem(path), window, unit, tokenizer)


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".jsonl.gz", ".jsonl", ".json", ".txt", ".gz"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def _read_lines(path: Path) -> list[str]:
    """Decoded lines of a (possibly gzipped) UTF-8 file; errors name the line."""
    try:
        if path.name.lower().endswith(".gz"):
            with gzip.open(path, "rb") as fh:
                raw = fh.read(MAX_DATASET_BYTES + 1)  # a gzip bomb stops at the cap
        else:
            if path.stat().st_size > MAX_DATASET_BYTES:
                raise DatasetError(f"{path}: {path.stat().st_size} bytes, more than the limit "
                                   f"of {MAX_DATASET_BYTES} for a data set file; refused")
            with open(path, "rb") as fh:
                raw = fh.read(MAX_DATASET_BYTES + 1)
    except (OSError, EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise DatasetError(f"{path}: cannot read ({one_line(exc, 160)})") from None
    if len(raw) > MAX_DATASET_BYTES:
        raise DatasetError(f"{path}: more than the limit of {MAX_DATASET_BYTES} bytes "
                           "(uncompressed) for a data set file; refused")
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    lines = []
    for lineno, chunk in enumerate(raw.split(b"\n"), start=1):
        try:
            lines.append(chunk.decode("utf-8").rstrip("\r"))
        except UnicodeDecodeError as exc:
            raise DatasetError(f"{path}:{lineno}: not valid UTF-8 (byte {exc.start + 1} of "
                               "the line); re-save the file as UTF-8") from None
    return lines


def _where(exc: json.JSONDecodeError) -> str:
    """``"Unterminated string starting at column 2"``: json's message (some end in "at",
    naming the position themselves) and the column."""
    msg = exc.msg[:-3] if exc.msg.endswith(" at") else exc.msg
    return f"{msg} at column {exc.colno}"


def _load_jsonl(path: Path, default_category: str) -> list[Prompt]:
    prompts = []
    for lineno, line in enumerate(_read_lines(path), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{path}:{lineno}: invalid JSON ({_where(exc)})") from None
        prompts.append(_record(obj, f"{path}:{lineno}", str(lineno), default_category,
                               TEXT_FIELDS))
    if not prompts:
        raise DatasetError(f"{path}: no prompts (the file is empty)")
    _check_unique(prompts, path)
    return prompts


def _load_json_list(path: Path, default_category: str) -> list[Prompt]:
    text = "\n".join(_read_lines(path))
    if not text.strip():
        raise DatasetError(f"{path}: no prompts (the file is empty)")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{path}:{exc.lineno}: invalid JSON ({_where(exc)})") from None
    if isinstance(data, dict):
        data = data.get("prompts", data.get("data"))
    if not isinstance(data, list):
        raise DatasetError(f"{path}: expected a JSON list of prompt objects "
                           "(or a .jsonl file with one object per line)")
    if not data:
        raise DatasetError(f"{path}: no prompts (the list is empty)")
    prompts = [_record(obj, f"{path}: item {i}", str(i), default_category, TEXT_FIELDS)
               for i, obj in enumerate(data, start=1)]
    _check_unique(prompts, path)
    return prompts


def _record(obj: Any, where: str, default_id: str, default_category: str,
            fields: Sequence[str]) -> Prompt:
    if isinstance(obj, str):
        obj = {"text": obj}
    if not isinstance(obj, dict):
        raise DatasetError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    pid = next((obj[k] for k in ("question_id", "task_id", "id") if obj.get(k) is not None),
               default_id)
    category = obj.get("category") or default_category
    if not isinstance(category, str):
        raise DatasetError(f"{where}: 'category' must be a string")
    if "turns" in obj:
        turns = obj["turns"]
        if isinstance(turns, str):
            turns = [turns]
        if (not isinstance(turns, list) or not turns
                or not all(isinstance(t, str) and t.strip() for t in turns)):
            raise DatasetError(f"{where}: 'turns' must be a non-empty list of non-empty "
                               "strings")
        return Prompt(str(pid), category, turns[0], tuple(turns))
    for key in fields:
        if key in obj:
            text = obj[key]
            if not isinstance(text, str) or not text.strip():
                raise DatasetError(f"{where}: field {key!r} must be a non-empty string")
            return Prompt(str(pid), category, text)
    raise DatasetError(f"{where}: no 'turns', {', '.join(repr(f) for f in fields[:-1])} "
                       f"or {fields[-1]!r} field (keys: {', '.join(sorted(obj)) or 'none'})")


def _check_unique(prompts: list[Prompt], path: Path) -> None:
    seen: set[str] = set()
    for p in prompts:
        if p.id in seen:
            raise DatasetError(f"{path}: prompt id {p.id!r} appears twice; ids must be unique")
        seen.add(p.id)


def _load_text(path: Path, category: str, window: int | None, unit: str,
               tokenizer: Any) -> list[Prompt]:
    lines = _read_lines(path)
    if window is None:
        prompts = [Prompt(str(i), category, line.strip())
                   for i, line in enumerate(lines, start=1) if line.strip()]
        if not prompts:
            raise DatasetError(f"{path}: no prompts (the file is empty)")
        return prompts
    if window < 1:
        raise DatasetError(f"window must be at least 1 {unit}, got {window}")
    corpus = "\n".join(lines)
    if not corpus.strip():
        raise DatasetError(f"{path}: no prompts (the file is empty)")
    prompts = []
    if unit == "chars":
        for k in range(len(corpus) // window):
            start = k * window
            prompts.append(Prompt(f"w{k + 1}@{start}", category, corpus[start:start + window]))
        size = len(corpus)
    else:
        if tokenizer is None:
            raise DatasetError("token windows need a tokenizer; use character windows or "
                               "pass the model's tokenizer")
        ids = list(tokenizer.encode(corpus, add_special_tokens=False))
        for k in range(len(ids) // window):
            chunk = tuple(int(t) for t in ids[k * window:(k + 1) * window])
            prompts.append(Prompt(f"w{k + 1}@{k * window}", category,
                                  tokenizer.decode(list(chunk)), token_ids=chunk))
        size = len(ids)
    if not prompts:
        raise DatasetError(f"{path}: the text has {size} {unit}, fewer than one window of "
                           f"{window}; use a smaller --window")
    return prompts


# ---------------------------------------------------------------------------- Hugging Face
def _load_hf(spec: str) -> list[Prompt]:
    rest = spec[3:]
    name, _, split = rest.partition(":")
    if not name:
        raise DatasetError("hf: needs a dataset name, e.g. hf:openai/openai_humaneval:test")
    try:
        import datasets  # noqa: PLC0415  (optional dependency)
    except ImportError:
        raise DatasetError(f"{spec}: needs the 'datasets' package (pip install datasets) and "
                           "network access; or use a shipped dataset or a local file") from None
    try:
        ds = datasets.load_dataset(name, split=split or "train")
    except Exception as exc:  # offline, unknown name, bad split: all one line for the user
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DatasetError(f"{spec}: cannot load from the Hugging Face hub ({msg}); offline "
                           "runs need a shipped dataset or a local file") from None
    prompts = [_record(dict(row), f"{spec}: row {i}", str(i), name.split("/")[-1],
                       HF_TEXT_FIELDS[1:]) for i, row in enumerate(ds, start=1)]
    if not prompts:
        raise DatasetError(f"{spec}: the split is empty")
    return prompts


def held_out_prompts(dataset: str, profile_meta: dict, n: int, seed: int = 0,
                     categories: str | None = None):
    """``n`` prompts of ``dataset`` that a profile measured with the same dataset did not use
    (its selection is rebuilt from the settings in its meta), drawn with ``seed``."""

    every = load_prompts(dataset, categories=categories)
    meta = profile_meta or {}
    settings = meta.get("settings", {})
    used: set[str] = set()
    if settings.get("dataset") == str(dataset) and meta.get("prompts_total"):
        used = {p.id for p in load_prompts(dataset, categories=categories,
                                           n=meta["prompts_total"],
                                           seed=settings.get("seed", 0))}
    rest = [p for p in every if p.id not in used]
    return select(rest, n=n, seed=seed + 1, source=str(dataset))


def split_prompts(dataset: str, n_profile: int, n_eval: int, seed: int = 0,
                  categories: str | None = None):
    """Two disjoint prompt sets: (``n_profile`` to profile on, ``n_eval`` to evaluate on)."""

    first = load_prompts(dataset, categories=categories, n=n_profile, seed=seed)
    used = {p.id for p in first}
    rest = [p for p in load_prompts(dataset, categories=categories) if p.id not in used]
    return first, select(rest, n=n_eval, seed=seed + 1, source=str(dataset))
