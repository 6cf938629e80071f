"""treeopt tune: profile a pair, search the best tree for this machine, save everything.

  treeopt tune --target smollm2 --draft early-exit:4 --dataset spec_bench --out-dir runs/ee4

Steps: acceptance profile (teacher-forced along the target's own continuations) -> latency
profile (target tree forwards and draft levels, on this device) -> hardware-aware DP choice of
size and height, exactly what `treeopt search` does on the profile written here (optionally
refined with Optuna, --optuna-trials) -> profile.json, tree.pt (Sequoia-compatible growmap),
tree.json, tree.png and summary.json in --out-dir. Without a GPU the defaults are small (a
few minutes on a laptop CPU for SmolLM2-135M); the first line says which defaults are used,
and progress bars on stderr follow the acceptance prompts and the latency runs (--quiet hides
them). Re-running with --resume continues an interrupted acceptance profile (Ctrl-C keeps
what was measured and says so).

Latency is timed with the sizes interleaved, 10 timed runs per point on CPU too (a stable
median needs them); a noisy point (IQR above 25 % of its median) or a curve that falls as
the size grows is reported with what to do. The hardware-aware choice prices sizes at the
latency curve's non-decreasing envelope and says when the chosen size lies beyond the
measured sizes; --measured-sizes-only chooses among the measured sizes only. The largest
size considered (default: the largest timed size) is at most MAX_TREE_NODES.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import treeopt
from treeopt.cli import UserError
from treeopt.cli.args import (
    add_height_arguments,
    draft_spec_with_variant,
    height_levels,
    print_treeset,
    sampling_from_args,
)
from treeopt.cli.profile import (
    add_acceptance_arguments,
    add_model_arguments,
    check_acceptance_args,
    check_latency_args,
    describe_acceptance,
    describe_latency,
    resume_hint,
)
from treeopt.cli.search import height
from treeopt.limits import MAX_TREE_NODES, check_nodes
from treeopt.models.loading import resolve_device
from treeopt.models.machine import Machine
from treeopt.profile.latency import LatencySettings, parse_contexts, parse_tokens
from treeopt.search.api import SearchSettings
from treeopt.search.hardware import DEFAULT_DRAFT_COST, DEFAULT_MAX_LEVELS, DRAFT_COSTS
from treeopt.tune_dtypes import (
    auto_pick,
    compare_dtypes,
    parse_dtypes,
    remember_pick,
    row_from,
)
from treeopt.tuning import (
    CPU_LATENCY,
    GPU_LATENCY,
    TUNE_ACCEPTANCE_DEPTH,
    AcceptanceSettings,
    tune_defaults,
)


def _tokens(value) -> str:
    return ",".join(map(str, value))


def register(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "tune", help="profile a pair, find its best tree on this machine, save it",
        description=__doc__.replace("MAX_TREE_NODES", str(MAX_TREE_NODES)),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    add_acceptance_arguments(parser)
    parser.set_defaults(depth=TUNE_ACCEPTANCE_DEPTH)
    parser.add_argument("--out-dir", required=True, metavar="DIR", help="where to write results")
    parser.add_argument("--resume", action="store_true",
                        help="continue the acceptance profile in --out-dir (a finished "
                             "latency measurement with the same settings is kept)")
    lat = parser.add_argument_group("latency")
    lat.add_argument("--tokens", help=f"target tree sizes to time (default "
                                      f"{_tokens(CPU_LATENCY['tokens'])} on CPU, "
                                      f"{_tokens(GPU_LATENCY['tokens'])} on GPU)")
    lat.add_argument("--context", type=int,
                     help=f"cached prefix length (default {CPU_LATENCY['context']} on CPU, "
                          f"{GPU_LATENCY['context']} on GPU)")
    lat.add_argument("--contexts", metavar="C1,C2,...",
                     help="time several cached prefix lengths instead (e.g. 128,512,1024) and "
                          "choose one tree per context range: treeset.json, used per prompt "
                          "by its length wherever a tree is accepted")
    lat.add_argument("--repeats", type=int,
                     help=f"timed runs per point, sizes interleaved (default "
                          f"{CPU_LATENCY['repeats']} on CPU, {GPU_LATENCY['repeats']} on GPU)")
    lat.add_argument("--warmup", type=int,
                     help=f"untimed runs per point (default {CPU_LATENCY['warmup']} on CPU, "
                          f"{GPU_LATENCY['warmup']} on GPU)")
    s = parser.add_argument_group("search")
    s.add_argument("--max-size", type=int, help="largest tree considered (default: the largest "
                                                f"timed size, at most {MAX_TREE_NODES})")
    add_height_arguments(s, DEFAULT_MAX_LEVELS, "the tree")
    s.add_argument("--draft-cost", choices=DRAFT_COSTS, default=DEFAULT_DRAFT_COST,
                   help="draft cost model, as in `treeopt search` (default %(default)s)")
    s.add_argument("--measured-sizes-only", action="store_true",
                   help="choose the tree size among the timed sizes (--tokens) only, as "
                        "Sequoia's valid_budget does, instead of every size up to --max-size "
                        "(whose costs are interpolated between timed sizes); for a draft "
                        "model the other drafters, which draft steps of any size, are then "
                        "not replayed beside its tree")
    s.add_argument("--optuna-trials", type=int, default=0, metavar="N",
                   help="refine the DP choice with N Optuna trials on predicted tokens/s "
                        "(default 0: DP only)")
    s.add_argument("--this-drafter-only", action="store_true",
                   help="greedy tune of a model-free drafter: choose among its own shapes and "
                        "step sizes only (default: also replay auto, suffix and ngram, and "
                        "answer with whichever decodes fastest)")
    parser.add_argument("--dtypes", default="auto", metavar="auto|none|D1,D2",
                        help="after tuning, time the pair in these dtypes too and report plain "
                             "and predicted tokens/s per dtype with the same acceptance profile "
                             "(auto: every dtype the device runs well; default: auto)")
    parser.add_argument("--quiet", action="store_true",
                        help="no progress bars (acceptance prompts, latency runs) on stderr")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    check_acceptance_args(args)
    check_latency_args(args)
    args.draft = draft_spec_with_variant(args)
    tokens = parse_tokens(args.tokens) if args.tokens is not None else None
    contexts = parse_contexts(args.contexts) if args.contexts is not None else None
    if contexts is not None and args.context is not None:
        raise UserError("give --context N or --contexts C1,C2,..., not both")
    if args.max_size is not None:
        if args.max_size < 1:
            raise UserError(f"--max-size must be >= 1, got {args.max_size}")
        check_nodes(args.max_size, "--max-size", UserError)
    levels = height_levels(args)
    if args.optuna_trials < 0:
        raise UserError(f"--optuna-trials must be >= 0, got {args.optuna_trials}")
    profile_path = Path(args.out_dir) / "profile.json"

    device = resolve_device(args.device)
    defaults = tune_defaults(device, n_prompts=args.prompts,
                             max_new_tokens=args.max_new_tokens, tokens=tokens,
                             context=args.context or (contexts[0] if contexts else None),
                             repeats=args.repeats, warmup=args.warmup)
    if defaults:  # said before the profiling starts, not after it
        print(f"defaults on {device.type} (smaller samples without a GPU): "
              f"{'; '.join(defaults)}", flush=True)
    try:
        run_ = treeopt.tune(
            args.target, args.draft, args.dataset, out_dir=args.out_dir, resume=args.resume,
            acceptance=AcceptanceSettings(
                prompts=args.prompts, categories=args.categories, positions=args.positions,
                max_new_tokens=args.max_new_tokens, width=args.width, depth=args.depth,
                mode=args.mode, continuation=args.continuation, seed=args.seed,
                chat_template=not args.no_chat_template),
            sampling=sampling_from_args(args),
            latency=LatencySettings(tokens=tokens, context=args.context, contexts=contexts,
                                    repeats=args.repeats, warmup=args.warmup),
            search=SearchSettings(max_size=args.max_size, max_levels=levels,
                                  draft_cost=args.draft_cost,
                                  measured_sizes_only=args.measured_sizes_only,
                                  optuna_trials=args.optuna_trials,
                                  other_drafters=not args.this_drafter_only),
            machine=Machine(device=args.device, dtype=args.dtype, threads=args.threads),
            progress=not args.quiet)
    except KeyboardInterrupt:
        if profile_path.exists():
            raise KeyboardInterrupt(resume_hint(profile_path)) from None
        raise
    report(run_)
    report_dtypes(args, run_)
    return 0


def report_dtypes(args, run_) -> None:
    """Plain and predicted tokens/s of the pair in every dtype of ``--dtypes`` (the tuned
    dtype from the run itself); the fastest predicted becomes what ``--dtype auto`` means."""
    dtypes = parse_dtypes(args.dtypes, args.device)
    if len(dtypes) < 2 and not (dtypes and dtypes[0] != run_.latency.meta.get("dtype")):
        return
    done = row_from(str(run_.latency.meta.get("dtype")), run_.latency, run_.prediction,
                    run_.tree)
    skipped: list[str] = []
    rows = compare_dtypes(args.target, args.draft, run_.profile, done=done, dtypes=dtypes,
                          device=args.device,
                          latency=LatencySettings(tokens=run_.latency.target.tokens,
                                                  context=run_.latency.context,
                                                  repeats=args.repeats, warmup=args.warmup),
                          search=SearchSettings(max_size=args.max_size,
                                                max_levels=run_.search.max_levels,
                                                draft_cost=args.draft_cost),
                          notes=skipped, replayed=run_.replay)
    basis = "same replayed steps" if run_.replay is not None else "same acceptance profile"
    print(f"per dtype ({basis}; speed-ups over plain decoding in that dtype):")
    for row in rows:
        print(f"  {row.line()}")
    for note in skipped:
        print(f"  {note}")
    kept = remember_pick(args.target, args.draft, rows, args.device)
    print(f"fastest predicted speculative decoding: {auto_pick(rows)}"
          + (f"; --dtype auto now means {kept} for this model on this machine"
             if kept is not None else ""))


def report(run_) -> None:
    """Print what ``treeopt.tuning`` measured and chose (warnings on stderr)."""

    for note in run_.warnings:
        print(f"warning: {note}", file=sys.stderr)
    print(f"acceptance ({run_.seconds['acceptance']:.0f} s): {describe_acceptance(run_.profile)}")
    print(f"{describe_latency(run_.latency)}  ({run_.seconds['latency']:.0f} s)")
    tree, pred = run_.tree, run_.prediction
    print(f"best tree ({run_.method}, draft cost {run_.search.draft_cost}): size {tree.size}, "
          f"{height(tree.depth, run_.search.max_levels)}, width {tree.width}; expected "
          f"{pred.expected_tokens:.3f} tokens/step")
    print(f"predicted step {pred.step_ms:.2f} ms (draft {pred.draft_ms:.2f} + verify "
          f"{pred.verify_ms:.2f}), {pred.tokens_per_s:.1f} tokens/s, speed-up "
          f"{pred.speedup:.2f}x over plain decoding ({pred.plain_ms:.2f} ms/token)")
    whole = run_.summary.get("prediction", {}).get("whole")
    if whole:
        draft = (f" + draft {whole['draft_prefill_ms']:.0f} ms" if whole["draft_prefill_ms"] >= 1
                 else "")
        print(f"whole generations, prefill included: {whole['speedup']:.2f}x for "
              f"{whole['new_tokens']} tokens after the tune prompts ({whole['prompt_tokens']} "
              f"tokens on average; prefill {whole['prefill_ms']:.0f} ms{draft})")
    if run_.replay is not None:
        print(replay_lines(run_.replay))
    if tree.size == 1 or pred.speedup < 1:
        print("note: on this hardware no tree is predicted to beat plain decoding for this pair "
              "(use plain decoding); a better draft or a GPU changes that")
    for note in run_.notes:
        print(f"note: {note}")
    if run_.treeset is not None:
        print_treeset(run_.treeset)
    if run_.optuna_note:
        print(run_.optuna_note)
    copy = run_.summary.get("copy")
    if copy:
        print(f"{copy['summary']}; per-step lengths: --draft "
              f"{copy.get('draft_spec', run_.summary['draft'] + ':len=auto,table=PROFILE')}")
    print("files: " + ", ".join(str(path) for path in run_.files.values()))
    if run_.summary.get("decode"):
        print(f"decode with: {run_.summary['decode']}")


def replay_lines(choice) -> str:
    """The replayed configurations of a model-free drafter, best first (at most 6 named)."""
    ranked = sorted(choice.predictions.items(), key=lambda kv: -kv[1].tokens_per_s)
    shown = ", ".join(f"{k} {p.speedup:.2f}x ({p.expected_tokens:.2f} tokens/step)"
                      for k, p in ranked[:6])
    more = f", ... ({len(ranked)} replayed)" if len(ranked) > 6 else ""
    kept = "" if ranked[0][0] == choice.label else (
        f"; kept {choice.label}: auto stays unless another replays more than "
        f"{choice.margin:.0%} faster")
    return (f"greedy replay along the target's continuations of the tune prompts (exact "
            f"steps, costs from the latency curve): {shown}{more}{kept}")
