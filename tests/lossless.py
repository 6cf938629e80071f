"""The one statistical check of losslessness the sampling tests share.

A tiny model over a vocabulary of a few tokens with peaked, context-dependent distributions;
the exact joint distribution of its first ``new`` generated tokens, by enumerating every
continuation; and chi-square p-values of the samples' consecutive token pairs against the
exact pair marginals. A decoding method is lossless when its samples pass (every p-value above
a small threshold) and a deliberately broken rule fails the same check.
"""

from __future__ import annotations

import itertools

import torch
from scipy.stats import chisquare

from treeopt.decode.sampling import logits_to_probs
from treeopt.testing import tiny_causal_lm


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
