#!/usr/bin/env bash
# Build the guest kernels and initramfs images from Debian packages only.
#
#   guest-images/build.sh [minimal] [cloud]      (default: both)
#
# Outputs (git-ignored, fixed paths):
#   out/minimal/bzImage, out/minimal/initramfs.cpio.gz
#       Linux from Debian's linux-source, `make tinyconfig` + minimal.config
#       (everything built in, virtio-mmio with cmdline devices).
#   out/cloud/vmlinuz, out/cloud/initramfs.cpio.gz
#       Debian's stock linux-image-*-cloud-amd64 and the virtio-mmio modules
#       it needs (the cloud kernel has no MP-table and no cmdline virtio-mmio
#       devices: the vmm must describe devices with ACPI).
# plus, for reference: config, build-info.txt (and out/minimal/vmlinux,
# out/minimal/System.map, out/cloud/modules.txt).
#
# Both initramfs images hold busybox (Debian busybox-static), /init (./init),
# /usr/bin/vmm-exit (./vmm-exit), /usr/bin/outb (./tools/outb.c),
# /usr/bin/vsock (./tools/vsock.c) and /usr/bin/hostile (./tools/hostile.c).
# Downloads and build trees live in cache/. Nothing is installed on the host.
# Each output carries a stamp with a hash of its inputs (config, scripts,
# package versions, the build code itself); up-to-date outputs are skipped.
#
# Environment: JOBS (make -j, default nproc).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CACHE=$HERE/cache
OUT=$HERE/out
DEBS=$CACHE/debs
JOBS=${JOBS:-$(nproc)}
# Fixed timestamp for archive members (reproducible images).
EPOCH=946684800 # 2000-01-01T00:00:00Z

# shellcheck source=lib/debs.sh
. "$HERE/lib/debs.sh"

say() { printf 'guest-images: %s\n' "$*"; }
die() {
    printf 'guest-images: error: %s\n' "$*" >&2
    exit 1
}

usage() {
    sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'
}

# ---------------------------------------------------------------------------
# Host tools. Keep in sync with deps.txt (which .ci/run installs).

# check_tools TARGET...: fail with the exact Debian packages that are missing.
check_tools() {
    local -a need=(
        "dpkg-deb:dpkg" "apt-get:apt" "apt-cache:apt" "sha256sum:coreutils"
        "cpio:cpio" "gzip:gzip" "gcc:build-essential" "flock:util-linux"
    )
    local t missing=() hdr
    for t in "$@"; do
        case $t in
        minimal)
            need+=("make:build-essential" "flex:flex" "bison:bison" "bc:bc"
                "xz:xz-utils" "lz4:lz4" "perl:perl")
            ;;
        cloud)
            need+=("depmod:kmod" "xz:xz-utils" "zstd:zstd")
            ;;
        esac
    done
    for t in "${need[@]}"; do
        command -v "${t%%:*}" >/dev/null 2>&1 || missing+=("${t#*:}")
    done
    for t in "$@"; do
        [ "$t" = minimal ] || continue
        for hdr in "gelf.h:libelf-dev" "openssl/opensslv.h:libssl-dev"; do
            [ -f "/usr/include/${hdr%%:*}" ] ||
                [ -n "$(ls /usr/include/*/"${hdr%%:*}" 2>/dev/null)" ] ||
                missing+=("${hdr#*:}")
        done
    done
    if [ ${#missing[@]} -gt 0 ]; then
        mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
        die "missing build tools; install them with: apt-get install ${missing[*]}"
    fi
}

# ---------------------------------------------------------------------------
# Helpers.

# hash_inputs WORD...: sha256 over the words; a word that names a file
# contributes its contents, a word `fn:NAME` the text of shell function NAME.
hash_inputs() {
    local w
    for w in "$@"; do
        printf '== %s\n' "$w"
        case $w in
        fn:*) declare -f "${w#fn:}" ;;
        /*) cat "$w" ;;
        esac
    done | sha256sum | cut -d' ' -f1
}

# up_to_date STAMP HASH FILE...: true if STAMP holds HASH and all FILEs exist.
up_to_date() {
    local stamp=$1 hash=$2 f
    shift 2
    [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$hash" ] || return 1
    for f in "$@"; do [ -s "$f" ] || return 1; done
}

# install_file SRC DEST: copy atomically (never a half-written output).
install_file() {
    cp "$1" "$2.tmp.$$"
    mv -f "$2.tmp.$$" "$2"
}

# unpack_once DEB DIR: dpkg-deb -x DEB into DIR unless already done.
unpack_once() {
    local deb=$1 dir=$2
    if [ ! -f "$dir/.unpacked" ] || [ "$(cat "$dir/.unpacked")" != "${deb##*/}" ]; then
        rm -rf "$dir"
        mkdir -p "$dir"
        dpkg-deb -x "$deb" "$dir"
        printf '%s\n' "${deb##*/}" >"$dir/.unpacked"
    fi
}

