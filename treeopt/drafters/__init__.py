"""Drafters: every implementation of the :class:`treeopt.decode.drafter.Drafter` interface, one
module per family. A draft model over a fixed tree (``model``, growing it with ``grow``),
model-free copies from the text (``ngram``), suffix tries over the text and earlier outputs
(``suffix``) or a corpus (``datastore``), adaptive trees
(``dynamic``, ``egag``) and cascades of other drafters (``cascade``). A module registers its
spec name with :func:`treeopt.decode.drafter.register_drafter`; a new drafter is a new module
here, and ``treeopt.specs`` imports it so that its name resolves."""

from treeopt.drafters import auto, cascade, datastore, dynamic, egag, model, ngram, suffix

__all__ = ["auto", "cascade", "datastore", "dynamic", "egag", "model", "ngram", "suffix"]
