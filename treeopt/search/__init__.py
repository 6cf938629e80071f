"""Tree-shape search: the exact DP (``dp``), the hardware-aware size/depth choice
(``hardware``) and, when installed by its module, an Optuna search (``optuna_search``)."""

from treeopt.search.dp import DPError, DPTable, solve
from treeopt.search.hardware import Choice, HardwareError, Prediction, choose, predict

__all__ = ["DPError", "DPTable", "solve", "Choice", "HardwareError", "Prediction", "choose",
           "predict"]
