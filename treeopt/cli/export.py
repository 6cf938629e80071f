"""treeopt export: a tree as a serving engine's settings, or back.

  treeopt export GROWMAP_OR_SHAPE --engine ENGINE [--format F]
  treeopt export --from ENGINE FILE_OR_TEXT --out tree.pt

Which engine takes which tree (the settings say which releases; the notes on stderr say
whether the engine drafts this very tree: exact, equivalent or approximate):

  umbrella      any tree, exact: UMbreLLa's growmap JSON (Sequoia's keys; its static engine)
  tensorrt-llm  any tree, exact: EAGLE-3 eagle_choices (TensorRT-LLM up to 1.3.x; removed
                since); --dynamic: the dynamic tree's knobs (use_dynamic_tree, topK), top-k
                family as SGLang
  sglang/eagle  the knobs of their dynamic top-k tree (num_steps = depth / depth = depth - 1,
                topk / top_k, num_draft_tokens / total_token = nodes, root included); with
                --profile the knobs are checked to build this very tree (treeopt search
                --family topk-per-level finds the best tree they can build)
  vllm          a chain: current vLLM's chain settings (method ngram|suffix|draft_model|eagle
                ..., num_speculative_tokens; --draft ngram:min=,max= gives prompt_lookup_min/
                max); another tree: speculative_token_tree, which only vLLM 0.10.1 to 0.20.x
                take (uniform per level unless --any-shape)
  llama.cpp     a chain: --draft-max/--draft-min/--draft-p-min, or with --draft ngram the
                n-gram --spec-type

Reading settings back (--from) builds the tree they mean (top-k knobs under --profile).
The settings go to stdout (or --out FILE), notes on what is exact to stderr.

examples:
  treeopt export growmaps/sequoia-l40-7b.pt --engine umbrella --out sequoia-tree.json
  treeopt export growmaps/sequoia-l40-7b.pt --engine tensorrt-llm
  treeopt export chain:4 --engine vllm --draft ngram:min=2,max=4
  treeopt export chain:4 --engine llama.cpp
  treeopt export specinfer:4,2,1 --engine vllm --format cli
  treeopt export dp:64x6 --profile profiles/sequoia-reference.json --engine sglang
  treeopt export --from vllm "[(0,), (1,), (0, 0)]" --out tree.pt
  treeopt export --from sglang knobs.json --profile profiles/sequoia-reference.json --out t.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from treeopt.cli import UserError
from treeopt.export import (
    ALL_FORMATS,
    DEFAULT_FORMAT,
    EXPORT_ENGINES,
    export_tree,
    read_settings,
)
from treeopt.growmap import check_writable, file_kind, load_growmap, save_growmap
from treeopt.limits import atomic_write
from treeopt.search.api import load_profile, rank_table
from treeopt.shapes import describe, from_name, is_file_spec


def register(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "export", help="a tree as UMbreLLa / TensorRT-LLM / SGLang / EAGLE / vLLM / llama.cpp "
                       "settings, or settings back to a growmap",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", metavar="GROWMAP_OR_SHAPE",
                        help="growmap file (.pt/.json) or shape spec such as specinfer:4,2; "
                             "with --from: engine settings, as text or a file holding them")
    parser.add_argument("--engine", choices=EXPORT_ENGINES,
                        help="engine to write settings for")
    parser.add_argument("--from", dest="from_engine", choices=EXPORT_ENGINES, metavar="ENGINE",
                        help="read ENGINE's settings (" + ", ".join(EXPORT_ENGINES) + ") "
                             "instead and write the tree they mean to --out (a growmap)")
    parser.add_argument("--format", choices=ALL_FORMATS,
                        help="json, python, cli or yaml (default: "
                             + ", ".join(f"{e} {f}" for e, f in DEFAULT_FORMAT.items()) + ")")
    parser.add_argument("--out", metavar="FILE",
                        help="write the settings here instead of stdout; with --from: the "
                             "growmap to write (.pt or .json)")
    parser.add_argument("--profile", metavar="PROFILE",
                        help="acceptance profile: needed by greedy:/dp: shapes and by --from "
                             "sglang|eagle (and a dynamic tensorrt-llm tree); checks whether "
                             "top-k knobs build this tree")
    parser.add_argument("--method", default=None,
                        help="vLLM's speculative method (eagle, eagle3, ngram, suffix, "
                             "draft_model, mtp, ...) or SGLang's algorithm (upper-cased: EAGLE, "
                             "EAGLE3) (default: from --draft, else eagle)")
    parser.add_argument("--draft", metavar="SPEC",
                        help="vLLM / llama.cpp chains: the drafter the chain was tuned for, as "
                             "treeopt generate takes it: ngram[:min=,max=] (vLLM ngram with "
                             "prompt_lookup_min/max; llama.cpp ngram-simple) or a draft model "
                             "(vLLM draft_model; llama.cpp -md)")
    parser.add_argument("--draft-model", metavar="NAME",
                        help="the draft model to name in the settings (vLLM, TensorRT-LLM, "
                             "llama.cpp)")
    parser.add_argument("--dynamic", action="store_true",
                        help="tensorrt-llm: the dynamic tree's knobs (use_dynamic_tree, "
                             "dynamic_tree_max_topK) instead of eagle_choices")
    parser.add_argument("--any-shape", action="store_true",
                        help="vLLM: write a tree that is not uniform per level anyway (vLLM "
                             "verifies any tree; its EAGLE drafter fills only uniform ones)")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    if args.from_engine:
        return run_import(args)
    if not args.engine:
        raise UserError("give --engine " + "|".join(EXPORT_ENGINES) + " (or --from ENGINE to "
                        "read settings back)")

    table = _table(args.profile)
    meta: dict = {}
    if is_file_spec(args.source):
        tree, meta = load_growmap(args.source)
    else:
        tree = from_name(args.source, table)
    hint = meta.get("top_k") if meta.get("family") == "topk-per-level" else None
    if args.out:
        _check_out(args.out, [args.source, args.profile])
    found = export_tree(tree, args.engine, args.format, profile=table, method=args.method,
                        model=args.draft_model, any_shape=args.any_shape,
                        top_k=hint if isinstance(hint, int) else None, draft=args.draft,
                        dynamic=args.dynamic)
    head = (f"{describe(args.source)}: size {tree.size}, depth {tree.depth}, width "
            f"{tree.width} -> {args.engine} ({found.match})")
    lines = [head] + [f"note: {note}" for note in found.notes]
    if found.versions:
        lines.append(f"engine versions: {found.versions}")
    if args.out:
        path = atomic_write(args.out, lambda fh: fh.write(found.text + "\n"), binary=False)
        print("\n".join(lines))
        print(f"settings: {path}")
    else:
        print(found.text)
        sys.stdout.flush()
        print("\n".join(lines), file=sys.stderr)
    return 0


def run_import(args: argparse.Namespace) -> int:
    if args.engine:
        raise UserError("give --from ENGINE to read settings, or --engine ENGINE to write "
                        "them, not both")
    if not args.out:
        raise UserError("--from writes a growmap: give --out tree.pt (or .json)")
    _check_out(args.out, [args.source, args.profile], growmap=True)
    check_writable(args.out)
    table = _table(args.profile)
    tree = read_settings(args.from_engine, args.source, profile=table)
    meta = {"method": "import", "engine": args.from_engine}
    if Path(args.source).is_file():
        meta["source"] = str(args.source)
    if args.profile:
        meta.update(profile=str(args.profile), expected_tokens=tree.expected_tokens(table))
    path = save_growmap(tree, args.out, meta)
    line = f"{args.from_engine} settings: size {tree.size}, depth {tree.depth}, width {tree.width}"
    if table is not None:
        line += f", expected tokens per step {tree.expected_tokens(table):.4f}"
    print(line)
    print(f"growmap: {path}")
    return 0


def _table(profile):
    """The rank table ``treeopt search`` uses for this profile (None without one)."""
    if not profile:
        return None

    return rank_table(load_profile(profile))


def _check_out(out: str, inputs: list, growmap: bool = False) -> None:
    """Refuse an output path that is one of the inputs, or (for settings) an existing
    growmap or treeopt file that writing text over would destroy."""
    target = Path(out).expanduser().resolve()
    for src in inputs:
        if src and Path(src).expanduser().resolve() == target:
            raise UserError(f"--out {out} is also an input; refusing to overwrite it")
    if growmap or not Path(out).is_file() or Path(out).stat().st_size == 0:
        return

    kind = file_kind(out)
    if kind == "growmap" or kind.startswith("a '"):
        what = "a growmap" if kind == "growmap" else kind
        raise UserError(f"--out {out}: refusing to overwrite {what} with engine settings; "
                        "choose another path")


# ---------------------------------------------------------------------------- search --family
