"""Batch-level routing: the adaptive window that assigns requests to pools (``BatchRouter``), the
assignment solver, and the quality estimators and embedding it reads."""
