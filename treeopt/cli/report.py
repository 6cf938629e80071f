"""``treeopt report``: plots and a Markdown/HTML page from ``treeopt eval`` results."""

from __future__ import annotations

import argparse

from treeopt.evaluate.passk import Limits, format_pass, score_run
from treeopt.evaluate.report import write_report


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
    p.add_argument("--pass-at-1", action="store_true",
                   help="first score the run's outputs for pass@1 (as treeopt eval "
                        "--pass-at-1: each output's code against its problem's tests in a "
                        "best-effort sandbox), without generating again; programs already "
                        "scored are not run again; rewrites the run's results files")
    p.add_argument("--problems", default=None, metavar="SPEC",
                   help="problems with tests for --pass-at-1: humaneval or a JSONL file with "
                        "prompt, test and entry_point (default: the run's dataset)")
    p.add_argument("--pass-timeout", type=float, default=10.0, metavar="S",
                   help="wall-clock seconds per program (default %(default)s)")
    p.add_argument("--pass-workers", type=int, choices=[1, 2], default=1,
                   help="programs run at once (default %(default)s)")
    p.set_defaults(func=run)


def run(args) -> int:
    if args.pass_at_1:
        scored = score_run(args.results, args.problems, Limits(timeout_s=args.pass_timeout),
                           workers=args.pass_workers)
        print(format_pass(scored))
    page = write_report(args.results, args.out, profile=args.profile, trees=not args.no_trees)
    print(page)
    return 0
