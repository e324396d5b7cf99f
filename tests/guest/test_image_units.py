"""Unit tests of the guest harness's building blocks (no QEMU needed).

cpio ``newc`` writing, vmlinux extraction from a bzImage, kernel module
dependency resolution, each against synthetic input (the QMP client is tested
in test_harness.py).
"""

from __future__ import annotations

import gzip
import lzma
import stat
import struct
from pathlib import Path

import pytest

from virtiofsd_py.testing.qemu.initramfs import Entry, initramfs_entries, write_newc
from virtiofsd_py.testing.qemu.kmodules import ModuleTree, module_depends
from virtiofsd_py.testing.qemu.vmlinux import ExtractError, extract_vmlinux, has_pvh_note


def parse_newc(data: bytes) -> list[tuple[str, int, bytes, tuple[int, int]]]:
    """(name, mode, data, rdev) of each member, independent of the writer."""
    out: list[tuple[str, int, bytes, tuple[int, int]]] = []
    pos = 0
    while True:
        assert data[pos : pos + 6] == b"070701"
        f = [int(data[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i in range(13)]
        namesize, filesize = f[11], f[6]
        name_at = pos + 110
        name = data[name_at : name_at + namesize - 1].decode()
        assert data[name_at + namesize - 1] == 0
        body_at = (name_at + namesize + 3) // 4 * 4
        if name == "TRAILER!!!":
            return out
        out.append((name, f[1], data[body_at : body_at + filesize], (f[9], f[10])))
        pos = (body_at + filesize + 3) // 4 * 4


def test_newc_round_trip() -> None:
    entries = [
        Entry("d", stat.S_IFDIR | 0o755),
        Entry("d/odd-size", stat.S_IFREG | 0o644, b"abcde"),
        Entry("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1)),
        Entry("link", stat.S_IFLNK | 0o777, b"d/odd-size"),
    ]
    parsed = parse_newc(write_newc(entries))
    assert parsed == [(e.name, e.mode, e.data, e.rdev) for e in entries]


def test_initramfs_has_init_busybox_and_modules() -> None:
    members = {
        name: (mode, data)
        for name, mode, data, _ in parse_newc(
            write_newc(initramfs_entries(b"BUSYBOX", [("fuse", b"ELF-fuse")]))
        )
    }
    assert members["bin/busybox"] == (stat.S_IFREG | 0o755, b"BUSYBOX")
    assert stat.S_IMODE(members["init"][0]) == 0o755
    assert members["init"][1].startswith(b"#!/bin/sh\n")
    assert members["etc/modules"][1] == b"fuse\n"
    assert members["lib/modules/fuse.ko"][1] == b"ELF-fuse"
    assert stat.S_ISCHR(members["dev/console"][0])


def fake_elf(with_pvh: bool) -> bytes:
    """A minimal ELF64 with one PT_NOTE segment holding one note."""
    ntype = 18 if with_pvh else 7
    note = struct.pack("<III", 4, 4, ntype) + b"Xen\0" + b"\0\0\x00\x01"
    ehdr = bytearray(64)
    ehdr[:6] = b"\x7fELF\x02\x01"
    struct.pack_into("<Q", ehdr, 0x20, 64)  # e_phoff
    struct.pack_into("<HH", ehdr, 0x36, 56, 1)  # e_phentsize, e_phnum
    phdr = struct.pack("<IIQQQQQQ", 4, 0, 64 + 56, 0, 0, len(note), len(note), 4)
    return bytes(ehdr) + phdr + note


def fake_bzimage(payload: bytes) -> bytes:
    setup_sects = 1
    image = bytearray((setup_sects + 1) * 512)
    image[0x1F1] = setup_sects
    image[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", image, 0x206, 0x20F)
    struct.pack_into("<II", image, 0x248, 100, len(payload))
    return bytes(image) + b"\0" * 100 + payload + b"trailing garbage"


@pytest.mark.parametrize("compress", [lzma.compress, gzip.compress], ids=["xz", "gzip"])
def test_extract_vmlinux(tmp_path: Path, compress: object) -> None:
    elf = fake_elf(with_pvh=True)
    assert callable(compress)
    (tmp_path / "bz").write_bytes(fake_bzimage(compress(elf)))
    extract_vmlinux(tmp_path / "bz", tmp_path / "vmlinux")
    assert (tmp_path / "vmlinux").read_bytes() == elf


def test_extract_vmlinux_refuses_kernel_without_pvh(tmp_path: Path) -> None:
    assert not has_pvh_note(fake_elf(with_pvh=False))
    (tmp_path / "bz").write_bytes(fake_bzimage(lzma.compress(fake_elf(with_pvh=False))))
    with pytest.raises(ExtractError, match="PVH"):
        extract_vmlinux(tmp_path / "bz", tmp_path / "vmlinux")
    assert not (tmp_path / "vmlinux").exists()


def test_extract_vmlinux_refuses_non_bzimage(tmp_path: Path) -> None:
    (tmp_path / "bz").write_bytes(b"\0" * 4096)
    with pytest.raises(ExtractError, match="HdrS"):
        extract_vmlinux(tmp_path / "bz", tmp_path / "vmlinux")


def fake_module(depends: str) -> bytes:
    return b"\x7fELF junk\0license=GPL\0depends=" + depends.encode() + b"\0name=x\0"


def test_module_resolution(tmp_path: Path) -> None:
    kdir = tmp_path / "kernel" / "drivers"
    kdir.mkdir(parents=True)
    (tmp_path / "modules.builtin").write_text("kernel/drivers/virtio.ko\n")
    (kdir / "virtiofs.ko.xz").write_bytes(lzma.compress(fake_module("fuse,virtio")))
    (kdir / "fuse.ko.xz").write_bytes(lzma.compress(fake_module("")))
    (kdir / "lonely.ko").write_bytes(fake_module(""))
    assert module_depends(fake_module("a-b,c")) == ["a_b", "c"]
    tree = ModuleTree(tmp_path)
    resolved = tree.resolve(("virtiofs", "virtio", "lonely", "fuse"))
    assert [name for name, _ in resolved] == ["fuse", "virtiofs", "lonely"]
    assert resolved[0][1] == fake_module("")
    with pytest.raises(LookupError, match="missing"):
        tree.resolve(("missing",))
