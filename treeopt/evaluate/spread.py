"""How far a speed-up can be trusted: the spread of per-prompt speed-ups and flags.

A method's speed-up (``runner.summarise``) is a ratio of summed times over the prompts,
per generated token: (Σ ar seconds / Σ ar tokens) / (Σ seconds / Σ tokens). Here, for the
same prompts:

- ``speedup_median``: the median of the per-prompt speed-ups (each prompt's turns summed);
- ``speedup_ci95_low`` / ``speedup_ci95_high``: a percentile bootstrap 95 % interval of the
  speed-up: ``RESAMPLES`` resamples of the prompts with replacement (seeded, so a summary
  is reproducible), each computing the same ratio of summed times; NaN with fewer than
  ``MIN_PROMPTS`` prompts;
- ``flag``: why the figure cannot be trusted (``FLAGS``), "" when nothing is wrong.

Prompts are paired: only prompts that plain decoding and the method both ran count.
"""

from __future__ import annotations

import math
from typing import Any

RESAMPLES = 2000
SEED = 0
LEVEL = 0.95
MIN_PROMPTS = 2

NO_ACCEPTED = "no-accepted"
SPANS_ONE = "ci-spans-1"
ONE_PROMPT = "one-prompt"
FLAGS = {
    NO_ACCEPTED: "a speed-up above 1 with no accepted draft token: every step still costs a "
                 "target forward, so only timing noise (a busy machine, too few prompts) can "
                 "make it faster than plain decoding",
    SPANS_ONE: "the 95 % interval contains 1: not distinguishable from plain decoding on "
               "these prompts",
    ONE_PROMPT: f"fewer than {MIN_PROMPTS} prompts: no interval, the figure is one "
                "measurement",
}


def paired_times(group: Any, method: str, ar: str) -> tuple[list, list, list, list]:
    """(ar seconds, ar tokens, seconds, tokens) per prompt that both ``ar`` and ``method``
    ran in ``group`` (rows of one category or all), turns summed, in prompt order."""
    cols = ["prompt_key", "seconds", "new_tokens"]
    a = group[group["method"] == ar][cols].groupby("prompt_key", sort=False).sum()
    m = group[group["method"] == method][cols].groupby("prompt_key", sort=False).sum()
    keys = [k for k in m.index if k in a.index]
    return (a.loc[keys, "seconds"].astype(float).tolist(),
            a.loc[keys, "new_tokens"].astype(float).tolist(),
            m.loc[keys, "seconds"].astype(float).tolist(),
            m.loc[keys, "new_tokens"].astype(float).tolist())


def spread(ar_s, ar_n, s, n, resamples: int = RESAMPLES, seed: int = SEED,
           level: float = LEVEL) -> dict:
    """Median per-prompt speed-up and the bootstrap interval of the pooled speed-up.

    Returns ``{"prompts", "speedup_median", "speedup_ci95_low", "speedup_ci95_high"}`` (NaN
    where undefined: no prompt, or fewer than MIN_PROMPTS for the interval)."""
    import numpy as np

    ar_s, ar_n, s, n = (np.asarray(x, dtype=float) for x in (ar_s, ar_n, s, n))
    ok = (ar_s > 0) & (ar_n > 0) & (s > 0) & (n > 0)
    ar_s, ar_n, s, n = ar_s[ok], ar_n[ok], s[ok], n[ok]
    out = {"prompts": int(len(s)), "speedup_median": math.nan,
           "speedup_ci95_low": math.nan, "speedup_ci95_high": math.nan}
    if not len(s):
        return out
    out["speedup_median"] = float(np.median((ar_s / ar_n) / (s / n)))
    if len(s) < MIN_PROMPTS:
        return out
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(s), size=(resamples, len(s)))
    boot = (ar_s[idx].sum(1) / ar_n[idx].sum(1)) / (s[idx].sum(1) / n[idx].sum(1))
    tail = (1 - level) / 2
    low, high = np.quantile(boot, [tail, 1 - tail])
    out["speedup_ci95_low"], out["speedup_ci95_high"] = float(low), float(high)
    return out


def flags(speedup: float, accepted: int, prompts: int, low: float, high: float,
          is_reference: bool = False) -> str:
    """The flags of one summary row, joined by ';' ("" = none). Plain decoding (the
    reference, ``is_reference``) is never flagged."""
    if is_reference or speedup is None or math.isnan(speedup):
        return ""
    out = []
    if speedup > 1 and accepted == 0:
        out.append(NO_ACCEPTED)
    if prompts < MIN_PROMPTS:
        out.append(ONE_PROMPT)
    elif not (math.isnan(low) or math.isnan(high)) and low <= 1 <= high:
        out.append(SPANS_ONE)
    return ";".join(out)
