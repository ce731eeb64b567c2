# syntax=docker/dockerfile:1
#
# extauthz container image.
#
#   docker build -t extauthz:0.1.0 .
#   docker run --rm -p 9001:9001 -p 9090:9090 \
#     -v "$PWD/examples/demo.yaml:/etc/extauthz/config.yaml:ro" --read-only extauthz:0.1.0
#
# Two stages: the builder installs the package and its dependencies into a virtualenv at
# /opt/extauthz; the runtime stage copies only that virtualenv onto the same slim base, so the
# final image has no compiler, no pip cache and no source tree. Every dependency ships manylinux
# wheels (grpcio, cryptography, pydantic-core), so the builder needs no compiler either.
#
# The runtime runs as UID/GID 10001 and never writes to its filesystem (bytecode is compiled at
# build time, PYTHONDONTWRITEBYTECODE stops any further writes), so it works with
# `--read-only` and Kubernetes' `readOnlyRootFilesystem: true`.
#
# Pin BASE_IMAGE by digest in your own build pipeline (python:3.12-slim-bookworm@sha256:...).
# Both stages must use the same base: the virtualenv links to that image's /usr/local/bin/python3.

ARG BASE_IMAGE=python:3.12-slim-bookworm

# ---------------------------------------------------------------------------------------------
FROM ${BASE_IMAGE} AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

RUN python -m venv /opt/extauthz

WORKDIR /src
# pyproject.toml names README.md as the package's readme, so setuptools needs it to build.
COPY pyproject.toml README.md ./
COPY extauthz ./extauthz

# Build the wheel, then install it (and only its runtime dependencies, not the test extra) into
# the virtualenv. --compile writes the .pyc files now, while the filesystem is still writable.
RUN --mount=type=cache,target=/root/.cache/pip \
    /opt/extauthz/bin/pip wheel --no-deps --wheel-dir /wheels . \
 && /opt/extauthz/bin/pip install --compile /wheels/extauthz-*.whl \
 && /opt/extauthz/bin/extauthz --help >/dev/null

# ---------------------------------------------------------------------------------------------
FROM ${BASE_IMAGE} AS runtime

ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="extauthz" \
      org.opencontainers.image.description="Envoy ext_authz gRPC service: JWT and OAuth token validation" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"

# A numeric, non-root user, so Kubernetes can verify runAsNonRoot without a passwd lookup.
RUN groupadd --system --gid 10001 extauthz \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin extauthz

COPY --from=builder /opt/extauthz /opt/extauthz

ENV PATH=/opt/extauthz/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    OTEL_SERVICE_NAME=extauthz

USER 10001:10001
WORKDIR /

# 9001: gRPC ext_authz + grpc.health.v1.Health; 9090: admin HTTP (/healthz, /readyz, /metrics).
EXPOSE 9001 9090

# The server drains in-flight checks on SIGTERM (--grace-seconds, default 10 s), then exits 0.
STOPSIGNAL SIGTERM

# For `docker run` and compose; Kubernetes ignores it and uses the chart's gRPC probes.
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9090/healthz', timeout=2)"]

ENTRYPOINT ["extauthz"]
CMD ["serve", "--config", "/etc/extauthz/config.yaml"]
