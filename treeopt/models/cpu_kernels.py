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

A forward over a few rows (2-16 tokens being verified) is memory-bound like one token's, but
oneDNN's blocked kernel for a few rows can cost much more than for one. Computed the other
way round, ``weight @ x.T`` (the weight streamed once, each row a column of a narrow product:
BLAS's matrix-vector shape), it can cost what one row does: on a 2-core AMD EPYC with AVX2
only (``python -m treeopt.bench.kernels --compare linear``, 128 cached tokens) a whole
SmolLM2 forward over 2 / 4 tokens took 99.5 / 109.2 ms with oneDNN and 86.4 / 86.1 ms with
those rows streamed, one token 83 ms. Which is faster depends on the machine and the row
count, so ``PackedLinear.streamed`` (none by default) is set per model from a measurement
(``treeopt.models.kernel_choice``); ``kernels_in_use`` names it.

oneDNN lays a packed weight out for the row count it is told to expect (``pack_rows``).
treeopt packs for :data:`PACK_ROWS` = 1, plain decoding's forward. Laid out for 16 rows
instead, whole SmolLM2 forwards over 2-16 rows ran 9-21 % faster and one row cost the same
(``python -m treeopt.bench.kernels --compare packing --contexts 128,1024`` on the AVX2 EPYC,
2 threads: after 128 cached tokens 4 rows 125.7 ms against 154.1, 8 rows 124.7 against
147.2, one row 94.1 against 91.8), but decoding Spec-Bench with ``auto`` was no faster
(2-4 rows already go to the streamed product where it is faster), and on larger layers (the
Qwen2.5-Coder-1.5B shapes) the 16-row layout made one row, the forward of every plain step,
slower. A second layout would cost another copy of the weights.
"""

from __future__ import annotations

import torch

# Largest |packed - reference| / (1 + |reference|) accepted in the self-check when packing.
PACK_TOLERANCE = 1e-3
KERNELS = ("auto", "onednn", "default")
#: The row count oneDNN lays the packed weights out for (``_reorder_linear_weight``'s
#: ``batch_size``): one, plain decoding's forward (see the module docstring).
PACK_ROWS = 1


class PackedLinear(torch.nn.Module):
    """``nn.Linear`` computed by oneDNN from a weight reordered once at construction, laid
    out for ``pack_rows``-row inputs (it computes any row count).

    Input (..., in_features) float32 on CPU; output (..., out_features)."""

    def __init__(self, linear: torch.nn.Linear, pack_rows: int = PACK_ROWS):
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.pack_rows = int(pack_rows)
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(),
                                                              self.pack_rows)
        #: Row counts computed as ``weight @ x.T`` instead of by oneDNN, each mapped to the
        #: rows it is computed with (itself, or more: zero rows padded on and dropped after,
        #: where the BLAS serves that count faster); set for a model by :func:`stream_rows`.
        self.streamed: dict[int, int] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        rows = x.reshape(-1, shape[-1])
        bias = None if self.bias is None else self.bias.detach()
        m = rows.shape[0]
        padded = self.streamed.get(m)
        if padded:
            if padded > m:
                rows = torch.cat([rows, rows.new_zeros(padded - m, rows.shape[1])])
            y = torch.mm(self.weight.detach(), rows.t())[:, :m].t().contiguous()
            if bias is not None:
                y += bias
        else:
            y = torch.ops.mkldnn._linear_pointwise(rows, self.packed, bias, "none", [], "")
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        streamed = f", streamed rows {rows_text(self.streamed)}" if self.streamed else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"oneDNN packed for {self.pack_rows} row{'s' * (self.pack_rows != 1)}"
                f"{streamed}")


def streamed_map(rows) -> dict[int, int]:
    """``rows`` as a row count -> rows computed map: a mapping as given, an iterable of row
    counts each computed as itself."""
    if isinstance(rows, dict):
        return {int(m): int(n) for m, n in rows.items()}
    return {int(m): int(m) for m in rows}


def rows_text(rows) -> str:
    """``"2-4,5:6,8"`` for row counts 2, 3, 4 and 8 computed as themselves and 5 padded to
    6 (``rows``: a mapping or an iterable, as :func:`streamed_map` takes)."""
    out, run = [], []

    def flush():
        if run:
            out.append(str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}")
            run.clear()

    for m, n in sorted(streamed_map(rows).items()):
        if n != m:
            flush()
            out.append(f"{m}:{n}")
        elif run and m == run[-1] + 1:
            run.append(m)
        else:
            flush()
            run.append(m)
    flush()
    return ",".join(out)


def stream_rows(model: torch.nn.Module, rows) -> int:
    """Compute the forwards over the given row counts as ``weight @ x.T`` in every packed
    layer of ``model`` (``rows``: an iterable of row counts, or a mapping of row count to the
    rows computed, >= it; empty: oneDNN for every count). Returns the layers set."""
    mapping = streamed_map(rows)
    if any(n < m for m, n in mapping.items()) or any(m < 1 for m in mapping):
        raise ValueError(f"streamed rows must map each row count to at least itself: {mapping}")
    layers = [m for m in model.modules() if isinstance(m, PackedLinear)]
    for m in layers:
        m.streamed = dict(mapping)
    return len(layers)


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


def pack_linear_layers(model: torch.nn.Module, pack_rows: int = PACK_ROWS) -> int:
    """Replace every ``nn.Linear`` of a float32 CPU model by a ``PackedLinear`` in place
    (its weight laid out for ``pack_rows``-row inputs).

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
        first = PackedLinear(todo[0][2], pack_rows)
    except RuntimeError:
        return 0
    if not _agrees(todo[0][2], first):
        return 0
    done: dict[int, PackedLinear] = {id(todo[0][2]): first}
    for parent, name, child in todo:
        packed = done.get(id(child))
        if packed is None:
            packed = done[id(child)] = PackedLinear(child, pack_rows)
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
    """"onednn" when the model's linear layers are packed (``"onednn,streamed=2-4,8"`` when
    some row counts are computed streamed), else "default"."""
    packed = [m for m in model.modules() if isinstance(m, PackedLinear)]
    if not packed:
        return "default"
    streamed = packed[0].streamed
    return f"onednn,streamed={rows_text(streamed)}" if streamed else "onednn"
