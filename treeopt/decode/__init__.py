"""Tree-based speculative decoding for Hugging Face causal LMs: the engine, the drafter
interface and the sampling settings (model loading lives in ``treeopt.decode.models``)."""

from treeopt.decode.drafter import Drafter, Proposal, build_drafter, register_drafter
from treeopt.decode.engine import DecodeError, DecodeStats, Generation, StepStats, generate
from treeopt.decode.sampling import Sampling

__all__ = ["generate", "Generation", "DecodeStats", "StepStats", "DecodeError", "Drafter",
           "Proposal", "Sampling", "build_drafter", "register_drafter"]
