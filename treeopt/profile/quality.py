"""Draft quality: how far the draft's next-token distribution is from the target's, per
draft position (the baseline measurement of Sequoia-based tree studies).

At every position t of a continuation (the target's own continuation of each prompt, greedy
at temperature 0 and sampled from the target at T > 0, exactly as the acceptance profiler's
teacher-forced mode: ``treeopt.profile.acceptance``; or the dataset text), with P_t the
target's and Q_t the draft's next-token distributions after the sampling settings
(temperature, top-k, top-p, processed as ``treeopt.decode.sampling.Sampling`` does):

- total variation  TV_t = 1/2 sum |P_t - Q_t|;
- KL_t = KL(P_t || Q_t) = sum over P_t > 0 of P_t ln(P_t / Q_t), in nats, computed from
  float64 log-probabilities (a probability that underflows to 0 in float32 is not an
  excluded token); infinite where the draft excludes a token the target can produce
  (top-k / top-p, a reduced-vocabulary draft, temperature 0): reported as
  ``kl_inf_share``, the share of such positions, beside the mean over the finite ones
  (``kl_finite``); ``kl`` is null (JSON) when any position is infinite;
- alpha_t = sum min(P_t, Q_t) = 1 - TV_t: the probability that one token drafted from Q_t
  is accepted by speculative sampling (Leviathan et al., Chen et al.). At temperature 0 P
  and Q are one-hot, so alpha_t is 1 when the draft's argmax is the target's and 0
  otherwise (TV is 0 or 1, KL 0 or infinite): greedy acceptance. The default temperature of
  ``treeopt profile quality`` is therefore 1 (the models' own distributions).

Per depth d = 1..D (``by_depth``): a chain of D drafted tokens started at position s (every
s where the whole chain fits in the continuation; the first position of the target's
continuation is not a start, as in decoding, where the prefill forward makes that token)
drafts its d-th token at position s + d - 1, teacher-forced (the draft sees the
continuation, which is what an accepted chain prefix is: exactly in greedy mode, in
distribution when sampling). It gets there with probability
R(s, d) = prod_{i<d} alpha_{s+i-1} (every earlier token accepted), and the depth-d figures
are means over s weighted by R(s, d): ``alpha`` at depth d is then the acceptance at depth d
given that depths 1..d-1 were accepted, the chain analogue of the rank profile's p1 at
depth d; ``reach`` is the mean of R(s, d).

Chain acceptance, the expected accepted drafted tokens of a chain of L = d tokens (add 1 for
the bonus token to get tokens per step):

- ``chain_accepted``: the mean over starts s of sum_{l<=L} prod_{i<=l} alpha_{s+i-1}, from
  the per-position alphas (the mean of per-sample products). By construction it equals
  sum_{l<=L} prod_{d<=l} alpha_d with the weighted per-depth means above.
- ``chain_independent``: sum_{l<=L} abar^l from the mean alpha over every position
  (``flat``): what one number implies when positions are alike and independent (Leviathan
  et al.'s (1 - a^(L+1)) / (1 - a) - 1). The gap between the two shows how much acceptance
  at consecutive positions hangs together.

With a rank profile (``--profile``), ``p1`` (the measured top-1 acceptance at each depth) and
``chain_profile`` (sum_{l<=L} prod_{d<=l} p1_d) are shown beside them. The draft must be a
model with logits (a draft model, an early exit, a cheaper int8 or reduced-vocabulary
draft); model-free drafters (n-gram, datastore) have no draft distribution.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from treeopt.decode.engine import model_window
from treeopt.decode.sampling import Sampling, logits_to_probs
from treeopt.errors import TreeoptError
from treeopt.limits import atomic_write, read_json
from treeopt.profile.acceptance import (
    _device,
    _logits,
    fit_window,
    prompt_generator,
    target_continuation,
    window_note,
)

FORMAT = "treeopt-quality"
CONTINUATIONS = ("target", "dataset")


class QualityError(TreeoptError, ValueError):
    """Bad draft-quality input; the one-line message says what to change."""


# ---------------------------------------------------------------------------- distributions
def distribution_quality(p: torch.Tensor, q: torch.Tensor, log_p: torch.Tensor | None = None,
                         log_q: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Per-row TV, KL(p || q) and alpha of distributions p, q (..., V) (rows summing to 1).

    Returns float64 tensors (...,): ``tv`` = 1/2 sum |p - q|, ``kl`` = sum over p > 0 of
    p ln(p / q) (inf where q = 0 < p), ``alpha`` = sum min(p, q). ``log_p``, ``log_q``
    (..., V), optional: the same distributions as log-probabilities (-inf = excluded), from
    which KL is computed instead, so that a probability that underflows to 0 in ``q`` is not
    taken for an excluded token."""
    if p.shape != q.shape:
        raise QualityError(f"target distribution {tuple(p.shape)} and draft distribution "
                           f"{tuple(q.shape)} differ; the pair must share a vocabulary")
    p, q = p.double(), q.double()
    tv = 0.5 * (p - q).abs().sum(-1)
    alpha = torch.minimum(p, q).sum(-1)
    if log_p is None or log_q is None:
        log_p, log_q = torch.log(p), torch.log(q)
    log_p, log_q = log_p.double(), log_q.double()
    weight = torch.exp(log_p)
    pos = weight > 0
    diff = torch.where(pos, log_p - log_q, torch.zeros_like(log_p))  # q = 0 < p -> inf
    terms = torch.where(pos, weight * diff, torch.zeros_like(weight))
    return {"tv": tv, "kl": terms.sum(-1), "alpha": alpha}


