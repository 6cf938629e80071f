"""Micro-benchmarks: tree attention against per-branch attention (``attention``), and the
target's verify cost against tree size."""
