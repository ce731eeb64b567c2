#!/usr/bin/env bash
# What `make test` needs for tests/container: an engine (installed where this is root on Debian)
# and the image built from this tree. With no engine and no way to get one, it says what to
# install and exits 0: the container tests then skip, except under CI=true, where they fail.
#
#   IMAGE=extauthz:0.1.0 container/for-tests.sh
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=container/common.sh
source container/common.sh

if ! container/host-setup.sh; then
    [[ ${CI:-} == true ]] && die "could not install a container engine"
    say "could not install a container engine: tests/container will skip"
    exit 0
fi
if [[ -z $(detect_engine) ]]; then
    [[ ${CI:-} == true ]] && die "no docker or podman, and CI=true: the container tests must run"
    say "no docker or podman: tests/container will skip (as root on Debian: apt-get install podman runc debootstrap)"
    exit 0
fi
container/build-image.sh
