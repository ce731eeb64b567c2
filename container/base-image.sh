#!/usr/bin/env bash
# A base image for the Dockerfile made from Debian's own packages, for machines that reach a
# Debian mirror but no image registry (the official python image cannot be pulled there).
#
#   container/base-image.sh [--force]         # ENGINE=podman|docker, LOCAL_BASE_IMAGE, SUITE, MIRROR
#
# debootstrap's minbase with python3, its venv module and the CA certificates, less apt's
# downloaded packages and lists, documentation and locales (none of which the image uses),
# imported as one layer. Needs root (debootstrap) and about 40 s. Without --force an existing
# image of that name is kept: rebuild it to take Debian's security updates.
set -euo pipefail
# shellcheck source=container/common.sh
source "$(dirname "$0")/common.sh"

ENGINE=$(detect_engine)
[[ -n $ENGINE ]] || die "no container engine: install podman (Debian: apt-get install podman runc) or docker"
LOCAL_BASE_IMAGE=${LOCAL_BASE_IMAGE:-localhost/extauthz-base:bookworm}
# bookworm's python3 is 3.11, the oldest the package supports (pyproject.toml requires-python).
SUITE=${SUITE:-bookworm}
force=false
[[ ${1:-} == --force ]] && force=true

if ! $force && "$ENGINE" image inspect "$LOCAL_BASE_IMAGE" >/dev/null 2>&1; then
    say "$LOCAL_BASE_IMAGE is there (--force rebuilds it)"
    exit 0
fi

[[ $(id -u) == 0 ]] || die "debootstrap needs root: run as root, or give a base that can be pulled (BASE_IMAGE=...)"
command -v debootstrap >/dev/null || die "debootstrap is missing: apt-get install debootstrap"

# The Debian mirror apt already uses (deb822 or one-line sources), so a machine that reaches only
# its configured mirror builds the same way. Missing files and an early exit are not errors.
mirror() {
    cat /etc/apt/sources.list.d/*.sources /etc/apt/sources.list /etc/apt/sources.list.d/*.list \
        2>/dev/null | awk '
        function take(uri) { if (uri ~ /^https?:\/\/.*\/debian\/?$/) { print uri; exit } }
        $1 == "URIs:" { take($2) }
        $1 == "deb" { for (i = 2; i <= NF; i++) if ($i ~ /^https?:/) { take($i); break } }' || true
}
MIRROR=${MIRROR:-$(mirror)}
MIRROR=${MIRROR:-http://deb.debian.org/debian}

root=$(mktemp -d /var/tmp/extauthz-base.XXXXXX)
trap 'rm -rf "$root"' EXIT

# A mirror that drops a connection mid-way fails debootstrap; the next try starts clean.
for try in 1 2 3; do
    say "debootstrap $SUITE from $MIRROR (try $try)"
    if debootstrap --variant=minbase \
        --include=python3,python3-venv,python-is-python3,ca-certificates \
        "$SUITE" "$root/rootfs" "$MIRROR" >"$root/debootstrap.log" 2>&1; then
        break
    fi
    tail -n 20 "$root/debootstrap.log" >&2
    rm -rf "$root/rootfs"
    [[ $try == 3 ]] && die "debootstrap failed 3 times (log above)"
done

rm -rf "$root"/rootfs/var/cache/apt/archives/*.deb "$root"/rootfs/var/lib/apt/lists/* \
    "$root"/rootfs/usr/share/doc "$root"/rootfs/usr/share/man "$root"/rootfs/usr/share/info \
    "$root"/rootfs/usr/share/locale

# An imported image has no config: give it the PATH and command a Docker Official Image has.
tar --numeric-owner -C "$root/rootfs" -c . | "$ENGINE" import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["python3"]' \
    - "$LOCAL_BASE_IMAGE" >/dev/null
say "imported $LOCAL_BASE_IMAGE ($("$ENGINE" image inspect --format '{{.Size}}' "$LOCAL_BASE_IMAGE") bytes)"
