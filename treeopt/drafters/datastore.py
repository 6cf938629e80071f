"""Corpus drafters: propose what usually follows the current text in a fixed corpus.

A *datastore* (as in REST and SuffixDecoding) is an index over a tokenised corpus, built once
with ``treeopt datastore build`` and loaded in milliseconds. At every tree node the
:class:`DatastoreDrafter` looks up the longest suffix of the text so far (up to ``max_n``
tokens) that occurs in the corpus and proposes its most frequent continuations, after the
continuations found in the run's own text (prompt lookup). The :class:`BigramDrafter`
(CS-Drafting's statistical drafter) keeps only a next-token table: for each token, its most
frequent successors in the corpus. Neither runs a model, so a step costs microseconds of
drafting: on hardware where verifying 1-3 tokens costs about as much as verifying one, they
are the cheapest way to a speed-up on text that repeats a corpus (code, templates, boilerplate).

Index. The documents are concatenated, each preceded by the separator ``-1`` (so a match never
crosses documents) and followed by a final ``-1``. Every position ``i`` whose token and next
token are both real is one row; the rows are sorted by the context that *ends* at ``i`` read
backwards, ``(t[i], t[i-1], ..., t[i-max_n+1])``, cut at the document start with ``-1`` (which
sorts first). The rows whose context ends with a given suffix are therefore one contiguous
range, and the range of a suffix one token longer lies inside it: a look-up narrows the range
of the last token (a table) one token at a time by binary search, keeps the longest non-empty
range, and counts the next tokens ``t[i+1]`` of its rows (at most :data:`SCAN_CAP` rows, evenly
spaced, for very common contexts). Ties in frequency go to the smaller token id.

File format (version 1): one uncompressed ``.npz`` (numpy zip, loaded with
``allow_pickle=False``, so a file never runs code) holding

- ``tokens``: int32 (N,), the corpus with the ``-1`` separators described above;
- ``positions``: int32 (or int64 past 2**31 tokens) (R,), the sorted rows;
- ``meta``: a JSON string: ``format`` ("treeopt-datastore"), ``version``, ``max_n``,
  ``num_tokens`` and ``num_documents`` (corpus tokens and documents), ``description``,
  ``tokenizer`` (its ``name_or_path``), ``vocab_size`` (the tokenizer's vocabulary size),
  ``tokenizer_fingerprint`` (sha256 of its sorted ``(token, id)`` vocabulary items, or null
  for a store built from ids), ``created`` (UTC time).

Files are written through a temporary file in the same folder, fsynced, then renamed over the
destination: an interrupted build leaves the destination as it was.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import math
import os
import struct
import tempfile
import time
import zipfile
import zlib
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from treeopt.decode.drafter import (
    DEFAULT_CANDIDATE_SHAPE,
    Drafter,
    DrafterError,
    Proposal,
    proposal_from_paths,
    register_drafter,
    root_only,
)
from treeopt.drafters.ngram import NgramIndex
from treeopt.errors import TreeoptError, one_line
from treeopt.limits import MAX_VOCAB_SIZE, integer, parse_json, quote as _short, show_number
from treeopt.tree import Tree

FORMAT = "treeopt-datastore"
VERSION = 1
SEP = -1
DEFAULT_MAX_N = 8
# Rows scanned per look-up at most: a context seen 10**5 times is counted on an even sample.
SCAN_CAP = 4096
# A target's embedding may have a few more rows than its tokenizer has tokens (padding to a
# multiple of 64..1024); a larger difference means another tokenizer.
VOCAB_PAD_TOLERANCE = 1024
DEFAULT_SHAPE = DEFAULT_CANDIDATE_SHAPE  # a 4-node chain: 3 drafted tokens
BIGRAM_TOP = 8
# What numpy/zipfile raise on a file that is not a (complete, intact) npz.
_READ_ERRORS = (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile,
                NotImplementedError, zlib.error, struct.error, RuntimeError)
# Caps checked before anything is allocated (a hostile 50 KB file must not cost gigabytes).
MAX_MEMBERS = 8  # a datastore has 3 members
MAX_MEMBER_BYTES = 16 << 30  # largest array member (uncompressed): 4 G tokens
MAX_COMPRESSION_RATIO = 16  # token arrays deflate 2-4x; a ratio over 16 is a bomb
MAX_META_BYTES = 4 << 20  # metadata JSON, as a numpy UTF-32 string
MAX_MAX_N = 256  # longest context a look-up matches
MAX_STORE_TOKENS = (1 << 32) - 2
REBUILD = "rebuild it with `treeopt datastore build --tokenizer TARGET`"


class DatastoreError(TreeoptError, ValueError):
    """A datastore that cannot be built, read or used; the one-line message says what to do."""


# ---------------------------------------------------------------------------- tokenizers
def tokenizer_vocab(tokenizer) -> dict[str, int] | None:
    """The tokenizer's ``token -> id`` vocabulary (added tokens included), or None."""
    get = getattr(tokenizer, "get_vocab", None)
    vocab = get() if callable(get) else getattr(tokenizer, "vocab", None)
    return dict(vocab) if isinstance(vocab, dict) else None


