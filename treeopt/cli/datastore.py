"""``treeopt datastore``: build and inspect the corpus index of the ``datastore:PATH`` and
``bigram:PATH`` drafters.

A datastore is an index over a tokenised corpus: at decoding time the drafter proposes what
most often followed the current text there. Build it once per corpus and tokenizer (the
target's: a store is refused by a target with another tokenizer).

Corpus documents: every turn of every prompt of a shipped dataset (spec_bench, mt_bench,
humaneval), every prompt/text of a .jsonl or .json file, or every non-empty line of any other
text file (use .jsonl with a "text" field for multi-line documents). Matches never cross
documents.

examples:
  treeopt datastore build --corpus humaneval --tokenizer smollm2 --out stores/humaneval.npz
  treeopt datastore build --corpus my_code.jsonl --tokenizer ./my-model --out code.npz
  treeopt datastore info stores/humaneval.npz
  treeopt generate --draft datastore:stores/humaneval.npz ...
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from treeopt.cli import UserError
from treeopt.datasets import load_prompts
from treeopt.drafters.datastore import DatastoreError, build_datastore, load_datastore, read_meta
from treeopt.models.loading import load_tokenizer

DEFAULT_MAX_N = 8


def register(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "datastore", help="build/inspect a corpus index for the datastore and bigram drafters",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="action", metavar="ACTION")

    b = sub.add_parser("build", help="tokenise a corpus and write its index (.npz)",
                       description="Tokenise a corpus with the target's tokenizer and write "
                                   "its suffix index as one .npz file (written atomically; "
                                   "an existing datastore at --out is replaced, any other "
                                   "file is left alone).")
    src = b.add_argument_group("corpus")
    src.add_argument("--corpus", required=True, metavar="FILE_OR_DATASET",
                     help="spec_bench, mt_bench, humaneval (every turn of every prompt), or a "
                          ".jsonl/.json file (one document per prompt) or text file (one "
                          "document per non-empty line)")
    src.add_argument("--categories", metavar="CAT[,CAT...]",
                     help="keep only these categories of the corpus (default: all)")
    tok = b.add_argument_group("tokenizer")
    tok.add_argument("--tokenizer", required=True, metavar="TARGET",
                     help="the target model spec whose tokenizer to use (e.g. smollm2, a "
                          "save_pretrained folder or a cached Hugging Face id)")
    idx = b.add_argument_group("index")
    idx.add_argument("--max-n", type=int, default=DEFAULT_MAX_N, metavar="N",
                     help="longest context matched, in tokens (default: %(default)s)")
    out = b.add_argument_group("output")
    out.add_argument("--out", required=True, metavar="PATH",
                     help="datastore file to write (.npz)")
    out.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    b.set_defaults(func=run_build)

    i = sub.add_parser("info", help="print a datastore's metadata",
                       description="Print a datastore's metadata (corpus, tokenizer, sizes) "
                                   "after checking the file.")
    i.add_argument("path", metavar="PATH", help="datastore file (.npz)")
    i.add_argument("--json", action="store_true", help="print the metadata as one JSON object")
    i.set_defaults(func=run_info)

    parser.set_defaults(func=lambda args: _no_action(parser))
    return parser


def _no_action(parser) -> int:
    parser.print_help()
    return 2


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover


def _check_out(path: Path) -> None:
    """Refuse an --out that exists and is not a datastore (never overwrite other files)."""

    if not path.exists():
        return
    if path.is_dir():
        raise UserError(f"--out {path} is a folder; give a file path such as {path}/store.npz")
    try:
        read_meta(path)
    except DatastoreError:
        raise UserError(f"--out {path} exists and is not a treeopt datastore; refusing to "
                        "overwrite it: remove it or choose another --out") from None


def run_build(args: argparse.Namespace) -> int:
    if args.max_n < 1:
        raise UserError(f"--max-n must be at least 1, got {args.max_n}")
    out = Path(args.out)
    _check_out(out)

    prompts = load_prompts(args.corpus, categories=args.categories, turns="both")
    texts = [t for p in prompts for t in p.turns if t.strip()]
    if not texts:
        raise UserError(f"corpus {args.corpus}: no text to index")
    tokenizer = load_tokenizer(args.tokenizer)
    if tokenizer is None:
        raise UserError(f"--tokenizer {args.tokenizer}: the model has no tokenizer files; give "
                        "the spec of a model saved with its tokenizer")
    start = time.perf_counter()
    corpus = Path(args.corpus).name if Path(args.corpus).exists() else args.corpus
    desc = corpus + (f" (categories {args.categories})" if args.categories else "")
    store = build_datastore(texts, tokenizer, max_n=args.max_n, progress=not args.no_progress,
                            description=desc, meta={"tokenizer_spec": args.tokenizer})
    store.save(out)
    elapsed = time.perf_counter() - start
    print(f"wrote {out}: {store.num_documents} documents, {store.num_tokens} tokens, "
          f"max_n {store.max_n}, {_size(out.stat().st_size)}, built in {elapsed:.1f} s")
    return 0


def run_info(args: argparse.Namespace) -> int:
    path = Path(args.path)
    start = time.perf_counter()
    store = load_datastore(path)
    load_s = time.perf_counter() - start
    meta = dict(store.meta)
    if args.json:
        print(json.dumps(meta, ensure_ascii=False, sort_keys=True))
        return 0
    fp = meta.get("tokenizer_fingerprint")
    lines = [
        ("file", f"{path} ({_size(path.stat().st_size)}, loaded in {load_s * 1000:.0f} ms)"),
        ("format", f"{meta.get('format')} v{meta.get('version')}"),
        ("corpus", meta.get("description") or "-"),
        ("documents", store.num_documents),
        ("tokens", store.num_tokens),
        ("max_n", store.max_n),
        ("tokenizer", meta.get("tokenizer_spec") or meta.get("tokenizer") or "- (token ids)"),
        ("vocab_size", meta.get("vocab_size")),
        ("fingerprint", fp[:16] if fp else "-"),
        ("created", meta.get("created") or "-"),
    ]
    for key, value in lines:
        print(f"{key + ':':<13}{value}")
    return 0
