"""treeopt: find, save, decode with and evaluate token-tree shapes for speculative decoding.

The pipeline as Python calls (loaded on first use):

- ``treeopt.search_tree(profile, ...)``: the exact DP's best tree for a profile, of a fixed
  budget or the hardware-aware choice of size and height (``treeopt.pipeline``);
- ``treeopt.tune(target, draft, prompts, ...)``: profile acceptance and latency, choose the
  tree, save everything (``treeopt.pipeline``);
- ``treeopt.generate(prompt, ...)``: decode text with a tree (``treeopt.decode.api``).
"""

__version__ = "0.1.0"

from treeopt.tree import Tree, TreeError  # noqa: E402

__all__ = ["Tree", "TreeError", "generate", "search_tree", "tune", "__version__"]

# name -> module; importing them loads numpy, torch or transformers: only when used.
_LAZY = {"generate": "treeopt.decode.api", "search_tree": "treeopt.pipeline",
         "tune": "treeopt.pipeline"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'treeopt' has no attribute {name!r}")
