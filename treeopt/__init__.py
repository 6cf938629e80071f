"""treeopt: find, save, decode with and evaluate token-tree shapes for speculative decoding."""

__version__ = "0.1.0"

from treeopt.tree import Tree, TreeError  # noqa: E402

__all__ = ["Tree", "TreeError", "generate", "__version__"]


def __getattr__(name):
    # ``treeopt.generate`` loads torch and transformers; only pay for them when it is used.
    if name == "generate":
        from treeopt.decode.api import generate

        return generate
    raise AttributeError(f"module 'treeopt' has no attribute {name!r}")
