"""Drafters: the proposers behind the drafter interface (treeopt.decode.drafter)."""
