"""Unit tests of the programs image builder (no QEMU): ELF dependencies, closure, members."""

from __future__ import annotations

import stat
import struct
from pathlib import Path

import pytest

from virtiofsd_py.testing.qemu.progimage import (
    ProgramsUnavailable,
    elf_deps,
    library_closure,
    programs_entries,
)

LIBDIR = "usr/lib/x86_64-linux-gnu"


def make_elf(needed: list[str], interp: str | None = None) -> bytes:
    """A minimal little-endian ELF64 with PT_LOAD, PT_DYNAMIC and maybe PT_INTERP.

    The string table sits at a virtual address different from its file
    offset, so that a parser that skips the PT_LOAD translation fails.
    """
    strtab = b"\0"
    offsets = []
    for name in needed:
        offsets.append(len(strtab))
        strtab += name.encode() + b"\0"
    phnum = 3 if interp else 2
    ph_off = 64
    interp_off = ph_off + 56 * phnum
    interp_bytes = (interp.encode() + b"\0") if interp else b""
    str_off = interp_off + len(interp_bytes)
    dyn_off = str_off + len(strtab)
    dyn = b"".join(struct.pack("<qQ", 1, o) for o in offsets)
    vaddr_base = 0x400000
    dyn += struct.pack("<qQ", 5, vaddr_base + str_off) + struct.pack("<qQ", 0, 0)
    total = dyn_off + len(dyn)
    header = b"\x7fELF" + bytes([2, 1, 1]) + b"\0" * 9
    header += struct.pack("<HHIQQQIHHHHHH", 3, 62, 1, 0, ph_off, 0, 0, 64, 56, phnum, 64, 0, 0)
    phdrs = struct.pack("<IIQQQQQQ", 1, 5, 0, vaddr_base, vaddr_base, total, total, 0x1000)
    phdrs += struct.pack("<IIQQQQQQ", 2, 6, dyn_off, 0, 0, len(dyn), len(dyn), 8)
    if interp:
        n = len(interp_bytes)
        phdrs += struct.pack("<IIQQQQQQ", 3, 4, interp_off, 0, 0, n, n, 1)
    return header + phdrs + interp_bytes + strtab + dyn


def test_elf_deps_reads_interpreter_and_needed() -> None:
    elf = make_elf(["libfoo.so.1", "libc.so.6"], "/lib64/ld-linux-x86-64.so.2")
    assert elf_deps(elf) == ("/lib64/ld-linux-x86-64.so.2", ["libfoo.so.1", "libc.so.6"])


def test_elf_deps_of_static_and_non_elf() -> None:
    assert elf_deps(make_elf([])) == (None, [])
    assert elf_deps(b"#!/bin/sh\n") == (None, [])


def test_elf_deps_of_a_real_program() -> None:
    interp, needed = elf_deps(Path("/bin/ls").read_bytes())
    if interp is None:
        pytest.skip("/bin/ls is static here")
    assert "libc.so.6" in needed


def _put(root: Path, rel: str, data: bytes) -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_library_closure_is_transitive_and_prefers_the_first_root(tmp_path: Path) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    prog = _put(first, "usr/bin/prog", make_elf(["liba.so"], "/lib64/ld.so"))
    _put(first, f"{LIBDIR}/liba.so", make_elf(["libb.so"]))
    _put(second, f"{LIBDIR}/liba.so", make_elf([]))
    _put(second, "lib/x86_64-linux-gnu/libb.so", make_elf([]))
    interps, libs = library_closure([prog], [first, second])
    assert interps == {"/lib64/ld.so"}
    assert libs == {
        "liba.so": first / LIBDIR / "liba.so",
        "libb.so": second / "lib/x86_64-linux-gnu/libb.so",
    }


def test_missing_library_says_which(tmp_path: Path) -> None:
    prog = _put(tmp_path, "usr/bin/prog", make_elf(["libmissing.so.9"]))
    with pytest.raises(ProgramsUnavailable, match=r"libmissing\.so\.9"):
        library_closure([prog], [tmp_path])


def test_programs_entries(tmp_path: Path) -> None:
    root = tmp_path / "root"
    _put(root, "usr/bin/git", make_elf(["libz.so.1"], "/lib64/ld-fake.so"))
    _put(root, f"{LIBDIR}/libz.so.1", make_elf([]))
    _put(root, "lib64/ld-fake.so", b"loader")
    _put(root, "usr/bin/python3.99", make_elf([]))
    _put(root, "usr/lib/python3.99/os.py", b"# os\n")
    _put(root, "usr/lib/python3.99/__pycache__/os.pyc", b"skip me")
    probe = _put(tmp_path, "vfsprobe", b"static probe")
    entries = programs_entries(root, probe)
    names = {e.name: e for e in entries}
    assert names["bin/vfsprobe"].data == b"static probe"
    assert names["usr/bin/git"].mode == stat.S_IFREG | 0o755
    assert names[f"{LIBDIR}/libz.so.1"].data == (root / LIBDIR / "libz.so.1").read_bytes()
    assert names["bin/git"].mode == stat.S_IFLNK | 0o777
    assert names["bin/git"].data == b"/usr/bin/git"
    assert names["usr/bin/python3"].data == b"python3.99"
    assert "usr/lib/python3.99/os.py" in names
    assert not any("__pycache__" in n for n in names)
    assert names["lib64/ld-fake.so"].data == b"loader"
    assert ":1000:1000:" in names["etc/passwd"].data.decode()
    # Directories come before anything inside them.
    order = [e.name for e in entries]
    for i, e in enumerate(entries):
        if "/" in e.name:
            assert order.index(e.name.rsplit("/", 1)[0]) < i, e.name
