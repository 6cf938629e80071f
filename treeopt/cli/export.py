"""``treeopt export`` (being written)."""


def register(sub) -> None:
    """Not registered yet."""