# busybox_root: Debian's busybox-static, unpacked (not installed).
busybox_root() {
    local deb
    deb=$(fetch_deb "$DEBS" busybox-static) || die "cannot fetch busybox-static"
    unpack_once "$deb" "$CACHE/busybox"
    [ -x "$CACHE/busybox/bin/busybox" ] || die "busybox-static has no bin/busybox"
    printf '%s\n' "$CACHE/busybox"
}

# build_outb DEST: the freestanding I/O-port helper (tools/outb.c).
build_outb() {
    gcc -Os -static -nostdlib -ffreestanding -fno-pie -no-pie \
        -fno-stack-protector -fno-asynchronous-unwind-tables \
        -fcf-protection=none -Wall -Wextra -Werror -s -Wl,--build-id=none \
        -o "$1" "$HERE/tools/outb.c"
}

# build_vsock DEST: the guest's AF_VSOCK client/server (tools/vsock.c), static glibc.
build_vsock() {
    gcc -Os -static -Wall -Wextra -Werror -s -o "$1" "$HERE/tools/vsock.c"
}

# build_hostile DEST: the hostile virtio driver (tools/hostile.c), static glibc.
build_hostile() {
    gcc -Os -static -Wall -Wextra -Werror -s -o "$1" "$HERE/tools/hostile.c"
}

