#!/bin/bash
# Install units/ and image/extra/ into a root directory, in the places systemd looks:
#   units/*.service|*.target|*.socket|*.timer|*.path  -> usr/lib/systemd/system/
#   units/sysusers.d/*.conf                            -> usr/lib/sysusers.d/
#   units/tmpfiles.d/*.conf                            -> usr/lib/tmpfiles.d/
#   units/system-preset/*.preset                       -> usr/lib/systemd/system-preset/
#   units/dbus-1/{system.d,system-services}/*          -> usr/share/dbus-1/...
#   image/extra/**                                     -> the same path under ROOT
# A new role is one more file in units/ (and a line in the preset); nothing here changes.
# Used by the image build (staging tree for mkosi) and by tests/image (a temp root).
set -euo pipefail

die() { echo "install-units: error: $*" >&2; exit 1; }
[ $# -eq 1 ] || die "usage: $0 ROOT"
root=$1
repo=$(cd "$(dirname "$0")/.." && pwd)
units=$repo/units
[ -d "$units" ] || die "$units does not exist"

put() {  # put MODE SRC DESTDIR
    install -d -m 0755 "$root/$3"
    install -m "$1" "$2" "$root/$3/"
}

shopt -s nullglob
for f in "$units"/*.service "$units"/*.target "$units"/*.socket "$units"/*.timer "$units"/*.path; do
    put 0644 "$f" usr/lib/systemd/system
done
for f in "$units"/sysusers.d/*.conf; do put 0644 "$f" usr/lib/sysusers.d; done
for f in "$units"/tmpfiles.d/*.conf; do put 0644 "$f" usr/lib/tmpfiles.d; done
for f in "$units"/system-preset/*.preset; do put 0644 "$f" usr/lib/systemd/system-preset; done
for d in system.d system-services; do
    for f in "$units"/dbus-1/"$d"/*; do put 0644 "$f" "usr/share/dbus-1/$d"; done
done

# image/extra mirrors the image: keep executables executable, everything else 0644.
extra=$repo/image/extra
if [ -d "$extra" ]; then
    (cd "$extra" && find . -type f -printf '%P\n') | while read -r rel; do
        mode=0644
        [ -x "$extra/$rel" ] && mode=0755
        put "$mode" "$extra/$rel" "$(dirname "$rel")"
    done
fi
