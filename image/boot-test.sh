#!/bin/bash
# `make image-test`: boot mkosi.output/secondsite.raw under QEMU (TCG: KVM is not usable
# on the build machines) with VMware-like devices (pvscsi disk, vmxnet3 NIC), then check
# the OVA with virt-v2v. Two boots by default, one per firmware, one per first-boot path:
#   plain:bios  no OVF environment: multi-user, no failed unit, the console's setup
#               screen on tty1 (dumped from /dev/vcsu1 into the log), no role daemon
#   ovf:uefi    a CD-ROM with ovf-env.xml (the OVF ISO transport) setting the hostname, a
#               static address and role "all": the hostname and address applied, the
#               role targets enabled, configd answering secondsitectl and targetd a TLS
#               1.3 handshake at the static address (host port forward to 10.0.2.20)
# Arguments pick other boots: SCENARIO:FIRMWARE with plain|ovf and bios|uefi.
#
# Each boot runs on a throwaway qcow2 overlay (the raw disk and the OVA stay pristine,
# and every boot is a first boot). Test-only TLS material reaches the guest as the
# systemd credential tmpfiles.extra in an SMBIOS type 11 string (tests/image/bootkit.py
# says why); it makes targetd startable, and only the role decides whether it starts.
# The guest's secondsite-boot-check.service prints its report (with systemd-analyze
# blame and the tty1 screen) on the serial console; this script reads it, then powers
# the guest off over QMP.
#
# Settings: BOOT_TIMEOUT (seconds per boot, 900), BOOT_SMP (1: the build machines are
# shared), BOOT_MEMORY_MIB (2048). Serial logs: mkosi.output/boot-test-<scenario>-<fw>.log.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"

die() { echo "image-test: error: $*" >&2; exit 1; }
say() { echo "image-test: $*"; }

OUT=mkosi.output
RAW=$OUT/secondsite.raw
OVA=$OUT/secondsite.ova
PY=${PY:-.venv/bin/python}
BOOT_TIMEOUT=${BOOT_TIMEOUT:-900}
BOOT_SMP=${BOOT_SMP:-1}
BOOT_MEMORY_MIB=${BOOT_MEMORY_MIB:-2048}
OVMF_CODE=${OVMF_CODE:-/usr/share/OVMF/OVMF_CODE_4M.fd}
OVMF_VARS=${OVMF_VARS:-/usr/share/OVMF/OVMF_VARS_4M.fd}
MARK="SECONDSITE-BOOT-CHECK:"

# What the ovf boot's environment sets, and so what it must find applied.
OVF_HOSTNAME=dr01.example.test
OVF_ADDRESS=10.0.2.20/24
OVF_MAC=00:50:56:8a:3c:01  # VMware's OUI; the environment names it as the first adapter
ROLE_DAEMONS="secondsite-configd.service secondsite-processd.service secondsite-targetd.service"

boots=("$@")
[ ${#boots[@]} -gt 0 ] || boots=(plain:bios ovf:uefi)
for b in "${boots[@]}"; do
    case "$b" in plain:bios | plain:uefi | ovf:bios | ovf:uefi) ;;
        *) die "unknown boot '$b' (SCENARIO:FIRMWARE: plain or ovf, bios or uefi)" ;;
    esac
done
for cmd in qemu-system-x86_64 qemu-img virt-v2v genisoimage; do
    command -v "$cmd" >/dev/null || die "$cmd not found (hint: make image-deps)"
done
[ -f "$RAW" ] && [ -f "$OVA" ] || die "$RAW or $OVA is missing (hint: make image)"
[ -x "$PY" ] || die "$PY is missing (hint: make venv)"

work=$(mktemp -d "${TMPDIR:-/tmp}/secondsite-boot-test.XXXXXX")
qpid=""
stop_qemu() {
    [ -n "$qpid" ] || return 0
    if kill -0 "$qpid" 2>/dev/null; then
        kill "$qpid" 2>/dev/null || true
        for _ in 1 2 3 4 5 6 7 8 9 10; do kill -0 "$qpid" 2>/dev/null || break; sleep 1; done
        kill -9 "$qpid" 2>/dev/null || true
    fi
    wait "$qpid" 2>/dev/null || true
    qpid=""
}
cleanup() { stop_qemu; rm -rf "$work"; }
trap cleanup EXIT
trap 'exit 130' INT TERM

"$PY" -m tests.image.bootkit pki "$work/pki"
credential=$(cat "$work/pki/smbios-credential")

summary=()
failures=0

