"""The evaluation's error type, in its own module so that every evaluation module can raise
it without importing the runner."""

from treeopt.errors import TreeoptError


class EvalError(TreeoptError, ValueError):
    """A run that cannot proceed (bad method spec, mismatched resume, busy results folder);
    the message is one line naming the problem."""
