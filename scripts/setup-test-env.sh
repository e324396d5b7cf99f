#!/bin/bash
# Prepare a Debian 12 (bookworm) or 13 (trixie) machine for the test suite.
# Run as root. Idempotent, and quick when everything is already in place.
#
#  - QEMU >= 8.2 (bookworm-backports on bookworm), busybox-static, cpio, zstd, xz,
#    libatomic1 (atomic dirty-log bits for migration)
#  - uidmap (newuidmap/newgidmap: --uid-map/--gid-map of an unprivileged daemon)
#  - gcc and libc6-dev (the guest's static syscall helper, tests/guest/guest_scripts)
#  - the Python package in editable mode with its test tools, ruff, mypy
#  - pyfuse3 (the [pyfuse3] extra: built against libfuse3-dev, with pkg-config, and
#    fuse3 for host mounts by pyfuse3 itself) and its sdist's example file systems,
#    unpacked into $VIRTIOFSD_PY_GUEST_DIR/pyfuse3-sdist (tests/support/pyfuse3_examples.py)
#  - a Debian 6.12 guest kernel (downloaded, never installed) unpacked into
#    $VIRTIOFSD_PY_GUEST_DIR (default /var/tmp/virtiofsd-py-guest): PVH vmlinux,
#    modules, and the initramfs. VIRTIOFSD_PY_GUEST_REFRESH=1 fetches it again.
#  - real programs for the guest (git, rsync, sqlite3, attr, python3) and the
#    libraries they need: their Debian packages downloaded (never installed) and
#    unpacked into $VIRTIOFSD_PY_GUEST_DIR/progroot (virtiofsd_py/testing/progimage.py)
set -euo pipefail
cd "$(dirname "$0")/.."
GUEST_DIR=${VIRTIOFSD_PY_GUEST_DIR:-/var/tmp/virtiofsd-py-guest}
export VIRTIOFSD_PY_GUEST_DIR=$GUEST_DIR DEBIAN_FRONTEND=noninteractive

log() { echo "setup-test-env: $*" >&2; }

# Other sessions may hold apt's locks for a while: wait for them.
APT=(apt-get -o DPkg::Lock::Timeout=600 -q)
apt_updated=
apt_update() {
    [ -n "$apt_updated" ] && return
    local i
    for i in $(seq 60); do
        if "${APT[@]}" update -qq; then apt_updated=1; return; fi
        log "apt-get update failed (locked?), retrying"; sleep 5
    done
    return 1
}

codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
backports=
if [ "$codename" = bookworm ]; then
    backports=bookworm-backports
    if ! grep -rqs '^[^#]*bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
        uri=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
        log "adding bookworm-backports (${uri:=http://deb.debian.org/debian})"
        printf 'Types: deb\nURIs: %s\nSuites: bookworm-backports\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
            "$uri" > /etc/apt/sources.list.d/bookworm-backports.sources
        apt_updated=
        apt_update
    fi
fi
target=(${backports:+-t "$backports"})

qemu_ok() {
    local v
    v=$(qemu-system-x86_64 --version 2>/dev/null | sed -n 's/.*version \([0-9]*\)\.\([0-9]*\).*/\1 \2/p')
    [ -n "$v" ] && set -- $v && { [ "$1" -gt 8 ] || { [ "$1" -eq 8 ] && [ "$2" -ge 2 ]; }; }
}
missing=()
for p in busybox-static cpio zstd xz-utils libatomic1 gcc libc6-dev uidmap \
         libfuse3-dev pkg-config fuse3; do
    dpkg-query -W -f '${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    log "installing ${missing[*]}"
    apt_update
    "${APT[@]}" install -y --no-install-recommends "${missing[@]}"
fi
if ! qemu_ok; then
    log "installing qemu-system-x86 ${backports:+from $backports}"
    apt_update
    "${APT[@]}" install -y --no-install-recommends "${target[@]}" qemu-system-x86
    qemu_ok || { log "QEMU >= 8.2 is still not available"; exit 1; }
fi

# Whether every requirement of pyproject.toml's dependencies and test extra is
# installed in a version it accepts (packaging comes with pytest: without it,
# the test tools are missing anyway).
requirements_met() {
    (cd / && python3 - "$1" <<'EOF'
import importlib.metadata as md, sys, tomllib
try:
    from packaging.requirements import Requirement
except ImportError:
    sys.exit(1)
with open(sys.argv[1], "rb") as f:
    project = tomllib.load(f)["project"]
for text in project["dependencies"] + project["optional-dependencies"]["test"]:
    req = Requirement(text)
    try:
        version = md.version(req.name)
    except md.PackageNotFoundError:
        sys.exit(1)
    if not req.specifier.contains(version, prereleases=True):
        sys.exit(1)
EOF
    )
}
# Python.h: for the compiled core and for building pyfuse3.
if [ ! -f "$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["include"])')/Python.h" ]; then
    log "installing python3-dev (Python.h for the compiled core and pyfuse3)"
    apt_update
    "${APT[@]}" install -y --no-install-recommends python3-dev
fi
# Editable install of this checkout (CI uses a fresh clone elsewhere: reinstall
# whenever the installed package points at another directory, or a requirement
# is missing or too old).
installed=$(cd / && python3 -c 'import virtiofsd_py, os; print(os.path.dirname(os.path.dirname(virtiofsd_py.__file__)))' 2>/dev/null || true)
if [ "$installed" != "$PWD" ] || ! requirements_met "$PWD/pyproject.toml" \
    || ! command -v ruff >/dev/null || ! command -v mypy >/dev/null; then
    log "pip install -e .[test] ruff mypy"
    PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install -q --root-user-action=ignore -e '.[test]' ruff mypy
