"""A larger guest image with real programs: git, rsync, sqlite3, attr, python3, vfsprobe.

The base initramfs (``initramfs.py``) stays small for the guests that only
need busybox. Tests that run real programs boot a second archive: the base
archive followed by a ``newc`` archive of programs (the kernel unpacks
concatenated archives in order, Documentation/driver-api/early-userspace/
buffer-format.rst), passed to ``Guest.boot`` as ``-initrd``.

The programs come from Debian packages that ``scripts/setup-test-env.sh``
downloads and unpacks (never installs) into ``progroot`` in the cache. Each
program is shipped with the shared libraries it needs: ``DT_NEEDED`` entries
read from its ELF dynamic section, resolved in ``progroot`` first and then on
the host (same Debian release, so the host's libc and loader fit).

``vfsprobe`` (``tests/guest/guest_scripts/vfsprobe.c``) is compiled here with
``gcc -static``; it runs single syscalls that busybox has no applet for.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import struct
import subprocess
from pathlib import Path

from virtiofsd_py.testing.qemu.image import cache_dir, load_image
from virtiofsd_py.testing.qemu.initramfs import Entry, write_newc

#: The static syscall helper's source.
VFSPROBE_SOURCE = Path(__file__).resolve().parents[3] / "tests/guest/guest_scripts/vfsprobe.c"
#: Programs shipped from progroot (guest path = path in progroot), if present.
PROGRAMS = (
    "usr/bin/git",
    "usr/bin/rsync",
    "usr/bin/sqlite3",
    "usr/bin/setfattr",
    "usr/bin/getfattr",
)
#: Where libraries are looked up, in progroot and then on the host.
LIB_DIRS = ("lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu", "lib64", "usr/lib64")
GUEST_LIB_DIR = "usr/lib/x86_64-linux-gnu"
#: Users of the guest: root and an unprivileged user 1000.
PASSWD = "root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000:user:/tmp:/bin/sh\n"
GROUP = "root:x:0:\nuser:x:1000:\n"

_PT_LOAD, _PT_DYNAMIC, _PT_INTERP = 1, 2, 3
_DT_NEEDED, _DT_STRTAB = 1, 5


class ProgramsUnavailable(Exception):
    """The programs image cannot be built here; the message says why."""


def progroot() -> Path:
    """The unpacked Debian packages (filled by scripts/setup-test-env.sh)."""
    return cache_dir() / "progroot"


def elf_deps(data: bytes) -> tuple[str | None, list[str]]:
    """The program interpreter and the ``DT_NEEDED`` names of a 64-bit ELF file.

    Returns ``(None, [])`` for anything that is not a dynamically linked
    little-endian ELF64 file.
    """
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return None, []
    (phoff,) = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    loads: list[tuple[int, int, int]] = []  # (vaddr, offset, filesz)
    dynamic: tuple[int, int] | None = None
    interp: str | None = None
    for i in range(phnum):
        p_type, _flags, p_offset, p_vaddr, _paddr, p_filesz = struct.unpack_from(
            "<IIQQQQ", data, phoff + i * phentsize
        )
        if p_type == _PT_LOAD:
            loads.append((p_vaddr, p_offset, p_filesz))
        elif p_type == _PT_DYNAMIC:
            dynamic = (p_offset, p_filesz)
        elif p_type == _PT_INTERP:
            interp = data[p_offset : p_offset + p_filesz].rstrip(b"\0").decode()
    if dynamic is None:
        return interp, []
    needed: list[int] = []
    strtab_vaddr = None
    for off in range(dynamic[0], dynamic[0] + dynamic[1], 16):
        tag, val = struct.unpack_from("<qQ", data, off)
        if tag == 0:
            break
        if tag == _DT_NEEDED:
            needed.append(val)
        elif tag == _DT_STRTAB:
            strtab_vaddr = val
    if strtab_vaddr is None:
        return interp, []
    strtab = next(
        (off + strtab_vaddr - va for va, off, size in loads if va <= strtab_vaddr < va + size),
        None,
    )
    if strtab is None:
        raise ValueError("DT_STRTAB outside every PT_LOAD segment")
    names = [data[strtab + n : data.index(b"\0", strtab + n)].decode() for n in needed]
    return interp, names


def _find_lib(name: str, roots: list[Path]) -> Path:
    for root in roots:
        for d in LIB_DIRS:
            candidate = root / d / name
            if candidate.exists():
                return candidate
    raise ProgramsUnavailable(f"shared library {name} not found in {[str(r) for r in roots]}")


def library_closure(elves: list[Path], roots: list[Path]) -> tuple[set[str], dict[str, Path]]:
    """Interpreters and libraries (soname -> file) that ``elves`` need, transitively."""
    interps: set[str] = set()
    libs: dict[str, Path] = {}
    todo = list(elves)
    while todo:
        interp, needed = elf_deps(todo.pop().read_bytes())
        if interp:
            interps.add(interp)
        for name in needed:
            if name not in libs:
                libs[name] = _find_lib(name, roots)
                todo.append(libs[name])
    return interps, libs


def build_vfsprobe(cache: Path) -> Path:
    """Compile vfsprobe statically (cached by a hash of its source)."""
    source = VFSPROBE_SOURCE.read_bytes()
    out = cache / f"vfsprobe-{hashlib.sha256(source).hexdigest()[:16]}"
    if out.exists():
        return out
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        raise ProgramsUnavailable("no C compiler for vfsprobe (apt-get install gcc libc6-dev)")
    tmp = out.with_name(out.name + ".tmp")
    res = subprocess.run(
        [cc, "-static", "-O2", "-Wall", "-o", str(tmp), str(VFSPROBE_SOURCE)],
        capture_output=True,
        text=True,
        check=False,
    )
    if res.returncode != 0:
        raise ProgramsUnavailable(f"cannot build vfsprobe: {res.stderr.strip()[-2000:]}")
    tmp.replace(out)
    return out


def _dirs_of(paths: list[str]) -> list[str]:
    dirs: set[str] = set()
    for p in paths:
        parts = p.split("/")[:-1]
        dirs.update("/".join(parts[: i + 1]) for i in range(len(parts)))
    return sorted(dirs, key=lambda d: (d.count("/"), d))


def _python_entries(root: Path) -> tuple[list[Entry], list[Path]]:
    """Python's binary and stdlib from progroot, plus the ELF files among them."""
    binaries = sorted((root / "usr/bin").glob("python3.[0-9]*"))
    if not binaries:
        return [], []
    binary = binaries[-1]
    version = binary.name.removeprefix("python")
    entries = [
        Entry(f"usr/bin/{binary.name}", stat.S_IFREG | 0o755, binary.read_bytes()),
        Entry("usr/bin/python3", stat.S_IFLNK | 0o777, binary.name.encode()),
    ]
    elves = [binary]
    stdlib = root / f"usr/lib/python{version}"
    for dirpath, dirnames, filenames in os.walk(stdlib):
        dirnames[:] = sorted(d for d in dirnames if d not in ("__pycache__", "test"))
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if path.is_symlink() or not path.is_file():
                continue
            rel = str(path.relative_to(root))
            entries.append(Entry(rel, stat.S_IFREG | 0o644, path.read_bytes()))
            if name.endswith(".so"):
                elves.append(path)
    return entries, elves


