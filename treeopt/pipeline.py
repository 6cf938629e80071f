"""The pipeline as library calls, kept importable under its old name: the search API lives in
``treeopt.search.api`` (``search_tree``, ``optuna_tree``, ``load_profile``, ``rank_table``)
and tuning in ``treeopt.tuning`` (``tune`` and its defaults); prompt sets that a profile did not
see are ``treeopt.datasets.held_out_prompts`` / ``split_prompts``. Nothing is defined here."""

from treeopt.datasets import held_out_prompts, split_prompts
from treeopt.search.api import (
                                OPTUNA_MAX_SIZE,
                                OPTUNA_OBJECTIVES,
                                PipelineError,
                                SearchResult,
                                level_limit,
                                load_profile,
                                optuna_size_limit,
                                optuna_tree,
                                rank_table,
                                search_tree,
)
from treeopt.tuning import (
                                CPU_LATENCY,
                                CPU_NEW_TOKENS,
                                CPU_PROMPTS,
                                GPU_LATENCY,
                                GPU_NEW_TOKENS,
                                GPU_PROMPTS,
                                TUNE_ACCEPTANCE_DEPTH,
                                TuneResult,
                                acceptance_defaults,
                                latency_defaults,
                                latency_progress,
                                latency_warnings,
                                load_prompt_set,
                                measure_acceptance,
                                tune,
                                tune_defaults,
)

__all__ = ["CPU_LATENCY", "CPU_NEW_TOKENS", "CPU_PROMPTS", "GPU_LATENCY", "GPU_NEW_TOKENS",
           "GPU_PROMPTS", "OPTUNA_MAX_SIZE", "OPTUNA_OBJECTIVES", "PipelineError",
           "SearchResult", "TUNE_ACCEPTANCE_DEPTH", "TuneResult", "acceptance_defaults",
           "held_out_prompts", "latency_defaults", "latency_progress", "latency_warnings",
           "level_limit", "load_profile", "load_prompt_set", "measure_acceptance",
           "optuna_size_limit", "optuna_tree", "rank_table", "search_tree", "split_prompts",
           "tune", "tune_defaults"]
