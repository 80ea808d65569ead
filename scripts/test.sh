#!/usr/bin/env bash
# The whole test suite: set-up (cached venvs, system packages), lint, type-check, layering
# contracts, then every pytest tier. `make test` and `.ci/run` run exactly this.
# Extra arguments go to pytest, e.g. `scripts/test.sh tests/unit -k crd`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

scripts/system-deps.sh
DEV="$(scripts/kvenv.sh dev)"
ENGINE="$(scripts/kvenv.sh engine)"
export KVROUTE_ENGINE_PYTHON="$ENGINE/bin/python"
export PATH="$DEV/bin:$PATH"

echo "== ruff"; ruff check .
echo "== mypy --strict"; mypy crds/kvroute_api operator/kvroute_operator router/kvroute_router cli/kvroute_cli \
  emulator/kvroute_emulator
echo "== mypy: bench (strict) and tests (checked, see pyproject)"; mypy bench tests
echo "== import-linter"; lint-imports
echo "== vulture (dead code; whitelist: scripts/vulture_whitelist.py)"; vulture
echo "== pytest"
set +e
python -m pytest -p no:cacheprovider -ra "$@"
code=$?
set -e
if [[ $code -eq 5 ]]; then
  echo "pytest collected no tests: that is a failure here" >&2
  exit 1
fi
exit $code
