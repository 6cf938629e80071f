"""``treeopt bench``: micro-benchmarks. ``attention``: one masked attention call over a tree
vs one call per branch; ``verify``: the target's forward time against tree size."""

from __future__ import annotations

import sys

from treeopt.bench.attention import (
    bench_attention,
    bench_verify,
    format_attention_table,
    plot_attention,
    plot_verify,
)
from treeopt.cli import UserError
from treeopt.cli.args import DEFAULT_TARGET, THREADS_HELP, DefaultsFormatter, int_list, set_threads
from treeopt.models.loading import load_model


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "bench", help="tree attention and verify-cost benchmarks",
        description="Micro-benchmarks. attention: one masked attention call over a token tree "
                    "against one call per branch; verify: the target's forward time against "
                    "tree size (the verify cost curve). CPU timings: treeopt sets "
                    "OMP_WAIT_POLICY=PASSIVE unless it is set; --threads 1 steadies them on a "
                    "busy machine.")
    sub = p.add_subparsers(dest="bench", metavar="BENCH")
    a = sub.add_parser(
        "attention", help="tree attention (one masked call) vs per-branch attention",
        description="Time torch SDPA over a whole token tree with a boolean and an additive "
                    "tree mask (and FlexAttention with a block mask on CUDA) against one "
                    "causal SDPA call per root-to-leaf branch, over batch size, context "
                    "length and tree size. Each tree result is checked against the "
                    "per-branch results. Median and IQR over --repeats after --warmup.",
        formatter_class=DefaultsFormatter)
    a.add_argument("--batch", type=int_list, default=[1, 4], metavar="B,...",
                   help="batch sizes (comma-separated)")
    a.add_argument("--context", type=int_list, default=[128, 512, 2048], metavar="C,...",
                   help="cached prefix lengths (comma-separated)")
    a.add_argument("--tree-sizes", type=int_list, default=[8, 16, 32, 64], metavar="N,...",
                   help="tree sizes in nodes, root included (comma-separated)")
    a.add_argument("--shape", default="binary", choices=["binary", "ternary", "chain", "star"],
                   help="tree shape of each size (chain: size-1 drafted tokens, one branch)")
    a.add_argument("--heads", type=int, default=12, help="attention heads (>= 1)")
    a.add_argument("--head-dim", type=int, default=64, help="dimension of each head (>= 1)")
    a.add_argument("--dtype", default="float32",
                   choices=["float32", "float16", "bfloat16", "float64"],
                   help="dtype of queries, keys and values")
    a.add_argument("--device", default="cpu", help="cpu or cuda")
    a.add_argument("--repeats", type=int, default=20, help="timed calls per point (>= 1)")
    a.add_argument("--warmup", type=int, default=3, help="untimed calls per point (>= 0)")
    a.add_argument("--no-flex", action="store_true", help="skip FlexAttention on CUDA")
    a.add_argument("--threads", type=int, default=None, metavar="N", help=THREADS_HELP)
    a.add_argument("--out", default=None, metavar="DIR",
                   help="folder for attention.csv and attention.png")
    a.set_defaults(func=run_attention)
    v = sub.add_parser(
        "verify", help="target forward time against tree size (the verify cost curve)",
        description="Time one target forward over a tree of each size after --context cached "
                    "tokens (the latency profiler's measurement, sizes interleaved); median "
                    "and IQR over --repeats after --warmup.",
        formatter_class=DefaultsFormatter)
    v.add_argument("--target", default=DEFAULT_TARGET,
                   help="target model: smollm2, qwen2.5-coder-1.5b, a folder, a .gguf file "
                        "or a hub id")
    v.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="model dtype (auto: float32 on CPU, bfloat16 on CUDA)")
    v.add_argument("--device", default="auto", help="auto, cpu or cuda")
    v.add_argument("--tree-sizes", type=int_list, default=[1, 2, 4, 8, 16, 32, 64],
                   metavar="N,...", help="tree sizes (tokens verified at once, comma-separated)")
    v.add_argument("--context", type=int, default=256, help="cached prefix length (>= 1)")
    v.add_argument("--repeats", type=int, default=10, help="timed forwards per size (>= 1)")
    v.add_argument("--warmup", type=int, default=2, help="untimed forwards per size (>= 0)")
    v.add_argument("--threads", type=int, default=None, metavar="N", help=THREADS_HELP)
    v.add_argument("--out", default=None, metavar="DIR",
                   help="folder for verify.csv and verify.png")
    v.set_defaults(func=run_verify)
    p.set_defaults(func=lambda args: _missing(p))


def _missing(parser) -> int:
    parser.print_help(sys.stderr)
    return 2


def _check_counts(args) -> None:
    if args.repeats < 1 or args.warmup < 0:
        raise UserError(f"--repeats must be >= 1 and --warmup >= 0, got {args.repeats} and "
                        f"{args.warmup}")
    for name in ("heads", "head_dim", "context"):
        value = getattr(args, name, None)
        if isinstance(value, int) and value < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {value}")


def run_attention(args) -> int:
    from pathlib import Path

    import pandas as pd

    _check_counts(args)
    set_threads(args.threads)
    rows, notes = bench_attention(args.batch, args.context, args.tree_sizes, shape=args.shape,
                                  heads=args.heads, head_dim=args.head_dim, dtype=args.dtype,
                                  device=args.device, repeats=args.repeats, warmup=args.warmup,
                                  flex=not args.no_flex,
                                  progress=lambda line: print(line, file=sys.stderr))
    print(f"attention ms, median (IQR) over {args.repeats} repeats; heads {args.heads}, "
          f"head dim {args.head_dim}, {args.dtype}, {args.device}, {args.shape} trees; "
          "branches/tree = per-branch median / additive-mask tree median")
    print(format_attention_table(rows))
    for note in notes:
        print(f"note: {note}")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        pd.DataFrame(rows).to_csv(out / "attention.csv", index=False)
        plot_attention(rows, out / "attention.png")
        print(f"wrote {out / 'attention.csv'} and {out / 'attention.png'}", file=sys.stderr)
    return 0


def run_verify(args) -> int:
    from pathlib import Path

    import pandas as pd

    _check_counts(args)
    set_threads(args.threads)
    model = load_model(args.target, dtype=args.dtype, device=args.device)
    rows = bench_verify(model, args.tree_sizes, context=args.context, repeats=args.repeats,
                        warmup=args.warmup)
    df = pd.DataFrame(rows)
    print(f"target forward ms after {args.context} cached tokens, median (IQR) over "
          f"{args.repeats} repeats ({args.target}, {df['device'].iloc[0]}, "
          f"{df['dtype'].iloc[0]})")
    print(df[["tree_size", "median_ms", "iqr_ms"]].to_string(index=False,
                                                              float_format="%.3f"))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        df.to_csv(out / "verify.csv", index=False)
        plot_verify(rows, out / "verify.png")
        print(f"wrote {out / 'verify.csv'} and {out / 'verify.png'}", file=sys.stderr)
    return 0
