"""Tree-based speculative decoding for Hugging Face causal LMs: the engine, the drafter
interface and the sampling settings (model loading lives in ``treeopt.models.loading``)."""

from treeopt.decode.drafter import Drafter, Proposal, build_drafter, register_drafter
from treeopt.decode.engine import DecodeStats, Generation, StepStats, generate
from treeopt.decode.sampling import Sampling
from treeopt.decode.verify import DecodeError

__all__ = ["generate", "Generation", "DecodeStats", "StepStats", "DecodeError", "Drafter",
           "Proposal", "Sampling", "build_drafter", "register_drafter"]
