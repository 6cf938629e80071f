"""``treeopt profile``: measure what a draft/target pair accepts and what the hardware costs.

  treeopt profile acceptance --target smollm2 --draft early-exit:4 --dataset spec_bench \\
      --temperature 0 --width 8 --depth 6 --out profiles/smollm2-ee4.json
  treeopt profile latency --target smollm2 --draft early-exit:4 --tokens 1,2,4,8,16,32,64 \\
      --context 256 --out profiles/smollm2-ee4.json
  treeopt profile merge A.json B.json --out C.json
  treeopt profile quality --target smollm2 --draft early-exit:4 --out quality.json

Acceptance: teacher-forced (default; the target's own continuation of each prompt, or the
dataset text with --continuation dataset) or online (the engine decodes with a full W-ary tree
of depth D). The file is rewritten atomically every --save-every prompts; Ctrl-C keeps what
was measured and --resume continues. Latency: target tree-forward time by tokens verified at
once and draft forward time by tokens per level, median and IQR over --repeats; merged into
--out when that file already holds an acceptance profile.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from treeopt.api import encode_for_decoding, encode_prompts, load_pair
from treeopt.cli import UserError
from treeopt.cli.args import (
    THREADS_HELP,
    add_draft_variant_arguments,
    add_prompt_arguments,
    add_sampling_arguments,
    draft_spec_with_variant,
    sampling_from_args,
    set_threads,
)
from treeopt.datasets import select
from treeopt.decode.sampling import Sampling, check_settings
from treeopt.limits import read_json
from treeopt.models.dtype import choose_dtype, interpolate
from treeopt.models.loading import eos_ids, resolve_device
from treeopt.profile import Profile
from treeopt.profile.acceptance import AcceptanceRun, with_intervals, write_atomic
from treeopt.profile.calibrate import calibrate_pair
from treeopt.profile.calibration import check_settings as check_calibration, check_writable
from treeopt.profile.copy import measure_copy, write_copy_table
from treeopt.profile.latency import measure_latency, parse_contexts, parse_tokens, write_latency
from treeopt.profile.model import check_replaceable, latencies_by_context
from treeopt.profile.quality import (
    QualityRun,
    check_quality_out,
    draft_model,
    format_quality,
    profile_quality,
)
from treeopt.rules import default_width
from treeopt.tune_dtypes import parse_dtypes, plain_rows
from treeopt.tuning import (
    CPU_NEW_TOKENS,
    CPU_PROMPTS,
    GPU_NEW_TOKENS,
    GPU_PROMPTS,
    acceptance_defaults as defaults,
    latency_progress,
    latency_warnings,
    load_prompt_set,
    measure_acceptance as measure,
)

COPY_DESCRIPTION = """\
Measure a copy drafter's acceptance by what it knew when it proposed (sibling rank, its
estimated probability of the candidate, the matched suffix length, the depth in the step;
treeopt.profile.copytable), letting it draft its largest tree every step. --mode online
counts along real decoding (what decoding sees; sampling allowed); --mode teacher-forced
along the target's greedy continuation, every position a step start (one target pass per
prompt). The table is written as the "copy" section of the profile --out (other sections
kept; --merge adds to a table already there). With a latency section in the same file it
drives per-step lengths: --draft ngram:len=auto,table=OUT or suffix:len=auto,table=OUT."""


ACCEPTANCE_DESCRIPTION = """\
Measure which sibling rank the verifier accepts, per rank (Sequoia's p[k]) and per depth
(p[d][k]), at many positions of real continuations: draft a width-W set of siblings, verify
them as decoding does, count the accepted rank (or none).

  treeopt profile acceptance --target smollm2 --draft early-exit:4 --dataset spec_bench \\
      --temperature 0 --width 8 --depth 6 --out profiles/smollm2-ee4.json

Teacher-forced (default) along the target's own continuation of each prompt (or the dataset
text with --continuation dataset), or online (the engine decodes with a full W-ary tree of
depth D). Raw counts are kept so profiles can be merged. --out is rewritten atomically every
--save-every prompts; Ctrl-C keeps what was measured and --resume continues (also with a
larger --prompts: prompts are drawn so that the first k of n are the draw of k; the file
records which prompts it measured and a resume that would not continue them is refused).
Prompts longer than the model window minus the continuation are cut from the left (and
continuations longer than half the window capped), with a warning. --out is never a file of
another kind (a growmap, results).
"""

LATENCY_DESCRIPTION = """\
Time the target's tree forward by tokens verified at once (after --context cached tokens)
and the draft's forward by tokens one draft level expands; median and IQR over --repeats
(each size relative to the first size's time in the same round),
the sizes interleaved. The table is written into --out (merged into an existing acceptance
profile).

  treeopt profile latency --target smollm2 --draft early-exit:4 --tokens 1,2,4,8,16,32,64 \\
      --context 256 --out profiles/smollm2-ee4.json

--contexts 128,512,1024 times every context instead (one cache each, every round timing every
context and size) into one table; tune and search then choose one tree per context range, a
tree set that decoding applies per prompt by its length. The table measured so far is written
to --out after every round, so an interrupted run keeps it (marked partial). Contexts beyond
the model window are refused before anything is timed.

CPU timings: run on a quiet machine; treeopt sets OMP_WAIT_POLICY=PASSIVE unless it is set
(spin-waiting threads distort timings when anything else runs) and warns when a point's IQR
exceeds 25 % of its median or the curve falls as the size grows (then use more --repeats or
--threads 1).
"""

QUALITY_DESCRIPTION = """\
Measure how far the draft's next-token distribution Q is from the target's P at every
position of the target's own continuation of each prompt (or the dataset text), after
temperature / top-k / top-p: total variation TV = 1/2 sum |P - Q|, KL(P || Q) (infinite where
Q = 0 < P: reported with the share of such positions), alpha = sum min(P, Q) = 1 - TV (the
chance one drafted token is accepted), per draft depth 1..D of a chain (weighted by the
chance the chain gets there), and the chain acceptance that implies; with --profile, the
measured rank profile's top-1 acceptance p1 per depth beside it.

  treeopt profile quality --target smollm2 --draft early-exit:4 --dataset spec_bench \\
      -n 8 --depth 6 --profile profiles/smollm2-ee4.json --out quality.json

The default temperature is 1 (the models' own distributions): at temperature 0 both are
one-hot and alpha is the greedy top-1 agreement (TV 0 or 1, KL 0 or infinite). Needs a draft
with a distribution (a draft model or early-exit:K), not a model-free drafter.
"""


def add_dataset_arguments(parser) -> None:
    """``--dataset`` and ``--categories``: the prompts every profiling sub-command reads."""
    parser.add_argument("--dataset", default="spec_bench",
                        help="prompts: spec_bench, mt_bench, humaneval, a .jsonl/.txt file or "
                             "hf:NAME (default %(default)s)")
    parser.add_argument("--categories", help="comma-separated categories to keep")


def register(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "profile", help="measure acceptance (by rank and depth) and latency of a model pair",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", metavar="WHAT", required=True)

    acc = sub.add_parser("acceptance", help="acceptance profile p[k] and p[d][k]",
                         description=ACCEPTANCE_DESCRIPTION,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(acc)
    add_acceptance_arguments(acc)
    acc.add_argument("--out", required=True, metavar="PATH", help="profile .json to write")
    acc.add_argument("--resume", action="store_true",
                     help="continue from the counts and prompt index stored in --out")
    acc.add_argument("--save-every", type=int, default=1, metavar="N",
                     help="rewrite --out every N prompts (default %(default)s)")
    acc.add_argument("--quiet", action="store_true", help="no progress bar")
    acc.set_defaults(func=run_acceptance)

    lat = sub.add_parser("latency", help="forward time by number of tokens",
                         description=LATENCY_DESCRIPTION,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(lat, draft_required=False)
    add_latency_arguments(lat)
    lat.add_argument("--out", required=True, metavar="PATH",
                     help="profile .json to write (its latency section is replaced if it exists)")
    lat.add_argument("--quiet", action="store_true", help="no progress bars")
    lat.add_argument("--dtypes", default="auto", metavar="auto|none|D1,D2",
                     help="also time plain decoding of the target in these dtypes (short, "
                          "cached) and say which --dtype auto picks (auto: every dtype the "
                          "device runs well; default: auto)")
    lat.set_defaults(func=run_latency)

    merge = sub.add_parser("merge", help="pool profiles by adding their counts",
                           description="Pool acceptance profiles of the same pair and settings "
                                       "(e.g. from several runs or machines) by adding their "
                                       "raw counts; the intervals are recomputed. Profiles of "
                                       "another target, draft, temperature/top-k/top-p/rule, "
                                       "width, depth, mode or continuation are refused, and so "
                                       "is the same file (or the same measurement) twice.")
    merge.add_argument("inputs", nargs="+", metavar="PROFILE", help="profiles with raw counts")
    merge.add_argument("--out", required=True, metavar="PATH", help="merged profile .json")
    merge.set_defaults(func=run_merge)

    qual = sub.add_parser("quality", help="draft quality per position: TV, KL, alpha, chain "
                                          "acceptance",
                          description=QUALITY_DESCRIPTION,
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(qual)
    add_quality_arguments(qual)
    qual.set_defaults(func=run_quality)
    add_calibration_parser(sub)
    add_copy_parser(sub)
    return parser


def add_model_arguments(parser: argparse.ArgumentParser, draft_required: bool = True) -> None:
    parser.add_argument("--target", required=True,
                        help="target model: smollm2, qwen2.5-coder-1.5b, a folder, a .gguf "
                             "file or a hub id")
    parser.add_argument("--draft", required=draft_required,
                        help="drafter: early-exit:K, a draft model with the same tokenizer, "
                             "ngram[:min=,max=,k=,topk=,keep=], suffix[:...], datastore:PATH "
                             "or bigram:PATH")
    add_draft_variant_arguments(parser)
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    parser.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16")
    parser.add_argument("--threads", type=int, metavar="N", help=THREADS_HELP)


def add_acceptance_arguments(parser: argparse.ArgumentParser) -> None:
    """Acceptance settings (``treeopt tune`` shares them)."""
    add_dataset_arguments(parser)
    parser.add_argument("--prompts", type=int, metavar="N",
                        help=f"number of prompts (default {CPU_PROMPTS} on CPU, {GPU_PROMPTS} "
                             "on GPU)")
    parser.add_argument("--positions", type=int, metavar="N",
                        help="stop once N positions are measured (default: all prompts)")
    parser.add_argument("--max-new-tokens", type=int, metavar="T",
                        help=f"continuation length per prompt (default {CPU_NEW_TOKENS} on CPU, "
                             f"{GPU_NEW_TOKENS} on GPU)")
    add_sampling_arguments(parser)
    parser.add_argument("--width", type=int, default=None,
                        help="siblings drafted (default 8; 1 with --rule block, which "
                             "verifies chains; traversal and block profile one-level trees "
                             "as sequoia does)")
    parser.add_argument("--depth", type=int, default=6,
                        help="depth D of the profiled tree in edges: parents at depths "
                             "0..D-1 each get their own acceptance row (default %(default)s)")
    parser.add_argument("--mode", choices=["teacher-forced", "online"], default="teacher-forced",
                        help="teacher-forced (fast; default) or online (engine, what decoding "
                             "sees)")
    add_prompt_arguments(parser, "teacher-forced positions along the target's own "
                                 "continuation (default, unbiased for decoding) or the dataset "
                                 "text")


def add_latency_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tokens", default="1,2,4,8,16,32,64,128",
                        help="target tree sizes to time (default %(default)s)")
    parser.add_argument("--draft-tokens",
                        help="tokens per draft level to time (default: --tokens)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--context", type=int, default=256,
                       help="cached prefix length (default %(default)s)")
    where.add_argument("--contexts", metavar="C1,C2,...",
                       help="several cached prefix lengths, e.g. 128,512,1024, timed "
                            "interleaved into one table (the hardware-aware choice then picks "
                            "one tree per context range: a tree set)")
    parser.add_argument("--repeats", type=int, default=10,
                        help="timed runs per point, sizes interleaved (default %(default)s)")
    parser.add_argument("--warmup", type=int, default=2,
                        help="untimed runs per point (default %(default)s)")


# ---------------------------------------------------------------------------- helpers
def load_models(args):
    """(Pair, device) from --target/--draft/--device/--dtype/--threads."""

    set_threads(getattr(args, "threads", None))
    device = resolve_device(args.device)
    pair = load_pair(args.target, getattr(args, "draft", None), dtype=args.dtype, device=device)
    return pair, device


def acceptance_defaults(args, device) -> list[str]:
    """Fill --prompts / --max-new-tokens by device (``treeopt.pipeline.acceptance_defaults``);
    return notes on the defaults used."""

    args.prompts, args.max_new_tokens, notes = defaults(device, args.prompts,
                                                        args.max_new_tokens)
    return notes


def check_acceptance_args(args) -> None:
    """Validate the acceptance settings before any model is loaded (sampling settings by
    ``treeopt.decode.sampling.check_settings``, as every command does)."""

    check_settings(args.temperature, args.top_k, args.top_p, args.rule)
    if args.width is None:
        args.width = default_width(args.rule)
    for name in ("width", "depth"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be >= 1, got {getattr(args, name)}")
    for name in ("prompts", "positions", "max_new_tokens"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {value}")


def acceptance_run(args):
    run = AcceptanceRun(width=args.width, depth=args.depth, mode=args.mode,
                        continuation=args.continuation, max_new_tokens=args.max_new_tokens,
                        seed=args.seed, draft=args.draft, target=args.target,
                        dataset=str(args.dataset), chat_template=not args.no_chat_template,
                        sampling=sampling_from_args(args))
    run.check()
    return run


def measure_acceptance(args, pair, device, out: Path, progress: bool = True):
    """Load the prompts, run the profiler (``treeopt.pipeline.measure_acceptance``);
    returns (Profile, notes on the defaults used)."""

    if pair.drafter is None:
        raise UserError("acceptance profiling needs a --draft")
    notes = acceptance_defaults(args, device)
    run = acceptance_run(args)
    prompts = select_prompts(args)
    profile = measure(pair, prompts, run, out=out, resume=getattr(args, "resume", False),
                      save_every=getattr(args, "save_every", 1), positions=args.positions,
                      progress=progress)
    return profile, notes


def select_prompts(args):
    """The --prompts prompts of --dataset (--categories) drawn with --seed, in draw order:
    the same prompts as every other command draws, ordered so that the first k of a draw of
    n are the draw of k. A --resume that asks for more prompts therefore continues with new
    ones (the profiler checks the measured ones are the same, by content)."""

    every, name = load_prompt_set(args.dataset, None, args.seed, args.categories)
    return select(every, n=args.prompts, seed=args.seed, source=name, order="draw")


def describe_acceptance(profile) -> str:
    """A few lines: p by rank with its 95 % interval, per-depth p1."""
    lines = [profile.summary(ranks=min(8, profile.width))]
    empty = (profile.meta or {}).get("no_candidate")
    positions = (profile.meta or {}).get("positions")
    if empty and positions:
        lines.append(f"  no candidate at {empty}/{positions} positions "
                     f"({empty / positions:.1%}): those steps are plain decoding")
    if profile.counts is not None:
        ci = profile.ci95()
        head = "  ".join(f"p{k + 1}={p:.3f}[{lo:.3f},{hi:.3f}]"
                         for k, (p, (lo, hi)) in enumerate(zip(profile.p[:4], ci[:4])))
        lines.append(f"  {head}")
    if profile.by_depth is not None:
        rows = "  ".join(f"d{d}: p1={r[0]:.3f} sum={sum(r):.3f}"
                         for d, r in enumerate(profile.by_depth))
        lines.append(f"  by depth: {rows}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- commands
def run_acceptance(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if out.suffix.lower() != ".json":
        raise UserError(f"--out {out.name}: acceptance profiles are written as .json")
    if out.exists() and not args.resume:
        _check_overwrite(out)
        check_profile_out(out)
    check_acceptance_args(args)
    args.draft = draft_spec_with_variant(args)
    pair, device = load_models(args)
    try:
        profile, notes = measure_acceptance(args, pair, device, out, progress=not args.quiet)
    except KeyboardInterrupt:
        if out.exists():
            raise KeyboardInterrupt(resume_hint(out)) from None
        raise
    if notes:
        print(f"defaults on {device.type}: {', '.join(notes)}")
    print(describe_acceptance(profile))
    print(f"profile: {out}")
    return 0


def resume_hint(path: Path) -> str:
    """What an interrupted profiling run kept and how to continue it."""
    return (f"what was measured is kept in {path}; run the same command with --resume to "
            "continue from it")


def _check_overwrite(out: Path) -> None:
    """Refuse to overwrite an acceptance profile a run could be resumed from."""
    try:
        d = read_json(out)
    except (OSError, ValueError):
        return
    if isinstance(d, dict) and d.get("acceptance"):
        raise UserError(f"{out} already holds an acceptance profile; pass --resume to continue "
                        "it, or choose another --out")


def check_profile_out(out: Path) -> None:
    """Refuse (one line) an output path holding a file that is not a treeopt profile (a
    growmap, eval results, ...), before any model is loaded."""

    check_replaceable(out)


def run_latency(args: argparse.Namespace) -> int:
    tokens = parse_tokens(args.tokens)
    draft_tokens = parse_tokens(args.draft_tokens) if args.draft_tokens else None
    contexts = parse_contexts(args.contexts) if getattr(args, "contexts", None) else None
    check_latency_args(args)
    check_profile_out(Path(args.out))
    args.draft = draft_spec_with_variant(args)
    pair, device = load_models(args)

    try:
        with latency_progress(not getattr(args, "quiet", False)):
            latency = measure_latency(pair.target, pair.drafter, tokens=tokens,
                                      draft_tokens=draft_tokens, context=args.context,
                                      contexts=contexts, repeats=args.repeats,
                                      warmup=args.warmup,
                                      names={"target": args.target, "draft": args.draft},
                                      out=args.out)
    except KeyboardInterrupt:
        if Path(args.out).exists():
            raise KeyboardInterrupt(f"every finished timing round is kept in {args.out} "
                                    "(marked partial); run the command again to measure it "
                                    "in full") from None
        raise
    path = write_latency(latency, args.out)
    print(describe_latency(latency))
    print_timing_warnings(latency)
    print_dtypes(args, pair.target)
    print(f"profile: {path}")
    return 0


def print_dtypes(args, target) -> None:
    """Plain decoding's speed of the target in every dtype of ``--dtypes`` (short cached
    curves, ``treeopt.models.dtype``) and the one ``--dtype auto`` picks; ``target``: the
    model as loaded (its own dtype's curve is timed on it; nothing without a model)."""
    import torch

    dtypes = parse_dtypes(getattr(args, "dtypes", "none"), args.device)
    if len(dtypes) < 2 or not isinstance(target, torch.nn.Module):
        return
    curves = plain_rows(args.target, args.device, dtypes, loaded=target)
    for name, curve in curves.items():
        print(f"  {name}: plain {1000 / interpolate(curve, 1):.1f} tokens/s; forward of 4 / 16 "
              f"tokens = {interpolate(curve, 4) / interpolate(curve, 1):.2f}x / "
              f"{interpolate(curve, 16) / interpolate(curve, 1):.2f}x one token")
    print(f"--dtype auto picks {choose_dtype(curves)} on this machine by plain forwards "
          "(until `tune` compares the dtypes' speculative speed)")


def check_latency_args(args) -> None:
    """--context, --repeats and --warmup, before any model is loaded."""
    if args.context is not None and args.context < 1:
        raise UserError(f"--context must be >= 1, got {args.context}")
    if args.repeats is not None and args.repeats < 1:
        raise UserError(f"--repeats must be >= 1, got {args.repeats}")
    if args.warmup is not None and args.warmup < 0:
        raise UserError(f"--warmup must be >= 0, got {args.warmup}")


def print_timing_warnings(latency) -> list[str]:
    """Print ``treeopt.pipeline.latency_warnings`` for a measured table on stderr; returns
    them."""
    import sys

    notes = latency_warnings(latency)
    for note in notes:
        print(f"warning: {note}", file=sys.stderr)
    return notes


def describe_latency(latency) -> str:
    tables = latencies_by_context(latency)
    contexts = ", ".join(str(t.context) for t in tables)
    lines = [f"latency on {latency.meta.get('device')} ({latency.meta.get('dtype')}), "
             f"context{'s' if len(tables) > 1 else ''} {contexts}, median ms (IQR):"]
    for table in tables:
        at = f" at {table.context}" if len(tables) > 1 else ""
        for name, curve in (("target", table.target), ("draft", table.draft)):
            if curve is None:
                continue
            pts = "  ".join(f"{n}:{ms:.2f}({s:.2f})"
                            for n, ms, s in zip(curve.tokens, curve.ms, curve.spread_ms or
                                                [0.0] * len(curve.ms)))
            lines.append(f"  {name}{at}: {pts}")
    return "\n".join(lines)


def run_merge(args: argparse.Namespace) -> int:
    if len(args.inputs) < 2:
        raise UserError("merge needs at least two profiles")
    for i, a in enumerate(args.inputs):
        for b in args.inputs[:i]:
            if _same_file(a, b):
                raise UserError(f"{a} is given twice (as {b} and {a}); pooling a profile with "
                                "itself counts every position twice")
    check_profile_out(Path(args.out))
    profiles = [Profile.load(p) for p in args.inputs]
    merged = profiles[0]
    for other in profiles[1:]:
        merged = merged.merge(other)
    merged = with_intervals(merged)
    write_atomic(merged, Path(args.out))
    n = sum(merged.counts) + merged.none_count
    print(f"merged {len(profiles)} profiles ({n} positions): {merged.summary()}")
    print(f"profile: {args.out}")
    return 0


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.abspath(a) == os.path.abspath(b)


# ---------------------------------------------------------------------------- quality
def add_quality_arguments(parser: argparse.ArgumentParser) -> None:
    add_dataset_arguments(parser)
    parser.add_argument("-n", "--prompts", type=int, metavar="N",
                        help=f"number of prompts (default {CPU_PROMPTS} on CPU, {GPU_PROMPTS} "
                             "on GPU)")
    parser.add_argument("--max-new-tokens", type=int, metavar="T",
                        help=f"continuation length per prompt (default {CPU_NEW_TOKENS} on CPU, "
                             f"{GPU_NEW_TOKENS} on GPU)")
    add_sampling_arguments(parser, temperature=1.0, rule=False, temperature_help=(
        "temperature of P and Q (1: the models' own distributions; 0: one-hot argmax, alpha = "
        "top-1 agreement)"))
    parser.add_argument("--depth", type=int, default=6,
                        help="chain depth D: figures for draft positions 1..D "
                             "(default %(default)s)")
    add_prompt_arguments(parser, "positions along the target's own continuation (default) or "
                                 "the dataset text")
    parser.add_argument("--profile", metavar="PATH",
                        help="an acceptance profile whose top-1 acceptance p1 per depth is "
                             "shown beside (default: none)")
    parser.add_argument("--out", required=True, metavar="PATH",
                        help="quality .json to write (rewritten after every prompt)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run_quality(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if out.suffix.lower() != ".json":
        raise UserError(f"--out {out.name}: draft quality is written as .json")
    check_quality_out(out)
    check_settings(args.temperature, args.top_k, args.top_p)
    for name in ("prompts", "max_new_tokens", "depth"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    profile = None
    if args.profile:
        profile = Profile.load(args.profile)
    args.draft = draft_spec_with_variant(args)
    pair, device = load_models(args)
    model = draft_model(pair.draft if pair.draft is not None else pair.drafter)
    notes = acceptance_defaults(args, device)
    run = QualityRun(depth=args.depth, max_new_tokens=args.max_new_tokens,
                     continuation=args.continuation, seed=args.seed, target=args.target,
                     draft=args.draft, dataset=str(args.dataset),
                     chat_template=not args.no_chat_template,
                     sampling=sampling_from_args(args))
    run.check()
    ids = encode_prompts(pair.tokenizer, select_prompts(args), run.chat_template)
    eos = eos_ids(pair.tokenizer, pair.target) if pair.tokenizer is not None else []
    quality = profile_quality(pair.target, model, ids, run, out=out,
                              eos_token_id=eos[0] if eos else None, progress=not args.quiet)
    if notes:
        print(f"defaults on {device.type}: {', '.join(notes)}")
    print(format_quality(quality, profile))
    print(f"quality: {out}")
    return 0


# ---------------------------------------------------------------------------- calibration
CALIBRATION_DESCRIPTION = """\
Measure how often the target accepts a drafted candidate by the draft's confidence in it
(its softmax probability at its parent): along the target's own greedy continuation of each
prompt, the draft's top --topk tokens at every position are candidates, accepted when equal
to the target's token; counted in --bins bins of confidence (quantile or log-spaced). The
map (made non-decreasing) prices candidates for dynamic-dp:...,profile=PATH;
--latency-from copies a profile's latency table in, so dynamic-dp also weighs step cost.

  treeopt profile calibration --target smollm2 --draft early-exit:4 --dataset spec_bench \\
      --prompts 16 --latency-from profiles/smollm2-ee4-cpu.json --out calibration.json
"""


def add_calibration_parser(sub) -> None:
    cal = sub.add_parser("calibration", help="acceptance by draft confidence (for dynamic-dp)",
                         description=CALIBRATION_DESCRIPTION,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(cal)
    add_dataset_arguments(cal)
    cal.add_argument("--prompts", type=int, metavar="N",
                     help=f"number of prompts (default {CPU_PROMPTS} on CPU, {GPU_PROMPTS} on "
                          "GPU)")
    cal.add_argument("--max-new-tokens", type=int, metavar="T",
                     help=f"continuation length per prompt (default {CPU_NEW_TOKENS} on CPU, "
                          f"{GPU_NEW_TOKENS} on GPU)")
    cal.add_argument("--topk", type=int, default=8, help="candidates per position (default "
                                                        "%(default)s)")
    cal.add_argument("--bins", type=int, default=10, help="confidence bins (default "
                                                         "%(default)s)")
    cal.add_argument("--binning", choices=["quantile", "log"], default="quantile",
                     help="bin edges at quantiles of the confidences (default) or log-spaced")
    cal.add_argument("--latency-from", metavar="PROFILE",
                     help="a profile whose latency table is copied into the calibration")
    cal.add_argument("--seed", type=int, default=0, help="prompt selection seed")
    cal.add_argument("--no-chat-template", action="store_true",
                     help="feed the raw prompt text instead of the chat template")
    cal.add_argument("--out", required=True, metavar="PATH", help="calibration .json to write")
    cal.set_defaults(func=run_calibration)


def run_calibration(args: argparse.Namespace) -> int:
    out = Path(args.out)
    check_writable(out)
    for name in ("prompts", "max_new_tokens"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    check_calibration(args.bins, args.binning, args.topk)
    latency = None
    if args.latency_from:
        latency = Profile.load(args.latency_from).latency
        if latency is None:
            raise UserError(f"{args.latency_from} holds no latency table; measure one with "
                            "treeopt profile latency")
    args.draft = draft_spec_with_variant(args)
    pair, device = load_models(args)
    notes = acceptance_defaults(args, device)
    calibration = calibrate_pair(pair, select_prompts(args), topk=args.topk, bins=args.bins,
                                 binning=args.binning, max_new_tokens=args.max_new_tokens,
                                 latency=latency, chat_template=not args.no_chat_template)
    path = calibration.save(out)
    if notes:
        print(f"defaults on {device.type}: {', '.join(notes)}")
    print(calibration.summary())
    print(calibration.table())
    print(f"calibration: {path}")
    return 0


def add_copy_parser(sub) -> None:
    p = sub.add_parser("copy", help="copy-acceptance table of ngram / suffix drafters",
                       description=COPY_DESCRIPTION,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p)
    add_dataset_arguments(p)
    p.add_argument("--prompts", type=int, metavar="N", help="number of prompts (default by "
                                                           "device, as profile acceptance)")
    p.add_argument("--max-new-tokens", type=int, metavar="T",
                   help="tokens per prompt (default by device)")
    p.add_argument("--mode", choices=["online", "teacher-forced"], default="online",
                   help="online (default) or teacher-forced")
    p.add_argument("--max-tokens", type=int, default=32,
                   help="drafted tokens per step at most while measuring (default %(default)s)")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="online mode: sampling temperature (0 = greedy, the default)")
    p.add_argument("--seed", type=int, default=0, help="prompt selection and sampling seed")
    p.add_argument("--no-chat-template", action="store_true",
                   help="feed the raw prompt text instead of the chat template")
    p.add_argument("--merge", action="store_true", help="add to the table already in --out")
    p.add_argument("--out", required=True, metavar="PATH", help="profile .json to write into")
    p.set_defaults(func=run_copy)


def run_copy(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if out.suffix.lower() != ".json":
        raise UserError(f"--out {out.name}: the copy table goes into a .json profile")
    if not 1 <= args.max_tokens <= 255:
        raise UserError(f"--max-tokens must be in 1..255, got {args.max_tokens}")
    if args.mode == "teacher-forced" and args.temperature > 0:
        raise UserError("--mode teacher-forced is greedy; use --mode online with sampling")
    args.draft = draft_spec_with_variant(args)
    pair, device = load_models(args)
    notes = acceptance_defaults(args, device)
    ids = encode_for_decoding(pair, select_prompts(args), not args.no_chat_template,
                              args.max_new_tokens)
    eos = eos_ids(pair.tokenizer, pair.target) if pair.tokenizer is not None else []
    kw = {"max_new_tokens": args.max_new_tokens, "eos_token_id": eos[0] if eos else None,
          "max_tokens": args.max_tokens}
    if args.mode == "online":
        kw["sampling"] = Sampling(args.temperature, seed=args.seed)
    table = measure_copy(pair.target, pair.drafter, ids, mode=args.mode, **kw)
    table.meta.update(draft=args.draft, target=args.target, dataset=str(args.dataset))
    write_copy_table(table, out, merge=args.merge)
    if notes:
        print(f"defaults on {device.type}: {', '.join(notes)}")
    print(table.summary())
    print("depth: trials/accepted " + "  ".join(f"{d}:{n}/{a}" for d, n, a in
                                                table.by_depth(1)[:16]))
    print(f"copy table: {out}")
    return 0
