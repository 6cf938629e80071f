"""treeopt: find, save, decode with and evaluate token-tree shapes for speculative decoding."""

__version__ = "0.1.0"

from treeopt.tree import Tree, TreeError  # noqa: E402

__all__ = ["Tree", "TreeError", "__version__"]