def tokenizer_fingerprint(tokenizer) -> str | None:
    """sha256 of the sorted ``(token, id)`` vocabulary items: equal for tokenizers that map
    every token to the same id. None when the tokenizer exposes no vocabulary."""
    vocab = tokenizer_vocab(tokenizer)
    if vocab is None:
        return None
    items = sorted((str(t), int(i)) for t, i in vocab.items())
    return hashlib.sha256(json.dumps(items, ensure_ascii=False).encode("utf-8")).hexdigest()


def tokenizer_vocab_size(tokenizer) -> int | None:
    vocab = tokenizer_vocab(tokenizer)
    if vocab is not None:
        return max(len(vocab), max(vocab.values(), default=-1) + 1)
    try:
        return int(len(tokenizer))
    except TypeError:
        return None


def target_vocab_size(target) -> int | None:
    """Rows of the target's output embedding (or its config's ``vocab_size``)."""
    if target is None:
        return None
    get = getattr(target, "get_output_embeddings", None)
    emb = get() if callable(get) else None
    if emb is not None and getattr(emb, "weight", None) is not None:
        return int(emb.weight.shape[0])
    size = getattr(getattr(target, "config", None), "vocab_size", None)
    return int(size) if size else None


def _target_device(target):
    if target is None:
        return "cpu"
    try:
        return next(target.parameters()).device
    except (AttributeError, StopIteration):
        return getattr(target, "device", "cpu")


