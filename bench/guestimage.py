"""The benchmark guest's initramfs: the programs image plus fio and block-device modules.

The test image (``virtiofsd_py.testing.qemu.progimage``) stays as it is; the
benchmark guest boots it followed by one more ``newc`` archive (the kernel
unpacks concatenated archives in order) holding:

- fio and the shared libraries it needs, from Debian packages that
  ``bench/setup-bench-env.sh`` unpacks into ``benchroot`` in the guest cache
  (resolved in benchroot, then progroot, then on the host);
- the guest kernel's ``virtio_blk`` and ``ext4`` modules with their
  dependencies (``bench-modules``), loaded by :func:`load_modules_cmd` after
  boot, for the upper-bound disk.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import stat
from pathlib import Path

from virtiofsd_py.testing.qemu.image import cache_dir
from virtiofsd_py.testing.qemu.initramfs import Entry, write_newc
from virtiofsd_py.testing.qemu.kmodules import ModuleTree
from virtiofsd_py.testing.qemu.progimage import (
    GUEST_LIB_DIR,
    ProgramsUnavailable,
    load_programs_initramfs,
    progroot,
)
from virtiofsd_py.testing.qemu.progimage import (
    library_closure as _closure,
)

BENCH_PROGRAMS = ("usr/bin/fio",)
#: ext4 needs a crc32c implementation at mount time (loaded by name, not a dependency).
BENCH_MODULES = ("virtio_blk", "crc32c_generic", "ext4")
GUEST_MODULE_DIR = "lib/modules/bench"


def benchroot() -> Path:
    """Unpacked fio packages (filled by bench/setup-bench-env.sh)."""
    return cache_dir() / "benchroot"


def modules_dir() -> Path:
    """Decompressed benchmark modules plus their load order."""
    return cache_dir() / "bench-modules"


def unavailable_reason() -> str | None:
    """Why the benchmark image cannot be built, or None."""
    if not (benchroot() / ".packages").exists():
        return f"no fio in {benchroot()} (run bench/setup-bench-env.sh)"
    if not (modules_dir() / "load-order").exists():
        return f"no virtio_blk/ext4 modules in {modules_dir()} (run bench/setup-bench-env.sh)"
    return None


def prepare_modules(kernel_root: Path, release: str, out: Path) -> list[str]:
    """Copy ``BENCH_MODULES`` and their dependencies out of an unpacked kernel package."""
    moddir = kernel_root / "lib" / "modules" / release
    if not moddir.is_dir():
        moddir = kernel_root / "usr" / "lib" / "modules" / release
    mods = ModuleTree(moddir).resolve(BENCH_MODULES)
    tmp = out.with_name(out.name + ".new")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name, elf in mods:
        (tmp / f"{name}.ko").write_bytes(elf)
    (tmp / "load-order").write_text("".join(f"{n}\n" for n, _ in mods))
    (tmp / ".stamp").write_text(stamp(release))
    shutil.rmtree(out, ignore_errors=True)
    tmp.replace(out)
    return [n for n, _ in mods]


def stamp(release: str) -> str:
    """What a prepared module directory was made from: release and module list."""
    return f"{release} {' '.join(BENCH_MODULES)}"


def bench_entries(root: Path, mods: Path) -> list[Entry]:
    """Members of the extra archive: fio, its libraries, the modules."""
    files: list[Entry] = []
    elves: list[Path] = []
    for rel in BENCH_PROGRAMS:
        path = root / rel
        if not path.is_file():
            raise ProgramsUnavailable(f"{rel} missing in {root}")
        files.append(Entry(rel, stat.S_IFREG | 0o755, path.read_bytes()))
        files.append(Entry(f"bin/{Path(rel).name}", stat.S_IFLNK | 0o777, f"/{rel}".encode()))
        elves.append(path)
    _interps, libs = _closure(elves, [root, progroot(), Path("/")])
    for name, path in sorted(libs.items()):
        files.append(Entry(f"{GUEST_LIB_DIR}/{name}", stat.S_IFREG | 0o755, path.read_bytes()))
    order = (mods / "load-order").read_text().split()
    files.append(
        Entry(f"{GUEST_MODULE_DIR}/load-order", stat.S_IFREG | 0o644, "\n".join(order).encode())
    )
    for name in order:
        data = (mods / f"{name}.ko").read_bytes()
        files.append(Entry(f"{GUEST_MODULE_DIR}/{name}.ko", stat.S_IFREG | 0o644, data))
    dirs = {"usr", "usr/bin", "usr/lib", GUEST_LIB_DIR, "lib", "lib/modules", GUEST_MODULE_DIR}
    return [Entry(d, stat.S_IFDIR | 0o755) for d in sorted(dirs, key=len)] + files


def load_modules_cmd() -> str:
    """Guest shell command that loads the benchmark modules (already loaded: fine)."""
    return (
        f"for m in $(cat /{GUEST_MODULE_DIR}/load-order); do "
        f'grep -q "^$m " /proc/modules || insmod /{GUEST_MODULE_DIR}/$m.ko || exit 1; done'
    )


def load_bench_initramfs() -> Path:
    """The programs initramfs followed by the benchmark archive (built if needed)."""
    reason = unavailable_reason()
    if reason is not None:
        raise ProgramsUnavailable(reason)
    base = load_programs_initramfs().read_bytes()
    data = base + write_newc(bench_entries(benchroot(), modules_dir()))
    out = cache_dir() / f"initramfs-bench-{hashlib.sha256(data).hexdigest()[:16]}.cpio"
    if not out.exists():
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_bytes(data)
        tmp.replace(out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m bench.guestimage")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare-modules", help="copy virtio_blk/ext4 out of a kernel package")
    p.add_argument("--kernel-root", type=Path, required=True)
    p.add_argument("--release", required=True)
    sub.add_parser("build", help="build the benchmark initramfs and print its path")
    p = sub.add_parser("stamp", help="print the stamp of a prepared module directory")
    p.add_argument("--release", required=True)
    args = parser.parse_args(argv)
    if args.cmd == "prepare-modules":
        print(" ".join(prepare_modules(args.kernel_root, args.release, modules_dir())))
        return 0
    if args.cmd == "stamp":
        print(stamp(args.release))
        return 0
    print(load_bench_initramfs())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
