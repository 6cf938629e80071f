"""Tree-based speculative decoding for Hugging Face causal LMs (engine only; model loading
lives in ``treeopt.decode.models``)."""

from treeopt.decode.engine import DecodeError, DecodeStats, Generation, StepStats, generate

__all__ = ["generate", "Generation", "DecodeStats", "StepStats", "DecodeError"]
