#!/usr/bin/env bash
# Builds the extauthz image: `make image` runs it with IMAGE and VERSION from the chart.
#
#   IMAGE=extauthz:0.1.0 container/build-image.sh
#
#   ENGINE      docker or podman (default: docker when its engine answers, else podman)
#   BASE_IMAGE  the base of both stages (default: the Dockerfile's, the official python slim
#               image, when it is there or can be pulled; else the local Debian base,
#               LOCAL_BASE_IMAGE, made by container/base-image.sh)
#   CA_BUNDLE   a CA bundle pip trusts in the build, handed in as the ca_bundle secret (default:
#               this host's bundle; empty: none)
#   BUILD_FLAGS more flags for `build`, e.g. --no-cache
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=container/common.sh
source container/common.sh

: "${IMAGE:?IMAGE=repository:tag}"
VERSION=${VERSION:-${IMAGE##*:}}
ENGINE=$(detect_engine)
[[ -n $ENGINE ]] || die "no container engine: install podman (Debian: apt-get install podman runc) or docker"
export ENGINE
export LOCAL_BASE_IMAGE=${LOCAL_BASE_IMAGE:-localhost/extauthz-base:bookworm}

if [[ -z ${BASE_IMAGE:-} ]]; then
    default=$(sed -n 's/^ARG BASE_IMAGE=//p' Dockerfile)
    if "$ENGINE" image inspect "$default" >/dev/null 2>&1; then
        BASE_IMAGE=$default
    elif pulled=$(timeout 300 "$ENGINE" pull "$default" 2>&1); then
        BASE_IMAGE=$default
    else
        say "cannot pull $default (${pulled##*$'\n'}): building on $LOCAL_BASE_IMAGE, made from Debian's packages"
        container/base-image.sh
        BASE_IMAGE=$LOCAL_BASE_IMAGE
    fi
fi

if [[ -z ${CA_BUNDLE+set} ]]; then
    for CA_BUNDLE in /etc/ssl/certs/ca-certificates.crt /etc/pki/tls/certs/ca-bundle.crt ''; do
        [[ -z $CA_BUNDLE || -s $CA_BUNDLE ]] && break
    done
fi

flags=(-f Dockerfile -t "$IMAGE" --build-arg "BASE_IMAGE=$BASE_IMAGE" --build-arg "VERSION=$VERSION")
[[ -n $CA_BUNDLE ]] && flags+=(--secret "id=ca_bundle,src=$CA_BUNDLE")
if [[ $ENGINE == podman ]]; then
    # docker format: the OCI format has no HEALTHCHECK and podman would drop it. Host network:
    # the RUN steps need no bridge set up, and use the host's route to the package index.
    flags+=(--format docker --network host)
else
    export DOCKER_BUILDKIT=1 # secrets and cache mounts
fi
# shellcheck disable=SC2206 # BUILD_FLAGS is a list of flags, split on purpose
flags+=(${BUILD_FLAGS:-})

say "$ENGINE build $IMAGE on $BASE_IMAGE"
started=$SECONDS
"$ENGINE" build "${flags[@]}" .
size=$("$ENGINE" image inspect --format '{{.Size}}' "$IMAGE")
say "built $IMAGE in $((SECONDS - started)) s: $((size / 1000000)) MB on $BASE_IMAGE"
