"""Greedy exactness: is a method's output plain decoding's, token for token?

In float32 a lossless greedy method reproduces plain decoding exactly. In half precision it
may not, without any bug: the tree pass computes the target's logits in one batched forward
over many tokens, plain decoding one token at a time, and the two roundings differ. Where the
target's two best logits are (nearly) tied, the last bit decides the argmax, so the two runs
can pick different tokens and their outputs part from there on. Each greedy output is
therefore classified as

- ``"equal"``: the same tokens as plain decoding;
- ``"tie"``: it differs, and at the first difference the token plain decoding chose and the
  token the method chose are both within the dtype's tolerance of the target's best logit
  there (a numerical tie: which one wins is rounding, not the method);
- ``"differs"``: any other difference (a token the target does not rate as tied for best,
  or outputs of different lengths): a real failure.

The logits at the first difference ``j`` are recomputed after the run (one extra target
forward over prompt + plain decoding's first ``j`` tokens, only for outputs that differ);
the recomputation itself rounds a little differently from plain decoding's cached steps,
which is why both tokens are compared with the best logit rather than trusting which one of
them the recomputation ranks first.

Tolerance (``tie_tolerance``): ``REL_TOLERANCE[dtype] * scale`` with ``scale`` the larger
magnitude of the best logit and of the lower of the two tokens' logits. The half-precision
factors are measured, not derived from one rounding step: a bfloat16 forward rounds every
layer's output, and the roundings of a one-token and a many-token forward part by a few
steps per layer that compound over the network. ``scripts/bench_ties.py`` decodes greedily
one token at a time, feeds the same tokens again in chunks of 2, 5 and 16 (as verification
does) and in one uncached forward (as this check recomputes), and measures the *ordering
drift*: how far the gap between the best token and any of the 5 best moves, relative to the
best logit. SmolLM2-135M in bfloat16 (13 Spec-Bench prompts x 64 positions, 2-core AMD EPYC
with AVX512-BF16, torch 2.13): median 0.0054, p99 0.019-0.021, max 0.033 (chunks of 2), 0.039
(5), 0.051 (16) and 0.050 for the recomputation. A tie at the first difference shows in the
recomputed logits as a gap up to the method's drift plus the recomputation's (about 0.10), so
bfloat16 gets 2**-3 = 0.125: the measured worst case with a quarter to spare. (One rounding
step, 2**-7, the factor used before this was measured, failed 5 of 26 outputs, of treeopt's
methods and Hugging Face's prompt lookup alike, whose first difference was 1-2 bfloat16 steps
below the best logit.) float16 has three more
mantissa bits, and its median drift is 8x smaller (7e-4), but its worst positions drift as
far (4 prompts x 32 positions: max 0.017 / 0.037 / 0.031 for chunks of 2 / 5 / 16, 0.029
recomputed), so it gets the same 2**-3. float32 (eps 1.2e-7) gets 1e-4: its tree logits match plain decoding's to ~1e-6 relative here, and
1e-4 leaves a real tie rare (a wrong token would have to land within 0.01 % of the best
logit). Other floating dtypes use their machine epsilon. The half-precision tolerances are
wide (a bfloat16 token within 12.5 % of the best logit counts as tied): the strict check of a
method's exactness is float32, where the test suite runs.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

EQUAL, TIE, DIFFERS = "equal", "tie", "differs"
EXACTNESS = (EQUAL, TIE, DIFFERS)

# Tie tolerance relative to the logits' magnitude, by dtype name (see the module docstring).
REL_TOLERANCE = {"float32": 1e-4, "bfloat16": 2.0 ** -3, "float16": 2.0 ** -3}


def first_mismatch(ref: Sequence[int], got: Sequence[int]) -> int | None:
    """Index of the first new token where ``got`` differs from ``ref`` (the shorter length
    when one is a prefix of the other); None when equal."""
    if list(ref) == list(got):
        return None
    return next((j for j, (a, b) in enumerate(zip(ref, got)) if a != b), min(len(ref), len(got)))


def dtype_name(dtype: Any) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"`` (a string is returned as is)."""
    return str(dtype).rsplit(".", 1)[-1]