boot() {
    local scenario=${1%%:*} fw=${1##*:} name=${1/:/-}
    local log=$OUT/boot-test-$name.log overlay=$work/$name.qcow2 qmp=$work/qmp-$name.sock
    local port start elapsed result problems=() guest_ip=""
    # BIOS: the disk on VMware paravirtual SCSI (SeaBIOS boots from it), the CD-ROM on
    # the board's IDE. UEFI: Debian's OVMF has no PVSCSI driver (ESXi's own EFI firmware
    # has one), so disk and CD-ROM sit on AHCI, which is VMware's SATA controller.
    # shellcheck disable=SC2054  # commas belong to QEMU's option syntax
    local fwargs=() diskargs=(-device pvscsi,id=scsi0 -device scsi-hd,drive=disk0,bus=scsi0.0,bootindex=0)
    local cdbus=ide.1 cdargs=()
    if [ "$fw" = uefi ]; then
        [ -f "$OVMF_CODE" ] && [ -f "$OVMF_VARS" ] || die "OVMF not found (hint: make image-deps)"
        cp "$OVMF_VARS" "$work/vars-$name.fd"
        fwargs=(-drive "if=pflash,format=raw,unit=0,readonly=on,file=$OVMF_CODE"
            -drive "if=pflash,format=raw,unit=1,file=$work/vars-$name.fd")
        # shellcheck disable=SC2054
        diskargs=(-device ahci,id=ahci0 -device ide-hd,drive=disk0,bus=ahci0.0,bootindex=0)
        cdbus=ahci0.1
    fi
    if [ "$scenario" = ovf ]; then
        guest_ip=${OVF_ADDRESS%/*}
        "$PY" -m tests.image.bootkit ovf-iso "$work/ovf-env-$name.iso" \
            "hostname=$OVF_HOSTNAME" role=all network.mode=static "network.address=$OVF_ADDRESS" \
            network.gateway=10.0.2.2 network.dns=10.0.2.3 --mac "$OVF_MAC" \
            || die "cannot build the OVF ISO"
        cdargs=(-drive "if=none,id=cd0,file=$work/ovf-env-$name.iso,format=raw,media=cdrom,readonly=on"
            -device "ide-cd,drive=cd0,bus=$cdbus")
    fi
    qemu-img create -q -f qcow2 -F raw -b "$(realpath "$RAW")" "$overlay"
    port=$("$PY" -m tests.image.bootkit free-port)
    : > "$log"
    say "[$name] booting (TCG, $BOOT_SMP vCPU, $BOOT_MEMORY_MIB MiB, disk on ${diskargs[1]%%,*}, vmxnet3${cdargs:+, OVF ISO on $cdbus}); serial log $log"
    qemu-system-x86_64 -accel tcg -machine pc -cpu max -smp "$BOOT_SMP" -m "$BOOT_MEMORY_MIB" \
        -nodefaults -display none -vga std "${fwargs[@]}" \
        -drive "if=none,id=disk0,file=$overlay,format=qcow2,cache=unsafe" "${diskargs[@]}" \
        "${cdargs[@]}" \
        -netdev "user,id=net0,hostfwd=tcp:127.0.0.1:$port-$guest_ip:9442" \
        -device "vmxnet3,netdev=net0,mac=$OVF_MAC,romfile=" \
        -smbios "type=11,value=$credential" \
        -serial "file:$log" -qmp "unix:$qmp,server=on,wait=off" &
    qpid=$!
    start=$SECONDS
    result=""
    while :; do
        result=$(grep -a -o "$MARK RESULT=.*" "$log" | tr -d '\r' | head -n 1 || true)
        [ -z "$result" ] || break
        if ! kill -0 "$qpid" 2>/dev/null; then problems+=("qemu-exited"); break; fi
        if [ $((SECONDS - start)) -gt "$BOOT_TIMEOUT" ]; then problems+=("timeout"); break; fi
        sleep 3
    done
    elapsed=$((SECONDS - start))
    sleep 1  # let the last lines reach the log
    say "[$name] boot check after ${elapsed}s (wall clock):"
    grep -a -o "$MARK.*" "$log" | tr -d '\r' | sed "s/^/  [$name] /" || true
    local report
    report=$(grep -a -o "$MARK.*" "$log" | tr -d '\r' || true)
    has() { grep -q -E "^$MARK $1" <<<"$report"; }

    [ "$result" = "$MARK RESULT=PASS" ] || problems+=("boot-check:${result:-none}")
    has "reached multi-user.target" || problems+=("no-multi-user")
    has "failed-units=none" || problems+=("failed-units")
    has "setup1=ok" || problems+=("setup1")
    has "unit=secondsite-console.service state=active/running" || problems+=("console-not-running")
    has "tty1\| ." || problems+=("no-tty1-dump")
    has "tty1-drawn=yes" || problems+=("console-never-drew-tty1")

    local unit ready="" readiness=""
    if [ "$scenario" = plain ]; then
        # Nobody chose a role: no role daemon may run, and the console asks.
        for unit in $ROLE_DAEMONS; do
            ! has "unit=$unit state=active" || problems+=("role-daemon-running:$unit")
        done
        has "tty1\| .*Setup: " || problems+=("tty1-not-setup-screen")
        readiness="no role daemon running"
    else
        has "hostname=$OVF_HOSTNAME\$" || problems+=("hostname-not-applied")
        has "address: [^ ]+ $OVF_ADDRESS\$" || problems+=("address-not-applied")
        has "role-target=secondsite-config.target enabled=enabled active=active" \
            || problems+=("config-role-not-enabled")
        has "role-target=secondsite-target.target enabled=enabled active=active" \
            || problems+=("target-role-not-enabled")
        has "unit=secondsite-configd.service state=active/running" || problems+=("configd-not-ready")
        has "secondsitectl=ok" || problems+=("secondsitectl")
        ready=$(grep -o -E "unit=secondsite-targetd.service state=active/running ready_s=[0-9.]+" \
            <<<"$report" | sed 's/.*ready_s=//' | head -n 1 || true)
        [ -n "$ready" ] || problems+=("targetd-not-ready")
        # Boot time to "all role daemons ready": the last READY=1 of the running ones.
        local last
        last=$(grep -o -E "unit=secondsite-(configd|processd|targetd).service state=active/running ready_s=[0-9.]+" \
            <<<"$report" | sed 's/.*ready_s=//' | sort -n | tail -n 1 || true)
        readiness="all role daemons ready at ${last:-?}s guest uptime"
        if [ -n "$ready" ] && kill -0 "$qpid" 2>/dev/null; then
            if probe=$("$PY" -m tests.image.bootkit probe "$work/pki" "$port" --timeout 90); then
                say "[$name] targetd answers on $guest_ip:9442: $probe"
            else
                problems+=("targetd-no-tls")
            fi
        fi
    fi

    # Clean shutdown over ACPI (targetd stops on SIGTERM); forced after 120 s.
    local down=""
    if kill -0 "$qpid" 2>/dev/null && "$PY" -m tests.image.bootkit qmp "$qmp" system_powerdown; then
        for _ in $(seq 1 120); do
            kill -0 "$qpid" 2>/dev/null || { down=yes; break; }
            sleep 1
        done
    fi
    [ -n "$down" ] || say "[$name] guest did not power off within 120 s; killing QEMU"
    stop_qemu

    if [ ${#problems[@]} -eq 0 ]; then
        summary+=("$name: PASS, boot check after ${elapsed}s wall, $readiness")
    else
        summary+=("$name: FAIL (${problems[*]}) after ${elapsed}s; see $log")
        failures=$((failures + 1))
    fi
}

check_ova() {
    local start=$SECONDS out
    say "[ova] virt-v2v -i ova $OVA --print-source"
    if ! out=$(LIBGUESTFS_BACKEND=direct virt-v2v -i ova "$OVA" --print-source 2>&1); then
        echo "$out" | sed 's/^/  [ova] /'
        summary+=("ova: FAIL (virt-v2v refused it)")
        failures=$((failures + 1))
        return
    fi
    echo "$out" | sed 's/^/  [ova] /'
    # A wrong hash in the manifest must be refused.
    local bad=$work/bad
    mkdir -p "$bad"
    tar -xf "$OVA" -C "$bad"
    # Same length, one hex digit changed: the last one of the OVF's hash.
    awk 'NR == 1 { $0 = substr($0, 1, length($0) - 1) (substr($0, length($0)) == "0" ? "1" : "0") } 1' \
        "$bad/secondsite.mf" > "$bad/mf" && mv "$bad/mf" "$bad/secondsite.mf"
    tar --format=ustar -cf "$work/bad.ova" -C "$bad" secondsite.ovf secondsite.mf secondsite-disk1.vmdk
    rm -rf "$bad"
    if LIBGUESTFS_BACKEND=direct virt-v2v -i ova "$work/bad.ova" --print-source >"$work/bad.log" 2>&1; then
        summary+=("ova: FAIL (a wrong manifest hash was accepted)")
        failures=$((failures + 1))
    else
        say "[ova] wrong hash refused: $(grep -a -i -m1 -E 'checksum|sha|manifest' "$work/bad.log" || tail -n 1 "$work/bad.log")"
        summary+=("ova: PASS ($(du -m "$OVA" | cut -f1) MiB; manifest checked, wrong hash refused; $((SECONDS - start))s)")
    fi
    rm -f "$work/bad.ova"
}

for b in "${boots[@]}"; do
    boot "$b"
done
check_ova

say "summary:"
printf '  %s\n' "${summary[@]}"
[ "$failures" -eq 0 ] || die "$failures check(s) failed"
