#!/usr/bin/env bash
# Installs the system packages ax's build, quickstart and tests need, on
# Debian/Ubuntu, if any is missing. Runs `apt-get update` only then, once.
set -euo pipefail

PKGS=(
    libseccomp-dev   # libseccomp: the launcher compiles its filter with it
    pkg-config
    busybox-static   # static httpd/wget for the end-to-end tests
    redis-server redis-tools
    curl python3
    iproute2         # ip, ss
    util-linux       # unshare, setpriv, runuser
    procps
    golang-go        # a Go program under ax in the end-to-end tests (offline, stdlib only)
    gcc libc6-dev    # C test programs compiled at test time
    g++              # libfuzzer-sys (the fuzz targets) builds C++
    openssh-server openssh-client  # sshd and ssh under ax (tests/tests/fidelity.rs)
    nginx            # nginx with `listen … reuseport` under ax (tests/tests/reuseport.rs)
    apache2-utils    # ab, whose APR connects every socket twice (tests/tests/e2e.rs)
    erlang-base      # erl/epmd: Erlang distribution under ax (tests/tests/localhost.rs)
    runc crun podman uidmap  # containers served by ax as their OCI seccomp agent (tests/tests/oci*.rs)
)

installed() {
    dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"
}

if ! command -v dpkg-query >/dev/null 2>&1; then
    echo "install-deps: not a Debian/Ubuntu system; make sure these are installed: ${PKGS[*]}" >&2
    exit 0
fi

missing=()
for p in "${PKGS[@]}"; do
    installed "$p" || missing+=("$p")
done
if ((${#missing[@]} == 0)); then
    exit 0
fi

SUDO=()
if [ "$(id -u)" -ne 0 ]; then
    SUDO=(sudo)
fi
echo "install-deps: installing ${missing[*]}" >&2
"${SUDO[@]}" apt-get update
"${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"
