"""treeopt: find, save, decode with and evaluate token-tree shapes for speculative decoding.

The pipeline as Python calls (loaded on first use):

- ``treeopt.search_tree(profile, ...)``: the exact DP's best tree for a profile, of a fixed
  budget or the hardware-aware choice of size and height (``treeopt.search.api``);
- ``treeopt.tune(target, draft, prompts, ...)``: profile acceptance and latency, choose the
  tree, save everything (``treeopt.tuning``);
- ``treeopt.generate(prompt, ...)``: decode text with a tree (``treeopt.api``).
"""

__version__ = "0.1.0"

from treeopt.tree import Tree, TreeError  # noqa: E402

__all__ = ["Tree", "TreeError", "generate", "search_tree", "tune", "__version__"]


def __getattr__(name):
    # The three pipeline calls load torch and transformers: ``import treeopt`` stays light (no
    # torch) and imports them on first use (the package facade's deliberate lazy imports).
    if name == "generate":
        from treeopt.api import generate  # lazy: torch and transformers only when used
        return generate
    if name == "search_tree":
        from treeopt.search.api import search_tree  # lazy: numpy and torch only when used
        return search_tree
    if name == "tune":
        from treeopt.tuning import tune  # lazy: torch and transformers only when used
        return tune
    raise AttributeError(f"module 'treeopt' has no attribute {name!r}")
