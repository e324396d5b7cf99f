"""Pick the kernel modules a test guest needs out of an unpacked kernel package.

Debian's linux-image package ships no modules.dep (depmod runs at install
time), so dependencies are read from each module's own ``.modinfo`` section
(``depends=a,b``). Modules that ``modules.builtin`` lists are part of the
kernel and skipped. Compressed modules (``.ko.xz``/``.ko.zst``/``.ko.gz``)
are decompressed here because busybox insmod may not understand them.
"""

from __future__ import annotations

import gzip
import lzma
import re
import subprocess
from pathlib import Path

#: What a virtio-fs test guest needs: PCI transport, console ports, FUSE.
WANTED = (
    "virtio",
    "virtio_ring",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
    "virtio_console",
    "fuse",
    "virtiofs",
)

_DEPENDS = re.compile(rb"(?:^|\0)depends=([^\0]*)\0")


def _norm(name: str) -> str:
    return name.replace("-", "_")


def _mod_name(path: Path) -> str:
    return _norm(path.name.split(".ko", 1)[0])


def read_module(path: Path) -> bytes:
    """Return the ELF bytes of a possibly compressed ``.ko`` file."""
    data = path.read_bytes()
    if path.name.endswith(".ko.xz"):
        return lzma.decompress(data)
    if path.name.endswith(".ko.gz"):
        return gzip.decompress(data)
    if path.name.endswith(".ko.zst"):
        return subprocess.run(["zstd", "-dcq"], input=data, capture_output=True, check=True).stdout
    return data


def module_depends(elf: bytes) -> list[str]:
    """The ``depends=`` list from a module's modinfo strings."""
    m = _DEPENDS.search(elf)
    if m is None or not m.group(1):
        return []
    return [_norm(d) for d in m.group(1).decode().split(",") if d]


class ModuleTree:
    """The modules of one kernel release inside an unpacked package root."""

    def __init__(self, moddir: Path) -> None:
        self.moddir = moddir
        builtin = moddir / "modules.builtin"
        lines = builtin.read_text().split() if builtin.exists() else []
        self.builtin = {_mod_name(Path(line)) for line in lines}
        self.files = {_mod_name(p): p for p in moddir.rglob("*.ko*")}

    def resolve(self, wanted: tuple[str, ...] = WANTED) -> list[tuple[str, bytes]]:
        """Loadable modules for ``wanted`` plus dependencies, dependencies first.

        Raises LookupError for a module that is neither built in nor present.
        """
        order: list[tuple[str, bytes]] = []
        seen: set[str] = set()

        def visit(name: str) -> None:
            name = _norm(name)
            if name in seen or name in self.builtin:
                return
            seen.add(name)
            path = self.files.get(name)
            if path is None:
                raise LookupError(f"kernel module {name!r} is neither built in nor shipped")
            elf = read_module(path)
            for dep in module_depends(elf):
                visit(dep)
            order.append((name, elf))

        for name in wanted:
            visit(name)
        return order
