"""What CPU timings depend on, recorded beside every timing treeopt takes (latency profiles,
evaluation runs): the one definition of that record."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from treeopt.decode.attention import attention_in_use
from treeopt.models.cpu_kernels import kernels_in_use
from treeopt.models.dtype import machine


@dataclass(frozen=True)
class Machine:
    """Where a run executes: ``device`` ("auto", "cpu", "cuda", ...), ``dtype`` ("auto",
    "float32", "bfloat16", "float16") and torch's CPU ``threads`` (None: torch's choice)."""

    device: str = "auto"
    dtype: str = "auto"
    threads: int | None = None


def threading_settings(model=None, draft=None) -> dict:
    """torch's intra- and inter-op threads, the OpenMP environment as set in this process
    (``omp_wait_policy`` None = unset: OpenMP's default, active spin-waiting;
    ``omp_num_threads``), the CPU count, and the linear-layer kernels of ``model`` (and of a
    ``draft`` model) timed (``treeopt.models.cpu_kernels.kernels_in_use``) and its attention
    (``treeopt.decode.attention.attention_in_use``), with ``model``'s
    dtype and the machine it runs on (CPU model and matrix flags, or the GPU's name:
    ``treeopt.models.dtype.machine``), so that every timing names what it ran on."""
    out = {"threads": torch.get_num_threads(),
           "interop_threads": torch.get_num_interop_threads(),
           "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
           "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
           "cpu_count": os.cpu_count()}
    if isinstance(model, torch.nn.Module):
        param = next(model.parameters(), None)
        if param is not None:
            out["dtype"] = str(param.dtype).removeprefix("torch.")
            out["machine"] = {k: v for k, v in machine(param.device).items()
                              if k in ("cpu", "flags", "gpu")}
        out["kernels"] = kernels_in_use(model)
        out["attention"] = attention_in_use(model)
    if isinstance(draft, torch.nn.Module):
        out["draft_kernels"] = kernels_in_use(draft)
    return out


def threads_text(settings: dict) -> str:
    """``"2 threads, OMP_WAIT_POLICY=PASSIVE, kernels onednn, attention sdpa"`` for a
    :func:`threading_settings` record (records from before the attention was recorded leave
    it out)."""
    text = (f"{settings.get('threads')} threads, OMP_WAIT_POLICY="
            f"{settings.get('omp_wait_policy') or 'unset'}, kernels {settings.get('kernels')}")
    return text + (f", attention {settings['attention']}" if settings.get("attention") else "")


__all__ = ["Machine", "threading_settings", "threads_text"]
