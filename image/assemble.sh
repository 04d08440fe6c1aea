#!/bin/bash
# assemble.sh TREE DISK.raw: a GPT disk that boots the OS tree by BIOS and by UEFI,
# built without mounting anything (build machines have no FAT in the kernel, and
# grub-install cannot target an image file):
#
#   LBA 0        protective MBR; its first 440 bytes are GRUB's boot.img, patched with
#                the LBA of core.img
#   part 1  1M   BIOS boot partition: GRUB's core.img (grub-mkimage, modules built in)
#   part 2       EFI system partition, FAT32 made with mkfs.fat + mtools: systemd-boot,
#                the kernel and the initrd, a loader entry
#   part 3       root, ext4 made with `mkfs.ext4 -d TREE` (type: x86-64 root, so the
#                discoverable-partitions spec recognises it)
#
# Both loaders boot root=PARTUUID=<part 3> with the same command line. It stamps into
# the tree what names this disk: /etc/fstab and /boot/grub/grub.cfg.
# Sizes: DISK_MIB (default 4096) total, ESP_MIB (default 128).
set -euo pipefail

die() { echo "assemble: error: $*" >&2; exit 1; }
[ $# -eq 2 ] || die "usage: $0 TREE DISK.raw"
tree=$(realpath "$1")
disk=$2
DISK_MIB=${DISK_MIB:-4096}
ESP_MIB=${ESP_MIB:-128}
for cmd in sfdisk mkfs.ext4 mkfs.fat mmd mcopy grub-mkimage; do
    command -v "$cmd" >/dev/null || die "$cmd not found (hint: make image-deps)"
done
[ -d "$tree/usr" ] || die "$tree is not an OS tree"

kernel=$(readlink -f "$tree/vmlinuz") || true
initrd=$(readlink -f "$tree/initrd.img") || true
[ -f "$kernel" ] && [ -f "$initrd" ] || die "$tree has no /vmlinuz and /initrd.img"
kver=${kernel##*/vmlinuz-}
grubdir=$tree/usr/lib/grub/i386-pc
sdboot=$tree/usr/lib/systemd/boot/efi/systemd-bootx64.efi
[ -f "$grubdir/boot.img" ] || die "no GRUB i386-pc files in the tree (grub-pc-bin)"
[ -f "$sdboot" ] || die "no systemd-boot in the tree (systemd-boot-efi)"

work=$(mktemp -d "${TMPDIR:-/tmp}/secondsite-assemble.XXXXXX")
trap 'rm -rf "$work"' EXIT

uuid() { cat /proc/sys/kernel/random/uuid; }
disk_guid=$(uuid)
root_partuuid=$(uuid)
esp_partuuid=$(uuid)
bios_partuuid=$(uuid)
root_fsuuid=$(uuid)
esp_volid=$(od -An -N4 -tx4 /dev/urandom | tr -d ' ')

SECTORS_PER_MIB=2048
bios_start=1
esp_start=2
root_start=$((esp_start + ESP_MIB))
root_mib=$((DISK_MIB - root_start - 1))  # the last MiB holds the backup GPT
tree_mib=$(du -sxm "$tree" | cut -f1)
[ $((tree_mib * 5 / 4)) -lt "$root_mib" ] \
    || die "the tree ($tree_mib MiB) does not fit a $root_mib MiB root with room to spare; raise DISK_MIB"

cmdline="root=PARTUUID=$root_partuuid rw console=tty0 console=ttyS0,115200n8 quiet"
# /dev/console is the last console=: the serial port. Boot status and the boot check
# go there; tty1 stays free for the Secondsite console.

# --- stamp the tree ---------------------------------------------------------------
cat > "$tree/etc/fstab" <<EOF
# Written by image/assemble.sh. The EFI system partition is not mounted: the kernel
# and initrd on it are written when the image is built.
PARTUUID=$root_partuuid / ext4 defaults 0 1
EOF
install -d -m 0755 "$tree/boot/grub"
cat > "$tree/boot/grub/grub.cfg" <<EOF
# GRUB (BIOS boot). Written by image/assemble.sh; /vmlinuz and /initrd.img are the
# symlinks Debian's kernel packages keep current.
serial --unit=0 --speed=115200
terminal_input console serial
terminal_output console serial
set timeout_style=hidden
set timeout=0
menuentry "Secondsite appliance" {
    linux /vmlinuz $cmdline
    initrd /initrd.img
}
EOF

# --- partition table --------------------------------------------------------------
rm -f "$disk"
truncate -s "${DISK_MIB}M" "$disk"
sfdisk --quiet --no-reread --no-tell-kernel "$disk" <<EOF
label: gpt
label-id: $disk_guid
first-lba: 2048
start=$((bios_start * SECTORS_PER_MIB)), size=$SECTORS_PER_MIB, type=21686148-6449-6E6F-744E-656564454649, uuid=$bios_partuuid, name="bios-boot"
start=$((esp_start * SECTORS_PER_MIB)), size=$((ESP_MIB * SECTORS_PER_MIB)), type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, uuid=$esp_partuuid, name="esp"
start=$((root_start * SECTORS_PER_MIB)), size=$((root_mib * SECTORS_PER_MIB)), type=4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709, uuid=$root_partuuid, name="root-x86-64"
EOF

# --- root -------------------------------------------------------------------------
truncate -s "${root_mib}M" "$work/root.img"
mkfs.ext4 -q -L secondsite-root -U "$root_fsuuid" -d "$tree" "$work/root.img" \
    || die "mkfs.ext4 -d $tree failed"
dd if="$work/root.img" of="$disk" bs=1M seek="$root_start" conv=notrunc,sparse status=none
rm -f "$work/root.img"

# --- ESP: systemd-boot, kernel, initrd ----------------------------------------------
truncate -s "${ESP_MIB}M" "$work/esp.img"
mkfs.fat -F 32 -n ESP -i "$esp_volid" "$work/esp.img" >/dev/null
cat > "$work/loader.conf" <<EOF
timeout 0
default secondsite.conf
EOF
cat > "$work/entry.conf" <<EOF
title   Secondsite appliance
version $kver
linux   /secondsite/$kver/vmlinuz
initrd  /secondsite/$kver/initrd.img
options $cmdline
EOF
export MTOOLS_SKIP_CHECK=1
esp=(-i "$work/esp.img")
mmd "${esp[@]}" ::/EFI ::/EFI/BOOT ::/EFI/systemd ::/loader ::/loader/entries \
    ::/secondsite "::/secondsite/$kver"
mcopy "${esp[@]}" "$sdboot" ::/EFI/BOOT/BOOTX64.EFI
mcopy "${esp[@]}" "$sdboot" ::/EFI/systemd/systemd-bootx64.efi
mcopy "${esp[@]}" "$work/loader.conf" ::/loader/loader.conf
mcopy "${esp[@]}" "$work/entry.conf" ::/loader/entries/secondsite.conf
mcopy "${esp[@]}" "$kernel" "::/secondsite/$kver/vmlinuz"
mcopy "${esp[@]}" "$initrd" "::/secondsite/$kver/initrd.img"
dd if="$work/esp.img" of="$disk" bs=1M seek="$esp_start" conv=notrunc,sparse status=none

# --- GRUB for BIOS ------------------------------------------------------------------
# core.img finds the root by filesystem UUID and reads /boot/grub/grub.cfg from it; all
# modules that config needs are built in, so the root needs no GRUB module directory.
cat > "$work/early.cfg" <<EOF
search --no-floppy --fs-uuid --set=root $root_fsuuid
set prefix=(\$root)/boot/grub
EOF
grub-mkimage --format=i386-pc --directory="$grubdir" --output="$work/core.img" \
    --config="$work/early.cfg" --prefix=/boot/grub \
    biosdisk part_gpt ext2 search search_fs_uuid normal configfile linux boot \
    echo test serial terminal
core_bytes=$(stat -c %s "$work/core.img")
core_sectors=$(((core_bytes + 511) / 512))
[ "$core_sectors" -le "$SECTORS_PER_MIB" ] || die "core.img ($core_bytes bytes) exceeds the BIOS boot partition"
core_lba=$((bios_start * SECTORS_PER_MIB))

le() {  # le VALUE BYTES: VALUE as little-endian bytes, as printf escapes
    local value=$1 bytes=$2 out="" i
    for ((i = 0; i < bytes; i++)); do
        out+=$(printf '\\x%02x' $(((value >> (8 * i)) & 0xff)))
    done
    printf '%s' "$out"
}
patch() {  # patch FILE OFFSET ESCAPED-BYTES
    # shellcheck disable=SC2059
    printf "$3" | dd of="$1" bs=1 seek="$2" conv=notrunc status=none
}
# core.img's first sector (diskboot) ends with a blocklist {u64 start, u16 sectors,
# u16 segment}: where the rest of core.img is. It directly follows that first sector.
patch "$work/core.img" $((0x1f4)) "$(le $((core_lba + 1)) 8)$(le $((core_sectors - 1)) 2)"
# boot.img: the LBA of core.img at 0x5c; NOP the floppy drive check at 0x66, as
# grub-bios-setup does for hard disks.
cp "$grubdir/boot.img" "$work/boot.img"
patch "$work/boot.img" $((0x5c)) "$(le "$core_lba" 8)"
patch "$work/boot.img" $((0x66)) '\x90\x90'
dd if="$work/core.img" of="$disk" bs=512 seek="$core_lba" conv=notrunc status=none
# Only the boot code: bytes 440.. keep the disk signature and the protective MBR.
dd if="$work/boot.img" of="$disk" bs=440 count=1 conv=notrunc status=none

sfdisk --verify "$disk" >/dev/null || die "sfdisk --verify failed on $disk"
echo "assemble: $disk: ${DISK_MIB} MiB, kernel $kver, root PARTUUID $root_partuuid" >&2
