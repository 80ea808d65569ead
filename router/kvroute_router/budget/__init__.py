"""Budgets: what a request costs on a pool (pricing), the meters and the ledger that reserve and
settle it, and the ``kvroute_budget_*`` / ``kvroute_admission_*`` / ``kvroute_batch_*`` metrics."""
