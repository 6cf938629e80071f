"""Dynamic per-step trees (EAGLE-2 style expansion and a per-step exact DP)."""