def log_probs(logits: torch.Tensor, probs: torch.Tensor, temperature: float, top_k: int,
              top_p: float) -> torch.Tensor | None:
    """float64 log-probabilities (..., V) of the distribution ``logits_to_probs`` makes
    (``probs``): temperature, then the same top-k and top-p exclusions (-inf), renormalised;
    None at temperature 0 (one-hot: ``probs`` is exact)."""
    if temperature == 0:
        return None
    z = logits.double() / temperature
    if 0 < top_k < z.shape[-1]:
        kth = z.topk(top_k, dim=-1).values[..., -1:]
        z = z.masked_fill(z < kth, float("-inf"))
    if top_p < 1.0:
        z = z.masked_fill(probs == 0, float("-inf"))  # outside the nucleus Sampling kept
    return torch.log_softmax(z, dim=-1)


def chain_acceptance(alphas: Sequence[float]) -> list[float]:
    """Expected accepted drafted tokens of chains of L = 1..len(alphas) tokens whose l-th
    token is accepted with probability ``alphas[l-1]`` given the earlier ones were:
    E(L) = sum_{l<=L} prod_{i<=l} alpha_i."""
    out, prod, total = [], 1.0, 0.0
    for a in alphas:
        prod *= float(a)
        total += prod
        out.append(total)
    return out


