"""The ``treeopt`` command. Each sub-command lives in its own module of this package and
exposes ``register(subparsers)``; arguments several commands share are in ``args``. A command
parses its arguments, calls the library (``treeopt.search.api``, ``treeopt.tuning``,
``treeopt.api``, ``treeopt.evaluate``, ...) and formats what it returns.

Start-up: only the module of the command being run is imported (with the libraries it uses,
torch among them); ``treeopt --help`` and an unknown command import them all to list them.

Units on the command line: sizes count nodes (root included); ``--max-levels`` counts levels
with the root (Sequoia's ``max_depth``), ``--max-depth`` counts edges (as ``Tree.depth`` and
shape strings such as ``dp:64x8``); a command takes one or the other.

Errors: a :class:`treeopt.errors.TreeoptError` (bad input, an impossible request, a broken
file) and an unreadable file the user named are printed as one line, exit status 2; any other
exception is a bug and keeps its traceback. A reader that closes the pipe early
(``treeopt compare ... | head -1``) stops the command quietly, with status 0, as Unix tools do.

CPU timing: unless ``OMP_WAIT_POLICY`` is already set, the command sets it to ``PASSIVE``
before torch is imported. OpenMP's default spin-waiting makes every timing treeopt takes
(latency profiles, benchmarks, evaluations) meaningless as soon as another process is busy
on the machine; passive waiting costs nothing measurable on an idle one.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from typing import Sequence

from treeopt import __version__
from treeopt.errors import TreeoptError, UserError, one_line

#: The sub-commands, in the order ``treeopt --help`` lists them; each is ``treeopt.cli.NAME``.
COMMANDS = ("search", "show", "compare", "shapes", "generate", "chat", "profile", "tune", "eval",
            "report", "bench", "datastore", "models", "export")


def check_threads(threads: int | None) -> None:
    """The one check of ``--threads``: at least 1 (every command that takes it)."""
    if threads is not None and threads < 1:
        raise UserError(f"--threads must be >= 1, got {threads}")


def passive_openmp() -> None:
    """Set ``OMP_WAIT_POLICY=PASSIVE`` unless the user set it or torch is already imported
    (OpenMP reads it when torch loads; setting it later would only make the recorded value
    lie)."""
    if "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def build_parser(commands: Sequence[str] = COMMANDS) -> argparse.ArgumentParser:
    """The ``treeopt`` parser with the sub-commands ``commands`` registered (importing their
    modules: the one deliberate lazy import of the package's command layer)."""
    parser = argparse.ArgumentParser(
        prog="treeopt",
        description="Find the best token-tree shape for tree-based speculative decoding.",
        epilog="CPU timings: treeopt sets OMP_WAIT_POLICY=PASSIVE unless it is set already "
               "(OpenMP spin-waiting distorts timings on a busy machine).",
    )
    parser.add_argument("--version", action="version", version=f"treeopt {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in commands:
        importlib.import_module(f"treeopt.cli.{name}").register(sub)
    return parser


def _quiet_stdout() -> None:
    """The reader of stdout went away: point stdout at the null device so that Python's
    final flush does not raise again (the Python docs' recipe for SIGPIPE)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # stdout replaced (tests) or closed
        pass


class _Notices(logging.Handler):
    """``treeopt: message`` on whatever ``sys.stderr`` is when the message comes."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            print(f"treeopt: {record.getMessage()}", file=sys.stderr, flush=True)
        except Exception:  # noqa: BLE001 - logging's own rule: a notice never stops the run
            self.handleError(record)


def show_notices() -> None:
    """Print the library's notices (``logging`` INFO under ``treeopt``: a measurement taken
    once on a new machine, say) as ``treeopt: ...`` lines on stderr; installed once."""
    logger = logging.getLogger("treeopt")
    if not any(isinstance(h, _Notices) for h in logger.handlers):
        logger.addHandler(_Notices())
    logger.setLevel(logging.INFO)


# Longest error line the command prints (a message quoting hostile input is cut).
MAX_ERROR_LINE = 1000


def main(argv: list[str] | None = None) -> int:
    passive_openmp()
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser([argv[0]] if argv and argv[0] in COMMANDS else COMMANDS)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    where = " ".join(x for x in (args.command, getattr(args, "what", None),
                                 getattr(args, "bench", None)) if isinstance(x, str))
    show_notices()
    try:
        check_threads(getattr(args, "threads", None))
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # a closed pipe shows here, not at exit
        return code
    except BrokenPipeError:
        _quiet_stdout()
        return 0
    except KeyboardInterrupt as exc:
        # A command may say what it kept and how to continue (KeyboardInterrupt("...")).
        note = one_line(exc) if str(exc).strip() else ""
        print(f"treeopt {where}: interrupted" + (f"; {note}" if note else ""), file=sys.stderr)
        return 130
    except TreeoptError as exc:
        # Our own errors (TreeError, ProfileError, SamplingError, UserError, ...) carry a
        # one-line message naming the problem: show it, not a traceback.
        print(f"treeopt {where}: error: {one_line(exc, MAX_ERROR_LINE)}", file=sys.stderr)
        return 2
    except OSError as exc:
        # A file the user named cannot be read or written (missing, a folder, no permission).
        if exc.filename is None:
            raise
        print(f"treeopt {where}: error: {one_line(exc, MAX_ERROR_LINE)}", file=sys.stderr)
        return 2
    # Anything else (a ValueError from torch or numpy, a KeyError, ...) is a bug in treeopt
    # or a library: Python prints its traceback.


__all__ = ["COMMANDS", "TreeoptError", "UserError", "build_parser", "check_threads", "main",
           "passive_openmp", "show_notices"]


if __name__ == "__main__":
    sys.exit(main())
