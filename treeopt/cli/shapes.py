"""``treeopt shapes``: write named or baseline tree shapes as growmap files.

Each NAME is a shape spec: chain:N (N nodes), kary:KxD (full K-ary, depth D), chains:KxL
(K independent chains of L draft tokens, SpecInfer-style), specinfer:E1,E2,... (every node
at level i gets Ei children), greedy:N[xD] and dp:N[xD] (need --profile; D = depth in edges),
paths:[[0],[1],[0,0]] (Medusa/EAGLE choices), parents:[-1,0,0], a preset (see --list) or a
growmap file (converted, e.g. .json -> .pt; its metadata is kept). Files are
Sequoia-compatible .pt (or .json). Every shape is at most MAX_TREE_NODES nodes. An input file
is never overwritten, nor any existing file that is not a growmap; every output is checked
before the first one is written.

examples:
  treeopt shapes mc_sim_7b_63 chains:4x8          # -> growmaps/mc_sim_7b_63.pt, chains-4x8.pt
  treeopt shapes greedy:64 --profile p.json --out growmaps/greedy64.json
  treeopt shapes --list
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from treeopt.cli import UserError
from treeopt.growmap import check_writable, load_growmap, save_growmap
from treeopt.search.api import load_profile, rank_table
from treeopt.shapes import PRESETS, SPEC_HELP, from_name, is_file_spec

DEFAULT_DIR = "growmaps"


def register(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "shapes", help="write named/baseline shapes as growmaps (Sequoia .pt or .json)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", metavar="NAME", help="shape specs or preset names")
    parser.add_argument("--out", metavar="PATH",
                        help="output file for a single NAME (.pt or .json); default "
                             "DIR/<name>.pt")
    parser.add_argument("--dir", default=DEFAULT_DIR, metavar="DIR",
                        help="output folder when --out is not given (default: %(default)s)")
    parser.add_argument("--json", action="store_true",
                        help="write .json instead of .pt when --out is not given")
    parser.add_argument("--profile", metavar="PROFILE",
                        help="acceptance profile: needed by greedy:/dp:, and records F "
                             "(expected tokens per step) in the file's metadata")
    parser.add_argument("--list", action="store_true", help="list presets and spec syntax")
    parser.set_defaults(func=run)
    return parser


def file_stem(spec: str) -> str:
    """A file-name-safe stem for a spec: ``chains:4x8`` -> ``chains-4x8``."""
    path = Path(spec)
    if path.suffix.lower() in (".pt", ".pth", ".json"):
        return path.stem
    stem = re.sub(r"[^A-Za-z0-9_.]+", "-", spec).strip("-.")
    if len(stem) > 60:
        import hashlib

        stem = f"{stem[:40]}-{hashlib.sha1(spec.encode()).hexdigest()[:8]}"
    return stem or "tree"


def run(args: argparse.Namespace) -> int:
    if args.list:
        print(f"specs: {SPEC_HELP}")
        for name, preset in sorted(PRESETS.items()):
            t = preset.tree()
            print(f"{name}: size {t.size}, depth {t.depth}, width {t.width}; "
                  f"{preset.description} [{preset.source}]")
        return 0
    if not args.names:
        raise UserError("give at least one shape NAME (see `treeopt shapes --list`)")
    if args.out and len(args.names) > 1:
        raise UserError("--out takes a single NAME; use --dir for several")
    suffix = ".json" if args.json else ".pt"

    # Inputs (growmap files among the NAMEs, the profile) are never written.
    inputs = {_same(spec): spec for spec in args.names if is_file_spec(spec)}
    if args.profile:
        inputs.setdefault(_same(args.profile), args.profile)
    targets = [Path(args.out)] if args.out else [
        Path(args.dir) / f"{file_stem(spec)}{suffix}" for spec in args.names]
    outs: dict[str, str] = {}
    for spec, out in zip(args.names, targets):
        key = _same(out)
        if key in inputs:
            raise UserError(f"{out} is an input ({inputs[key]}); refusing to overwrite it: "
                            "give --out, --dir or --json")
        if key in outs:
            raise UserError(f"{spec} and {outs[key]} would both be written to {out}; "
                            "use --out for one of them")
        outs[key] = spec
        check_writable(out)  # no profile, picture or other non-growmap file in the way

    # Build every tree before writing the first file, so a bad NAME writes nothing.
    # the rank table `treeopt search` and `compare` use for this profile
    table = rank_table(load_profile(args.profile)) if args.profile else None
    plan = []
    for spec, out in zip(args.names, targets):
        source_meta: dict = {}
        if is_file_spec(spec):
            tree, source_meta = load_growmap(spec)
        else:
            tree = from_name(spec, table)
        meta = dict(source_meta)  # a converted growmap keeps its search metadata
        meta.update({"shape": source_meta.get("shape", spec), "created_by": "treeopt shapes",
                     "size": tree.size, "depth": tree.depth})
        if source_meta:
            meta["converted_from"] = str(spec)
        if spec in PRESETS:
            meta["source"] = PRESETS[spec].source
        if table is not None:
            meta["profile"] = Path(args.profile).name
            meta["expected_tokens"] = tree.expected_tokens(table)
        plan.append((tree, out, meta))
    for tree, out, meta in plan:
        save_growmap(tree, out, meta=meta)
        f = f", F = {meta['expected_tokens']:.4f}" if table is not None else ""
        print(f"wrote {out} (size {tree.size}, depth {tree.depth}, width {tree.width}{f})")
    return 0


def _same(path: str | Path) -> str:
    """A key equal for two spellings of the same file."""
    return str(Path(path).expanduser().resolve())
