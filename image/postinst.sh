#!/bin/bash
# mkosi PostInstallationScript: runs inside the image (systemd-nspawn, no network),
# after the packages and the extra tree (units, image/extra, wheelhouse) are in place.
set -euo pipefail

[ "${1:-final}" = final ] || exit 0

die() { echo "postinst: error: $*" >&2; exit 1; }

WHEELS=/var/cache/secondsite/wheels
VENV=/opt/secondsite

# The project and its dependencies, into a venv, from the wheelhouse staged by
# image/build.sh (no index: the wheels are exactly what was built from the checkout).
[ -d "$WHEELS" ] || die "$WHEELS is missing: run the build through 'make image'"
python3 -m venv "$VENV"
"$VENV/bin/pip" install --quiet --no-index --find-links "$WHEELS" --disable-pip-version-check \
    'secondsite[appliance]'
rm -rf "$WHEELS"
# ProtectSystem=strict makes /opt read-only to the daemons: bytecode must exist now.
"$VENV/bin/python" -m compileall -q "$VENV/lib" >/dev/null

# The units as installed, with the real programs: verify prints nothing when all is well.
out=$(systemd-analyze verify /usr/lib/systemd/system/secondsite-* 2>&1) \
    || die "systemd-analyze verify failed: $out"
[ -z "$out" ] || die "systemd-analyze verify complained: $out"

# Enable (and disable) exactly the units our preset file names; Debian's packages have
# already enabled their own units at install time.
mapfile -t named < <(awk '($1 == "enable" || $1 == "disable") && $2 !~ /[*?]/ { print $2 }' \
    /usr/lib/systemd/system-preset/90-secondsite.preset)
systemctl preset "${named[@]}"
# Enabling networkd enables wait-online through Also=; nothing here waits for the network.
systemctl disable systemd-networkd-wait-online.service
# No desktop: boot to multi-user.target (Debian's default is graphical.target).
systemctl set-default multi-user.target

# First-boot questions on /dev/console (the serial port) would block a headless boot;
# the Secondsite console asks what the appliance needs. The time zone stays UTC.
systemctl mask systemd-firstboot.service

# Package lists are rebuilt by `apt-get update`; they only make the OVA bigger.
rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin

# Boot files: image/assemble.sh boots /vmlinuz and /initrd.img (GRUB) and copies them
# into the ESP (systemd-boot). Debian's symlinks miss /initrd.img when dracut made the
# initrd after the kernel's postinst; mkosi's kernel-install leftovers are removed by
# image/build.sh once mkosi has read them.
kver=$(basename "$(ls -d /usr/lib/modules/*/ | head -n 1)")
[ -f "/boot/vmlinuz-$kver" ] && [ -f "/boot/initrd.img-$kver" ] \
    || die "kernel $kver has no /boot/vmlinuz or /boot/initrd.img"
linux-update-symlinks install "$kver" "/boot/vmlinuz-$kver"
chmod 0755 /boot
