"""The results folder of ``treeopt eval``: one writer at a time, files replaced atomically,
and a resume that continues exactly the run recorded there.

- ``locked(out)``: an exclusive lock on ``out/.lock`` (``fcntl.flock``; ``msvcrt`` on
  Windows) held for the whole run; a second run on the same folder fails at once with one
  line naming the folder. The operating system drops the lock when the process ends, however
  it ends, so a crashed run never leaves the folder locked.
- ``atomic_write(path, text)``: a temporary file beside ``path``, flushed and fsync'ed, then
  ``os.replace``: a reader (or a crash) sees the old file or the new one, never a mixture or
  a truncated file.
- ``resume_difference(old, new)``: the first recorded setting of the run in the folder that
  this run changes, as words for a one-line error (None when they agree).
- ``read_rows(path)``: the per-prompt rows written so far, one per (prompt, turn, method).
"""

from __future__ import annotations

import errno
import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from treeopt.evaluate.errors import EvalError
from treeopt.limits import MAX_RESULTS_BYTES, atomic_write as _atomic, quote, read_text

LOCK_FILE = ".lock"


# ---------------------------------------------------------------------------- the lock
def _try_lock(fh) -> bool | None:
    """True: locked; False: another process holds the lock; None: this file system cannot
    lock files (the run goes on unlocked, with a warning)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        import msvcrt

        try:
            fh.seek(0)
            msvcrt.locking(fh.fileno(), msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except (BlockingIOError, PermissionError):
        return False
    except OSError as exc:
        if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
            return None
        raise


def _unlock(fh) -> None:
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        import msvcrt

        fh.seek(0)
        msvcrt.locking(fh.fileno(), msvcrt.LK_UNLCK, 1)
        return
    fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


@contextmanager
def locked(out: Path) -> Iterator[None]:
    """Hold the exclusive lock of the results folder ``out`` (which must exist) while the
    block runs; EvalError when another run holds it."""
    path = Path(out) / LOCK_FILE
    try:
        fh = open(path, "a+", encoding="utf-8")
    except OSError as exc:
        raise EvalError(f"{out}: cannot create the lock file {LOCK_FILE} "
                        f"({exc.strerror or exc})") from None
    try:
        state = _try_lock(fh)
        if state is False:
            raise EvalError(f"{out} is in use by another treeopt eval run (it holds "
                            f"{path}); wait for it to finish or choose another --out")
        if state is None:
            print(f"treeopt eval: warning: {out}: this file system cannot lock files; make "
                  "sure no other run writes to this folder", file=sys.stderr)
            yield
            return
        try:
            fh.seek(0)
            fh.truncate()
            fh.write(f"pid {os.getpid()}\n")
            fh.flush()
            yield
        finally:
            _unlock(fh)
    finally:
        fh.close()


# ---------------------------------------------------------------------------- atomic files
def atomic_write(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` (UTF-8) atomically: temporary file, fsync, rename
    (``treeopt.limits.atomic_write``)."""

    data = text.encode("utf-8")
    _atomic(path, lambda fh: fh.write(data))


def append_rows(path: Path, rows: list[dict]) -> None:
    """Append rows to a JSONL file and make them durable (one prompt's rows at a time)."""
    with open(path, "a", encoding="utf-8") as fh:
        fh.write("".join(json.dumps(r) + "\n" for r in rows))
        fh.flush()
        os.fsync(fh.fileno())


def row_key(row: dict) -> tuple:
    """What makes a row unique: (prompt, turn, method)."""
    return (row.get("prompt_key"), row.get("turn"), row.get("method"))


def read_rows(path: Path) -> list[dict]:
    """The rows of a JSONL file, one per (prompt, turn, method) (the last one written wins),
    in the order first written. Lines cut short by an interruption, and lines that are not
    rows, are skipped."""
    if not Path(path).exists():
        return []
    rows: dict[tuple, dict] = {}
    data = read_text(path, lambda msg: EvalError(f"{path}: {msg}"), max_bytes=MAX_RESULTS_BYTES,
                     errors="replace")
    for line in data.splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by the interruption: that prompt is redone
        if not isinstance(row, dict) or "prompt_key" not in row or "method" not in row:
            continue
        rows[row_key(row)] = row
    return list(rows.values())


# ---------------------------------------------------------------------------- resume
SETTING_WORDS = {"target": "target model", "draft": "default drafter (--draft)",
                 "dataset": "dataset"}


def _short(v: Any, limit: int = 60) -> str:
    return quote(v, limit)


def resume_difference(old: dict, new: dict) -> str | None:
    """The first setting recorded in ``old`` (a run.json) that ``new`` changes, in words;
    None when this run may continue that one.

    Compared: the target, the default drafter and the dataset; every decoding setting (the
    config: new tokens, sampling, seed, rule, ...); the methods; and the prompts: every
    prompt of the earlier run must still be selected, with the same content (a longer
    selection that keeps them all is allowed: the new prompts are run). Settings a run.json
    predates (absent from ``old``) are not compared; neither are the threading settings,
    which are recorded only."""
    for key, words in SETTING_WORDS.items():
        if key in old and old.get(key) != new.get(key):
            return (f"its {words} differs ({_short(old.get(key))} there, "
                    f"{_short(new.get(key))} here)")
    oc, nc = old.get("config") or {}, new.get("config") or {}
    for k, v in oc.items():
        if k in nc and nc[k] != v:
            return f"its {k} differs ({_short(v)} there, {_short(nc[k])} here)"
    om, nm = old.get("methods") or [], new.get("methods") or []
    if om != nm:
        on, nn = [m.get("name") for m in om], [m.get("name") for m in nm]
        if on != nn:
            return f"its methods differ ({', '.join(map(str, on))} there; " \
                   f"{', '.join(map(str, nn))} here)"
        name = next(a.get("name") for a, b in zip(om, nm) if a != b)
        return f"its method {name!r} differs (another tree, drafter or source)"
    op, np_ = old.get("prompts"), new.get("prompts")
    if isinstance(op, dict) and isinstance(np_, dict):
        changed = [k for k, v in op.items() if k in np_ and np_[k] != v]
        if changed:
            more = f" and {len(changed) - 1} more" if len(changed) > 1 else ""
            return f"the content of prompt {changed[0]!r}{more} differs"
        missing = [k for k in op if k not in np_]
        if missing:
            return (f"its prompt selection differs ({len(missing)} of its {len(op)} prompts "
                    f"are not selected here, e.g. {missing[0]!r}; use the same --dataset, "
                    "--categories, -n, --seed and --turns)")
    return None