# newc_entry NAME MODE(octal) RDEVMAJOR RDEVMINOR INO: one header-only
# cpio "newc" entry (a directory or device node), so the archives carry
# /dev/console without mknod (no root, no fakeroot needed).
newc_entry() {
    local name=$1 mode=$((8#$2)) namesize=$((${#1} + 1))
    printf '070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X' \
        "$5" "$mode" 0 0 1 "$EPOCH" 0 0 0 "$3" "$4" "$namesize" 0
    printf '%s\0' "$name"
    head -c $(((4 - (110 + namesize) % 4) % 4)) /dev/zero
}

# make_initramfs KIND OUTFILE [MODROOT KVER MODPATH...]: busybox, /init,
# vmm-exit, outb, vsock, hostile and (cloud) the given modules, as a gzipped
# newc cpio archive owned by root.
make_initramfs() {
    local kind=$1 outfile=$2 bbroot stage applet m
    shift 2
    bbroot=$(busybox_root)
    stage=$CACHE/stage-$kind
    rm -rf "$stage"
    mkdir -p "$stage"/{bin,sbin,usr/bin,usr/sbin,etc,proc,sys,tmp,run,root,mnt}
    chmod 1777 "$stage/tmp"
    chmod 700 "$stage/root"

    install -m 0755 "$bbroot/bin/busybox" "$stage/bin/busybox"
    # Applet links from the busybox binary itself (static x86-64, runs here).
    while read -r applet; do
        [ "$applet" = bin/busybox ] && continue
        mkdir -p "$stage/$(dirname "$applet")"
        [ -e "$stage/$applet" ] || ln -s /bin/busybox "$stage/$applet"
    done < <("$stage/bin/busybox" --list-full)

    [ -L "$stage/bin/sh" ] || die "busybox applet links missing (busybox --list-full failed?)"
    install -m 0755 "$HERE/init" "$stage/init"
    install -m 0755 "$HERE/vmm-exit" "$stage/usr/bin/vmm-exit"
    build_outb "$stage/usr/bin/outb"
    build_vsock "$stage/usr/bin/vsock"
    build_hostile "$stage/usr/bin/hostile"

    printf 'root:x:0:0:root:/root:/bin/sh\n' >"$stage/etc/passwd"
    printf 'root:x:0:\ntty:x:5:\n' >"$stage/etc/group"
    printf 'vmm-guest\n' >"$stage/etc/hostname"
    printf "export PS1='\\\\h:\\\\w# '\n" >"$stage/etc/profile"
    printf 'kind=%s\n' "$kind" >"$stage/etc/vmm-guest-image"

    if [ $# -gt 0 ]; then
        local modroot=$1 kver=$2 src dst
        shift 2
        : >"$stage/etc/vmm-modules"
        for m in "$@"; do
            src=$modroot/lib/modules/$kver/$m
            dst=lib/modules/$kver/${m%.xz}
            dst=${dst%.zst}
            dst=${dst%.gz}
            mkdir -p "$stage/$(dirname "$dst")"
            # busybox insmod may not read compressed modules: decompress.
            case $m in
            *.ko.xz) xz -dc "$src" >"$stage/$dst" ;;
            *.ko.zst) zstd -q -dc "$src" >"$stage/$dst" ;;
            *.ko.gz) gzip -dc "$src" >"$stage/$dst" ;;
            *.ko) cp "$src" "$stage/$dst" ;;
            *) die "unexpected module file $m" ;;
            esac
            chmod 0644 "$stage/$dst"
            printf '/%s\n' "$dst" >>"$stage/etc/vmm-modules"
        done
    fi

    find "$stage" -exec touch -h -d "@$EPOCH" {} +
    {
        newc_entry dev 040755 0 0 1
        newc_entry dev/console 020600 5 1 2
        (cd "$stage" && find . -mindepth 1 -printf '%P\n' | LC_ALL=C sort |
            cpio -o -H newc --owner=0:0 --reproducible --quiet)
    } | gzip -n -9 >"$outfile.tmp.$$"
    mv -f "$outfile.tmp.$$" "$outfile"
    rm -rf "$stage"
}

# ---------------------------------------------------------------------------
# Minimal kernel.

# linux_source_tree: fetch linux-source-X.Y, extract its tarball once under
# cache/linux-source/, print the source directory.
linux_source_tree() {
    local pkg deb base root tarball
    pkg=$(linux_source_pkg)
    deb=$(fetch_deb "$DEBS" "$pkg") || die "cannot fetch $pkg"
    base=${deb##*/}
    root=$CACHE/linux-source
    if [ ! -f "$root/.extracted" ] || [ "$(cat "$root/.extracted")" != "$base" ]; then
        say "extracting $base" >&2
        rm -rf "$root"
        unpack_deb "$DEBS" "$pkg" "$root/deb" || die "cannot unpack $pkg"
        tarball=$(ls "$root"/deb/usr/src/linux-source-*.tar.* | head -n1)
        [ -f "$tarball" ] || die "no source tarball in $base"
        tar -xf "$tarball" -C "$root"
        rm -rf "$root/deb"
        printf '%s\n' "$base" >"$root/.extracted"
    fi
    ls -d "$root"/linux-source-*/ | head -n1 | sed 's:/$::'
}

# verify_config FRAGMENT CONFIG: every `CONFIG_X=v` line of FRAGMENT must be
# in CONFIG, every `# CONFIG_X is not set` must not be set there.
verify_config() {
    local frag=$1 cfg=$2 line sym bad=0 actual
    while IFS= read -r line; do
        case $line in
        CONFIG_*=*)
            grep -qxF -- "$line" "$cfg" && continue
            sym=${line%%=*}
            ;;
        "# CONFIG_"*" is not set")
            sym=${line#\# }
            sym=${sym%% *}
            grep -q "^$sym=" "$cfg" || continue
            ;;
        *) continue ;;
        esac
        actual=$(grep -E "^$sym=|^# $sym is not set" "$cfg" || true)
        printf 'guest-images: config: wanted "%s", got "%s"\n' \
            "$line" "${actual:-(absent: dependencies not met)}" >&2
        bad=1
    done <"$frag"
    [ $bad = 0 ] || die "minimal.config: required options were dropped by Kconfig (see above)"
}

