# syntax=docker/dockerfile:1
#
# extauthz container image. `make image` builds it with docker or podman (README.md, "Container
# image"); by hand:
#
#   docker build -t extauthz:0.1.0 .
#   podman build --format docker --network host -t extauthz:0.1.0 .
#   docker run --rm -p 9001:9001 -p 9090:9090 --read-only --cap-drop ALL \
#     -v "$PWD/examples/demo.yaml:/etc/extauthz/config.yaml:ro" extauthz:0.1.0
#
# Two stages: the builder installs the package and its dependencies into a virtualenv at
# /opt/extauthz; the runtime stage copies only that virtualenv onto the same base, so the final
# image has no compiler, no pip cache and no source tree. Every dependency ships manylinux wheels
# (grpcio, cryptography, pydantic-core, uvloop, httptools), so the builder needs no compiler.
#
# The runtime runs as UID/GID 10001 and never writes to its filesystem (bytecode is compiled at
# build time, PYTHONDONTWRITEBYTECODE stops any further writes), so it works with `--read-only`
# and Kubernetes' `readOnlyRootFilesystem: true`.
#
# BASE_IMAGE: any Debian-like image with python3 (>= 3.11), its venv module, groupadd and
# useradd. The default is the official slim image; pin it by digest in your own pipeline
# (--build-arg BASE_IMAGE=python:3.12-slim-bookworm@sha256:<digest>; the digest is the one
# `docker buildx imagetools inspect python:3.12-slim-bookworm` prints), so a rebuild gets the same
# bytes. Where no registry can be reached, container/base-image.sh makes a base from Debian's
# packages. Both stages must use the same base: the virtualenv links to that image's python3.
#
# Behind a TLS-intercepting proxy, pip must trust the proxy's CA. Hand the build host's CA
# bundle in as a build secret: it is mounted for the pip step only and is in no layer.
#
#   docker build --secret id=ca_bundle,src=/etc/ssl/certs/ca-certificates.crt -t extauthz:0.1.0 .

ARG BASE_IMAGE=python:3.12-slim-bookworm

# ---------------------------------------------------------------------------------------------
FROM ${BASE_IMAGE} AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PIP_NO_INPUT=1

# python3, not python: Debian's own python3 has no `python` unless python-is-python3 is there.
RUN python3 -m venv /opt/extauthz

WORKDIR /src
# pyproject.toml names README.md as the package's readme, so setuptools needs it to build.
COPY pyproject.toml README.md ./
COPY extauthz ./extauthz

# Build the wheel, then install it (and only its runtime dependencies, not the test extra) into
# the virtualenv. --compile writes the .pyc files now, while the filesystem is still writable.
# The ca_bundle secret, when given, replaces pip's own CA list for this step (a bundle from the
# build host already holds the public CAs as well as the proxy's).
RUN --mount=type=cache,target=/root/.cache/pip \
    --mount=type=secret,id=ca_bundle \
    if [ -s /run/secrets/ca_bundle ]; then export PIP_CERT=/run/secrets/ca_bundle; fi \
 && /opt/extauthz/bin/pip wheel --no-deps --wheel-dir /wheels . \
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

# For `docker run` and compose; Kubernetes ignores it and uses the chart's gRPC probes. The OCI
# image format has no health check, so podman keeps it only with `--format docker` (as
# `make image` builds).
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9090/healthz', timeout=2)"]

ENTRYPOINT ["extauthz"]
CMD ["serve", "--config", "/etc/extauthz/config.yaml"]
