"""Offline evaluation of budgeted routing: the engine of ``kvroute eval routing`` and of
``bench/routing_eval.py`` (the router itself imports nothing from here)."""
