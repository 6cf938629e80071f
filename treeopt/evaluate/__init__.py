"""Evaluation: prompts (``datasets``), interleaved method comparison (``runner``) and reports
(``report``). Only the light dataset module is imported here; import the others directly."""

from treeopt.datasets import DatasetError, Prompt, load_prompts

__all__ = ["DatasetError", "Prompt", "load_prompts"]
