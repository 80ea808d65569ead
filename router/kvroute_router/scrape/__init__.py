"""Engine metrics: a fast parser of vLLM's Prometheus text and the per-endpoint scrape loops."""