build_minimal_kernel() {
    local src bdir hash stamp kmake t0 t1 ts
    src=$(linux_source_tree)
    bdir=$CACHE/build-minimal
    stamp=$OUT/minimal/.kernel.stamp
    hash=$(hash_inputs "$HERE/minimal.config" "$(cat "$CACHE/linux-source/.extracted")" \
        fn:build_minimal_kernel fn:verify_config)
    if up_to_date "$stamp" "$hash" "$OUT/minimal/bzImage"; then
        say "minimal kernel: up to date ($OUT/minimal/bzImage)"
        return
    fi
    mkdir -p "$bdir" "$OUT/minimal"
    rm -f "$stamp"
    # Reproducible build metadata: the timestamp of the source tarball.
    ts=$(date -u -d "@$(stat -c %Y "$src/Makefile")" '+%a %b %e %H:%M:%S UTC %Y')
    kmake=(make -C "$src" O="$bdir" ARCH=x86_64
        KBUILD_BUILD_TIMESTAMP="$ts" KBUILD_BUILD_USER=vmm
        KBUILD_BUILD_HOST=guest-images KBUILD_BUILD_VERSION=1)

    say "minimal kernel: configuring ($(basename "$src"), tinyconfig + minimal.config)"
    # merge_config.sh -n: `make allnoconfig` with the merged tinyconfig +
    # fragment as KCONFIG_ALLCONFIG (how tinyconfig itself is made), so
    # options the fragment makes visible default to n instead of their
    # Kconfig defaults (olddefconfig would pull in VT, i8042, HPET, ...).
    {
        "${kmake[@]}" tinyconfig &&
            (cd "$src" && ARCH=x86_64 scripts/kconfig/merge_config.sh -n \
                -O "$bdir" "$bdir/.config" "$HERE/minimal.config")
    } >"$bdir/config.log" 2>&1 || {
        tail -n 30 "$bdir/config.log" >&2
        die "kernel configuration failed (log: $bdir/config.log)"
    }
    verify_config "$HERE/minimal.config" "$bdir/.config"

    say "minimal kernel: make -j$JOBS bzImage (log: $bdir/build.log)"
    t0=$(date +%s)
    "${kmake[@]}" -j"$JOBS" bzImage >"$bdir/build.log" 2>&1 || {
        tail -n 40 "$bdir/build.log" >&2
        die "kernel build failed (log: $bdir/build.log)"
    }
    t1=$(date +%s)

    install_file "$bdir/arch/x86/boot/bzImage" "$OUT/minimal/bzImage"
    install_file "$bdir/vmlinux" "$OUT/minimal/vmlinux"
    install_file "$bdir/System.map" "$OUT/minimal/System.map"
    install_file "$bdir/.config" "$OUT/minimal/config"
    {
        echo "kernel=$(cat "$bdir/include/config/kernel.release")"
        echo "source=$(cat "$CACHE/linux-source/.extracted")"
        echo "build_seconds=$((t1 - t0))"
        echo "jobs=$JOBS"
    } >"$OUT/minimal/build-info.txt"
    printf '%s\n' "$hash" >"$stamp"
    say "minimal kernel: built in $((t1 - t0))s -> $OUT/minimal/bzImage ($(du -h "$OUT/minimal/bzImage" | cut -f1))"
}

