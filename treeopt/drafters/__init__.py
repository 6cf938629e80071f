"""Drafters: what proposes the token tree of each step (model-free and model-based)."""
