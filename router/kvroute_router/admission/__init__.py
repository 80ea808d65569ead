"""Admission: the director's admission hook (``BudgetHook``), tenant resolution, and admission
control (token limits, shedding and queueing when every endpoint is saturated)."""
