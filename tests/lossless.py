"""The one statistical check of losslessness the sampling tests share.

A tiny model over a vocabulary of a few tokens with peaked, context-dependent distributions;
the exact joint distribution of its first ``new`` generated tokens, by enumerating every
continuation; and chi-square p-values of the samples' consecutive token pairs against the
exact pair marginals. A decoding method is lossless when its samples pass (every p-value above
a small threshold) and a deliberately broken rule fails the same check.
"""

from __future__ import annotations

import itertools
from functools import lru_cache

import torch
from scipy.stats import chisquare

from treeopt.decode.sampling import logits_to_probs
from treeopt.testing import tiny_causal_lm
from treeopt.tree import Tree


def peaked_lm(seed: int, vocab: int = 8, sharpness: float = 40.0):
    """A one-layer Llama over ``vocab`` tokens whose next-token distributions are peaked and
    depend on the context (the final norm's weight scaled by ``sharpness``)."""
    m = tiny_causal_lm("llama", vocab_size=vocab, hidden_size=16, num_layers=1, num_heads=2,
                       num_kv_heads=1, seed=seed)
    with torch.no_grad():
        m.model.norm.weight.mul_(sharpness)
    return m


def exact_joint(target, prompt: torch.Tensor, new: int, temperature: float = 1.0,
                top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """(V,) * new float64 joint probability of the first ``new`` tokens ``target`` samples
    after ``prompt`` (1, L) with these settings, by enumeration of all V**(new-1) prefixes."""
    vocab = target.get_output_embeddings().weight.shape[0]
    seqs = torch.tensor(list(itertools.product(range(vocab), repeat=new - 1)))
    x = torch.cat([prompt.expand(len(seqs), -1), seqs], 1)
    with torch.inference_mode():
        probs = logits_to_probs(target(input_ids=x).logits[:, -new:], temperature, top_k, top_p)
    joint = torch.ones((), dtype=torch.float64)
    for i in range(new):
        # probs[s, i] is the next-token distribution after the first i tokens of s
        step = probs[:, i].reshape((vocab,) * new)
        step = step[(slice(None),) * i + (0,) * (new - 1 - i)]
        joint = joint.unsqueeze(-1) * step.double()
    return joint


def pair_pvalues(samples: torch.Tensor, joint: torch.Tensor) -> list[float]:
    """Chi-square p-values of the consecutive token pairs (t1, t2), (t2, t3), ... of
    ``samples`` (n, new) against the pair marginals of ``joint``; cells expected below 5 are
    pooled. A sampled pair of probability zero fails at once."""
    new, vocab = joint.dim(), joint.shape[0]
    out = []
    for i in range(new - 1):
        marg = joint.sum(dim=[d for d in range(new) if d not in (i, i + 1)]).flatten()
        obs = torch.bincount(samples[:, i] * vocab + samples[:, i + 1],
                             minlength=vocab * vocab).double()
        exp = marg * len(samples)
        big = exp >= 5
        o = torch.cat([obs[big], obs[~big].sum().view(1)])
        e = torch.cat([exp[big], exp[~big].sum().view(1)])
        if e[-1] == 0:
            assert o[-1] == 0, "generated a token pair of probability zero"
            o, e = o[:-1], e[:-1]
        out.append(float(chisquare(o.numpy(), (e * o.sum() / e.sum()).numpy()).pvalue))
    return out


# ---------------------------------------------------------------------------------------------
# Exact enumeration: every draft of a tree and every decision of a sequence-level rule, with
# their probabilities (tests/test_traversal.py, tests/test_rule_gain.py).
class Branch(Exception):
    def __init__(self, n: int):
        self.n = n


class Scripted:
    """A rule's randomness replayed from a script of choices; raises Branch at the first
    choice past the script (``outcomes`` then tries each option)."""

    def __init__(self, script):
        self.script, self.i, self.weight = script, 0, 1.0

    def _choose(self, options):
        options = [(o, w) for o, w in options if w > 0]
        if self.i == len(self.script):
            raise Branch(len(options))
        o, w = options[self.script[self.i]]
        self.i += 1
        self.weight *= w
        return o

    def accept(self, node, prob):
        prob = min(max(float(prob), 0.0), 1.0)
        return self._choose([(True, prob), (False, 1.0 - prob)])

    def draw(self, probs):
        p = probs.double() / probs.double().sum()
        return self._choose([(x, float(p[x])) for x in range(len(p))])


def outcomes(run):
    """[(probability, result)] of every way ``run(source)`` can go."""
    out, stack = [], [[]]
    while stack:
        script = stack.pop()
        src = Scripted(script)
        try:
            res = run(src)
        except Branch as b:
            stack.extend(script + [k] for k in range(b.n))
            continue
        out.append((src.weight, res))
    return out


def lm(seed: int, vocab: int, top_k: int = 0, top_p: float = 1.0, sharp: float = 1.5):
    """A context -> next-token distribution (float64, (vocab,)) map, fixed by ``seed``."""

    @lru_cache(maxsize=None)
    def probs(ctx: tuple) -> torch.Tensor:
        g = torch.Generator().manual_seed(hash((seed,) + ctx) % (2 ** 31))
        logits = torch.randn(vocab, generator=g, dtype=torch.float64) * sharp
        probs = logits_to_probs(logits, 1.0, top_k, top_p).double()
        return probs / probs.sum()

    return probs


def drafts(tree: Tree, q, mode: str, prompt: tuple = (1,)):
    """[(probability, tokens)] of every draft of ``tree`` after ``prompt``: children drawn from
    q without replacement ("sample"; a filler of zero remaining mass once q is exhausted,
    as ``draw_children`` pads) or q's ranked top tokens ("point", deterministic)."""
    vocab = len(q(prompt))
    out = []

    def fill(v_index, tokens, prob, ctxs):
        internal = [v for v in range(tree.size) if tree.children[v]]
        if v_index == len(internal):
            out.append((prob, list(tokens)))
            return
        v = internal[v_index]
        kids, qv = tree.children[v], q(ctxs[v])
        if mode == "point":
            order = sorted(range(vocab), key=lambda x: -float(qv[x]))
            choices = [(tuple(order[:len(kids)]), 1.0)]
        else:
            choices = []
            for seq in itertools.product(range(vocab), repeat=len(kids)):
                w, left, used = 1.0, qv.clone(), []
                for x in seq:
                    if left.sum() <= 0:  # exhausted: fillers are the smallest zero-mass token
                        want = int(torch.nonzero(left == 0)[0])
                        w *= 1.0 if x == want else 0.0
                    else:
                        w *= float(left[x] / left.sum())
                    left = left.clone()
                    left[x] = 0.0
                    used.append(x)
                if w > 0:
                    choices.append((seq, w))
        for seq, w in choices:
            for c, x in zip(kids, seq):
                tokens[c] = x
                ctxs[c] = ctxs[v] + (x,)
            fill(v_index + 1, tokens, prob * w, ctxs)

    tokens = [prompt[-1]] + [0] * (tree.size - 1)
    fill(0, tokens, 1.0, {0: prompt})
    return out