def programs_entries(root: Path, vfsprobe: Path) -> list[Entry]:
    """The members of the programs archive."""
    files: list[Entry] = [
        Entry("bin/vfsprobe", stat.S_IFREG | 0o755, vfsprobe.read_bytes()),
        Entry("etc/passwd", stat.S_IFREG | 0o644, PASSWD.encode()),
        Entry("etc/group", stat.S_IFREG | 0o644, GROUP.encode()),
    ]
    elves: list[Path] = []
    for rel in PROGRAMS:
        if (root / rel).is_file():
            files.append(Entry(rel, stat.S_IFREG | 0o755, (root / rel).read_bytes()))
            elves.append(root / rel)
    templates = root / "usr/share/git-core/templates"
    for path in sorted(templates.rglob("*")) if templates.is_dir() else []:
        if path.is_file():
            mode = 0o755 if os.access(path, os.X_OK) else 0o644
            files.append(Entry(str(path.relative_to(root)), stat.S_IFREG | mode, path.read_bytes()))
    py_entries, py_elves = _python_entries(root)
    files += py_entries
    elves += py_elves
    roots = [root, Path("/")]
    interps, libs = library_closure(elves, roots)
    for name, path in sorted(libs.items()):
        files.append(Entry(f"{GUEST_LIB_DIR}/{name}", stat.S_IFREG | 0o755, path.read_bytes()))
    for interp in sorted(interps):
        found = next(
            (r / interp.lstrip("/") for r in roots if (r / interp.lstrip("/")).exists()), None
        )
        if found is None:
            raise ProgramsUnavailable(f"program interpreter {interp} not found")
        files.append(Entry(interp.lstrip("/"), stat.S_IFREG | 0o755, found.read_bytes()))
    # The loader searches /usr/lib/x86_64-linux-gnu by default: no ld.so.cache needed.
    dirs = [Entry(d, stat.S_IFDIR | 0o755) for d in _dirs_of([e.name for e in files])]
    # The guest's PATH is /bin:/sbin.
    links = [
        Entry(f"bin/{e.name.rsplit('/', 1)[1]}", stat.S_IFLNK | 0o777, f"/{e.name}".encode())
        for e in files
        if e.name.startswith("usr/bin/")
    ]
    return dirs + files + links


def programs_unavailable_reason() -> str | None:
    """Why the programs image cannot be built, or None."""
    if not (progroot() / ".packages").exists():
        return f"no guest programs in {progroot()} (run scripts/setup-test-env.sh)"
    if shutil.which("gcc") is None and shutil.which("cc") is None:
        return "no C compiler for vfsprobe (apt-get install gcc libc6-dev)"
    return None


def load_programs_initramfs() -> Path:
    """The base initramfs followed by the programs archive (built if needed)."""
    reason = programs_unavailable_reason()
    if reason is not None:
        raise ProgramsUnavailable(reason)
    cache = cache_dir()
    base = load_image().initramfs
    extra = write_newc(programs_entries(progroot(), build_vfsprobe(cache)))
    data = base.read_bytes() + extra
    out = cache / f"initramfs-programs-{hashlib.sha256(data).hexdigest()[:16]}.cpio"
    if not out.exists():
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_bytes(data)
        tmp.replace(out)
    return out
