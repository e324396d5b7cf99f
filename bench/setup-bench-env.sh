#!/bin/bash
# Prepare what the in-guest benchmarks need, on top of scripts/setup-test-env.sh
# (which calls this script and only warns when it fails). Idempotent.
#  - fio and libaio with the libraries they need: Debian packages downloaded
#    (never installed) and unpacked into $GUEST_DIR/benchroot; progimage.py
#    ships them in the benchmark guest's programs archive.
#  - the guest kernel's virtio_blk and ext4 modules (plus dependencies) in
#    $GUEST_DIR/bench-modules, for the upper-bound disk.
# VIRTIOFSD_PY_GUEST_REFRESH=1 fetches everything again.
set -euo pipefail
cd "$(dirname "$0")/.."
GUEST_DIR=${VIRTIOFSD_PY_GUEST_DIR:-/var/tmp/virtiofsd-py-guest}
export VIRTIOFSD_PY_GUEST_DIR=$GUEST_DIR DEBIAN_FRONTEND=noninteractive
log() { echo "setup-bench-env: $*" >&2; }
APT=(apt-get -o DPkg::Lock::Timeout=600 -q)
[ -f "$GUEST_DIR/kernel.json" ] || { log "no guest kernel: run scripts/setup-test-env.sh"; exit 1; }
release=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["release"])' "$GUEST_DIR/kernel.json")
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

bench_pkgs="fio libaio1"
if [ "$(cat "$GUEST_DIR/benchroot/.packages" 2>/dev/null)" != "$bench_pkgs" ] || [ -n "${VIRTIOFSD_PY_GUEST_REFRESH:-}" ]; then
    all=$bench_pkgs cur=$bench_pkgs
    for level in 1 2 3 4; do
        next=$(apt-cache depends --no-recommends --no-suggests --no-conflicts --no-breaks \
                --no-replaces --no-enhances $cur 2>/dev/null \
            | awk '/^ *(Pre)?Depends: (lib|zlib)/{print $2}' \
            | grep -v -E '^(libc6|libgcc-s1|libcrypt1)$' | sort -u || true)
        cur=$(comm -13 <(tr ' ' '\n' <<<"$all" | sort -u) <(echo "$next") | xargs || true)
        [ -z "$cur" ] && break
        all="$all $cur"
    done
    log "fetching benchmark programs: $all"
    mkdir "$tmp/debs"
    (cd "$tmp/debs" && "${APT[@]}" -o APT::Sandbox::User=root download $all)
    rm -rf "$GUEST_DIR/benchroot.new"
    mkdir -p "$GUEST_DIR/benchroot.new"
    for deb in "$tmp"/debs/*.deb; do dpkg-deb -x "$deb" "$GUEST_DIR/benchroot.new"; done
    # Some libraries live in private directories found through RUNPATH (ceph);
    # the guest has one flat library directory, so link them into it.
    libdir="$GUEST_DIR/benchroot.new/usr/lib/x86_64-linux-gnu"
    find "$libdir" -mindepth 2 -name 'lib*.so*' -printf '%P\n' | while read -r rel; do
        [ -e "$libdir/$(basename "$rel")" ] || ln -s "$rel" "$libdir/$(basename "$rel")"
    done
    echo "$bench_pkgs" > "$GUEST_DIR/benchroot.new/.packages"
    rm -rf "$GUEST_DIR/benchroot"
    mv "$GUEST_DIR/benchroot.new" "$GUEST_DIR/benchroot"
fi

want=$(python3 -m bench.guestimage stamp --release "$release")
if [ "$(cat "$GUEST_DIR/bench-modules/.stamp" 2>/dev/null)" != "$want" ] || [ -n "${VIRTIOFSD_PY_GUEST_REFRESH:-}" ]; then
    log "fetching linux-image-$release for virtio_blk, crc32c and ext4"
    mkdir "$tmp/kernel"
    (cd "$tmp/kernel" && "${APT[@]}" -o APT::Sandbox::User=root download "linux-image-$release")
    dpkg-deb -x "$tmp"/kernel/*.deb "$tmp/kernel/root"
    python3 -m bench.guestimage prepare-modules --kernel-root "$tmp/kernel/root" --release "$release"
fi
