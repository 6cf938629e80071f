"""``treeopt chat`` (being written)."""


def register(sub) -> None:
    """Not registered yet."""
