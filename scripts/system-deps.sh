#!/usr/bin/env bash
# Debian packages the tests and the demo use (real servers on loopback). Idempotent and quiet
# when everything is present; needs root (as on the dev and CI machines) the first time.
set -euo pipefail
missing=()
command -v redis-server >/dev/null || missing+=(redis-server)
if (( ${#missing[@]} )); then
  echo "[system-deps] installing ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  apt-get install -y -qq "${missing[@]}" >&2
fi
