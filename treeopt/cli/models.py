"""``treeopt models`` (being written)."""


def register(sub) -> None:
    """Not registered yet."""
