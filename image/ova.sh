#!/bin/bash
# ova.sh DISK.raw OUT.ova: the raw disk as a streamOptimized VMDK, the OVF from
# image/secondsite.ovf.in, a SHA256 manifest, and the OVA (a ustar archive holding the
# OVF, the manifest and the disk, in that order, as the OVF spec asks).
# Settings: OVA_CPUS (2), OVA_MEMORY_MIB (4096), OVA_FIRMWARE (efi | bios).
set -euo pipefail

die() { echo "ova: error: $*" >&2; exit 1; }
[ $# -eq 2 ] || die "usage: $0 DISK.raw OUT.ova"
raw=$1
ova=$2
repo=$(cd "$(dirname "$0")/.." && pwd)
CPUS=${OVA_CPUS:-2}
MEMORY_MIB=${OVA_MEMORY_MIB:-4096}
FIRMWARE=${OVA_FIRMWARE:-efi}
case "$FIRMWARE" in efi | bios) ;; *) die "OVA_FIRMWARE must be efi or bios" ;; esac
command -v qemu-img >/dev/null || die "qemu-img not found (hint: make image-deps)"
[ -f "$raw" ] || die "$raw does not exist (hint: make image)"

version=$(python3 -c 'import sys, tomllib; print(tomllib.load(open(sys.argv[1], "rb"))["project"]["version"])' \
    "$repo/pyproject.toml")
name=secondsite
work=$(mktemp -d "$(dirname "$ova")/.ova.XXXXXX")
trap 'rm -rf "$work"' EXIT

vmdk=$name-disk1.vmdk
qemu-img convert -f raw -O vmdk -o subformat=streamOptimized,adapter_type=lsilogic \
    "$raw" "$work/$vmdk" || die "qemu-img convert failed"

sed -e "s|@DISK_FILE@|$vmdk|g" \
    -e "s|@DISK_FILE_BYTES@|$(stat -c %s "$work/$vmdk")|g" \
    -e "s|@DISK_CAPACITY_BYTES@|$(stat -c %s "$raw")|g" \
    -e "s|@CPUS@|$CPUS|g" \
    -e "s|@MEMORY_MIB@|$MEMORY_MIB|g" \
    -e "s|@FIRMWARE@|$FIRMWARE|g" \
    -e "s|@VERSION@|$version|g" \
    "$repo/image/secondsite.ovf.in" > "$work/$name.ovf"
if grep -n '@[A-Z_]*@' "$work/$name.ovf"; then die "unrendered placeholders in the OVF"; fi
python3 -c 'import sys, xml.etree.ElementTree as ET; ET.parse(sys.argv[1])' "$work/$name.ovf" \
    || die "the rendered OVF is not well-formed XML"

(cd "$work" && for f in "$name.ovf" "$vmdk"; do
    printf 'SHA256(%s)= %s\n' "$f" "$(sha256sum "$f" | cut -d' ' -f1)"
done) > "$work/$name.mf"

rm -f "$ova"
tar --format=ustar --owner=0 --group=0 --numeric-owner --mode=0644 \
    -cf "$ova" -C "$work" "$name.ovf" "$name.mf" "$vmdk"
echo "ova: $ova: $(du -m "$ova" | cut -f1) MiB (version $version, $CPUS vCPU, ${MEMORY_MIB} MiB, $FIRMWARE)" >&2
