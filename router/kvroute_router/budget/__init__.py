"""Budgets, tenant resolution, quality estimation, batch-level assignment and admission control."""
