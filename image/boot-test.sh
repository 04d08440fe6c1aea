#!/bin/bash
# `make image-test`: boot mkosi.output/secondsite.raw under QEMU (TCG: KVM is not usable
# on the build machines) with VMware-like devices (pvscsi disk, vmxnet3 NIC), once per
# firmware (default: bios uefi), then check the OVA with virt-v2v.
#
# Each boot runs on a throwaway qcow2 overlay (the raw disk and the OVA stay pristine,
# and every boot is a first boot). Test-only TLS material reaches the guest as the
# systemd credential tmpfiles.extra in an SMBIOS type 11 string (tests/image/bootkit.py
# says why). The guest's secondsite-boot-check.service prints its report on the serial
# console; this script passes a boot when the report says:
#   reached multi-user.target, failed-units=none, RESULT=PASS,
#   unit=secondsite-targetd.service state=active/running (READY=1 received)
# and a TLS 1.3 handshake (client certificate from the test CA) with targetd on 9442
# succeeds through a host port forward. Then it powers the guest off over QMP.
#
# Settings: BOOT_TIMEOUT (seconds per boot, 900), BOOT_SMP (1: the build machines are
# shared), BOOT_MEMORY_MIB (2048). Serial logs: mkosi.output/boot-test-<firmware>.log.
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

firmwares=("$@")
[ ${#firmwares[@]} -gt 0 ] || firmwares=(bios uefi)
for fw in "${firmwares[@]}"; do
    case "$fw" in bios | uefi) ;; *) die "unknown firmware '$fw' (bios or uefi)" ;; esac
done
for cmd in qemu-system-x86_64 qemu-img virt-v2v; do
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
    local fw=$1 log=$OUT/boot-test-$1.log overlay=$work/$1.qcow2 qmp=$work/qmp-$1.sock
    local port start elapsed result problems=()
    # BIOS: the disk on VMware paravirtual SCSI (SeaBIOS boots from it). UEFI: Debian's
    # OVMF has no PVSCSI driver (ESXi's own EFI firmware has one), so the disk sits on
    # AHCI, which is VMware's SATA controller.
    # shellcheck disable=SC2054  # commas belong to QEMU's option syntax
    local fwargs=() diskargs=(-device pvscsi,id=scsi0 -device scsi-hd,drive=disk0,bus=scsi0.0,bootindex=0)
    if [ "$fw" = uefi ]; then
        [ -f "$OVMF_CODE" ] && [ -f "$OVMF_VARS" ] || die "OVMF not found (hint: make image-deps)"
        cp "$OVMF_VARS" "$work/vars.fd"
        fwargs=(-drive "if=pflash,format=raw,unit=0,readonly=on,file=$OVMF_CODE"
            -drive "if=pflash,format=raw,unit=1,file=$work/vars.fd")
        # shellcheck disable=SC2054
        diskargs=(-device ahci,id=ahci0 -device ide-hd,drive=disk0,bus=ahci0.0,bootindex=0)
    fi
    qemu-img create -q -f qcow2 -F raw -b "$(realpath "$RAW")" "$overlay"
    port=$("$PY" -m tests.image.bootkit free-port)
    : > "$log"
    say "[$fw] booting (TCG, $BOOT_SMP vCPU, $BOOT_MEMORY_MIB MiB, disk on ${diskargs[1]%%,*}, vmxnet3); serial log $log"
    qemu-system-x86_64 -accel tcg -machine pc -cpu max -smp "$BOOT_SMP" -m "$BOOT_MEMORY_MIB" \
        -nodefaults -display none -vga std "${fwargs[@]}" \
        -drive "if=none,id=disk0,file=$overlay,format=qcow2,cache=unsafe" "${diskargs[@]}" \
        -netdev "user,id=net0,hostfwd=tcp:127.0.0.1:$port-:9442" \
        -device vmxnet3,netdev=net0,romfile= \
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
    say "[$fw] boot check after ${elapsed}s (wall clock):"
    grep -a -o "$MARK.*" "$log" | tr -d '\r' | sed "s/^/  [$fw] /" || true

    [ "$result" = "$MARK RESULT=PASS" ] || problems+=("boot-check:${result:-none}")
    grep -a -q "$MARK reached multi-user.target" "$log" || problems+=("no-multi-user")
    grep -a -q "$MARK failed-units=none" "$log" || problems+=("failed-units")
    local ready
    ready=$(grep -a -o "$MARK unit=secondsite-targetd.service state=active/running ready_s=[0-9.]*" "$log" \
        | sed 's/.*ready_s=//' | head -n 1 || true)
    [ -n "$ready" ] || problems+=("targetd-not-ready")
    grep -a -q "$MARK unit=secondsite-configd.service state=active/running" "$log" \
        || problems+=("configd-not-ready")
    grep -a -q "$MARK secondsitectl=ok" "$log" || problems+=("secondsitectl")
    grep -a -q "$MARK setup1=ok" "$log" || problems+=("setup1")
    grep -a -q "$MARK unit=secondsite-console.service state=active/running" "$log" \
        || problems+=("console-not-running")
    if [ -n "$ready" ] && kill -0 "$qpid" 2>/dev/null; then
        if probe=$("$PY" -m tests.image.bootkit probe "$work/pki" "$port" --timeout 90); then
            say "[$fw] targetd answers on 9442: $probe"
        else
            problems+=("targetd-no-tls")
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
    [ -n "$down" ] || say "[$fw] guest did not power off within 120 s; killing QEMU"
    stop_qemu

    if [ ${#problems[@]} -eq 0 ]; then
        summary+=("$fw: PASS, boot check after ${elapsed}s wall, targetd READY at ${ready}s guest uptime")
    else
        summary+=("$fw: FAIL (${problems[*]}) after ${elapsed}s; see $log")
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

for fw in "${firmwares[@]}"; do
    boot "$fw"
done
check_ova

say "summary:"
printf '  %s\n' "${summary[@]}"
[ "$failures" -eq 0 ] || die "$failures check(s) failed"