# ---------------------------------------------------------------------------- the index
class Datastore:
    """A sorted suffix index over a tokenised corpus (see the module docstring).

    Build one with :func:`build_datastore` (texts and a tokenizer) or
    :meth:`from_token_lists` (ids), save it with :meth:`save`, read it with
    :func:`load_datastore`. ``candidates(context, k)`` is the look-up drafters use.
    """

    def __init__(self, tokens: np.ndarray, positions: np.ndarray, meta: dict[str, Any]):
        self.tokens = np.ascontiguousarray(tokens, dtype=np.int32)
        pdtype = np.int32 if len(self.tokens) < 2**31 - 1 else np.int64
        self.positions = np.ascontiguousarray(positions, dtype=pdtype)
        self.meta = dict(meta)
        self.max_n = int(self.meta["max_n"])
        first = self.tokens[self.positions]
        top = int(first.max()) + 1 if len(first) else 0
        width = top  # token ids past the corpus' largest have no rows: look-ups check it
        counts = np.bincount(first, minlength=width) if len(first) else np.zeros(width, int)
        self._offsets = np.zeros(width + 1, dtype=np.int64)
        np.cumsum(counts, out=self._offsets[1:])
        # memoryviews give plain ints ~30 % faster than numpy scalar indexing: the binary
        # searches read one token per step.
        self._tok = memoryview(self.tokens)
        self._pos = memoryview(self.positions)
        self._off = memoryview(self._offsets)
        self._rows = range(len(self.positions))

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_token_lists(cls, docs: Iterable[Sequence[int]], max_n: int = DEFAULT_MAX_N,
                         meta: dict[str, Any] | None = None) -> "Datastore":
        """A store over token-id documents (matches never cross documents). ``meta`` adds to
        or overrides the metadata (e.g. ``tokenizer``, ``vocab_size``,
        ``tokenizer_fingerprint``, ``description``)."""
        max_n = int(max_n)
        if max_n < 1:
            raise DatastoreError(f"max_n must be at least 1, got {max_n}")
        parts: list[np.ndarray] = [np.array([SEP], dtype=np.int32)]
        n_docs = n_tokens = 0
        for doc in docs:
            arr = np.asarray(doc, dtype=np.int64).reshape(-1)
            if not len(arr):
                continue
            bad = arr[(arr < 0) | (arr >= 2**31 - 1)]
            if len(bad):
                raise DatastoreError(f"document {n_docs + 1} has token id {int(bad[0])}; ids "
                                     "must be in 0..2**31-2")
            parts.append(arr.astype(np.int32))
            parts.append(np.array([SEP], dtype=np.int32))
            n_docs += 1
            n_tokens += len(arr)
        if n_tokens == 0:
            raise DatastoreError("the corpus has no tokens; give a corpus with text in it")
        tokens = np.concatenate(parts)
        positions = _sorted_rows(tokens, max_n)
        full = {"format": FORMAT, "version": VERSION, "max_n": max_n, "num_tokens": n_tokens,
                "num_documents": n_docs, "description": "", "tokenizer": None,
                "vocab_size": int(tokens.max()) + 1, "tokenizer_fingerprint": None,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        full.update(meta or {})
        full["max_n"], full["num_tokens"], full["num_documents"] = max_n, n_tokens, n_docs
        full["format"], full["version"] = FORMAT, VERSION
        if full.get("vocab_size") is None:
            full["vocab_size"] = int(tokens.max()) + 1
        return cls(tokens, positions, full)

    # ------------------------------------------------------------------ properties
    @property
    def num_tokens(self) -> int:
        return int(self.meta["num_tokens"])

    @property
    def num_documents(self) -> int:
        return int(self.meta["num_documents"])

    @property
    def vocab_size(self) -> int:
        return int(self.meta.get("vocab_size") or (len(self._offsets) - 1))

    @property
    def max_token(self) -> int:
        return int(self.tokens.max())

    def __len__(self) -> int:
        return self.num_tokens

    def __repr__(self) -> str:
        return (f"Datastore({self.num_tokens} tokens, {self.num_documents} documents, "
                f"max_n={self.max_n}, tokenizer={self.meta.get('tokenizer')!r})")

    # ------------------------------------------------------------------ look-up
    def _range(self, context: Sequence[int]) -> tuple[int, int, int]:
        """(matched suffix length, lo, hi): the rows whose context ends with the longest
        suffix of ``context`` (at most ``max_n`` tokens) found in the corpus; (0, 0, 0) when
        not even the last token occurs (with a continuation)."""
        if not len(context):
            return 0, 0, 0
        last = int(context[-1])
        if not 0 <= last < len(self._off) - 1:
            return 0, 0, 0
        lo, hi = self._off[last], self._off[last + 1]
        if lo == hi:
            return 0, 0, 0
        tok, pos, rows = self._tok, self._pos, self._rows
        n = 1
        for j in range(1, min(self.max_n, len(context))):
            t = int(context[-1 - j])

            def key(m: int, j: int = j) -> int:
                return tok[pos[m] - j]

            if key(lo) == t and key(hi - 1) == t:  # the whole range continues with t
                n += 1
                continue
            new_lo = bisect.bisect_left(rows, t, lo, hi, key=key)
            if new_lo == hi or key(new_lo) != t:
                break
            hi = bisect.bisect_right(rows, t, new_lo, hi, key=key)
            lo = new_lo
            n += 1
        return n, lo, hi

    def match(self, context: Sequence[int]) -> tuple[int, int]:
        """(length of the longest suffix of ``context`` found, its occurrences with a
        continuation); (0, 0) when nothing matches."""
        n, lo, hi = self._range(context)
        return n, hi - lo

    def candidates(self, context: Sequence[int], k: int) -> list[int]:
        """The ``k`` most frequent distinct tokens that follow the longest suffix of
        ``context`` (at most ``max_n`` tokens) found in the corpus, most frequent first, ties
        to the smaller token id; [] when nothing matches. Counts come from at most
        :data:`SCAN_CAP` occurrences, evenly spaced over the sorted rows."""
        if k < 1:
            return []
        n, lo, hi = self._range(context)
        if n == 0:
            return []
        count = hi - lo
        if count == 1:
            return [self._tok[self._pos[lo] + 1]]
        if count > SCAN_CAP:
            rows = lo + (np.arange(SCAN_CAP, dtype=np.int64) * count) // SCAN_CAP
            nxt = self.tokens[self.positions[rows] + 1]
        else:
            nxt = self.tokens[self.positions[lo:hi] + 1]
        uniq, counts = np.unique(nxt, return_counts=True)
        if len(uniq) <= 1:
            return uniq.tolist()
        order = np.argsort(-counts, kind="stable")[:k]  # uniq is ascending: ties -> smaller id
        return uniq[order].tolist()

    def bigram_table(self, top: int = BIGRAM_TOP) -> np.ndarray:
        """(V, top) int32: row a = the ``top`` most frequent tokens that follow token a in the
        corpus (most frequent first, ties to the smaller id), padded with -1."""
        return bigram_table(self.tokens, self.vocab_size, top)

    # ------------------------------------------------------------------ files
    def save(self, path: str | os.PathLike) -> Path:
        """Write the store as one ``.npz`` atomically (temporary file, fsync, rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = json.dumps(self.meta, ensure_ascii=False, sort_keys=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                np.savez(fh, tokens=self.tokens, positions=self.positions, meta=np.array(meta))
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return path


def _sorted_rows(tokens: np.ndarray, max_n: int) -> np.ndarray:
    """Rows (positions with a real token and a real next token) sorted by their backward
    context ``t[i], t[i-1], ...`` cut with -1 at the document start (see the module doc)."""
    real = tokens >= 0
    pos = np.flatnonzero(real[:-1] & real[1:])
    keys = []
    alive = np.ones(len(pos), dtype=bool)
    for j in range(max_n):
        idx = pos - j  # >= 0: tokens[0] is a separator and pos >= 1
        col = tokens[np.maximum(idx, 0)]
        alive &= (idx >= 0) & (col >= 0)
        keys.append(np.where(alive, col, SEP).astype(np.int32))
    order = np.lexsort(keys[::-1])  # last key is primary: t[i] first, then t[i-1], ...
    dtype = np.int32 if len(tokens) < 2**31 - 1 else np.int64
    return pos[order].astype(dtype)


def bigram_table(tokens: np.ndarray, vocab_size: int, top: int = BIGRAM_TOP) -> np.ndarray:
    """Dense next-token table from a ``-1``-separated token array (see Datastore)."""
    top = int(top)
    if top < 1:
        raise DatastoreError(f"the bigram table needs top >= 1, got {top}")
    tokens = np.asarray(tokens, dtype=np.int64)
    width = max(int(vocab_size), int(tokens.max()) + 1 if len(tokens) else 0)
    table = np.full((width, top), -1, dtype=np.int32)
    a, b = tokens[:-1], tokens[1:]
    ok = (a >= 0) & (b >= 0)
    if not ok.any():
        return table
    pairs, counts = np.unique(a[ok] * width + b[ok], return_counts=True)
    first, second = pairs // width, pairs % width
    order = np.lexsort((second, -counts, first))  # by first, then count desc, then id asc
    first, second = first[order], second[order]
    starts = np.searchsorted(first, first, side="left")
    rank = np.arange(len(first)) - starts
    keep = rank < top
    table[first[keep], rank[keep]] = second[keep]
    return table


# ---------------------------------------------------------------------------- build / load
def build_datastore(texts: Iterable[str], tokenizer, *, max_n: int = DEFAULT_MAX_N,
                    progress: bool = True, description: str = "",
                    meta: dict[str, Any] | None = None) -> Datastore:
    """Tokenise each text (no special tokens) as one document and index them.

    ``description`` says what the corpus is (kept in the file's metadata); ``meta`` adds
    other metadata. An empty corpus raises DatastoreError. Sorting needs about
    ``4 * (max_n + 2)`` bytes of memory per token for a moment (2M tokens: ~4 s, ~80 MB).
    """
    texts = list(texts) if progress else texts
    if progress:
        import sys

        from tqdm.auto import tqdm

        texts = tqdm(texts, desc="tokenise", unit="doc", file=sys.stderr, dynamic_ncols=True)
    docs = (tokenizer.encode(t, add_special_tokens=False) for t in texts if t)
    full = {"description": description,
            "tokenizer": str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__),
            "vocab_size": tokenizer_vocab_size(tokenizer),
            "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer)}
    full.update(meta or {})
    return Datastore.from_token_lists(docs, max_n=max_n, meta=full)


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata of a datastore file, without reading its arrays (raises DatastoreError
    when the file is not a readable treeopt datastore)."""
    path = Path(path)
    with _open_npz(path) as zf:
        return _meta_of(zf, path)


def _open_npz(path: Path) -> zipfile.ZipFile:
    """The file as a zip archive whose members are all checked against the size caps (not
    yet read)."""
    if not path.exists():
        raise DatastoreError(f"{path}: no such datastore; build one with `treeopt datastore "
                             "build --corpus FILE --tokenizer TARGET --out PATH`")
    if path.is_dir():
        raise DatastoreError(f"{path}: is a folder, not a datastore file")
    try:
        zf = zipfile.ZipFile(path)
        infos = zf.infolist()
    except _READ_ERRORS as exc:
        if path.read_bytes()[:6] == b"\x93NUMPY":
            raise DatastoreError(f"{path}: a single numpy array, not a treeopt datastore; "
                                 f"{REBUILD}") from None
        raise DatastoreError(f"{path}: not a treeopt datastore, or truncated/corrupt "
                             f"({one_line(exc, 160)}); {REBUILD}") from None
    try:
        if len(infos) > MAX_MEMBERS:
            raise DatastoreError(f"{path}: {len(infos)} members, a datastore has 3; {REBUILD}")
        for info in infos:
            if info.file_size > MAX_MEMBER_BYTES:
                raise DatastoreError(
                    f"{path}: member {_short(info.filename)} declares "
                    f"{show_number(info.file_size)} bytes uncompressed, more than the limit "
                    f"{MAX_MEMBER_BYTES}; refused")
            if info.compress_type != zipfile.ZIP_STORED and \
                    info.file_size > MAX_COMPRESSION_RATIO * max(info.compress_size, 1024):
                raise DatastoreError(
                    f"{path}: member {_short(info.filename)} would decompress from "
                    f"{info.compress_size} to {info.file_size} bytes (ratio over "
                    f"{MAX_COMPRESSION_RATIO}); refused as a compression bomb")
    except BaseException:
        zf.close()
        raise
    return zf


def _read_array(zf: zipfile.ZipFile, name: str, path: Path, kinds: str, ndim: int
                ) -> np.ndarray:
    """Member ``name`` as an array, its ``.npy`` header checked BEFORE anything is
    allocated: dtype kind in ``kinds``, ``ndim`` dimensions, and exactly as many data bytes
    as the member holds. Memory: the member's real size, once."""
    try:
        info = zf.getinfo(name + ".npy")
    except KeyError:
        raise DatastoreError(f"{path}: datastore without {name!r}; {REBUILD}") from None
    try:
        with zf.open(info) as fh:
            version = np.lib.format.read_magic(fh)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            if version not in ((1, 0), (2, 0)):
                raise ValueError(f".npy format version {version}")
            shape, fortran, dtype = read_header(fh)
            if dtype.kind not in kinds or dtype.hasobject or len(shape) != ndim:
                raise DatastoreError(f"{path}: datastore member {name!r} has dtype {dtype} and "
                                     f"shape {shape}; {REBUILD}")
            count = math.prod(int(d) for d in shape)
            nbytes = count * dtype.itemsize
            if nbytes != info.file_size - fh.tell():
                raise DatastoreError(
                    f"{path}: datastore member {name!r} declares {show_number(count)} elements "
                    f"({show_number(nbytes)} bytes) but holds {info.file_size - fh.tell()} "
                    f"bytes; refused as corrupt")
            data = fh.read(nbytes)
    except DatastoreError:
        raise
    except _READ_ERRORS + (zipfile.LargeZipFile,) as exc:
        raise DatastoreError(f"{path}: truncated or corrupt datastore member {name!r} "
                             f"({one_line(exc, 160)}); {REBUILD}") from None
    if len(data) != nbytes:
        raise DatastoreError(f"{path}: truncated datastore member {name!r}; {REBUILD}")
    return np.frombuffer(data, dtype=dtype).reshape(shape, order="F" if fortran else "C")


def _meta_of(zf: zipfile.ZipFile, path: Path) -> dict[str, Any]:
    if "meta.npy" not in zf.namelist():
        raise DatastoreError(f"{path}: not a treeopt datastore (no metadata); {REBUILD}")
    info = zf.getinfo("meta.npy")
    if info.file_size > MAX_META_BYTES:
        raise DatastoreError(f"{path}: datastore metadata of {show_number(info.file_size)} "
                             f"bytes, more than the limit {MAX_META_BYTES}; {REBUILD}")
    text = str(_read_array(zf, "meta", path, "U", 0)[()])
    # parse_json: invalid, too deeply nested or too-long-number JSON is one line, never a
    # RecursionError or a traceback.
    meta = parse_json(text, lambda msg: DatastoreError(
        f"{path}: unreadable metadata, {msg}; {REBUILD}"))
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        fmt = meta.get("format") if isinstance(meta, dict) else None
        raise DatastoreError(f"{path}: not a treeopt datastore (format {_short(fmt)}); "
                             f"{REBUILD}")
    version = meta.get("version")
    if version != VERSION or isinstance(version, bool):
        raise DatastoreError(f"{path}: datastore format version {_short(version)}, this "
                             f"treeopt reads version {VERSION}; {REBUILD}")

    def error(msg: str) -> DatastoreError:
        return DatastoreError(f"{path}: datastore metadata {msg}; {REBUILD}")

    for key in ("max_n", "num_tokens", "num_documents"):
        if key not in meta:
            raise error(f"lacks {key}")
    meta["max_n"] = integer(meta["max_n"], "max_n", error, minimum=1, maximum=MAX_MAX_N)
    meta["num_tokens"] = integer(meta["num_tokens"], "num_tokens", error, minimum=1,
                                 maximum=MAX_STORE_TOKENS)
    meta["num_documents"] = integer(meta["num_documents"], "num_documents", error,
                                    minimum=1, maximum=meta["num_tokens"])
    if meta.get("vocab_size") is not None:
        meta["vocab_size"] = integer(meta["vocab_size"], "vocab_size", error, minimum=1,
                                     maximum=MAX_VOCAB_SIZE)
    for key in ("tokenizer", "tokenizer_fingerprint", "description", "created",
                "tokenizer_spec"):
        if meta.get(key) is not None and not isinstance(meta[key], str):
            raise error(f"{key} = {_short(meta[key])} must be a string")
    return meta


def load_datastore(path: str | os.PathLike, tokenizer=None,
                   vocab_size: int | None = None) -> Datastore:
    """Read a datastore file and check it.

    ``tokenizer``: the target's tokenizer; a store built with another one (different
    vocabulary fingerprint or size) is refused. ``vocab_size``: the target's vocabulary size
    (its output-embedding rows); every token must fit and the store's tokenizer size must be
    within :data:`VOCAB_PAD_TOLERANCE` of it. Every problem raises DatastoreError with a
    one-line message. Hostile files cost no more memory than they really hold: every
    metadata number and array header is checked against the caps (``MAX_*``) and against
    the arrays present before anything is allocated.
    """
    path = Path(path)
    with _open_npz(path) as zf:
        meta = _meta_of(zf, path)
        tokens = _read_array(zf, "tokens", path, "i", 1)
        positions = _read_array(zf, "positions", path, "i", 1)
    if tokens.dtype != np.int32 or positions.dtype not in (np.int32, np.int64):
        raise DatastoreError(f"{path}: datastore arrays of the wrong type or shape; {REBUILD}")
    n = len(tokens)
    if n < 2 or tokens[0] != SEP or tokens[-1] != SEP or int(tokens.min()) < SEP:
        raise DatastoreError(f"{path}: corrupt datastore (bad token array); {REBUILD}")
    if len(positions) and (int(positions.min()) < 1 or int(positions.max()) > n - 2):
        raise DatastoreError(f"{path}: corrupt datastore (row outside the corpus); {REBUILD}")
    real = int(np.count_nonzero(tokens >= 0))
    if real != meta["num_tokens"]:
        raise DatastoreError(f"{path}: corrupt datastore ({real} tokens, metadata says "
                             f"num_tokens {meta['num_tokens']}); {REBUILD}")
    docs = n - real - 1
    if docs != meta["num_documents"]:
        raise DatastoreError(f"{path}: corrupt datastore ({docs} documents, metadata says "
                             f"num_documents {meta['num_documents']}); {REBUILD}")
    if len(positions) != real - docs:
        raise DatastoreError(f"{path}: corrupt datastore ({len(positions)} rows for {real} "
                             f"tokens in {docs} documents); {REBUILD}")
    top = int(tokens.max())
    if top >= MAX_VOCAB_SIZE:
        raise DatastoreError(f"{path}: token id {top} exceeds the vocabulary limit "
                             f"{MAX_VOCAB_SIZE}; {REBUILD}")
    if meta.get("vocab_size") is not None and top >= meta["vocab_size"]:
        raise DatastoreError(f"{path}: corrupt datastore (token id {top}, metadata says "
                             f"vocab_size {meta['vocab_size']}); {REBUILD}")
    store = Datastore(tokens, positions, meta)
    check_compatible(store, tokenizer=tokenizer, vocab_size=vocab_size, where=str(path))
    return store


def check_compatible(store: Datastore, *, tokenizer=None, vocab_size: int | None = None,
                     where: str = "datastore") -> None:
    """Raise DatastoreError when ``store`` was built for another tokenizer than
    ``tokenizer`` / a vocabulary of ``vocab_size`` (see :func:`load_datastore`)."""
    built = store.meta.get("tokenizer") or "token ids"
    if tokenizer is not None:
        want_fp = tokenizer_fingerprint(tokenizer)
        have_fp = store.meta.get("tokenizer_fingerprint")
        want_v = tokenizer_vocab_size(tokenizer)
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        if want_fp and have_fp and want_fp != have_fp:
            raise DatastoreError(f"{where}: built with tokenizer {built!r} (vocabulary "
                                 f"{store.vocab_size}), not the target's {name!r} (vocabulary "
                                 f"{want_v}): its ids mean other text; {REBUILD}")
        if want_v is not None and store.max_token >= want_v:
            raise DatastoreError(f"{where}: datastore token id {store.max_token} is outside "
                                 f"the target tokenizer {_short(name)}'s vocabulary of "
                                 f"{want_v} tokens (built with {_short(built)}); {REBUILD}")
        if want_v is not None and have_fp and store.vocab_size != want_v:
            raise DatastoreError(f"{where}: built with tokenizer {built!r} (vocabulary "
                                 f"{store.vocab_size}), the target's {name!r} has {want_v} "
                                 f"tokens; {REBUILD}")
    if vocab_size is not None:
        vocab_size = int(vocab_size)
        if store.max_token >= vocab_size:
            raise DatastoreError(f"{where}: datastore token id {store.max_token} is outside "
                                 f"the target's vocabulary of {vocab_size} entries (built "
                                 f"with {_short(built)}); {REBUILD}")
        if abs(store.vocab_size - vocab_size) > VOCAB_PAD_TOLERANCE:
            raise DatastoreError(f"{where}: built with tokenizer {built!r} (vocabulary "
                                 f"{store.vocab_size}), the target's vocabulary has "
                                 f"{vocab_size} entries; {REBUILD}")


def _load_for(options: str, target, tokenizer, drafter: str) -> Datastore:
    path = options.strip()
    if not path:
        raise DrafterError(f"drafter {drafter!r} needs a datastore file: {drafter}:PATH "
                           "(build one with `treeopt datastore build`)")
    return load_datastore(os.path.expanduser(path), tokenizer=tokenizer,
                          vocab_size=target_vocab_size(target))


# ---------------------------------------------------------------------------- drafters
def _ints(seq: Sequence[int]) -> list[int]:
    if hasattr(seq, "tolist"):
        return [int(x) for x in seq.tolist()]
    return [int(x) for x in seq]


class DatastoreDrafter(Drafter):
    """REST-style retrieval drafter: at each node of ``shape``, the run's own n-gram
    continuations (prompt + generated text, via :class:`~treeopt.drafters.ngram.NgramIndex`)
    first, then the datastore's most frequent continuations of the longest matching suffix,
    distinct, at most ``k`` per node. Nodes without a candidate are dropped."""

    name = "datastore"

    def __init__(self, store: Datastore, shape: Tree | None = None, k: int | None = None,
                 device="cpu", ngram_max_n: int = 4):

        self.store = store
        self.shape = shape if shape is not None else DEFAULT_SHAPE
        if k is not None and int(k) < 1:
            raise DrafterError(f"drafter 'datastore': k must be at least 1, got {k}")
        self._k = int(k) if k is not None else None
        self.device = device
        self.index = NgramIndex(min_n=1, max_n=ngram_max_n)
        self._tail = max(store.max_n, ngram_max_n)
        self._seen = 0  # committed tokens indexed
        self._last: int | None = None  # the last of them

    @property
    def k(self) -> int:
        """Candidates per node: as given, else the shape's width."""
        return self._k if self._k is not None else max(1, self.shape.width)

    def reshaped(self, shape: Tree) -> "DatastoreDrafter":
        """A copy filling ``shape``: the store is shared, the run's own index is not."""

        new = super().reshaped(shape)
        new.index = NgramIndex(self.index.min_n, self.index.max_n)
        new._seen, new._last = 0, None
        return new

    def check(self, target) -> None:
        size = target_vocab_size(target)
        if size is not None and self.store.max_token >= size:
            raise DrafterError(f"datastore has token id {self.store.max_token}, outside the "
                               f"target's vocabulary of {size}; {REBUILD}")

    def start(self, prompt_ids) -> None:
        if hasattr(prompt_ids, "device"):
            self.device = prompt_ids.device
        self.index.reset()
        self._seen, self._last = 0, None
        self._sync(_ints(prompt_ids.reshape(-1) if hasattr(prompt_ids, "reshape")
                         else prompt_ids))

    def _sync(self, committed: Sequence[int]) -> None:
        """Index the committed tokens not indexed yet; a sequence that is not an extension
        of the indexed one (a new text without ``start``) is indexed afresh."""
        seen = self._seen
        if len(committed) < seen or (seen and int(committed[seen - 1]) != self._last):
            self.index.reset()
            seen = self._seen = 0
        if len(committed) > seen:
            new = _ints(committed[seen:])
            self.index.extend(new)
            self._seen = len(committed)
            self._last = new[-1]

    def children(self, context: list[int]) -> list[int]:
        """Ranked distinct candidates after ``context``: the run's own, then the corpus'."""
        k = self.k
        out = list(dict.fromkeys(int(t) for t in self.index.candidates(context, k)))[:k]
        if len(out) < k:
            for t in self.store.candidates(context, k + len(out)):
                if t not in out:
                    out.append(t)
                    if len(out) == k:
                        break
        return out

    def path_candidates(self, committed: Sequence[int]):
        """``children(path)``: the ranked candidates after ``committed`` + ``path`` (drafted
        tokens below the root), as ``propose`` fills its shape; indexes ``committed``
        first. Cascades (``treeopt.drafters.cascade``) draft through it."""
        if hasattr(committed, "tolist"):
            committed = committed.reshape(-1).tolist()
        self._sync(committed)
        tail = _ints(committed[-self._tail:])
        return lambda path: self.children(tail + list(path))

    def propose(self, committed, max_depth, sampling=None, generator=None) -> Proposal:
        if hasattr(committed, "tolist"):
            committed = committed.reshape(-1).tolist()
        self._sync(committed)
        if max_depth < 1:
            return root_only(committed, self.device)
        tail = _ints(committed[-self._tail:])
        return proposal_from_paths(committed, lambda path: self.children(tail + list(path)),
                                   self.shape, max_depth, self.device)


class BigramDrafter(Drafter):
    """CS-Drafting's statistical drafter: every node of ``shape`` gets the top-k corpus
    successors of its parent's token (a dense (V, top) next-token table)."""

    name = "bigram"

    def __init__(self, table: np.ndarray, shape: Tree | None = None, k: int | None = None,
                 device="cpu"):
        self.table = np.asarray(table, dtype=np.int32)
        if self.table.ndim != 2 or self.table.shape[1] < 1:
            raise DrafterError("bigram table must be (V, top) with top >= 1")
        self.shape = shape if shape is not None else DEFAULT_SHAPE
        if k is not None and int(k) < 1:
            raise DrafterError(f"drafter 'bigram': k must be at least 1, got {k}")
        self._k = int(k) if k is not None else None
        self.device = device
        self._rows = [None] * len(self.table)  # per-token successor lists, filled lazily

    @property
    def k(self) -> int:
        """Candidates per node: as given, else the shape's width; at most the table's."""
        k = self._k if self._k is not None else max(1, self.shape.width)
        return min(k, self.table.shape[1])

    @classmethod
    def from_datastore(cls, store: Datastore, shape: Tree | None = None, k: int | None = None,
                       device="cpu", top: int = BIGRAM_TOP) -> "BigramDrafter":
        width = shape.width if shape is not None else DEFAULT_SHAPE.width
        # Rows up to the largest token the corpus holds (later tokens have no successors):
        # memory follows the file, not the vocabulary size its metadata declares.
        table = bigram_table(store.tokens, store.max_token + 1, max(top, k or 0, width))
        return cls(table, shape, k, device)

    def check(self, target) -> None:
        size = target_vocab_size(target)
        if size is not None and int(self.table.max()) >= size:
            raise DrafterError(f"bigram table has token id {int(self.table.max())}, outside "
                               f"the target's vocabulary of {size}; {REBUILD}")

    def start(self, prompt_ids) -> None:
        if hasattr(prompt_ids, "device"):
            self.device = prompt_ids.device

    def next_tokens(self, token: int) -> list[int]:
        if not 0 <= token < len(self.table):
            return []
        row = self._rows[token]
        if row is None:
            row = [int(t) for t in self.table[token] if t >= 0]
            self._rows[token] = row
        return row[: self.k]

    def path_candidates(self, committed: Sequence[int]):
        """``children(path)``: the top-k successors of the path's last token (of the root
        when the path is empty), as ``propose`` fills its shape. Cascades draft through
        it."""
        last = int(committed[-1])
        return lambda path: self.next_tokens(int(path[-1]) if path else last)

    def propose(self, committed, max_depth, sampling=None, generator=None) -> Proposal:
        if max_depth < 1:
            return root_only(committed, self.device)
        last = int(committed[-1])
        return proposal_from_paths(
            committed, lambda path: self.next_tokens(int(path[-1]) if path else last),
            self.shape, max_depth, self.device)


@register_drafter("datastore", "most frequent continuations in a corpus index built by "
                  "`treeopt datastore build` plus the text so far (datastore:PATH)",
                  takes_path=True)
def _datastore_factory(options, *, target, tokenizer, tree):
    store = _load_for(options, target, tokenizer, "datastore")
    return DatastoreDrafter(store, shape=tree, device=_target_device(target))


@register_drafter("bigram", "top next tokens of each token in a corpus (CS-Drafting's "
                  "statistical draft; bigram:PATH of a `treeopt datastore build` file)",
                  takes_path=True)
def _bigram_factory(options, *, target, tokenizer, tree):
    store = _load_for(options, target, tokenizer, "bigram")
    return BigramDrafter.from_datastore(store, shape=tree, device=_target_device(target))


__all__ = ["BigramDrafter", "Datastore", "DatastoreDrafter", "DatastoreError", "SCAN_CAP",
           "bigram_table", "build_datastore", "check_compatible", "load_datastore",
           "read_meta", "target_vocab_size", "tokenizer_fingerprint"]
