"""The guest image cache: kernel, modules and initramfs for test guests.

Layout of the cache directory (``VIRTIOFSD_PY_GUEST_DIR``, default
``/var/tmp/virtiofsd-py-guest``)::

    kernel.json          what was prepared: release, boot file, PVH or not
    vmlinuz              the kernel package's bzImage (fallback boot file)
    vmlinux              uncompressed ELF with a PVH note (preferred)
    modules/             decompressed NAME.ko files plus load-order
    initramfs-HASH.cpio  built on demand from busybox + modules + init script

``scripts/setup-test-env.sh`` downloads and unpacks the Debian kernel package
and runs ``python3 -m virtiofsd_py.testing.qemu.image prepare --kernel-root DIR``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from virtiofsd_py.testing.qemu.initramfs import build_initramfs, find_busybox
from virtiofsd_py.testing.qemu.kmodules import ModuleTree
from virtiofsd_py.testing.qemu.vmlinux import ExtractError, extract_vmlinux

DEFAULT_DIR = "/var/tmp/virtiofsd-py-guest"
MIN_QEMU = (8, 2)


def cache_dir() -> Path:
    """The guest image cache directory."""
    return Path(os.environ.get("VIRTIOFSD_PY_GUEST_DIR", DEFAULT_DIR))


def qemu_binary() -> str:
    """The QEMU system emulator to run (env ``VIRTIOFSD_PY_QEMU`` overrides)."""
    return os.environ.get("VIRTIOFSD_PY_QEMU", "qemu-system-x86_64")


@dataclass(frozen=True)
class GuestImage:
    """Everything needed to boot a test guest."""

    kernel: Path
    initramfs: Path
    pvh: bool
    release: str


def prepare(kernel_root: Path, out: Path) -> dict[str, object]:
    """Turn an unpacked ``linux-image-*`` package into the cache layout."""
    vmlinuz = sorted((kernel_root / "boot").glob("vmlinuz-*"))
    if not vmlinuz:
        raise FileNotFoundError(f"no boot/vmlinuz-* under {kernel_root}")
    release = vmlinuz[-1].name.removeprefix("vmlinuz-")
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(vmlinuz[-1], out / "vmlinuz")
    info: dict[str, object] = {"release": release, "kernel": "vmlinuz", "pvh": False}
    try:
        extract_vmlinux(out / "vmlinuz", out / "vmlinux")
        info.update(kernel="vmlinux", pvh=True)
    except ExtractError as e:
        info["vmlinux_error"] = str(e)
    moddir = kernel_root / "lib" / "modules" / release
    if not moddir.is_dir():
        moddir = kernel_root / "usr" / "lib" / "modules" / release
    mods = ModuleTree(moddir).resolve()
    target = out / "modules"
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir()
    for name, elf in mods:
        (target / f"{name}.ko").write_bytes(elf)
    (target / "load-order").write_text("".join(f"{n}\n" for n, _ in mods))
    info["modules"] = [n for n, _ in mods]
    (out / "kernel.json").write_text(json.dumps(info, indent=1) + "\n")
    return info


def qemu_version(binary: str) -> tuple[int, int] | None:
    """``(major, minor)`` of a QEMU binary, or None when it cannot run."""
    path = shutil.which(binary)
    if path is None:
        return None
    try:
        text = subprocess.run(
            [path, "--version"], capture_output=True, text=True, timeout=30, check=False
        ).stdout
    except OSError:
        return None
    m = re.search(r"version (\d+)\.(\d+)", text)
    return (int(m.group(1)), int(m.group(2))) if m else None


def unavailable_reason() -> str | None:
    """Why test guests cannot run here, or None when they can."""
    qemu = qemu_binary()
    version = qemu_version(qemu)
    if version is None:
        return f"{qemu} not found or not runnable (run scripts/setup-test-env.sh)"
    if version < MIN_QEMU:
        return f"{qemu} is version {version[0]}.{version[1]}, need >= 8.2"
    info_path = cache_dir() / "kernel.json"
    if not info_path.exists():
        return f"no guest kernel in {cache_dir()} (run scripts/setup-test-env.sh)"
    info = json.loads(info_path.read_text())
    if not (cache_dir() / str(info["kernel"])).exists():
        return f"guest kernel {cache_dir() / str(info['kernel'])} is missing"
    if find_busybox() is None:
        return "no static busybox for the initramfs (apt-get install busybox-static)"
    return None


def load_image() -> GuestImage:
    """The prepared kernel plus an up-to-date initramfs (built if needed)."""
    reason = unavailable_reason()
    if reason is not None:
        raise RuntimeError(reason)
    d = cache_dir()
    info = json.loads((d / "kernel.json").read_text())
    busybox = find_busybox()
    assert busybox is not None
    initrd = build_initramfs(busybox, d / "modules", d)
    return GuestImage(
        kernel=d / str(info["kernel"]),
        initramfs=initrd,
        pvh=bool(info["pvh"]),
        release=str(info["release"]),
    )


def main(argv: list[str] | None = None) -> int:
    """CLI: ``prepare`` the cache from an unpacked kernel, or ``check`` it."""
    parser = argparse.ArgumentParser(prog="python3 -m virtiofsd_py.testing.qemu.image")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="fill the cache from an unpacked linux-image package")
    p.add_argument("--kernel-root", type=Path, required=True)
    sub.add_parser("check", help="build the initramfs and say whether guests can run")
    args = parser.parse_args(argv)
    if args.cmd == "prepare":
        info = prepare(args.kernel_root, cache_dir())
        print(json.dumps(info))
        if not info["pvh"]:
            print(f"warning: booting bzImage, no PVH vmlinux: {info.get('vmlinux_error')}")
        return 0
    reason = unavailable_reason()
    if reason is not None:
        print(f"guests unavailable: {reason}")
        return 1
    image = load_image()
    print(f"guest image ok: {image}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
