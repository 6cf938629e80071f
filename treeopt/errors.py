"""The base class of treeopt's own errors.

Every error treeopt raises on purpose (bad input, an impossible request, a broken file) is a
:class:`TreeoptError` whose message names the problem and what to change, in one line. The
module-specific classes (``TreeError``, ``ProfileError``, ``SamplingError``, ...) subclass it
and keep ``ValueError`` as a second base, so ``except ValueError`` keeps catching them.

The ``treeopt`` command prints a ``TreeoptError`` as one line and exits with status 2; any
other exception (a ``ValueError`` from torch or numpy, a ``KeyError``, ...) is a bug, not a
user error, and keeps its traceback.
"""

from __future__ import annotations


class TreeoptError(Exception):
    """An error treeopt raises on purpose: its message is one line for the user."""


class UserError(TreeoptError):
    """Bad command-line input: printed as one line, exit status 2, no traceback."""


def one_line(exc: object, limit: int | None = None) -> str:
    """The first line of an exception's message (its type's name when the message is empty),
    cut to ``limit`` characters with "..." when given: the one way treeopt turns an error
    into the one line a user sees."""
    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    if limit is not None and len(line) > limit:
        return line[:limit - 3] + "..."
    return line
