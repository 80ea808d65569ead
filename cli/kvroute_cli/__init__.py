"""The ``kvroute`` command line: the top layer, which may use the API, operator and router
packages (they never import it). Also the local vLLM engine fleet and the test model that the
tests, the demo and the benchmarks share."""
