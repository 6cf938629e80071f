"""``treeopt generate``: decode a prompt with a draft/target pair and a tree, streaming the
text to stdout; the decoding statistics follow on stderr."""

from __future__ import annotations

import json
import sys
import time

from treeopt.api import encode_prompt, generate, load_pair
from treeopt.cli import UserError
from treeopt.cli.args import (
    DEFAULT_DRAFT,
    DEFAULT_TARGET,
    TARGET_HELP,
    THREADS_HELP,
    add_draft_variant_arguments,
    add_remeasure_argument,
    add_sampling_arguments,
    draft_spec_with_variant,
    drafter_specs,
    remeasuring,
    sampling_from_args,
    set_threads,
)
from treeopt.decode.sampling import check_settings
from treeopt.models.cache import cache_dir
from treeopt.models.loading import pending_conversion
from treeopt.shapes import resolve_tree
from treeopt.treeset import TreeSet


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "generate", help="decode a prompt with tree speculative decoding",
        description="Decode a prompt with a draft/target pair and a token tree. The text is "
                    "streamed to stdout; statistics (tokens per step, acceptance rate, "
                    "tokens/s of generated tokens, time split) follow on stderr. Works offline "
                    f"with the defaults (--target {DEFAULT_TARGET} --draft {DEFAULT_DRAFT}).",
    )
    p.add_argument("--target", default=DEFAULT_TARGET, help=TARGET_HELP)
    p.add_argument("--draft", default=DEFAULT_DRAFT,
                   help=f"drafter: a draft model (folder, .gguf file, hub id) or one of "
                        f"{drafter_specs()}; or 'none' for plain autoregressive decoding "
                        f"(default: {DEFAULT_DRAFT})")
    add_draft_variant_arguments(p)
    p.add_argument("--growmap", "--tree", dest="growmap", default=None,
                   help="tree: a growmap file (.pt/.json), a tree set (.json: one tree per "
                        "context range, picked by prompt tokens + max-new-tokens // 2) or a "
                        "shape such as chain:5 (a chain "
                        "of size 5 = 4 drafted tokens per step), kary:2x3 or specinfer:1,2,1: "
                        "what a model drafter drafts, or the most an n-gram/datastore drafter "
                        "fills (default: the drafter's own: chain:5 for model drafters, "
                        "chain:4 for model-free ones)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", help="prompt text (with neither --prompt nor --prompt-file "
                                      "the prompt is read from stdin)")
    src.add_argument("--prompt-file", help="file whose whole content is the prompt")
    p.add_argument("--max-new-tokens", type=int, default=128,
                   help="tokens to generate (default: 128)")
    add_sampling_arguments(p)
    p.add_argument("--seed", type=int, default=None,
                   help="seed for sampling (default: none, a different draw each run)")
    p.add_argument("--no-chat-template", action="store_true",
                   help="feed the raw prompt instead of applying the tokenizer's chat template")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto: on a CPU the dtype measured faster for the target on this "
                        "machine (once, then cached), bfloat16 on CUDA (default: auto)")
    p.add_argument("--device", default="auto", help="auto (default), cpu or cuda")
    p.add_argument("--threads", type=int, metavar="N", help=THREADS_HELP)
    add_remeasure_argument(p)
    p.add_argument("--stats-json", action="store_true",
                   help="print the statistics as one JSON line instead of a table")
    p.set_defaults(func=run)


def read_prompt(args) -> str:
    if args.prompt is not None:
        text = args.prompt
    elif args.prompt_file is not None:
        try:
            with open(args.prompt_file, encoding="utf-8") as f:
                text = f.read()
        except OSError as exc:
            raise UserError(f"cannot read --prompt-file {args.prompt_file!r}: "
                            f"{exc.strerror}") from None
    elif not sys.stdin.isatty():
        text = sys.stdin.read()
    else:
        raise UserError("give a prompt with --prompt TEXT, --prompt-file FILE or on stdin")
    if not text.strip():
        raise UserError("the prompt is empty")
    return text


def format_stats(stats, load_s: float) -> list[str]:
    """Human-readable statistics lines for a ``DecodeStats``."""
    total = stats.total_s or 0.0
    tps = stats.generated_tokens / total if total > 0 else float("nan")

    def share(x: float) -> str:
        return f"{x:.2f} s ({100 * x / total:.0f} %)" if total > 0 else f"{x:.2f} s"

    return [
        f"generated tokens   {stats.generated_tokens} in {stats.target_forwards} target "
        f"forwards",
        f"tokens per step    {stats.tokens_per_step:.3f}",
        f"acceptance rate    {stats.acceptance_rate:.3f} "
        f"({stats.accepted_tokens}/{stats.drafted_tokens} drafted tokens accepted)",
        f"tokens/s           {tps:.2f} (generated tokens only)",
        f"time               decode {total:.2f} s = prefill {share(stats.prefill_s)} + draft "
        f"{share(stats.draft_s)} + verify {share(stats.verify_s)} + other "
        f"{share(stats.other_s)}; model load {load_s:.2f} s",
    ] + ([f"drafter choice     {stats.choice}"] if getattr(stats, "choice", "") else [])


def run(args) -> int:
    import torch
    from transformers.utils import logging as hf_logging

    check_settings(args.temperature, args.top_k, args.top_p, args.rule)
    if args.max_new_tokens < 1:
        raise UserError("--max-new-tokens must be >= 1")
    args.draft = draft_spec_with_variant(args)
    set_threads(args.threads)
    prompt = read_prompt(args)
    tree = resolve_tree(args.growmap)
    hf_logging.disable_progress_bar()
    gguf = pending_conversion(args.target)
    if gguf is not None:
        print(f"treeopt: converting {gguf.name} once into {cache_dir()} (takes about half a "
              "minute)", file=sys.stderr)
    start = time.perf_counter()
    with remeasuring(args):
        pair = load_pair(args.target, args.draft, dtype=args.dtype, device=args.device)
    load_s = time.perf_counter() - start
    if pair.tokenizer is None:
        raise UserError(f"target {args.target!r} has no tokenizer to turn the prompt into ids")

    def on_text(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    picked = {}
    if isinstance(tree, TreeSet) and pair.drafter is not None:
        n = encode_prompt(pair.tokenizer, prompt, not args.no_chat_template).shape[1]
        bucket, used = tree.pick(n, args.max_new_tokens)
        picked = {"tree_bucket": bucket, "tree_nodes": used.size}
        print(f"tree set: {n} prompt tokens + {args.max_new_tokens} // 2 new tokens -> "
              f"contexts {tree.span(bucket)}: size {used.size}, depth {used.depth}",
              file=sys.stderr)
    if args.seed is not None:
        torch.manual_seed(args.seed)
    _, stats = generate(prompt, pair=pair, tree=tree if pair.drafter is not None else None,
                        chat_template=not args.no_chat_template,
                        max_new_tokens=args.max_new_tokens,
                        sampling=sampling_from_args(args, seed=args.seed), on_text=on_text)
    sys.stdout.write("\n")
    sys.stdout.flush()
    if args.stats_json:
        record = dict(stats.to_dict(), load_s=load_s, target=args.target, draft=args.draft,
                      growmap=str(args.growmap) if pair.drafter is not None else None,
                      **picked)
        record.pop("steps", None)
        print(json.dumps(record), file=sys.stderr)
    else:
        for line in format_stats(stats, load_s):
            print(line, file=sys.stderr)
    return 0
