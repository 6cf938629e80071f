"""Models: loading, CPU kernels, dtype choice."""
