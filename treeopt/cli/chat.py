"""``treeopt chat``: an interactive session. Prompts are read from stdin line by line (a
terminal or a pipe), answers stream to stdout, slash commands change the drafting and
sampling settings between answers (see ``treeopt.chat``)."""

from __future__ import annotations

import sys

from treeopt.api import load_pair
from treeopt.chat import ChatSession, summary
from treeopt.cli import UserError
from treeopt.cli.args import (
    DEFAULT_DRAFT,
    DEFAULT_TARGET,
    TARGET_HELP,
    THREADS_HELP,
    add_remeasure_argument,
    add_sampling_arguments,
    drafter_specs,
    remeasuring,
    sampling_from_args,
    set_threads,
)
from treeopt.decode.sampling import check_settings
from treeopt.errors import TreeoptError, one_line
from treeopt.models.cache import cache_dir
from treeopt.models.loading import pending_conversion

PROMPT = "> "


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "chat", help="an interactive session with slash commands that switch drafting",
        description="Chat with a target model decoded by tree speculative decoding. Type a "
                    "prompt and the answer streams back; slash commands change the settings "
                    "without restarting: /speculative, /ngram, /egag, /gamma N, /tree SHAPE, "
                    "/draft SPEC, /processor greedy|multinomial|topk K|nucleus P|topknucleus "
                    "K P, /length N, /stats, /reset, /help, /quit. An empty line is ignored; "
                    "Ctrl-C stops the answer being written; Ctrl-D or /quit leaves. Reads a "
                    "pipe as well as a terminal (the '> ' marker is shown on terminals only). "
                    "The conversation goes through the tokenizer's chat template when it has "
                    "one; each answer's statistics line goes to stderr.",
    )
    p.add_argument("--target", default=DEFAULT_TARGET, help=TARGET_HELP)
    p.add_argument("--draft", default=DEFAULT_DRAFT,
                   help=f"drafter of speculative decoding: a draft model or one of {drafter_specs()}; or 'none' to "
                        f"start with speculation off (/speculative turns it on with "
                        f"{DEFAULT_DRAFT}) (default: {DEFAULT_DRAFT})")
    p.add_argument("--tree", "--growmap", dest="tree", default=None,
                   help="tree: a shape such as chain:5 or kary:2x3, or a growmap file (.pt or "
                        ".json); /tree changes it (default: the drafter's own)")
    p.add_argument("--gamma", type=int, default=None, metavar="N",
                   help="draft a chain of N tokens per step instead of a tree; /gamma changes "
                        "it (default: the drafter's own)")
    p.add_argument("--max-new-tokens", type=int, default=128,
                   help="new tokens per answer; /length changes it (default: 128)")
    add_sampling_arguments(p, changed_by="/processor changes it")
    p.add_argument("--seed", type=int, default=None,
                   help="seed for sampling, the same for every answer (default: none, a "
                        "different draw each time)")
    p.add_argument("--system", default=None, metavar="TEXT",
                   help="system message opening the conversation (default: none)")
    p.add_argument("--no-chat-template", action="store_true",
                   help="feed the raw text instead of applying the tokenizer's chat template "
                        "(the turns are then joined by newlines)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto: on a CPU the dtype measured faster for the target on this "
                        "machine (once, then cached), bfloat16 on CUDA (default: auto)")
    p.add_argument("--device", default="auto", help="auto (default), cpu or cuda")
    p.add_argument("--threads", type=int, metavar="N", help=THREADS_HELP)
    add_remeasure_argument(p)
    p.set_defaults(func=run)


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _read_line(interactive: bool) -> str | None:
    """The next line without its end, or None at the end of input (Ctrl-D)."""
    if interactive:
        try:
            return input(PROMPT)
        except EOFError:
            return None
    line = sys.stdin.readline()
    return None if line == "" else line.rstrip("\r\n")


def run(args) -> int:
    from transformers.utils import logging as hf_logging

    check_settings(args.temperature, args.top_k, args.top_p, args.rule)
    if args.max_new_tokens < 1:
        raise UserError("--max-new-tokens must be >= 1")
    if args.gamma is not None and args.tree is not None:
        raise UserError("give either --tree or --gamma, not both")
    set_threads(args.threads)
    hf_logging.disable_progress_bar()
    gguf = pending_conversion(args.target)
    if gguf is not None:
        print(f"treeopt: converting {gguf.name} once into {cache_dir()} (takes about half a "
              "minute)", file=sys.stderr)
    with remeasuring(args):
        pair = load_pair(args.target, None, dtype=args.dtype, device=args.device)
        if pair.tokenizer is None:
            raise UserError(f"target {args.target!r} has no tokenizer to turn prompts into "
                            "ids")
        session = ChatSession(
            pair.target, pair.tokenizer, draft=args.draft, gamma=args.gamma, tree=args.tree,
            sampling=sampling_from_args(args, seed=args.seed),
            max_new_tokens=args.max_new_tokens, system=args.system,
            chat_template=not args.no_chat_template)
        session.drafter()  # a draft that cannot be loaded fails here, before the first prompt
    print(f"treeopt chat: {args.target}; {session.mode()}. /help lists the commands, /quit "
          "or Ctrl-D leaves.", file=sys.stderr)
    interactive = sys.stdin.isatty()
    if callable(getattr(sys.stdin, "reconfigure", None)):
        # Bytes that are not UTF-8 reach the session as such (which refuses the line)
        # instead of ending the loop with a decoding error.
        sys.stdin.reconfigure(errors="surrogateescape")
    while not session.finished:
        try:
            line = _read_line(interactive)
        except KeyboardInterrupt:
            print("\n(Ctrl-C stops an answer; Ctrl-D or /quit leaves)", file=sys.stderr)
            continue
        if line is None:
            if interactive:
                _write("\n")
            break
        text = line.strip()
        if not text:
            continue
        try:
            if text.startswith("/") and not text.startswith("//"):
                _write(session.command(text) + "\n")
                continue
            prompt = text[1:] if text.startswith("//") else text
            try:
                answer = session.answer(prompt, on_text=_write)
            except (TreeoptError, OSError) as exc:
                _write(f"error: {one_line(exc, 300)}\n")
                continue
            except Exception as exc:  # noqa: BLE001 - the session survives any line
                _write(f"error: the answer failed ({type(exc).__name__}: "
                       f"{one_line(exc, 300)}); the conversation is kept\n")
                continue
            _write(" [interrupted]\n" if answer.interrupted else "\n")
            print(summary(answer), file=sys.stderr)
        except KeyboardInterrupt:
            _write(" [interrupted]\n")
    return 0
