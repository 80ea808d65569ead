# The two commands of the README. Both set up everything they need on first run
# (cached venvs under ~/.cache/kvroute, Debian packages) and are fast on a warm machine.
.PHONY: demo test crds

demo:  ## run the router demo on local vLLM-CPU engines (no cluster, no GPU)
	scripts/demo.sh

test:  ## lint, type-check and run the whole test suite
	scripts/test.sh

crds:  ## regenerate crds/*.yaml from the API models
	"$$(scripts/kvenv.sh dev)/bin/kvroute" crds --write crds/
