"""Entropy-adaptive draft length (EGAG)."""
