"""kvroute's benchmarks: seeded workloads, the side-by-side harness on real engines, the report.

Imported as ``kvroute_bench`` with ``bench/`` on the path (``kvroute bench`` puts it there);
nothing here is needed by the router, the operator or the API package.
"""
