"""``treeopt eval``: plain decoding, chains and trees, any drafter, and Hugging Face's own
prompt lookup and assisted generation on the same prompts, interleaved; a table on stdout,
CSV/JSON (and plots) in --out."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from treeopt.api import load_pair
from treeopt.cli import UserError
from treeopt.cli.args import (
    DEFAULT_DRAFT,
    DEFAULT_TARGET,
    THREADS_HELP,
    DefaultsFormatter,
    add_draft_variant_arguments,
    add_remeasure_argument,
    add_sampling_arguments,
    draft_spec_with_variant,
    drafter_specs,
    int_list,
    remeasuring,
    sampling_from_args,
    set_threads,
)
from treeopt.datasets import load_prompts
from treeopt.evaluate.methods import (
    ar_method,
    chain_method,
    disambiguate,
    dp_method,
    drafter_method,
    tree_method,
)
from treeopt.evaluate.passk import CACHE_FILE, Limits, format_pass, load_problems, score_run
from treeopt.evaluate.reference import early_exit_layers, hf_assisted, hf_prompt_lookup
from treeopt.evaluate.report import write_report
from treeopt.evaluate.results import choice_lines, format_summary
from treeopt.evaluate.runner import EvalConfig, check_config, check_out_dir, run_eval
from treeopt.evaluate.spread import FLAGS
from treeopt.evaluate.table import format_compact
from treeopt.profile import Profile


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "eval", help="compare plain decoding, chains, trees, drafters and Hugging Face's "
                     "speculative decoding on a dataset",
        description="Run plain autoregressive decoding, chains and trees of the default "
                    "drafter (--draft), other drafters (--drafter) and Hugging Face's own "
                    "prompt lookup and assisted generation (--hf-prompt-lookup, "
                    "--hf-assisted) on the same prompts with the same settings, interleaved "
                    "per prompt in a rotating order. Prints tokens/s (generated tokens only), "
                    "speed-up over plain decoding, tokens per step, acceptance rate, mean "
                    "accepted length, (greedy) whether each output equals plain decoding's, "
                    "and the per-step time split (draft / verify / other ms per step), with "
                    "the spread of the speed-up over prompts (median, bootstrap 95% "
                    "interval) and a flag on figures that cannot be trusted; writes "
                    "summary.csv, per_prompt.csv (plain CSV), metrics.json (their column "
                    "definitions), results.json, rows.jsonl and a report to --out. Greedy "
                    "outputs are 'equal' to plain decoding's, differ only at a numerical "
                    "tie (the target's two tokens in question within the dtype's rounding "
                    "tolerance of its best logit, as half precision produces: reported, not "
                    "a failure), or differ: exit status 1.",
        formatter_class=DefaultsFormatter)
    m = p.add_argument_group("models")
    m.add_argument("--target", default=DEFAULT_TARGET, help="target model spec (see generate)")
    m.add_argument("--draft", default=DEFAULT_DRAFT,
                   help="the default drafter, used by --chain, --tree, --dp and --hf-assisted: "
                        f"any drafter spec ({drafter_specs()}); 'none' for no drafter")
    add_draft_variant_arguments(p)
    m.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto: on a CPU the dtype measured faster for the target on this "
                        "machine (once, then cached), bfloat16 on CUDA (default: auto)")
    m.add_argument("--device", default="auto", help="auto, cpu or cuda")
    m.add_argument("--threads", type=int, default=None, metavar="N", help=THREADS_HELP)
    add_remeasure_argument(m)
    d = p.add_argument_group("prompts")
    d.add_argument("--dataset", default="spec_bench",
                   help="spec_bench, mt_bench, humaneval, a .jsonl/.json/.txt file, or "
                        "hf:NAME[:split] (default: spec_bench, as for tune and profile)")
    d.add_argument("--categories", default=None,
                   help="comma-separated categories to keep (default: all)")
    d.add_argument("-n", "--num-prompts", type=int, default=None, metavar="N",
                   help="draw this many prompts, stratified across categories (default: "
                        "every prompt)")
    d.add_argument("--seed", type=int, default=0,
                   help="seed of the prompt draw and of sampling (prompt i uses seed + i)")
    d.add_argument("--turns", choices=["first", "both"], default="first",
                   help="multi-turn data: first user turn only, or every turn")
    d.add_argument("--window", type=int, default=None, metavar="N",
                   help="text files: consecutive windows of N units (--window-unit) instead "
                        "of one prompt per line (default: lines)")
    d.add_argument("--window-unit", choices=["chars", "tokens"], default="tokens",
                   help="unit of --window: characters or target tokens")
    t = p.add_argument_group("methods (plain decoding always runs)")
    t.add_argument("--chain", type=int_list, default=[],
                   help="chains by draft tokens per step, e.g. 2,4,8 (L draft tokens is the "
                        "shape chain:L+1, whose number counts nodes)")
    t.add_argument("--tree", "--growmap", dest="trees", action="append", default=[],
                   help="a growmap file or shape spec (kary:2x3, greedy:32, dp:64x8 ...); "
                        "repeat for several")
    t.add_argument("--dp", action="append", default=[], metavar="SIZE[xLEVELS]",
                   help="the exact-DP tree for --profile of at most SIZE nodes and at most "
                        "LEVELS levels counting the root, e.g. 32x6 (depth 5: the method is "
                        "named by its shape spec dp:32x5, whose second number counts edges); "
                        "repeatable")
    t.add_argument("--drafter", dest="drafters", action="append", default=[],
                   metavar="SPEC[@SHAPE]",
                   help="a method drafting with the drafter SPEC (as for --draft), over SHAPE "
                        "(a growmap file or shape spec as for --tree; default: the drafter's "
                        "own), named as given: ngram, ngram@chain:3, ngram:max=3@kary:2x1, "
                        "datastore:store.npz@chain:4, egag:gamma_max=4@kary:2x3; adaptive "
                        "drafters' tree sizes and depths go into the report; repeatable")
    t.add_argument("--hf-prompt-lookup", type=int_list, default=[], metavar="K[,K...]",
                   help="reference: Hugging Face generate(prompt_lookup_num_tokens=K), as "
                        "methods hf-pld:K")
    t.add_argument("--hf-assisted", action="store_true",
                   help="reference: Hugging Face assisted generation (method hf-assisted) "
                        "with the --draft model, or assistant_early_exit=K when --draft is "
                        "early-exit:K")
    t.add_argument("--profile", default=None,
                   help="acceptance profile (.json/.pt): expected tokens per step of every "
                        "tree, and the table for dp:/greedy: shapes (default: none)")
    g = p.add_argument_group("decoding")
    g.add_argument("--max-new-tokens", type=int, default=128,
                   help="tokens each method generates per prompt")
    add_sampling_arguments(g)
    g.add_argument("--stop-at-eos", action="store_true",
                   help="stop at EOS (default: every method generates exactly "
                        "--max-new-tokens, so speed-ups compare equal token counts)")
    g.add_argument("--no-chat-template", action="store_true",
                   help="feed the raw prompt text (default: apply the tokenizer's chat "
                        "template)")
    g.add_argument("--long-prompts", choices=["truncate", "skip"], default="truncate",
                   help="a prompt longer than the model window (the smallest "
                        "max_position_embeddings of the models run) minus --max-new-tokens: "
                        "keep its last tokens (a left cut) or leave it out; a warning says "
                        "how many prompts and tokens")
    g.add_argument("--repeats", type=int, default=1,
                   help="run each generation this many times from the same drafter state and "
                        "keep the fastest (default 1): on a shared, noisy machine, 3 ranks "
                        "methods a few %% apart")
    g.add_argument("--no-warmup", action="store_true", help="skip the untimed warm-up call")
    o = p.add_argument_group("output")
    o.add_argument("--out", required=True, metavar="DIR",
                   help="results folder, required (locked while the run writes to it)")
    o.add_argument("--resume", action="store_true",
                   help="continue an interrupted run in --out, skipping finished prompts; "
                        "refused when the target, draft, dataset, prompts, methods or "
                        "decoding settings differ from that run's")
    o.add_argument("--no-report", action="store_true", help="skip plots and report page")
    o.add_argument("--wide", action="store_true",
                   help="print every summary column (time split, acceptance, nodes, ...) "
                        "instead of the compact table (method, speed-up and its interval, "
                        "tokens/step, equal, flags); the CSVs and the report always have all")
    o.add_argument("--no-progress", action="store_true", help="no progress bar")
    k = p.add_argument_group("pass@1 (code problems with tests: humaneval, or a JSONL file "
                             "with prompt, test and entry_point)")
    k.add_argument("--pass-at-1", action=argparse.BooleanOptionalAction, default=None,
                   help="run each output's code against its problem's tests and report "
                        "pass@1 per method: each program runs as user nobody in its own "
                        "PID, mount and network namespaces with a read-only file system "
                        "outside a temporary folder, limits and a timeout, where the kernel "
                        "allows (the report says what was achieved; refused where only the "
                        "limits hold). It runs model-written code, so it is off "
                        "unless asked, or unless --out already holds pass@1 results (a "
                        "--resume keeps scoring; programs already scored are not run again)")
    k.add_argument("--pass-timeout", type=float, default=10.0, metavar="S",
                   help="wall-clock seconds per program before it is killed (a timeout "
                        "costs that sample only)")
    k.add_argument("--pass-workers", type=int, choices=[1, 2], default=1,
                   help="programs run at once")
    k.add_argument("--pass-allow-unisolated", action="store_true",
                   help="score even where the sandbox can only set rlimits (the program "
                        "would run as your user with your file system writable)")
    p.set_defaults(func=run)


def build_methods(args, profile) -> list:
    """The methods of the command line, plain decoding first, then --chain, --tree, --dp,
    --drafter, --hf-prompt-lookup and --hf-assisted in that order."""

    methods = [ar_method()] + [chain_method(n) for n in args.chain]
    paths: list[str | None] = [None] * len(methods)
    for spec in args.trees:
        methods.append(tree_method(spec, profile))
        paths.append(spec if _is_growmap(spec) else None)
    for dp in args.dp:
        size, levels = parse_dp(dp)
        if profile is None:
            raise UserError("--dp needs --profile (the acceptance profile to optimise for)")
        methods.append(dp_method(profile, size, levels))
    methods += [drafter_method(text, profile) for text in getattr(args, "drafters", [])]
    methods += [hf_prompt_lookup(k) for k in getattr(args, "hf_prompt_lookup", [])]
    if getattr(args, "hf_assisted", False):
        methods.append(hf_assisted(early_exit_layers(args.draft)))
    paths += [None] * (len(methods) - len(paths))
    # Growmaps whose metadata names collide are told apart by their paths; any other
    # repeated name is refused by run_eval.
    return disambiguate(methods, paths)


def parse_dp(text: str) -> tuple[int, int | None]:
    """``--dp SIZE[xLEVELS]`` -> (size, levels counting the root, or None for no limit)."""
    import re

    m = re.fullmatch(r"\s*(\d{1,9})\s*(?:[xX]\s*(\d{1,9})\s*)?", text)
    if not m:
        raise UserError(f"--dp {text!r}: expected SIZExLEVELS (levels count the root), e.g. "
                        "32x6, or SIZE")
    size, levels = int(m.group(1)), None if m.group(2) is None else int(m.group(2))
    if size < 1:
        raise UserError(f"--dp {text!r}: the size must be at least 1")
    if levels is not None and levels < 2:
        raise UserError(f"--dp {text!r}: LEVELS counts the root, so it must be at least 2 "
                        "(the root and one level of drafted tokens)")
    return size, levels


def _is_growmap(spec: str) -> bool:
    from pathlib import Path

    return Path(spec.strip()).suffix.lower() in (".pt", ".pth", ".json")


def run(args) -> int:
    if args.max_new_tokens < 1:
        raise UserError("--max-new-tokens must be at least 1")
    # The prompts and the output folder are checked first, not after the models are loaded.
    select = dict(categories=args.categories, n=args.num_prompts, seed=args.seed,
                  turns=args.turns, window=args.window, window_unit=args.window_unit)
    token_windows = args.window is not None and args.window_unit == "tokens"
    prompts = None if token_windows else load_prompts(args.dataset, **select)
    check_out_dir(args.out, resume=args.resume)
    args.draft = draft_spec_with_variant(args)
    config = EvalConfig(max_new_tokens=args.max_new_tokens, seed=args.seed,
                        stop_at_eos=args.stop_at_eos, chat_template=not args.no_chat_template,
                        warmup=not args.no_warmup, long_prompts=args.long_prompts,
                        sampling=sampling_from_args(args), repeats=args.repeats)
    # Every setting is checked before any model is loaded or any file is written.
    check_config(config)
    scoring = _pass_at_1_setup(args)
    set_threads(args.threads)
    profile = None
    if args.profile:
        profile = Profile.load(args.profile)
    methods = build_methods(args, profile)
    if len(methods) == 1:
        print("treeopt eval: note: only plain decoding requested (add --chain, --tree, --dp, "
              "--drafter, --hf-prompt-lookup or --hf-assisted)", file=sys.stderr)
    with remeasuring(args):  # the drafters are built in run_eval too
        pair = load_pair_for(args)
        if prompts is None:
            prompts = load_prompts(args.dataset, tokenizer=pair.tokenizer, **select)
        meta = {"target": args.target, "draft": args.draft, "dataset": args.dataset,
                "device": str(getattr(pair.target, "device", "")),
                "profile": args.profile}
        # The pair's drafter (any spec); loaders that return only a draft model work too.
        draft = getattr(pair, "drafter", None) or getattr(pair, "draft", None)
        try:
            result = run_eval(pair.target, draft, prompts, methods, config=config,
                              tokenizer=pair.tokenizer, out_dir=args.out, resume=args.resume,
                              profile=profile, progress=not args.no_progress, meta=meta)
        except KeyboardInterrupt:
            if args.out and Path(args.out).is_dir():
                raise KeyboardInterrupt(f"every finished prompt is kept in {args.out}; run the "
                                        "same command with --resume to continue from it") from None
            raise
    scored = _score(result, scoring, not args.no_progress)
    print(format_summary(result.summary) if args.wide else format_compact(result.summary))
    for line in choice_lines(result.rows):
        print(line, file=sys.stderr)
    if scored is not None:
        print(format_pass(scored))
    _explain_flags(result.summary)
    print(f"results: {result.out_dir}", file=sys.stderr)
    if not args.no_report:
        page = write_report(result.out_dir, result.out_dir / "report", profile=profile)
        print(f"report: {page}", file=sys.stderr)
    ties = getattr(result, "ties", None) or []
    if ties:
        print(f"treeopt eval: note: {len(ties)} greedy output(s) differ from plain decoding "
              "only at a numerical tie (both tokens' logits within the dtype's rounding "
              "tolerance of the best; not a failure, see exactness in metrics.json):",
              file=sys.stderr)
        for line in ties[:20]:
            print(f"  {line}", file=sys.stderr)
    if result.failures:
        print(f"treeopt eval: GREEDY EXACTNESS FAILED for {len(result.failures)} output(s):",
              file=sys.stderr)
        for line in result.failures[:20]:
            print(f"  {line}", file=sys.stderr)
        return 1
    return 0


def _explain_flags(summary) -> None:
    """One stderr line per flag that appears in the summary, saying what it means."""

    seen = {f for v in summary.get("flag", []) if isinstance(v, str) for f in v.split(";") if f}
    for flag in (f for f in FLAGS if f in seen):
        print(f"flag {flag}: {FLAGS[flag]}", file=sys.stderr)


def load_pair_for(args):
    """The target, the default drafter (``--draft``) and the tokenizer for the command line
    (``treeopt.models.loading.Pair``; a seam for tests)."""

    return load_pair(args.target, args.draft, dtype=args.dtype, device=args.device)


def _pass_at_1_setup(args):
    """(problems, limits, workers) when this run scores pass@1 (checked before any model
    is loaded), else None; a note when a code dataset runs without it."""
    from pathlib import Path

    wanted = args.pass_at_1
    if wanted is None:
        wanted = (Path(args.out) / CACHE_FILE).exists()
        if not wanted and str(args.dataset) == "humaneval":
            print("treeopt eval: note: add --pass-at-1 to score pass@1 (runs the generated "
                  "code against HumanEval's tests in a sandbox)", file=sys.stderr)
    if not wanted:
        return None
    limits = Limits(timeout_s=args.pass_timeout, allow_unisolated=args.pass_allow_unisolated)
    return load_problems(args.dataset), limits, args.pass_workers


def _score(result, scoring, progress: bool):
    """Score the run's outputs (``treeopt.evaluate.passk.score_run``) and put pass@1 into
    ``result``'s summary; None when not scoring."""
    if scoring is None or result.out_dir is None:
        return None

    problems, limits, workers = scoring
    scored = score_run(result.out_dir, problems, limits, workers=workers, progress=progress)
    result.summary, result.rows = scored.summary, scored.rows
    return scored
