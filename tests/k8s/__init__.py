"""Operator tests against the kmock Kubernetes emulator (and, opt-in, a real cluster)."""
