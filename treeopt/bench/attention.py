"""What one masked attention call over a token tree costs, against one call per branch.

``bench_attention`` times, for each batch size, context (cached prefix) length and tree size:

- ``tree_bool``:     one ``scaled_dot_product_attention`` call over the whole tree with a
                     boolean mask (prefix visible, tree part ancestor-or-self);
- ``tree_additive``: the same with an additive float mask (0 / -inf), as models receive it;
- ``tree_flex``:     FlexAttention with a block mask (CUDA only; skipped elsewhere, said so);
- ``branches``:      one causal call per root-to-leaf path (query = the path's tokens, keys =
                     prefix + path), i.e. verifying each branch as its own sequence. Each
                     branch's keys/values are built before timing: only attention is timed.

Every tree result is checked against the per-branch results (``allclose``) before timing.
``bench_verify`` times a whole target forward over a tree after a cached prefix (the verify
cost curve the optimiser uses), with the latency profiler's ``time_tree_forwards``.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from treeopt.errors import TreeoptError
from treeopt.profile.latency import time_tree_forwards
from treeopt.tree import Tree

SHAPES = ("binary", "ternary", "chain", "star")
TOLERANCE = {torch.float32: (1e-4, 1e-5), torch.float16: (2e-2, 2e-3),
             torch.bfloat16: (5e-2, 1e-2), torch.float64: (1e-9, 1e-10)}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "float64": torch.float64}


class BenchError(TreeoptError, ValueError):
    """Benchmark settings that cannot run (bad shape, dtype or device)."""


def bench_tree(size: int, shape: str = "binary") -> Tree:
    """A tree of ``size`` nodes: ``binary``/``ternary`` fill levels breadth-first with 2/3
    children per node, ``chain`` is a chain (draft length size-1), ``star`` puts every node
    under the root."""
    if size < 1:
        raise BenchError(f"tree size must be at least 1, got {size}")
    if shape == "chain":
        return Tree.from_parents([-1] + list(range(size - 1)))
    if shape == "star":
        return Tree.from_parents([-1] + [0] * (size - 1))
    if shape not in ("binary", "ternary"):
        raise BenchError(f"unknown tree shape {shape!r}; use one of {', '.join(SHAPES)}")
    k = 2 if shape == "binary" else 3
    return Tree.from_parents([-1] + [(i - 1) // k for i in range(1, size)])


@dataclass
class AttentionCase:
    """Random q/k/v for one (batch, context, tree) point.

    q_tree: (B, H, n, D); k_all, v_all: (B, H, C + n, D) (prefix then tree tokens);
    branch_qkv: per leaf (q (B, H, L, D), k (B, H, C + L, D), v (B, H, C + L, D), path ids).
    """

    tree: Tree
    context: int
    q_tree: torch.Tensor
    k_all: torch.Tensor
    v_all: torch.Tensor
    mask_bool: torch.Tensor
    mask_add: torch.Tensor
    branch_qkv: list


def make_case(tree: Tree, batch: int, context: int, heads: int, head_dim: int,
              dtype: torch.dtype, device: torch.device, seed: int = 0) -> AttentionCase:
    g = torch.Generator(device="cpu").manual_seed(seed)
    n = tree.size

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    q = rand(batch, heads, n, head_dim)
    k = rand(batch, heads, context + n, head_dim)
    v = rand(batch, heads, context + n, head_dim)
    anc = tree.buffers("cpu").mask
    mask_bool = torch.ones(n, context + n, dtype=torch.bool)
    mask_bool[:, context:] = anc
    mask_add = torch.zeros(n, context + n, dtype=dtype)
    mask_add.masked_fill_(~mask_bool, float("-inf"))
    branches = []
    for leaf in tree.leaves:
        path = torch.tensor(tree.path_to(leaf), dtype=torch.long, device=device)
        cols = torch.cat([torch.arange(context, device=device), context + path])
        branches.append((q.index_select(2, path).contiguous(),
                         k.index_select(2, cols).contiguous(),
                         v.index_select(2, cols).contiguous(), path))
    return AttentionCase(tree, context, q, k, v, mask_bool.to(device).view(1, 1, n, -1),
                         mask_add.to(device).view(1, 1, n, -1), branches)


def _causal_lower_right(q_len: int, kv_len: int, device: torch.device) -> torch.Tensor:
    """(q_len, kv_len) bool: query i sees keys up to kv_len - q_len + i (prefix + own path)."""
    return torch.ones(q_len, kv_len, dtype=torch.bool, device=device).tril(kv_len - q_len)


def run_tree(case: AttentionCase, additive: bool = False) -> torch.Tensor:
    """One SDPA call over the tree; returns (B, H, n, D)."""
    mask = case.mask_add if additive else case.mask_bool
    return F.scaled_dot_product_attention(case.q_tree, case.k_all, case.v_all, attn_mask=mask)


def branch_masks(case: AttentionCase) -> list[torch.Tensor]:
    return [_causal_lower_right(q.shape[2], k.shape[2], q.device)
            for q, k, _v, _p in case.branch_qkv]


def run_branches(case: AttentionCase, masks: list[torch.Tensor]) -> list[torch.Tensor]:
    """One causal SDPA call per root-to-leaf path; returns per leaf (B, H, L, D)."""
    return [F.scaled_dot_product_attention(q, k, v, attn_mask=m)
            for (q, k, v, _p), m in zip(case.branch_qkv, masks)]


def flex_runner(case: AttentionCase) -> Callable[[], torch.Tensor] | None:
    """A compiled FlexAttention call with a block mask, or None off CUDA / without flex."""
    if case.q_tree.device.type != "cuda":
        return None
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        return None
    context, n = case.context, case.tree.size
    anc = case.tree.buffers(case.q_tree.device).mask

    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx < context) | anc[q_idx, (kv_idx - context).clamp(min=0)]

    block = create_block_mask(mask_mod, B=None, H=None, Q_LEN=n, KV_LEN=context + n,
                              device=case.q_tree.device)
    compiled = torch.compile(flex_attention, dynamic=False)
    return lambda: compiled(case.q_tree, case.k_all, case.v_all, block_mask=block)


def check_against_branches(case: AttentionCase, tree_out: torch.Tensor,
                           branch_out: list[torch.Tensor]) -> float:
    """Assert every leaf's path rows of the tree result equal that branch's result; returns
    the largest absolute difference."""
    rtol, atol = TOLERANCE.get(tree_out.dtype, (1e-3, 1e-4))
    worst = 0.0
    for (_q, _k, _v, path), out in zip(case.branch_qkv, branch_out):
        got = tree_out.index_select(2, path)
        if not torch.allclose(got.float(), out.float(), rtol=rtol, atol=atol):
            diff = (got.float() - out.float()).abs().max().item()
            raise AssertionError(f"tree attention differs from the per-branch result by {diff:g} "
                                 f"(tree size {case.tree.size}, context {case.context})")
        worst = max(worst, (got.float() - out.float()).abs().max().item())
    return worst


def time_call(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int
              ) -> list[float]:
    """Milliseconds of each of ``repeats`` calls after ``warmup`` untimed ones."""
    cuda = device.type == "cuda"
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize(device)
    out = []
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            out.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t0) * 1000.0)
    return out


def spread(ms: Sequence[float]) -> dict:
    """median, first and third quartile and IQR of a list of timings."""
    xs = sorted(ms)
    if len(xs) == 1:
        return {"median_ms": xs[0], "q25_ms": xs[0], "q75_ms": xs[0], "iqr_ms": 0.0}
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return {"median_ms": statistics.median(xs), "q25_ms": q[0], "q75_ms": q[2],
            "iqr_ms": q[2] - q[0]}


def bench_attention(batches: Sequence[int] = (1, 4), contexts: Sequence[int] = (128, 512, 2048),
                    tree_sizes: Sequence[int] = (8, 16, 32, 64), *, shape: str = "binary",
                    heads: int = 12, head_dim: int = 64, dtype: str | torch.dtype = "float32",
                    device: str | torch.device = "cpu", repeats: int = 20, warmup: int = 3,
                    flex: bool = True, progress: Callable[[str], None] | None = None
                    ) -> tuple[list[dict], list[str]]:
    """Time tree attention against per-branch attention over the grid.

    Returns (rows, notes): one row per (batch, context, tree size, method) with median_ms,
    q25_ms, q75_ms, iqr_ms, repeats, max_abs_err (against the per-branch result) and
    ``vs_branches`` (branches' median / this median, > 1 = faster than per-branch);
    notes say what was skipped and why.
    """
    dt = DTYPES.get(dtype, dtype) if isinstance(dtype, str) else dtype
    if not isinstance(dt, torch.dtype):
        raise BenchError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    for name, value in (("heads", heads), ("head dim", head_dim), ("repeats", repeats)):
        if int(value) < 1:
            raise BenchError(f"{name} must be >= 1, got {value}")
    if warmup < 0:
        raise BenchError(f"warmup must be >= 0, got {warmup}")
    for name, values in (("batch sizes", batches), ("contexts", contexts),
                         ("tree sizes", tree_sizes)):
        if not values or min(values) < 1:
            raise BenchError(f"{name} must be integers >= 1, got {list(values)}")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BenchError("--device cuda requested but CUDA is not available; use --device cpu")
    notes: list[str] = []
    use_flex = flex and dev.type == "cuda"
    if flex and dev.type != "cuda":
        notes.append("tree_flex skipped: FlexAttention with a block mask needs CUDA "
                     f"(device is {dev.type})")
    rows: list[dict] = []
    for batch in batches:
        for context in contexts:
            for size in tree_sizes:
                tree = bench_tree(size, shape)
                case = make_case(tree, batch, context, heads, head_dim, dt, dev)
                masks = branch_masks(case)
                ref = run_branches(case, masks)
                calls: dict[str, Callable[[], Any]] = {
                    "tree_bool": lambda c=case: run_tree(c),
                    "tree_additive": lambda c=case: run_tree(c, additive=True),
                }
                if use_flex:
                    try:
                        runner = flex_runner(case)
                    except Exception as exc:  # compile/backend failure: report, keep going
                        runner = None
                        notes.append(f"tree_flex failed at tree size {size}, context {context}: "
                                     f"{str(exc).splitlines()[0] if str(exc) else type(exc)}")
                    if runner is not None:
                        calls["tree_flex"] = runner
                calls["branches"] = lambda c=case, m=masks: run_branches(c, m)
                base = {"batch": batch, "context": context, "tree_size": size, "shape": shape,
                        "leaves": len(tree.leaves), "depth": tree.depth,
                        "dtype": str(dt).replace("torch.", ""), "device": dev.type}
                point = []
                for name, fn in calls.items():
                    err = 0.0
                    if name != "branches":
                        with torch.no_grad():
                            out = fn()
                        err = check_against_branches(case, out, ref)
                    with torch.no_grad():
                        ms = time_call(fn, dev, repeats, warmup)
                    point.append({**base, "method": name, "calls": (len(tree.leaves)
                                  if name == "branches" else 1), **spread(ms),
                                  "repeats": repeats, "max_abs_err": err})
                br = next(r["median_ms"] for r in point if r["method"] == "branches")
                for r in point:
                    r["vs_branches"] = br / r["median_ms"] if r["median_ms"] > 0 else math.nan
                rows.extend(point)
                if progress:
                    progress(f"batch {batch} context {context} tree {size}: "
                             + ", ".join(f"{r['method']} {r['median_ms']:.3f} ms" for r in point))
    return rows, notes


def bench_verify(model: Any, tree_sizes: Sequence[int] = (1, 2, 4, 8, 16, 32, 64), *,
                 context: int = 256, repeats: int = 10, warmup: int = 2,
                 seed: int = 0) -> list[dict]:
    """Time one target forward over a tree of each size after ``context`` cached tokens (the
    latency profiler's measurement: balanced binary trees, cache cropped back after each call).

    Returns one row per size: tree_size, context, median_ms, q25_ms, q75_ms, iqr_ms, repeats,
    device, dtype.
    """

    sizes = sorted({int(n) for n in tree_sizes})
    if not sizes or sizes[0] < 1:
        raise BenchError(f"tree sizes must be integers >= 1, got {list(tree_sizes)}")
    param = next(model.parameters())
    samples = time_tree_forwards(model, sizes, context=context, repeats=repeats, warmup=warmup,
                                 seed=seed)
    return [{"tree_size": n, "context": context, **spread(ms), "repeats": repeats,
             "device": param.device.type, "dtype": str(param.dtype).replace("torch.", "")}
            for n, ms in zip(sizes, samples)]


def format_attention_table(rows: list[dict]) -> str:
    """Median (IQR) ms per method, one line per (batch, context, tree size)."""
    import pandas as pd

    if not rows:
        return "(no rows)"
    df = pd.DataFrame(rows)
    df["cell"] = [f"{m:.3f} ({i:.3f})" for m, i in zip(df["median_ms"], df["iqr_ms"])]
    wide = df.pivot_table(index=["batch", "context", "tree_size", "leaves"], columns="method",
                          values="cell", aggfunc="first")
    ratio = df[df["method"] == "tree_additive"].set_index(
        ["batch", "context", "tree_size", "leaves"])["vs_branches"]
    wide["branches/tree"] = [f"{ratio.loc[idx]:.2f}x" for idx in wide.index]
    order = [c for c in ("tree_bool", "tree_additive", "tree_flex", "branches", "branches/tree")
             if c in wide.columns]
    return wide[order].reset_index().to_string(index=False)


def plot_attention(rows: list[dict], path) -> None:
    """Median ms (IQR as error bars) against tree size; one panel per (batch, context)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    df = pd.DataFrame(rows)
    batches = sorted(df["batch"].unique())
    contexts = sorted(df["context"].unique())
    fig, axes = plt.subplots(len(batches), len(contexts), squeeze=False,
                             figsize=(3.6 * len(contexts), 3.0 * len(batches)))
    for r, b in enumerate(batches):
        for c, ctx in enumerate(contexts):
            ax = axes[r][c]
            sub = df[(df["batch"] == b) & (df["context"] == ctx)]
            for method, g in sub.groupby("method", sort=False):
                g = g.sort_values("tree_size")
                ax.errorbar(g["tree_size"], g["median_ms"],
                            yerr=[g["median_ms"] - g["q25_ms"], g["q75_ms"] - g["median_ms"]],
                            marker="o", ms=3, capsize=2, label=method)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"batch {b}, context {ctx}", fontsize=9)
            ax.set_xlabel("tree size (nodes)")
            ax.set_ylabel("attention ms (median, IQR)")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"tree attention: one masked call vs one call per branch "
                 f"({df['device'].iloc[0]}, {df['dtype'].iloc[0]}, {df['shape'].iloc[0]} trees)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_verify(rows: list[dict], path) -> None:
    """Target forward ms against tree size (the verify cost curve)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [r["tree_size"] for r in rows]
    med = [r["median_ms"] for r in rows]
    lo = [r["median_ms"] - r["q25_ms"] for r in rows]
    hi = [r["q75_ms"] - r["median_ms"] for r in rows]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.errorbar(xs, med, yerr=[lo, hi], marker="o", capsize=3)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tokens verified at once (tree size)")
    ax.set_ylabel("target forward ms (median, IQR)")
    ax.set_title(f"verify cost after {rows[0]['context']} cached tokens ({rows[0]['device']})",
                 fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
