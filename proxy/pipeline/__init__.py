"""The operation pipeline: one sequence for every operation. Knows no HTTP."""