# ---------------------------------------------------------------------------- accumulating
@dataclass
class QualityStats:
    """Sums over positions and chain starts (mergeable by adding).

    Flat: positions, and sums of alpha, TV, finite KL, count of infinite KL. Per depth
    d (index d-1): weight (sum over starts of R(s, d)), and R-weighted sums of alpha, TV,
    finite KL, and weight at infinite KL; ``starts``: chain starts counted."""

    depth: int
    positions: int = 0
    alpha: float = 0.0
    tv: float = 0.0
    kl: float = 0.0
    kl_inf: int = 0
    starts: int = 0
    weight: list[float] = field(default_factory=list)
    w_alpha: list[float] = field(default_factory=list)
    w_tv: list[float] = field(default_factory=list)
    w_kl: list[float] = field(default_factory=list)
    w_kl_inf: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        for name in ("weight", "w_alpha", "w_tv", "w_kl", "w_kl_inf"):
            if not getattr(self, name):
                setattr(self, name, [0.0] * self.depth)

    def add_positions(self, alpha: Sequence[float], tv: Sequence[float],
                      kl: Sequence[float]) -> None:
        """Add one continuation's per-position figures (positions in order; ``kl`` may hold
        inf)."""
        n = len(alpha)
        self.positions += n
        self.alpha += float(sum(alpha))
        self.tv += float(sum(tv))
        self.kl += float(sum(k for k in kl if math.isfinite(k)))
        self.kl_inf += sum(1 for k in kl if not math.isfinite(k))
        for s in range(n - self.depth + 1):
            self.starts += 1
            reach = 1.0
            for d in range(self.depth):
                t = s + d
                self.weight[d] += reach
                self.w_alpha[d] += reach * alpha[t]
                self.w_tv[d] += reach * tv[t]
                if math.isfinite(kl[t]):
                    self.w_kl[d] += reach * kl[t]
                else:
                    self.w_kl_inf[d] += reach
                reach *= alpha[t]

    def add(self, other: "QualityStats") -> None:
        if other.depth != self.depth:
            raise QualityError(f"cannot add depth-{other.depth} statistics to depth "
                               f"{self.depth}")
        for name in ("positions", "alpha", "tv", "kl", "kl_inf", "starts"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for name in ("weight", "w_alpha", "w_tv", "w_kl", "w_kl_inf"):
            setattr(self, name, [a + b for a, b in zip(getattr(self, name),
                                                       getattr(other, name))])

    def flat(self) -> dict:
        """Means over every position, and the chain acceptance the mean alpha implies for
        chains of 1..depth tokens when positions are alike and independent."""
        n = self.positions
        if not n:
            return {"positions": 0}
        finite = n - self.kl_inf
        alpha = self.alpha / n
        return {"positions": n, "alpha": alpha, "tv": self.tv / n,
                "kl": self.kl / n if not self.kl_inf else None,
                "kl_finite": self.kl / finite if finite else None,
                "kl_inf_share": self.kl_inf / n,
                "chain_independent": chain_acceptance([alpha] * self.depth)}

    def by_depth(self) -> list[dict]:
        """Per depth 1..D: reach, weighted alpha / TV / KL, chain acceptance (see the module
        docstring); depths no chain reached have None figures."""
        if not self.starts:
            return []
        flat = self.flat()
        indep = flat["chain_independent"]
        rows, chain = [], 0.0
        for d in range(self.depth):
            w = self.weight[d]
            # The weight reaching depth d + 1 is the alpha-weighted weight at depth d, so
            # chain_accepted is the mean over starts of the per-sample products.
            chain += self.w_alpha[d] / self.starts
            finite = w - self.w_kl_inf[d]
            rows.append({
                "depth": d + 1, "reach": w / self.starts,
                "alpha": self.w_alpha[d] / w if w > 0 else None,
                "tv": self.w_tv[d] / w if w > 0 else None,
                "kl": (self.w_kl[d] / w if w > 0 and self.w_kl_inf[d] == 0 else None),
                "kl_finite": self.w_kl[d] / finite if finite > 1e-300 else None,
                "kl_inf_share": self.w_kl_inf[d] / w if w > 0 else None,
                "chain_accepted": chain, "chain_independent": indep[d]})
        return rows


# ---------------------------------------------------------------------------- measuring
@dataclass
class QualityRun:
    """Settings of a draft-quality measurement (recorded in the output)."""

    depth: int = 6
    max_new_tokens: int = 64
    sampling: Sampling = Sampling(temperature=1.0)  # its rule is not used: nothing verifies
    continuation: str = "target"
    seed: int = 0
    target: str | None = None
    draft: str | None = None
    dataset: str | None = None
    chat_template: bool = True

    # Read-only views of ``sampling`` (the one place the settings live).
    temperature = property(lambda self: self.sampling.temperature)
    top_k = property(lambda self: self.sampling.top_k)
    top_p = property(lambda self: self.sampling.top_p)

    @property
    def mode(self) -> str:
        """Always teacher-forced (``treeopt.profile.acceptance.fit_window`` reads it)."""
        return "teacher-forced"

    def to_dict(self) -> dict:
        """The settings as recorded in a quality file (flat, as they always were)."""
        out = {k: v for k, v in asdict(self).items() if k != "sampling"}
        out.update(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p)
        return out

    def check(self) -> None:
        if not isinstance(self.sampling, Sampling):  # a Sampling checks itself when made
            raise QualityError(f"sampling must be a Sampling, got "
                               f"{type(self.sampling).__name__}")
        if isinstance(self.depth, bool) or not isinstance(self.depth, int) or self.depth < 1:
            raise QualityError(f"depth must be an integer >= 1, got {self.depth!r}")
        if self.continuation not in CONTINUATIONS:
            raise QualityError(f"unknown continuation {self.continuation!r}; use target or "
                               "dataset")
        need = self.depth + (1 if self.continuation == "target" else 0)
        if self.max_new_tokens < need:
            raise QualityError(f"max_new_tokens {self.max_new_tokens} leaves no chain of depth "
                               f"{self.depth} to measure; give at least {need}")


def draft_model(draft: Any) -> Any:
    """The model whose logits give the draft distribution: ``draft`` itself, or a
    drafter's ``model``; one-line QualityError for model-free drafters."""
    if draft is None:
        raise QualityError("draft quality needs a --draft")
    if callable(getattr(draft, "forward", None)) and getattr(draft, "config", None) is not None:
        return draft
    model = getattr(draft, "model", None)
    if model is None:
        name = getattr(draft, "name", type(draft).__name__)
        raise QualityError(f"draft quality needs a draft distribution; {name} is a model-free "
                           "drafter (its candidates have no probabilities): give a draft "
                           "model or early-exit:K")
    return model


def position_quality(target: Any, draft: Any, prompt_ids: Sequence[int], run: QualityRun, *,
                     generator: torch.Generator | None = None,
                     eos_token_id: int | None = None) -> tuple[dict[str, list[float]], int]:
    """Per-position TV, KL and alpha along one continuation (``run.continuation``); returns
    (figures as lists over positions, the first position a chain may start at: 1 for the
    target's continuation, whose first token comes from the prefill forward; 0 for the
    dataset text)."""

    model = draft_model(draft)
    prompt_ids = [int(t) for t in prompt_ids]
    if run.continuation == "target":
        tokens, p_logits = target_continuation(
            target, prompt_ids, run.max_new_tokens, temperature=run.temperature,
            top_k=run.top_k, top_p=run.top_p, generator=generator, eos_token_id=eos_token_id)
        if not tokens:
            return {"tv": [], "kl": [], "alpha": []}, 1
        seq = prompt_ids + tokens[:-1]
        q_logits = _logits(model, torch.tensor([seq], device=_device(model)))
        q_logits = q_logits[len(prompt_ids) - 1:]
        start = 1
    else:
        if len(prompt_ids) < 2:
            return {"tv": [], "kl": [], "alpha": []}, 0
        p_logits = _logits(target, torch.tensor([prompt_ids], device=_device(target)))[:-1]
        q_logits = _logits(model, torch.tensor([prompt_ids], device=_device(model)))[:-1]
        start = 0
    if p_logits.shape[-1] != q_logits.shape[-1]:
        raise QualityError(f"target vocabulary {p_logits.shape[-1]} != draft vocabulary "
                           f"{q_logits.shape[-1]}; the pair must share a tokenizer")
    p = logits_to_probs(p_logits, run.temperature, run.top_k, run.top_p)
    q = logits_to_probs(q_logits, run.temperature, run.top_k, run.top_p)
    figures = distribution_quality(
        p, q, log_probs(p_logits, p, run.temperature, run.top_k, run.top_p),
        log_probs(q_logits, q, run.temperature, run.top_k, run.top_p))
    return {k: [float(x) for x in v.tolist()] for k, v in figures.items()}, start


@dataclass
class Quality:
    """A draft-quality measurement: the settings, the sums (``stats``) and meta (prompts,
    seconds, window); ``flat()`` / ``by_depth()`` give the figures, ``to_dict()`` the
    JSON document."""

    run: QualityRun
    stats: QualityStats
    meta: dict = field(default_factory=dict)

    def flat(self) -> dict:
        return self.stats.flat()

    def by_depth(self) -> list[dict]:
        return self.stats.by_depth()

    def to_dict(self) -> dict:
        return {"format": FORMAT, "version": 1, "settings": self.run.to_dict(),
                "flat": self.flat(), "by_depth": self.by_depth(), "sums": asdict(self.stats),
                "meta": self.meta}


def profile_quality(target: Any, draft: Any, prompts: Sequence[Sequence[int]],
                    run: QualityRun, *, out: str | Path | None = None,
                    eos_token_id: int | None = None, progress: bool = False) -> Quality:
    """Measure draft quality over ``prompts`` (token-id lists). Each prompt's random stream
    depends only on (seed, prompt index), as in the acceptance profiler. Prompts and
    continuations are fitted into the models' position window (left cut, continuation
    capped at half the window) with a warning. With ``out`` the JSON is rewritten
    atomically after every prompt, so an interrupted run keeps what it measured."""

    run.check()
    model = draft_model(draft)
    path = Path(out) if out is not None else None
    if path is not None:
        check_quality_out(path)
    prompts, measured, window = fit_window([list(p) for p in prompts], run,
                                           model_window(target, model))
    if window.get("prompts_cut") or measured.max_new_tokens < run.max_new_tokens:
        print(f"treeopt profile: warning: {window_note(window, len(prompts), run)}",
              file=sys.stderr, flush=True)
    measured.check()  # a continuation capped to fit the window must still hold a chain
    stats = QualityStats(run.depth)
    meta: dict = {"kind": "quality", "prompts_total": len(prompts), "prompts_done": 0}
    if window:
        meta["window"] = dict(window)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(prompts), desc="quality", unit="prompt", dynamic_ncols=True)
    t0 = time.perf_counter()
    result = Quality(run, stats, meta)
    try:
        for index, ids in enumerate(prompts):
            figures, start = position_quality(target, model, ids, measured,
                                              generator=prompt_generator(run.seed, index),
                                              eos_token_id=eos_token_id)
            stats.add_positions(figures["alpha"][start:], figures["tv"][start:],
                                figures["kl"][start:])
            meta["prompts_done"] = index + 1
            meta["seconds"] = round(time.perf_counter() - t0, 3)
            if path is not None:
                write_quality(result, path)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    if not stats.positions:
        raise QualityError("no positions were measured; give longer prompts or more "
                           "--max-new-tokens")
    return result