build_minimal_initramfs() {
    local hash stamp bbdeb
    stamp=$OUT/minimal/.initramfs.stamp
    bbdeb=$(fetch_deb "$DEBS" busybox-static) || die "cannot fetch busybox-static"
    hash=$(hash_inputs "$HERE/init" "$HERE/vmm-exit" "$HERE/tools/outb.c" "${bbdeb##*/}" \
        "$HERE/tools/vsock.c" fn:build_vsock "$HERE/tools/hostile.c" fn:build_hostile \
        fn:make_initramfs fn:newc_entry fn:build_outb fn:build_minimal_initramfs)
    if up_to_date "$stamp" "$hash" "$OUT/minimal/initramfs.cpio.gz"; then
        say "minimal initramfs: up to date"
        return
    fi
    mkdir -p "$OUT/minimal"
    rm -f "$stamp"
    make_initramfs minimal "$OUT/minimal/initramfs.cpio.gz"
    printf '%s\n' "$hash" >"$stamp"
    say "minimal initramfs: built ($(du -h "$OUT/minimal/initramfs.cpio.gz" | cut -f1))"
}

# ---------------------------------------------------------------------------
# Cloud kernel.

# Modules the cloud initramfs loads (names as modprobe knows them). `?`
# marks optional ones. Built-in ones are skipped; dependencies come from
# modules.dep.
CLOUD_MODULES=(virtio_mmio virtio_blk virtio_net virtio_console virtio_rng
    vmw_vsock_virtio_transport "pvpanic_mmio?" ext4)

