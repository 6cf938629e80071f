"""Logit processing, the names of the lossless verification rules, and the token-level ones
(greedy, Sequoia, SpecInfer); the tree-level rules (Traversal, Block) are in
:mod:`treeopt.decode.traversal`.

One implementation serves the engine (one node at a time) and tests/profilers (many rows at
once): :func:`verify_children_batch` works on B independent (P, Q, children) problems and
:func:`verify_children` is its B = 1 view.

Sequoia (children drawn from Q without replacement): for each child x in rank order accept
with probability min(1, P(x)/Q(x)); on reject P <- normalise(max(P - Q, 0)) and x is removed
from Q (Q(x) = 0, renormalised). SpecInfer (children drawn with replacement): the same with Q
unchanged. If no child is accepted the bonus token is sampled from the current P. A chain is
the width-1 case (Leviathan et al.). Children with Q(x) = 0 (fillers a drafter adds when Q has
fewer tokens than the tree asks for) are skipped without touching P or Q.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from treeopt.errors import TreeoptError
from treeopt.rules import CHAIN_RULES, RULE_HELP, RULES, TOKEN_RULES, WITH_REPLACEMENT  # noqa: F401

# A residual max(P - Q, 0) whose mass is below this is numerical noise (P == Q): keep P.
RESIDUAL_EPS = 1e-6
# top-p sorts only this many most likely tokens when they hold the top_p mass (else all).
TOP_P_CANDIDATES = 1024
# Smallest positive temperature accepted; 0 asks for greedy decoding. Below it the processed
# distribution is the argmax for any logit gap of practical size, and far below it
# (about 1e-37) ``logits / temperature`` overflows float32 and the probabilities become NaN:
# such temperatures are rejected rather than silently treated as greedy.
MIN_TEMPERATURE = 1e-5


class SamplingError(TreeoptError, ValueError):
    """Invalid sampling settings (temperature, top-k, top-p or rule), or a distribution that
    cannot be sampled (NaN logits, a row without probability mass)."""


def check_settings(temperature: float, top_k: int, top_p: float, rule: str = "sequoia") -> None:
    """Raise SamplingError for out-of-range sampling settings: every command and API that
    takes them validates them here (``Sampling`` calls it)."""
    if not temperature >= 0:
        raise SamplingError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if temperature == float("inf"):
        raise SamplingError("temperature must be finite (1 = the model's own distribution)")
    if 0 < temperature < MIN_TEMPERATURE:
        raise SamplingError(f"temperature {temperature:g} is too close to 0: use 0 for greedy "
                            f"decoding or a temperature >= {MIN_TEMPERATURE:g}")
    if isinstance(top_k, bool) or int(top_k) != top_k or top_k < 0:
        raise SamplingError(f"top_k must be an integer >= 0 (0 = off), got {top_k}")
    if not 0 < top_p <= 1:
        raise SamplingError(f"top_p must be in (0, 1] (1 = off), got {top_p}")
    check_rule(rule)


def check_rule(rule: str) -> None:
    """Raise SamplingError unless ``rule`` is one of ``RULES``."""
    if rule not in RULES:
        raise SamplingError(f"unknown verification rule {rule!r}; use one of {', '.join(RULES)}")


def one_level_rule(rule: str) -> str:
    """The token-level rule that verifies a one-level tree (the root's children only) exactly
    as ``rule`` does. On such a tree Traversal and Block Verification make Sequoia's
    decisions: the root's sequence weight starts at 1 and stays 1 after every rejection
    (r / (r + 1 - 1)), so each child is accepted with min(1, P/Q) and rejected children update
    P and Q as in Sequoia. One-level acceptance profiles of these rules are therefore the
    token-level ones; what they add shows on deeper trees only."""
    check_rule(rule)
    return rule if rule in WITH_REPLACEMENT else "sequoia"


def check_rule_shape(rule: str, tree) -> None:
    """Raise SamplingError (one line) when ``rule`` verifies chains only and ``tree`` (a
    ``Tree``) has a node with several children: never a silent fallback to another rule."""
    if rule in CHAIN_RULES and tree is not None and tree.width > 1:
        raise SamplingError(f"rule {rule!r} verifies chains (one child per node) but this tree "
                            f"has a node with {tree.width} children; use a chain shape or "
                            "--rule traversal for trees")


@dataclass(frozen=True)
class Sampling:
    """The sampling settings of one decoding run, validated once.

    temperature 0 = greedy (token-exact with the target's greedy decoding); a positive
    temperature must be at least ``MIN_TEMPERATURE`` (1e-5; smaller ones are rejected, not
    treated as greedy: ask for greedy with 0). Logits are divided by ``temperature``, then
    ``top_k`` (0 = off) and ``top_p`` (1 = off) are applied to the target's and the draft's
    distributions alike, and children are verified by ``rule`` (one of ``RULES``: "sequoia",
    "specinfer", "traversal", "block"; "block" verifies chains only). ``seed`` seeds the run's
    random stream (None = torch's global one).
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    rule: str = "sequoia"
    seed: int | None = None

    def __post_init__(self) -> None:
        check_settings(self.temperature, self.top_k, self.top_p, self.rule)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def replacement(self) -> bool:
        """Whether drafters draw a node's children with replacement for this rule."""
        return self.rule in WITH_REPLACEMENT

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """Processed distribution (..., V) float32 of logits (..., V)."""
        return logits_to_probs(logits, self.temperature, self.top_k, self.top_p)

    def generator(self, device: torch.device | str = "cpu") -> torch.Generator | None:
        """A fresh generator seeded with ``seed`` on ``device`` (None when unseeded)."""
        if self.seed is None:
            return None
        return torch.Generator(device=device).manual_seed(int(self.seed))


GREEDY = Sampling()


def logits_to_probs(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0,
                    top_p: float = 1.0) -> torch.Tensor:
    """Processed next-token distribution.

    logits: (..., V). Returns float32 probs (..., V). temperature 0 gives the one-hot argmax
    (greedy); otherwise logits / temperature, then top-k (keep the k largest, 0 = off), then
    top-p (keep the smallest set of most likely tokens whose mass reaches top_p, at least one;
    1 = off), renormalised. Raises SamplingError for NaN logits (e.g. a float16 overflow in
    the model) and for a row that ends up without a valid distribution (a temperature so
    small that ``logits / temperature`` overflows), instead of sampling garbage.
    """
    logits = logits.float()
    if bool(torch.isnan(logits).any()):
        raise SamplingError("the model produced NaN logits (a float16 overflow? try "
                            "--dtype float32 or bfloat16)")
    if temperature == 0:
        out = torch.zeros_like(logits)
        return out.scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
    logits = logits / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        probs = _top_p(probs, top_p)
    if temperature < MIN_TEMPERATURE:
        _check_rows(probs, f"at temperature {temperature:g} (below {MIN_TEMPERATURE:g}, "
                           "logits / temperature overflows; use 0 for greedy)")
    else:
        _check_rows(probs, f"at temperature {temperature:g}")
    return probs


def _check_rows(probs: torch.Tensor, context: str = "") -> None:
    """SamplingError unless every row of probs (..., V) has a finite, positive mass."""
    if probs.shape[-1] == 0:
        raise SamplingError("cannot sample from an empty vocabulary")
    mass = probs.sum(-1)
    bad = ~(torch.isfinite(mass) & (mass > 0))
    if bool(bad.any()):
        kind = "NaN" if bool(torch.isnan(mass[bad]).any()) else (
            "infinite" if bool(torch.isinf(mass[bad]).any()) else "all-zero")
        where = f" {context}" if context else ""
        raise SamplingError(f"{int(bad.sum())} of {mass.numel()} probability rows are {kind}"
                            f"{where}: no valid distribution to sample from")


def _top_p(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep, per row of probs (..., V), the most likely tokens until their mass reaches top_p.
    Sorts only the TOP_P_CANDIDATES most likely tokens when they already hold that mass."""
    k = min(probs.shape[-1], TOP_P_CANDIDATES)
    top, order = probs.topk(k, dim=-1)
    if k < probs.shape[-1] and not bool((top.sum(-1) >= top_p).all()):
        top, order = probs.sort(dim=-1, descending=True)
    keep_sorted = (top.cumsum(-1) - top) < top_p
    keep = torch.zeros(probs.shape, dtype=torch.bool, device=probs.device)
    keep.scatter_(-1, order, keep_sorted)
    probs = probs * keep
    return probs / probs.sum(-1, keepdim=True)


def _normalise(x: torch.Tensor) -> torch.Tensor:
    s = x.sum(-1, keepdim=True)
    return torch.where(s > 0, x / s.clamp_min(1e-30), x)


def verify_children_batch(p: torch.Tensor, q: torch.Tensor, children: torch.Tensor,
                          rule: str = "sequoia", generator: torch.Generator | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the stochastic verification rule on B independent nodes at once.

    p: (B, V) target probs at the nodes; q: (B, V) draft probs the children were drawn from;
    children: (B, k) int64 child tokens in rank order (k may be 0).
    Returns (accepted (B,) int64: index of the accepted child or -1,
    token (B,) int64: the accepted child's token, or the bonus sampled from the residual P).
    Inputs are not modified.
    """
    if rule not in TOKEN_RULES:
        raise SamplingError(f"verify_children runs the token-level rules "
                            f"({', '.join(TOKEN_RULES)}), not {rule!r}")
    b, k = children.shape
    p = p.float()
    q = q.float()
    accepted = torch.full((b,), -1, dtype=torch.int64, device=p.device)
    token = torch.full((b,), -1, dtype=torch.int64, device=p.device)
    done = torch.zeros(b, dtype=torch.bool, device=p.device)
    u = torch.rand(b, k, generator=generator, device=p.device) if k else None
    for i in range(k):
        x = children[:, i:i + 1]
        px = p.gather(1, x).squeeze(1)
        qx = q.gather(1, x).squeeze(1)
        valid = (qx > 0) & ~done
        acc = valid & (u[:, i] * qx < px)
        accepted = torch.where(acc, i, accepted)
        token = torch.where(acc, x.squeeze(1), token)
        done = done | acc
        rej = (valid & ~acc).unsqueeze(1)
        residual = (p - q).clamp_min(0.0)
        mass = residual.sum(-1, keepdim=True)
        residual = torch.where(mass > RESIDUAL_EPS, residual / mass.clamp_min(1e-30), p)
        p = torch.where(rej, residual, p)
        if rule == "sequoia":
            q = torch.where(rej, _normalise(q.scatter(1, x, 0.0)), q)
    bonus = sample(p, 1, generator).squeeze(1)
    token = torch.where(done, token, bonus)
    return accepted, token


def verify_children(p: torch.Tensor, q: torch.Tensor | None, children: Sequence[int],
                    rule: str = "sequoia", generator: torch.Generator | None = None
                    ) -> tuple[int | None, int]:
    """Verify one node's children: (index of the accepted child or None, token).

    p: (V,) target probs; q: (V,) draft probs (may be None when there are no children);
    children: child tokens in rank order. The token is the accepted child's, or the bonus
    sampled from the residual target distribution.
    """
    if not children:
        return None, int(sample(p[None], 1, generator))
    kids = torch.tensor([list(children)], dtype=torch.int64, device=p.device)
    acc, tok = verify_children_batch(p[None], q[None], kids, rule, generator)
    a = int(acc)
    return (a if a >= 0 else None), int(tok)


def verify_candidates(p: torch.Tensor, children: Sequence[int],
                      generator: torch.Generator | None = None) -> tuple[int | None, int]:
    """Verify one node's children proposed by a drafter without a distribution (point masses).

    p: (V,) target probs at the node; children: distinct candidate tokens in rank order.
    The rule is Sequoia's with Q = a point mass on each candidate in turn: accept x1 with
    probability P(x1); on rejection set P(x1) = 0 and renormalise (the residual
    max(P - δ_x1, 0)), then try x2 the same way, ...; if no candidate is accepted the bonus
    is sampled from what remains of P. Lossless: x1 is output with probability P(x1), and
    otherwise the output follows P conditioned on "not x1", whose mix with δ_x1 is P again;
    by induction over the candidates the output is exactly P. A repeated candidate has
    P = 0 by then and is never accepted. Returns (index of the accepted child or None, token).
    """
    p = p.float().clone()
    if children:
        u = torch.rand(len(children), generator=generator, device=p.device)
        for i, x in enumerate(children):
            px = float(p[x])
            if float(u[i]) * float(p.sum()) < px:
                return i, int(x)
            p[x] = 0.0
    return None, int(sample(p[None], 1, generator))


def verify_greedy(argmax: int, children: Sequence[int]) -> tuple[int | None, int]:
    """Greedy rule: (index of the child equal to the target argmax or None, argmax)."""
    for i, c in enumerate(children):
        if c == argmax:
            return i, argmax
    return None, argmax


def sample(probs: torch.Tensor, num: int = 1,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """``num`` independent draws per row (with replacement), by inverting the float64 CDF.

    probs: (B, V) non-negative, rows need not be normalised. Returns (B, num) int64. Tokens of
    zero probability are never drawn. A row without a valid distribution (NaN or infinite
    entries, or no mass at all) raises SamplingError rather than yielding an arbitrary token.
    Much faster than ``torch.multinomial`` for one draw from a large vocabulary.
    """
    cdf = probs.double().cumsum(-1)
    total = cdf[:, -1:] if probs.shape[-1] else cdf.new_zeros(probs.shape[0], 1)
    if not bool((torch.isfinite(total) & (total > 0)).all()):
        _check_rows(probs.double())
        raise SamplingError("a probability row has no valid distribution to sample from")
    u = torch.rand(probs.shape[0], num, generator=generator, device=probs.device)
    return torch.searchsorted(cdf, u.double() * total, right=True).clamp_max_(
        probs.shape[-1] - 1)


def draw_children(q: torch.Tensor, k: int, replacement: bool,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw k children per row of q.

    q: (B, V) probs. Returns (B, k) int64. Without replacement: k sequential draws, each from
    q with the earlier draws removed (renormalised); once a row has no mass left (fewer than
    k tokens of positive probability) the remaining children are fillers: token V - 1, a
    token of zero probability or a repeat of an earlier child. The verification rule never
    accepts them (it skips children whose current Q is 0: a rejected child is removed from Q).
    With replacement: k independent draws.
    """
    if k == 0 or replacement:
        return sample(q, k, generator)
    # One CDF for all k draws: each later draw picks a point on the CDF line with the
    # intervals of earlier draws cut out (holes skipped in ascending order).
    qd = q.double()
    cdf = qd.cumsum(-1)
    b, v = q.shape
    out = torch.empty(b, k, dtype=torch.int64, device=q.device)
    starts = cdf.new_empty(b, 0)
    ends = cdf.new_empty(b, 0)
    left = cdf[:, -1:]
    for j in range(k):
        u = torch.rand(b, 1, generator=generator, device=q.device).double() * left
        for h in range(j):
            s, e = starts[:, h:h + 1], ends[:, h:h + 1]
            u = torch.where(u >= s, e + (u - s), u)
        pick = torch.searchsorted(cdf, u, right=True).clamp_max_(v - 1)
        out[:, j:j + 1] = pick
        e = cdf.gather(1, pick)
        s = e - qd.gather(1, pick)
        left = (left - (e - s)).clamp_min(0.0)
        starts, order = torch.cat([starts, s], 1).sort(dim=1)
        ends = torch.cat([ends, e], 1).gather(1, order)
    return out
