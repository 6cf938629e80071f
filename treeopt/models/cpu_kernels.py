"""Faster CPU linear layers for verification: oneDNN with pre-packed weights.

Speculative decoding pays off only when verifying several tokens in one forward costs little
more than one token. On CPUs torch's default ``nn.Linear`` goes through MKL's sgemm, whose
small-row-count paths can be slow: measured on the 2-core AMD EPYC development machine
(torch 2.13 CPU, 2 threads, ``OMP_WAIT_POLICY=PASSIVE``), the 49152x576 SmolLM2 LM head took
12.9 / 26.9 / 45.3 / 24.6 / 19.7 ms for 1 / 2 / 3 / 4 / 8 rows, so a whole SmolLM2 forward over
2-4 tokens cost about 2x one token. oneDNN's linear with the weight reordered once into its
blocked layout (what ``torch.compile``'s CPU backend does when it freezes a model) took
5.6 / 7.6 / 10.2 / 7.5 / 8.7 ms, and a whole forward over 2-8 tokens 1.1-1.3x one token
(``python -m treeopt.models.cpu_kernels`` prints these figures for any model).

``pack_linear_layers(model)`` swaps every ``nn.Linear`` of a float32 CPU model for a
``PackedLinear`` holding the reordered weight (the original weight stays, shared, so
``get_output_embeddings().weight`` and tied embeddings keep working; the packed copy costs as
much memory again as the linear weights). Logits change by float32 rounding only (summation
order), checked when packing; greedy tree decoding stays token-exact with plain decoding *of
the packed model*, and every method a run compares uses the same packed target.
"""

from __future__ import annotations

import torch

# Largest |packed - reference| / (1 + |reference|) accepted in the self-check when packing.
PACK_TOLERANCE = 1e-3
KERNELS = ("auto", "onednn", "default")


class PackedLinear(torch.nn.Module):
    """``nn.Linear`` computed by oneDNN from a weight reordered once at construction.

    Input (..., in_features) float32 on CPU; output (..., out_features)."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        bias = None if self.bias is None else self.bias.detach()
        y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, shape[-1]), self.packed, bias,
                                               "none", [], "")
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, oneDNN"


def available() -> bool:
    """Whether this torch build has oneDNN's packed linear."""
    return bool(torch.backends.mkldnn.is_available()) and all(
        hasattr(torch.ops.mkldnn, op) for op in ("_reorder_linear_weight", "_linear_pointwise"))


def _agrees(linear: torch.nn.Linear, packed: PackedLinear) -> bool:
    x = torch.randn(3, linear.in_features, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ref = linear(x)
        got = packed(x)
    return bool(((got - ref).abs() / (1 + ref.abs())).max() <= PACK_TOLERANCE)


def pack_linear_layers(model: torch.nn.Module) -> int:
    """Replace every ``nn.Linear`` of a float32 CPU model by a ``PackedLinear`` in place.

    Returns the number of layers packed: 0 when the model is not float32 on CPU, when oneDNN
    is unavailable, or when the first packed layer disagrees with ``nn.Linear`` (then nothing
    is changed). Call it before building drafts that share the model's modules."""
    try:
        param = next(model.parameters())
    except StopIteration:
        return 0
    if param.device.type != "cpu" or param.dtype != torch.float32 or not available():
        return 0
    todo = [(parent, name, child) for parent in model.modules()
            for name, child in parent.named_children() if type(child) is torch.nn.Linear]
    if not todo:
        return 0
    try:
        first = PackedLinear(todo[0][2])
    except RuntimeError:
        return 0
    if not _agrees(todo[0][2], first):
        return 0
    done: dict[int, PackedLinear] = {id(todo[0][2]): first}
    for parent, name, child in todo:
        packed = done.get(id(child))
        if packed is None:
            packed = done[id(child)] = PackedLinear(child)
        setattr(parent, name, packed)
    return len(done)


def apply_kernels(model: torch.nn.Module, kernels: str = "auto") -> str:
    """Apply a ``--cpu-kernels`` choice; returns what the model now uses ("onednn" or
    "default"). "auto" and "onednn" pack float32 CPU models (``pack_linear_layers``);
    "default" keeps torch's ``nn.Linear``."""
    if kernels not in KERNELS:
        raise ValueError(f"unknown CPU kernels {kernels!r}; use {', '.join(KERNELS)}")
    if kernels == "default":
        return "default"
    return "onednn" if pack_linear_layers(model) else "default"


def kernels_in_use(model: torch.nn.Module) -> str:
    """"onednn" when the model's linear layers are packed, else "default"."""
    return "onednn" if any(isinstance(m, PackedLinear) for m in model.modules()) else "default"
