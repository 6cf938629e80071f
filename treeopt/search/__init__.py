"""Tree-shape search: the exact DP (``dp``), the hardware-aware size/height choice
(``hardware``), an Optuna search (``optuna_search``), the best tree within the families
serving engines draft (``family``) and the library calls around them: load a profile, search,
save (``api``). Only ``dp`` and ``hardware`` are re-exported here.

Units: ``levels`` count tree levels with the root (the DP's limit, Sequoia's ``max_depth``);
``depth`` counts edges (``Tree.depth``); ``levels_for_depth`` / ``depth_for_levels`` convert."""

from treeopt.search.dp import DPError, DPTable, depth_for_levels, levels_for_depth, solve
from treeopt.search.hardware import (
                                     DEFAULT_DRAFT_COST,
                                     DEFAULT_MAX_LEVELS,
                                     DRAFT_COSTS,
                                     Choice,
                                     HardwareError,
                                     Prediction,
                                     choose,
                                     predict,
                                     step_cost,
)

__all__ = ["DPError", "DPTable", "solve", "levels_for_depth", "depth_for_levels", "Choice",
           "HardwareError", "Prediction", "choose", "predict", "step_cost",
           "DEFAULT_DRAFT_COST", "DEFAULT_MAX_LEVELS", "DRAFT_COSTS"]
