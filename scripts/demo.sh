#!/usr/bin/env bash
# The main job on the embedded default: no cluster, no GPU. Sets everything up on first run.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
DEV="$(scripts/kvenv.sh dev)"
ENGINE="$(scripts/kvenv.sh engine)"
export KVROUTE_ENGINE_PYTHON="$ENGINE/bin/python"
exec "$DEV/bin/kvroute" demo "$@"
