#!/bin/bash
# Build tests/vcsim/main.go (govmomi's vSphere simulator) with Debian's Go in GOPATH mode.
#
# Output: <repo>/.cache/vcsim/vcsim (git-ignored), or $VCSIM_CACHE_DIR/vcsim. Rebuilt only
# when main.go, this script, the Go toolchain or the govmomi package changed (the hash of
# those is kept in vcsim.hash next to the binary). Installs the Debian packages first
# when they are missing (as root only). Safe to run concurrently (flock).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
cache="${VCSIM_CACHE_DIR:-$repo/.cache/vcsim}"
bin="$cache/vcsim"
stamp="$cache/vcsim.hash"
packages=(golang-go golang-github-vmware-govmomi-dev)
started=$EPOCHREALTIME

elapsed() { awk -v a="$started" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }'; }

mkdir -p "$cache"
exec 9>"$cache/.build.lock"
flock 9

missing=()
for p in "${packages[@]}"; do
    if [[ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null)" != "install ok installed" ]]; then
        missing+=("$p")
    fi
done
if ((${#missing[@]})); then
    if ((EUID != 0)); then
        echo "vcsim: missing Debian packages: ${missing[*]} (run as root, or apt-get install them)" >&2
        exit 1
    fi
    echo "vcsim: installing ${missing[*]}" >&2
    install=(apt-get -o DPkg::Lock::Timeout=600 install -y -q --no-install-recommends "${missing[@]}")
    if ! DEBIAN_FRONTEND=noninteractive "${install[@]}" >&2; then
        apt-get -o DPkg::Lock::Timeout=600 update -q >&2
        DEBIAN_FRONTEND=noninteractive "${install[@]}" >&2
    fi
fi

go=/usr/bin/go
govmomi_version="$(dpkg-query -W -f='${Version}' golang-github-vmware-govmomi-dev)"
hash="$(
    {
        sha256sum "$here/main.go" "${BASH_SOURCE[0]}" | cut -d' ' -f1
        "$go" version
        echo "govmomi $govmomi_version"
    } | sha256sum | cut -d' ' -f1
)"

if [[ -x "$bin" && -f "$stamp" && "$(cat "$stamp")" == "$hash" ]]; then
    echo "vcsim: $bin is up to date ($(elapsed) s)"
    exit 0
fi

gopath="$(mktemp -d)"
trap 'rm -rf "$gopath"' EXIT
# GOPATH mode against Debian's source tree; no module proxy, no network. CGO off: a static
# binary and no C toolchain needed (the packages are installed without Recommends).
GO111MODULE=off GOPROXY=off GOFLAGS='' CGO_ENABLED=0 \
    GOPATH="$gopath:/usr/share/gocode" GOCACHE="$cache/go-build" \
    "$go" build -trimpath -ldflags='-s -w' -o "$bin.new" "$here/main.go"
mv -f "$bin.new" "$bin"
echo "$hash" >"$stamp"
echo "vcsim: built $bin ($(elapsed) s)"