def check_quality_out(path: str | Path) -> None:
    """One-line QualityError unless ``path`` is free or holds an earlier draft-quality file
    (a profile, a growmap, results or anything else is never replaced)."""

    path = Path(path)
    if not path.exists():
        return
    try:
        doc = read_json(path)
    except (OSError, ValueError):  # LimitError is a ValueError
        doc = None
    if not (isinstance(doc, dict) and doc.get("format") == FORMAT):
        raise QualityError(f"{path} holds another kind of file (not a draft-quality result); "
                           "choose another output path")


def write_quality(quality: Quality, path: str | Path) -> Path:
    """Write the JSON document atomically (infinite numbers never reach the file: see
    ``kl``)."""
    import json

    data = json.dumps(quality.to_dict(), indent=1, allow_nan=False).encode("utf-8")
    return atomic_write(Path(path), lambda fh: fh.write(data))


# ---------------------------------------------------------------------------- showing
def profile_p1(profile: Any, depth: int) -> list[float]:
    """p1 (top-1 acceptance) at depths 1..depth from a rank profile (its depth rows; rows
    past its last measured depth reuse the last one, as the DP does)."""
    table = profile.table() if hasattr(profile, "table") else profile
    if table and not isinstance(table[0], (list, tuple)):
        table = [table]
    return [float(table[min(d, len(table) - 1)][0]) for d in range(depth)]


