"""Real vLLM-CPU engines for end-to-end tests: ``engine_fleet`` and ``unique_prompt`` live in
``tests/conftest.py`` (session-scoped, shared with the envoy tier, so engines start once)."""