fi
# pyfuse3 (the [pyfuse3] extra), built against libfuse3-dev.
if ! (cd / && python3 -c 'import pyfuse3') 2>/dev/null; then
    log "pip install pyfuse3"
    PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install -q --root-user-action=ignore -e '.[pyfuse3]'
fi
# pyfuse3's example file systems (tests serve them unmodified): from its sdist.
pf3_version=$(cd / && python3 -c 'import importlib.metadata as m; print(m.version("pyfuse3"))')
pf3_cache=$GUEST_DIR/pyfuse3-sdist
if [ ! -d "$pf3_cache/pyfuse3-$pf3_version/examples" ]; then
    log "fetching pyfuse3 $pf3_version sdist (example file systems)"
    mkdir -p "$pf3_cache"
    python3 -m pip download -q --no-deps --no-binary :all: -d "$pf3_cache" "pyfuse3==$pf3_version"
    tar -xzf "$pf3_cache/pyfuse3-$pf3_version.tar.gz" -C "$pf3_cache" "pyfuse3-$pf3_version/examples"
fi
# The compiled core, built in place (the editable install builds it once; a
# changed .pyx needs a rebuild): Cython and the Python headers.
if ! (cd / && python3 -c 'import Cython; assert int(Cython.__version__.split(".")[0]) >= 3') 2>/dev/null; then
    log "pip install Cython>=3"
    PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install -q --root-user-action=ignore 'Cython>=3'
fi
python3 setup.py -q build_ext --inplace 2>&1 | grep -v "^running\|^copying" || true
# tests/test_packaging.py builds the sdist and wheel without build isolation.
if ! (cd / && python3 -c 'import build, wheel') 2>/dev/null; then
    log "pip install build wheel setuptools>=68"
    PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install -q --root-user-action=ignore build wheel 'setuptools>=68'
fi
# Coverage-guided fuzzing (tests/test_fuzz.py skips without it; a wheel for CPython 3.11).
if ! (cd / && python3 -c 'import atheris') 2>/dev/null; then
    log "pip install atheris"
    PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install -q --root-user-action=ignore atheris \
        || log "atheris did not install: the atheris fuzz tests will be skipped"
fi

# The guest kernel: download and unpack the package, never install it.
if [ ! -f "$GUEST_DIR/kernel.json" ] || [ -n "${VIRTIOFSD_PY_GUEST_REFRESH:-}" ]; then
    apt_update
    pkg=$(apt-cache depends "${target[@]}" linux-image-amd64 \
        | awk '/Depends: linux-image-[0-9]/{print $2; exit}')
    [ -n "$pkg" ] || { log "cannot resolve linux-image-amd64"; exit 1; }
    log "fetching guest kernel $pkg"
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    (cd "$tmp" && "${APT[@]}" -o APT::Sandbox::User=root download "${target[@]}" "$pkg")
    dpkg-deb -x "$tmp"/*.deb "$tmp/root"
    mkdir -p "$GUEST_DIR"
    python3 -m virtiofsd_py.testing.qemu.image prepare --kernel-root "$tmp/root"
    rm -rf "$tmp"
fi
# Programs for the guest's second initramfs (tests/guest/test_programs.py):
# the packages plus, three levels deep, the library packages they depend on
# (libc6 and libgcc-s1 come from the host, which is the same release).
prog_pkgs="git rsync sqlite3 attr"
py_pkg=$(apt-cache depends python3-minimal 2>/dev/null | awk '/Depends: python3\.[0-9]+-minimal/{print $2; exit}')
[ -n "$py_pkg" ] && prog_pkgs="$prog_pkgs $py_pkg lib$py_pkg"
if [ "$(cat "$GUEST_DIR/progroot/.packages" 2>/dev/null)" != "$prog_pkgs" ] || [ -n "${VIRTIOFSD_PY_GUEST_REFRESH:-}" ]; then
    apt_update
    all=$prog_pkgs cur=$prog_pkgs
    for level in 1 2 3; do
        next=$(apt-cache depends --no-recommends --no-suggests --no-conflicts --no-breaks \
                --no-replaces --no-enhances $cur 2>/dev/null \
            | awk '/^ *(Pre)?Depends: (lib|zlib)/{print $2}' \
            | grep -v -E '^(libc6|libgcc-s1|libperl.*|libcrypt1)$' | sort -u || true)
        cur=$(comm -13 <(tr ' ' '\n' <<<"$all" | sort -u) <(echo "$next") | xargs || true)
        [ -z "$cur" ] && break
        all="$all $cur"
    done
    log "fetching guest programs: $all"
    ptmp=$(mktemp -d)
    (cd "$ptmp" && "${APT[@]}" -o APT::Sandbox::User=root download $all)
    rm -rf "$GUEST_DIR/progroot"
    mkdir -p "$GUEST_DIR/progroot"
    for deb in "$ptmp"/*.deb; do dpkg-deb -x "$deb" "$GUEST_DIR/progroot"; done
    echo "$prog_pkgs" > "$GUEST_DIR/progroot/.packages"
    rm -rf "$ptmp"
fi

# fio and block-device modules for the in-guest benchmarks (docs/benchmarks.md);
# the tests do not need them, so a failure here only warns.
bash bench/setup-bench-env.sh || log "warning: benchmark guest programs not prepared"

# Builds the initramfs if needed and says whether guests can run.
python3 -m virtiofsd_py.testing.qemu.image check
