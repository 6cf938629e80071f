"""treeopt's cache folder: the one place its location is decided.

Converted GGUF models, fetched models, token-frequency maps and measured per-machine choices
live under ``$TREEOPT_CACHE``, else ``$XDG_CACHE_HOME/treeopt``, else ``~/.cache/treeopt``."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """treeopt's cache folder (see the module docstring); not created here."""
    if os.environ.get("TREEOPT_CACHE"):
        return Path(os.environ["TREEOPT_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "treeopt"


__all__ = ["cache_dir"]
