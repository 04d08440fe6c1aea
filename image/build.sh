#!/bin/bash
# `make image`: the appliance, from this checkout, into mkosi.output/:
#   1. wheels   the project (built from the checkout) and its dependencies (PyPI)
#   2. stage    units/, image/extra/ and the wheelhouse laid out as mkosi's extra tree
#   3. mkosi    the OS tree (Format=directory; see mkosi.conf)
#   4. disk     a GPT disk bootable by BIOS and UEFI (image/assemble.sh)
#   5. ova      streamOptimized VMDK + OVF + SHA256 manifest (image/ova.sh)
# Needs root (mkosi, nspawn) and the Debian packages of IMAGE_APT_PACKAGES (Makefile).
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"

die() { echo "image: error: $*" >&2; exit 1; }
step() { printf '\nimage: == %s\n' "$*" >&2; }

[ "$(id -u)" -eq 0 ] || die "building the image needs root (mkosi runs systemd-nspawn)"
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || die "$PY is missing (hint: make venv)"
for cmd in mkosi systemd-nspawn debootstrap; do
    command -v "$cmd" >/dev/null || die "$cmd not found (hint: make image-deps)"
done

BUILD=build/image
OUT=mkosi.output
WHEELS=$BUILD/wheels
STAGE=$BUILD/stage
mkdir -p "$BUILD" "$OUT"

timings=()
timed() {  # timed NAME CMD...: run, remember how long it took
    local name=$1 start=$SECONDS
    shift
    "$@"
    timings+=("$name $((SECONDS - start))s")
}

build_wheels() {
    rm -rf "$WHEELS"
    mkdir -p "$WHEELS"
    "$PY" -m pip wheel --quiet --no-deps --wheel-dir "$WHEELS" . \
        || die "building the project's wheel failed"
    local wheel
    wheel=$(ls "$WHEELS"/secondsite-*.whl) || die "no secondsite wheel in $WHEELS"
    # Dependencies for the appliance: binary wheels from PyPI; dbus-python is an sdist,
    # built here against this machine's libdbus/glib (the image has the same bookworm).
    "$PY" -m pip wheel --quiet --wheel-dir "$WHEELS" \
        "secondsite[appliance] @ file://$repo/$wheel" || die "fetching the dependencies failed"
    ls "$WHEELS" >&2
}

stage_tree() {
    rm -rf "$STAGE"
    bash image/install-units.sh "$STAGE"
    install -d -m 0755 "$STAGE/var/cache/secondsite/wheels"
    install -m 0644 "$WHEELS"/*.whl "$STAGE/var/cache/secondsite/wheels/"
    # The agent bundles push installation copies to hosts (appliance/push/bundle.py;
    # CPython 3.11-3.13 x86_64, ~17 MiB each), where the process server looks first.
    "$PY" -m appliance.push.bundle build --out "$STAGE/usr/lib/secondsite/bundles" >&2 \
        || die "building the agent bundles failed"
}

run_mkosi() {
    # -f replaces the previous tree; the package cache in build/image/mkosi.cache stays.
    mkosi --force build
}

tidy_tree() {  # tidy_tree TREE: drop what mkosi's kernel-install run left for its own ESP
    # flow (a BLS copy of kernel and initrd keyed by the build's machine id, its loader
    # entry, and a kernel command line with Fedora's "rhgb"); keep Debian's /boot layout.
    local tree=$1 token
    token=$(cat "$tree/etc/kernel/entry-token" 2>/dev/null || true)
    [ -z "$token" ] || rm -rf "${tree:?}/boot/$token"
    rm -rf "$tree/boot/loader" "$tree/etc/kernel/entry-token" "$tree/etc/kernel/cmdline" \
        "$tree/etc/kernel/install.conf" "$tree"/etc/kernel/install.d/50-mkosi-*
}

step "wheels"
timed wheels build_wheels
step "stage"
timed stage stage_tree
step "mkosi"
timed mkosi run_mkosi
tree=$(find "$OUT" -mindepth 2 -maxdepth 2 -type d -name secondsite | head -n 1)
[ -n "$tree" ] && [ -d "$tree/usr" ] || die "mkosi produced no tree under $OUT"
tidy_tree "$tree"
step "disk from $tree"
timed disk bash image/assemble.sh "$tree" "$OUT/secondsite.raw"
step "ova"
timed ova bash image/ova.sh "$OUT/secondsite.raw" "$OUT/secondsite.ova"

step "done"
printf 'image: %s\n' "${timings[@]}" >&2
ls -l "$OUT/secondsite.raw" "$OUT/secondsite.ova" >&2
