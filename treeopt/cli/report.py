"""``treeopt report``: plots and a Markdown/HTML page from ``treeopt eval`` results."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "report", help="plots and a report page from treeopt eval results",
        description="Write speed-up and tokens-per-step bars by method and category, accepted "
                    "length histograms, acceptance heat maps by depth and rank, expected vs "
                    "measured tokens per step, tree pictures, and report.md / report.html.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", help="a folder written by treeopt eval, or its results.json")
    p.add_argument("--out", required=True, help="folder for the plots and the page")
    p.add_argument("--profile", default=None,
                   help="acceptance profile for expected tokens per step (default: the one "
                        "the run recorded, if any)")
    p.add_argument("--no-trees", action="store_true", help="skip the tree pictures")
    p.set_defaults(func=run)


def run(args) -> int:
    from treeopt.evaluate.report import write_report

    page = write_report(args.results, args.out, profile=args.profile, trees=not args.no_trees)
    print(page)
    return 0
