#!/usr/bin/env bash
# Makes a Debian machine, as root, able to build the image and run the container tests with
# podman: installs podman, runc and debootstrap when missing (and redis-server, for the
# shared-cache tests) and gives podman the settings this kind of machine needs. Run by .ci/run
# and by `make test` (through `make test-image`); safe to run again. Elsewhere (not root, no
# apt-get) it changes nothing and says so.
#
#   container/host-setup.sh          # exit 0: ready (or nothing it may do); 1: an install failed
set -euo pipefail
# shellcheck source=container/common.sh
source "$(dirname "$0")/common.sh"

docker=false
[[ $(detect_engine) == docker ]] && docker=true
if [[ $(id -u) != 0 ]] || ! command -v apt-get >/dev/null; then
    if $docker; then
        say "a Docker engine answers: nothing to install"
    else
        say "not root on a Debian-like machine: installs nothing (a container engine must be there already)"
    fi
    exit 0
fi

missing=()
if ! $docker; then
    command -v podman >/dev/null || missing+=(podman)
    command -v runc >/dev/null || missing+=(runc)
    command -v debootstrap >/dev/null || missing+=(debootstrap)
fi
# Not for the image: the shared-cache tests (tests/integration/test_shared_cache.py) start a real
# redis-server, and CI must run them rather than skip them, with Docker as with podman.
command -v redis-server >/dev/null || missing+=(redis-server)

if ((${#missing[@]})); then
    export DEBIAN_FRONTEND=noninteractive
    # Retries: a mirror or the proxy in front of it may drop a connection now and then, and
    # another apt (unattended upgrades) may hold the lock for a while at boot.
    apt_opts=(-o Acquire::Retries=3 -o DPkg::Lock::Timeout=120 -qq)
    for try in 1 2 3; do
        say "installing ${missing[*]} (try $try)"
        if apt-get "${apt_opts[@]}" update >/dev/null \
            && apt-get "${apt_opts[@]}" install -y --no-install-recommends "${missing[@]}" >/dev/null; then
            break
        fi
        if [[ $try == 3 ]]; then
            say "apt-get could not install ${missing[*]}"
            exit 1
        fi
        sleep $((try * 5)) # back off before asking the mirror again
    done
fi

if $docker; then
    say "a Docker engine answers: podman is not needed"
    exit 0
fi

# podman's defaults fail here: as root it raises nofile to 1048576, which this kernel refuses
# ("error setting rlimits"), and crun, when installed, refuses its cgroups. A drop-in, so the
# machine's own containers.conf stays as it is; it applies to builds (RUN steps) and to
# containers started through the API alike.
dropin=/etc/containers/containers.conf.d/50-extauthz-host.conf
want='# Written by extauthz container/host-setup.sh: podman settings this machine needs.
[containers]
default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]

[engine]
runtime = "runc"'
if [[ ! -f $dropin || $(<"$dropin") != "$want" ]]; then
    mkdir -p "${dropin%/*}"
    printf '%s\n' "$want" >"$dropin"
    say "wrote $dropin"
fi
say "ready: $(podman --version)"