def model_dtype(model: Any) -> Any:
    """The floating dtype a model computes in (its ``dtype`` or its first parameter's)."""
    dtype = getattr(model, "dtype", None)
    if dtype is None:
        try:
            dtype = next(model.parameters()).dtype
        except (AttributeError, StopIteration, TypeError):
            return None
    return dtype


def rel_tolerance(dtype: Any) -> float:
    """The relative tie tolerance of a dtype (see the module docstring)."""
    name = dtype_name(dtype)
    if name in REL_TOLERANCE:
        return REL_TOLERANCE[name]
    import torch

    try:
        return float(torch.finfo(getattr(torch, name)).eps)
    except (AttributeError, TypeError):
        return REL_TOLERANCE["float32"]


def tie_gap(logits: Any, a: int, b: int) -> tuple[float, float]:
    """(gap, scale) at one position: gap = best logit - the lower of tokens ``a`` and ``b``'s
    logits (the top-2 gap when they are the best two), scale = the larger magnitude of the
    two logits compared. ``logits``: a 1-D tensor or sequence over the vocabulary."""
    values = [float(v) for v in (logits.float().tolist() if hasattr(logits, "float")
                                 else logits)]
    best = max(values)
    low = min(values[a], values[b])
    return best - low, max(abs(best), abs(low))


def tie_tolerance(dtype: Any, scale: float) -> float:
    return rel_tolerance(dtype) * abs(scale)


def logits_after(target: Any, ids: Sequence[int]) -> Any:
    """The target's next-token logits after ``ids`` (one forward, no cache)."""
    import torch

    device = getattr(target, "device", None) or next(target.parameters()).device
    with torch.inference_mode():
        out = target(input_ids=torch.tensor([list(ids)], dtype=torch.long, device=device),
                     use_cache=False)
    return out.logits[0, -1]


def compare(target: Any, prompt_ids: Sequence[int], ref: Sequence[int], got: Sequence[int],
            dtype: Any = None) -> dict:
    """The exactness columns of one greedy output ``got`` against plain decoding's ``ref``
    for the same prompt: matches_ar (True only when equal), exactness, first_mismatch,
    tie_gap and tie_tolerance (at the first difference; None when equal or when the outputs
    differ only in length)."""
    j = first_mismatch(ref, got)
    row = {"matches_ar": j is None, "exactness": EQUAL if j is None else DIFFERS,
           "first_mismatch": j, "tie_gap": None, "tie_tolerance": None}
    if j is None or j >= min(len(ref), len(got)):
        return row
    dtype = dtype if dtype is not None else model_dtype(target)
    logits = logits_after(target, list(prompt_ids) + list(ref[:j]))
    gap, scale = tie_gap(logits, int(ref[j]), int(got[j]))
    tol = tie_tolerance(dtype if dtype is not None else "float32", scale)
    row.update(tie_gap=gap, tie_tolerance=tol, exactness=TIE if gap <= tol else DIFFERS)
    return row


def is_missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def row_exactness(row: Any) -> str | None:
    """A row's exactness: its ``exactness`` column, else (rows written before it existed)
    "equal" / "differs" from ``matches_ar``; None when not checked (sampling)."""
    get = row.get if hasattr(row, "get") else (lambda k, d=None: getattr(row, k, d))
    value = get("exactness", None)
    if isinstance(value, str) and value in EXACTNESS:
        return value
    match = get("matches_ar", None)
    if is_missing(match):
        return None
    return EQUAL if bool(match) else DIFFERS


def count_text(equal: int, ties: int, checked: int) -> str:
    """The summary's matches_ar cell: "5/6", or "5/6 (+1 tie)" when ties excuse some."""
    text = f"{equal}/{checked}"
    if ties:
        text += f" (+{ties} tie{'s' if ties > 1 else ''})"
    return text


def tie_line(method: str, prompt_key: str, turn: int, position: Any, gap: Any,
             tol: Any) -> str:
    where = f"{method} differs from ar on prompt {prompt_key} turn {turn}"
    if is_missing(position):
        return f"{where} at a numerical tie"
    detail = "" if is_missing(gap) or is_missing(tol) else (
        f" (best logits {float(gap):.3g} apart, tolerance {float(tol):.3g})")
    return f"{where} at a numerical tie at new token {int(position)}{detail}"