def format_quality(quality: Quality, profile: Any = None) -> str:
    """A table per depth (and the flat means) for the terminal; with a rank profile its p1
    and the chain acceptance it implies are shown beside. "-": no chain reached that depth
    (or no finite KL); "inf": KL is infinite at some position."""
    run, flat = quality.run, quality.flat()

    def num(v: Any) -> str:
        return "-" if v is None else f"{v:.3f}"

    def kl(v: Any, inf_share: Any) -> str:
        return "inf" if v is None and inf_share else num(v)

    head = (f"draft quality ({flat['positions']} positions, "
            f"{quality.meta.get('prompts_done', '?')} prompts, temperature "
            f"{run.temperature:g}, top-k {run.top_k}, top-p {run.top_p:g}, "
            f"{run.continuation} continuation)")
    kl_note = (f" (KL infinite at {flat['kl_inf_share']:.1%} of positions; mean of the finite "
               f"ones {num(flat['kl_finite'])})" if flat.get("kl_inf_share") else "")
    lines = [head, f"all positions: TV {num(flat['tv'])}  KL(P||Q) "
                   f"{kl(flat['kl'], flat['kl_inf_share'])} nats  alpha "
                   f"{num(flat['alpha'])}{kl_note}"]
    p1 = profile_p1(profile, run.depth) if profile is not None else None
    chain_p = chain_acceptance(p1) if p1 else None
    cols = ["depth", "reach", "alpha", "TV", "KL(P||Q)", "KL=inf", "chain", "chain_indep"]
    if p1:
        cols += ["p1(profile)", "chain(profile)"]
    rows = []
    for i, r in enumerate(quality.by_depth()):
        row = [str(r["depth"]), num(r["reach"]), num(r["alpha"]), num(r["tv"]),
               kl(r["kl"], r["kl_inf_share"]),
               "-" if r["kl_inf_share"] is None else f"{r['kl_inf_share']:.1%}",
               num(r["chain_accepted"]), num(r["chain_independent"])]
        if p1:
            row += [num(p1[i]), num(chain_p[i])]
        rows.append(row)
    widths = [max([len(c)] + [len(r[j]) for r in rows]) for j, c in enumerate(cols)]
    lines.append("  ".join(c.rjust(w) for c, w in zip(cols, widths)))
    lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in rows]
    lines += ["reach: chance a chain drafted from any position gets to that depth (the figures "
              "at a depth are weighted by it);",
              "chain: expected accepted drafted tokens of a chain of `depth` tokens (mean over "
              "starts of per-position products; +1 = tokens per step); chain_indep: the same "
              "from the mean alpha of all positions, as if independent"]
    return "\n".join(lines)
