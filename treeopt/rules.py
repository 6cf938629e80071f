"""The names of the stochastic verification rules: the one list that every command, API and
profile takes its choices from (no torch here, so the CLI can build its parsers cheaply).

The rules themselves live in :mod:`treeopt.decode.sampling` (token level) and
:mod:`treeopt.decode.traversal` (sequence level).
"""

#: The stochastic verification rules, the one list every command and API takes its choices
#: from: name -> what it verifies and the guarantee it comes with. "sequoia" and "specinfer"
#: decide node by node from the root (token level); "traversal" and "block" decide on whole
#: root-to-node sequences (:mod:`treeopt.decode.traversal`). Every rule is lossless: the output
#: follows the target's distribution exactly.
RULES = {
    "sequoia": "token level, children drawn without replacement (Sequoia, Chen et al. 2024)",
    "specinfer": "token level, children drawn with replacement (SpecInfer's recursive "
                 "rejection sampling, Miao et al. 2024)",
    "traversal": "sequence level, leaf to root, children drawn without replacement "
                 "(Traversal Verification, Weng et al. 2025); trees and chains",
    "block": "sequence level over one drafted block (Block Verification, Sun et al. 2025); "
             "chains only (one child per node)",
}
#: Rules that decide node by node from the root (``treeopt.decode.sampling.verify_children``);
#: the others decide on whole sequences (``treeopt.decode.traversal``).
TOKEN_RULES = ("sequoia", "specinfer")
#: Rules that verify chains only: a tree with a node of several children is refused.
CHAIN_RULES = ("block",)
#: Rules whose children are drawn with replacement (the others draw without).
WITH_REPLACEMENT = ("specinfer",)
RULE_HELP = ("stochastic verification rule: " + "; ".join(f"{k}: {v}" for k, v in RULES.items())
             + " (temperature 0 verifies by argmax whatever the rule; block still refuses a "
             "branching tree)")


def default_width(rule: str) -> int:
    """Siblings an acceptance profile drafts by default under ``rule``: 8, or 1 for a
    chain-only rule."""
    return 1 if rule in CHAIN_RULES else 8
