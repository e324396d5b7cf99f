"""Build the test guest's initramfs: busybox, a few modules, and an init script.

The archive is written directly in the cpio ``newc`` format
(Linux Documentation/driver-api/early-userspace/buffer-format.rst), so device
nodes need no root privileges and no external cpio tool.

The init script mounts the pseudo file systems, loads the modules, then
serves shell commands on the virtio-serial port named ``CONTROL_PORT``. The
wire protocol (one command per line, replies framed by a per-command token,
all payloads base64 so that no output can imitate a frame) is the one that
``guest.Guest.run`` speaks.
"""

from __future__ import annotations

import hashlib
import stat
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

CONTROL_PORT = "ctl"
READY_MARK = "VIRTIOFSD-PY-GUEST-READY"

INIT_SCRIPT = f"""#!/bin/sh
export PATH=/bin:/sbin HOME=/ TZ=UTC
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs tmp /tmp
while read -r m; do
    insmod "/lib/modules/$m.ko" || echo "init: insmod $m failed" >/dev/console
done < /etc/modules
port=
for i in $(seq 100); do
    for d in /sys/class/virtio-ports/*; do
        [ "$(cat "$d/name" 2>/dev/null)" = {CONTROL_PORT} ] && port=/dev/${{d##*/}}
    done
    [ -n "$port" ] && [ -c "$port" ] && break
    sleep 0.05
done
if [ -z "$port" ]; then
    echo "init: no virtio-serial port named {CONTROL_PORT}" >/dev/console
    poweroff -f
fi
echo "init: serving commands on $port" >/dev/console
exec 3<>"$port"
echo "{READY_MARK} $(uname -r)" >&3
while read -r tok cmd <&3; do
    echo "$cmd" | base64 -d > /tmp/.cmd
    (cd / && sh /tmp/.cmd) </dev/null >/tmp/.out 2>/tmp/.err
    rc=$?
    {{ echo "$tok OUT"; base64 /tmp/.out; echo "$tok ERR"; base64 /tmp/.err; \\
       echo "$tok END $rc"; }} >&3
done
echo "init: control port closed" >/dev/console
poweroff -f
"""

_DIRS = ("bin", "sbin", "dev", "proc", "sys", "tmp", "mnt", "etc", "lib", "lib/modules", "root")
#: (path, major, minor): nodes the kernel needs before devtmpfs is mounted.
_NODES = (("dev/console", 5, 1), ("dev/null", 1, 3))


@dataclass(frozen=True)
class Entry:
    """One cpio member."""

    name: str
    mode: int
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)


def _pad4(n: int) -> bytes:
    return b"\0" * (-n % 4)


def write_newc(entries: Iterable[Entry]) -> bytes:
    """Serialize entries as a ``newc`` cpio archive with a trailer."""
    out = bytearray()
    all_entries = [*entries, Entry("TRAILER!!!", 0)]
    for ino, e in enumerate(all_entries, start=1):
        name = e.name.encode() + b"\0"
        fields = (ino, e.mode, 0, 0, 1, 0, len(e.data), 0, 0, *e.rdev, len(name), 0)
        header = b"070701" + b"".join(b"%08X" % f for f in fields)
        out += header + name + _pad4(len(header) + len(name))
        out += e.data + _pad4(len(e.data))
    return bytes(out)


def initramfs_entries(busybox: bytes, modules: list[tuple[str, bytes]]) -> list[Entry]:
    """The members of the guest initramfs."""
    entries = [Entry(d, stat.S_IFDIR | 0o755) for d in _DIRS]
    entries += [
        Entry(path, stat.S_IFCHR | 0o600, rdev=(major, minor)) for path, major, minor in _NODES
    ]
    entries.append(Entry("bin/busybox", stat.S_IFREG | 0o755, busybox))
    entries.append(Entry("bin/sh", stat.S_IFLNK | 0o777, b"busybox"))
    entries.append(Entry("init", stat.S_IFREG | 0o755, INIT_SCRIPT.encode()))
    order = "".join(f"{name}\n" for name, _ in modules)
    entries.append(Entry("etc/modules", stat.S_IFREG | 0o644, order.encode()))
    entries += [Entry(f"lib/modules/{name}.ko", stat.S_IFREG | 0o644, elf) for name, elf in modules]
    return entries


def find_busybox() -> Path | None:
    """A statically linked busybox (Debian's busybox-static), if installed."""
    for candidate in ("/bin/busybox", "/usr/bin/busybox"):
        p = Path(candidate)
        if p.exists() and not _is_dynamic(p):
            return p
    return None


def _is_dynamic(path: Path) -> bool:
    """Whether an ELF file names a program interpreter (PT_INTERP = 3)."""
    data = path.read_bytes()[:4096]
    if data[:4] != b"\x7fELF" or data[4] != 2:
        return True
    (phoff,) = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    for i in range(phnum):
        off = phoff + i * phentsize
        if off + 4 <= len(data) and struct.unpack_from("<I", data, off)[0] == 3:
            return True
    return False


def build_initramfs(busybox: Path, moddir: Path | None, cache: Path) -> Path:
    """Build (or reuse) the initramfs for the given inputs; return its path.

    ``moddir`` holds decompressed ``NAME.ko`` files and a ``load-order``
    file. The archive's name carries a hash of its content, so a changed init
    script or module set never reuses a stale archive.
    """
    modules: list[tuple[str, bytes]] = []
    if moddir is not None and (moddir / "load-order").exists():
        for name in (moddir / "load-order").read_text().split():
            modules.append((name, (moddir / f"{name}.ko").read_bytes()))
    data = write_newc(initramfs_entries(busybox.read_bytes(), modules))
    digest = hashlib.sha256(data).hexdigest()[:16]
    out = cache / f"initramfs-{digest}.cpio"
    if not out.exists():
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_bytes(data)
        tmp.replace(out)
    return out