# modname PATH: module name of a module file (dashes as underscores).
modname() {
    local n=${1##*/}
    n=${n%%.ko*}
    printf '%s\n' "${n//-/_}"
}

# resolve_modules ROOT KVER NAME...: print the module files (relative to
# lib/modules/KVER) to load, dependencies first.
resolve_modules() {
    local root=$1 kver=$2 moddir line path name want opt
    shift 2
    moddir=$root/lib/modules/$kver
    # The package does not ship modules.dep (its postinst runs depmod).
    [ -f "$moddir/modules.dep" ] || depmod -b "$root" "$kver" ||
        die "depmod failed for $kver"
    local -A deps=() pathof=() seen=()
    local -a order=()
    while IFS= read -r line; do
        path=${line%%:*}
        name=$(modname "$path")
        pathof[$name]=$path
        deps[$path]=${line#*:}
    done <"$moddir/modules.dep"

    visit() {
        local p=$1 d
        [ -n "${seen[$p]:-}" ] && return
        seen[$p]=1
        for d in ${deps[$p]}; do visit "$d"; done
        order+=("$p")
    }
    for want in "$@"; do
        opt=
        case $want in *\?) want=${want%\?} opt=1 ;; esac
        if [ -n "${pathof[$want]:-}" ]; then
            visit "${pathof[$want]}"
        elif grep -q "/${want//_/[-_]}\.ko" "$moddir/modules.builtin" 2>/dev/null; then
            say "cloud: $want is built into the kernel" >&2
        elif [ -n "$opt" ]; then
            say "cloud: optional module $want not in this kernel, skipped" >&2
        else
            die "module $want is neither in modules.dep nor built in ($kver)"
        fi
    done
    unset -f visit
    printf '%s\n' "${order[@]}"
}

build_cloud() {
    local pkg deb root kver vmlinuz hash kstamp istamp bbdeb t0 mods
    pkg=$(cloud_kernel_pkg)
    [ -n "$pkg" ] || die "cannot resolve linux-image-cloud-amd64 (run 'apt-get update' first?)"
    deb=$(fetch_deb "$DEBS" "$pkg") || die "cannot fetch $pkg"
    mkdir -p "$OUT/cloud"
    t0=$(date +%s)

    kstamp=$OUT/cloud/.kernel.stamp
    hash=$(hash_inputs "${deb##*/}" fn:build_cloud)
    root=$CACHE/cloud-kernel
    if up_to_date "$kstamp" "$hash" "$OUT/cloud/vmlinuz"; then
        say "cloud kernel: up to date ($pkg)"
    else
        rm -f "$kstamp"
        say "cloud kernel: ${deb##*/}"
        unpack_once "$deb" "$root"
        vmlinuz=$(ls "$root"/boot/vmlinuz-* | head -n1)
        install_file "$vmlinuz" "$OUT/cloud/vmlinuz"
        install_file "$(ls "$root"/boot/config-* | head -n1)" "$OUT/cloud/config"
        printf '%s\n' "$hash" >"$kstamp"
    fi

    istamp=$OUT/cloud/.initramfs.stamp
    bbdeb=$(fetch_deb "$DEBS" busybox-static) || die "cannot fetch busybox-static"
    hash=$(hash_inputs "${deb##*/}" "${bbdeb##*/}" "$HERE/init" "$HERE/vmm-exit" \
        "$HERE/tools/outb.c" "$HERE/tools/vsock.c" fn:build_vsock \
        "$HERE/tools/hostile.c" fn:build_hostile \
        "${CLOUD_MODULES[*]}" fn:build_cloud fn:make_initramfs \
        fn:newc_entry fn:build_outb fn:resolve_modules fn:modname)
    if up_to_date "$istamp" "$hash" "$OUT/cloud/initramfs.cpio.gz"; then
        say "cloud initramfs: up to date"
        return
    fi
    rm -f "$istamp"
    unpack_once "$deb" "$root"
    if [ ! -d "$root/lib/modules" ] && [ -d "$root/usr/lib/modules" ]; then
        ln -s usr/lib "$root/lib" # merged-/usr packages
    fi
    kver=$(basename "$(ls -d "$root"/lib/modules/*/ | head -n1)")
    resolve_modules "$root" "$kver" "${CLOUD_MODULES[@]}" >"$CACHE/cloud-modules.list"
    mapfile -t mods <"$CACHE/cloud-modules.list"
    say "cloud initramfs: ${#mods[@]} modules: $(for m in "${mods[@]}"; do modname "$m"; done | paste -sd" ")"
    make_initramfs cloud "$OUT/cloud/initramfs.cpio.gz" "$root" "$kver" "${mods[@]}"
    printf '%s\n' "${mods[@]}" >"$OUT/cloud/modules.txt"
    {
        echo "kernel=$kver"
        echo "package=${deb##*/}"
        echo "build_seconds=$(($(date +%s) - t0))"
    } >"$OUT/cloud/build-info.txt"
    printf '%s\n' "$hash" >"$istamp"
    say "cloud initramfs: built in $(($(date +%s) - t0))s ($(du -h "$OUT/cloud/initramfs.cpio.gz" | cut -f1))"
}

# ---------------------------------------------------------------------------

main() {
    local targets=() t
    for t in "$@"; do
        case $t in
        minimal | cloud) targets+=("$t") ;;
        all) targets+=(minimal cloud) ;;
        -h | --help)
            usage
            exit 0
            ;;
        *) die "unknown target '$t' (targets: minimal, cloud; default both)" ;;
        esac
    done
    [ ${#targets[@]} -gt 0 ] || targets=(minimal cloud)
    check_tools "${targets[@]}"

    mkdir -p "$CACHE" "$OUT"
    # One build at a time (tests/kvm-host/run may call us too).
    exec 9>"$CACHE/.lock"
    if ! flock -n 9; then
        say "waiting for another build.sh to finish"
        flock 9
    fi

    for t in "${targets[@]}"; do
        case $t in
        minimal)
            build_minimal_kernel
            build_minimal_initramfs
            ;;
        cloud) build_cloud ;;
        esac
    done
}

# (Sourcing this file only defines the functions.)
if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    main "$@"
fi
