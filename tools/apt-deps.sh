#!/bin/bash
# Install the named Debian packages that are missing; idempotent, and a no-op when
# everything is present. Needs root only when something is missing.
set -euo pipefail
missing=()
for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
    echo "secondsite: missing Debian packages: ${missing[*]} (run as root, or install them)" >&2
    exit 1
fi
echo "secondsite: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
# Tests start their own daemons (sshd in a namespace, dbus-daemon): the packages' own
# services must not start on the build machine. policy-rc.d refusing (101) is the
# Debian way to say so; it is removed again whatever happens.
policy=/usr/sbin/policy-rc.d
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' > "$policy"
    chmod 0755 "$policy"
    trap 'rm -f "$policy"' EXIT
fi
apt-get -o DPkg::Lock::Timeout=600 update -qq
apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
