# shellcheck shell=bash
# Sourced by the scripts in container/: messages and which engine builds and runs the image.

say() { printf '%s: %s\n' "${0##*/}" "$*" >&2; }
die() { say "$*"; exit 1; }

# docker when its engine answers (the client alone, without a daemon, is common), else podman,
# else nothing. ENGINE overrides the choice.
detect_engine() {
    if [[ -n ${ENGINE:-} ]]; then
        printf '%s\n' "$ENGINE"
    elif command -v docker >/dev/null && timeout 20 docker info >/dev/null 2>&1; then
        echo docker
    elif command -v podman >/dev/null; then
        echo podman
    fi
}
