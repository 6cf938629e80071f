"""Benchmark the exact DP (``treeopt.search.dp.solve``) and compare with a faithful
pure-Python port of Sequoia's loop DP on the small cases, in the same run.

    python scripts/bench_dp.py [--repeat 3] [--ref-large]
    python scripts/bench_dp.py --tiny --repeat 1      # seconds: checks the script works

Prints, per (W, d, n): best-of-``repeat`` solve time, time to rebuild the optimal tree, peak
memory traced during one solve (tracemalloc, numpy buffers included) and F*(n, d); then the
reference port's time, its optimum and the measured speed-up. Depth d counts levels
including the root (Sequoia's ``max_depth``). Profiles: W=8 is DESIGN.md's reference
profile; W=16/32 are the first ranks of Sequoia's shipped acceptance vector.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

_TESTS = str(Path(__file__).resolve().parent.parent / "tests")
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)

from sequoia_reference_dp import reference_dp, reference_results  # noqa: E402

from treeopt.search.dp import solve  # noqa: E402

REF_P = [.6, .1, .05, .03, .02, .015, .01, .008]
SEQUOIA_SHIPPED = [.63418, .10795, .05697, .02249, .01949, .01499, .0045, .003, .01199, .0045,
                   .0075, .0045, .006, .003, .0015, .003, .0015, .003, 0, .003, .003, .003, 0,
                   .0015, 0, .0015, 0, 0, 0, .0015, .0015, .0015]
PROFILES = {8: REF_P, 16: SEQUOIA_SHIPPED[:16], 32: SEQUOIA_SHIPPED}
SIZES = [64, 128, 256, 512, 1024]


def best_time(fn, repeat: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def peak_mib(fn) -> float:
    tracemalloc.start()
    fn()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak / 2**20


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3, help="timed runs per case (best kept)")
    ap.add_argument("--ref-large", action="store_true",
                    help="also run the reference port at n=256 (about 2 s) and W=16, d=16")
    ap.add_argument("--tiny", action="store_true",
                    help="small cases only (W=8, d=4 and 6, n=16 and 32; reference at n=16): "
                         "checks the script works in seconds")
    args = ap.parse_args(argv)
    depths, profiles, sizes = (12, 16), PROFILES, SIZES
    aware = (16, 1024)  # depth-aware case: levels (= rows), n
    cases = [(8, 12, 64), (8, 12, 128)]
    if args.tiny:
        depths, profiles, sizes = (4, 6), {8: REF_P}, [16, 32]
        aware, cases = (4, 32), [(8, 6, 16)]
    print(f"python {platform.python_version()}, numpy {np.__version__}, "
          f"{os.cpu_count()} cpus; best of {args.repeat}; d = levels incl. root")
    print(f"{'W':>3} {'d':>3} {'n':>5} {'solve_s':>9} {'tree_s':>8} {'peak_MiB':>9} "
          f"{'F*(n,d)':>10}")
    for d in depths:
        for w, p in profiles.items():
            for n in sizes:
                t, table = best_time(lambda: solve(p, n, d), args.repeat)
                tt, tree = best_time(lambda: table.tree(n, d), args.repeat)
                mem = peak_mib(lambda: solve(p, n, d))
                assert abs(tree.expected_tokens(p) - table.value(n, d)) < 1e-9
                print(f"{w:>3} {d:>3} {n:>5} {t:9.4f} {tt:8.4f} {mem:9.1f} "
                      f"{table.value(n, d):10.6f}")

    levels, n_aware = aware
    rows = [[.6, .1, .05, .03, .02, .015, .01, .008]]
    rows += [[.6 + .01 * k] + r[1:] for k, r in enumerate(rows * (levels - 1), start=1)]
    t, table = best_time(lambda: solve(rows, n_aware, levels), args.repeat)
    mem = peak_mib(lambda: solve(rows, n_aware, levels))
    print(f"depth-aware, {levels} rows, W=8, d={levels}, n={n_aware}: solve {t:.4f} s, peak "
          f"{mem:.1f} MiB, F* = {table.value(n_aware, levels):.6f}")

    print("\nreference port of Sequoia's loop DP (pure Python) vs treeopt.search.dp:")
    print(f"{'W':>3} {'d':>3} {'n':>5} {'ref_s':>8} {'dp_s':>8} {'speedup':>9} "
          f"{'ref F*':>10} {'|diff| max over table':>22}")
    if args.ref_large and not args.tiny:
        cases += [(8, 12, 256), (16, 16, 64)]
    for w, d, n in cases:
        p = PROFILES[w]
        t_ref = time.perf_counter()
        T, _ = reference_dp(p, n, d)
        t_ref = time.perf_counter() - t_ref
        ref = np.array(reference_results(T))
        t, table = best_time(lambda: solve(p, n, d), args.repeat)
        fin = np.isfinite(ref)
        same_inf = bool((np.isinf(ref) == np.isinf(table.values)).all())
        diff = float(np.abs(ref[fin] - table.values[fin]).max())
        print(f"{w:>3} {d:>3} {n:>5} {t_ref:8.3f} {t:8.4f} {t_ref / t:8.0f}x "
              f"{ref[n, d]:10.6f} {diff:14.2e} (inf {'same' if same_inf else 'DIFFER'})")
    return 0

if __name__ == "__main__":
    sys.exit(main())
