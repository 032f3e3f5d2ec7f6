# shellcheck shell=bash
# Shared helpers for fetching Debian packages without installing them.
# Sourced by guest-images/build.sh and tests/kvm-host/run.

# fetch_deb DIR PKG: download PKG's .deb into DIR (once) and print its path.
# Never installs anything; uses `apt-get download`, so apt lists must exist
# (run `apt-get update` once on a fresh machine).
fetch_deb() {
    local dir=$1 pkg=$2 f
    mkdir -p "$dir"
    f=$(ls "$dir"/"${pkg}"_*.deb 2>/dev/null | head -n1)
    if [ -z "$f" ]; then
        (cd "$dir" && apt-get download "$pkg" >/dev/null 2>&1) ||
            { echo "error: could not download Debian package '$pkg' (run 'apt-get update' first?)" >&2; return 1; }
        f=$(ls "$dir"/"${pkg}"_*.deb | head -n1)
    fi
    printf '%s\n' "$f"
}

# unpack_deb DIR PKG DEST: fetch PKG into DIR and extract it under DEST (dpkg-deb -x).
unpack_deb() {
    local deb
    deb=$(fetch_deb "$1" "$2") || return 1
    mkdir -p "$3"
    dpkg-deb -x "$deb" "$3"
}

# cloud_kernel_pkg: the versioned package name behind linux-image-cloud-amd64,
# e.g. linux-image-6.1.0-56-cloud-amd64.
cloud_kernel_pkg() {
    apt-cache depends linux-image-cloud-amd64 2>/dev/null |
        awk '/Depends: linux-image-[0-9]/ {print $2; exit}'
}

# linux_source_pkg: the versioned package name behind linux-source,
# e.g. linux-source-6.1 (falls back to linux-source-6.1).
linux_source_pkg() {
    local p
    p=$(apt-cache depends linux-source 2>/dev/null |
        awk '/Depends: linux-source-[0-9]/ {print $2; exit}')
    printf '%s\n' "${p:-linux-source-6.1}"
}
