"""Cascades of drafters (CS-Drafting): vertical, horizontal and fallback."""
