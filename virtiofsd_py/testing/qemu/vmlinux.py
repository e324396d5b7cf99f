"""Extract the uncompressed ELF ``vmlinux`` from an x86 ``bzImage``.

QEMU boots an ELF vmlinux that carries a PVH entry note directly with
``-kernel``; that skips the kernel's self-decompression, which is slow under
TCG. The compressed payload is located through the x86 boot protocol header
(Linux Documentation/arch/x86/boot.rst: ``setup_sects`` at 0x1f1, ``HdrS`` at
0x202, ``payload_offset``/``payload_length`` at 0x248/0x24c, protocol >= 2.08)
and decompressed with the codec named by its magic bytes.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import shutil
import struct
import subprocess
from pathlib import Path

ELF_MAGIC = b"\x7fELF"
PT_NOTE = 4
#: Xen ELF note type giving the 32-bit PVH entry point (xen/include/public/elfnote.h).
XEN_ELFNOTE_PHYS32_ENTRY = 18


class ExtractError(Exception):
    """The image is not a bzImage we can unpack."""


def _payload(image: bytes) -> bytes:
    if len(image) < 0x250 or image[0x202:0x206] != b"HdrS":
        raise ExtractError("no x86 boot protocol header (HdrS)")
    (version,) = struct.unpack_from("<H", image, 0x206)
    if version < 0x208:
        raise ExtractError(f"boot protocol {version:#x} has no payload fields")
    setup_sects = image[0x1F1] or 4
    offset, length = struct.unpack_from("<II", image, 0x248)
    start = (setup_sects + 1) * 512 + offset
    if start + length > len(image):
        raise ExtractError("payload runs past the end of the image")
    return image[start : start + length]


def _decompress_cli(argv: list[str], data: bytes) -> bytes:
    if shutil.which(argv[0]) is None:
        raise ExtractError(f"payload needs the {argv[0]!r} tool, which is not installed")
    proc = subprocess.run(argv, input=data, capture_output=True, check=False)
    # Like extract-vmlinux, trailing bytes after the stream may make the tool
    # complain; the result is judged by its ELF header instead.
    return proc.stdout


def decompress(payload: bytes) -> bytes:
    """Decompress a kernel payload, choosing the codec by its magic bytes."""
    if payload.startswith(b"\x28\xb5\x2f\xfd"):
        return _decompress_cli(["zstd", "-dcq"], payload)
    if payload.startswith(b"\xfd7zXZ\x00"):
        return lzma.LZMADecompressor(lzma.FORMAT_XZ).decompress(payload)
    if payload.startswith(b"\x5d\x00\x00"):
        return lzma.LZMADecompressor(lzma.FORMAT_ALONE).decompress(payload)
    if payload.startswith(b"\x1f\x8b"):
        return gzip.decompress(payload)
    if payload.startswith(b"BZh"):
        return bz2.decompress(payload)
    if payload.startswith(b"\x02\x21\x4c\x18"):
        return _decompress_cli(["lz4", "-dcq"], payload)
    if payload.startswith(b"\x89LZO"):
        return _decompress_cli(["lzop", "-dcq"], payload)
    if payload.startswith(ELF_MAGIC):
        return payload
    raise ExtractError(f"unknown payload compression (magic {payload[:4].hex()})")


def has_pvh_note(elf: bytes) -> bool:
    """Whether a 64-bit little-endian ELF has a Xen PHYS32_ENTRY (PVH) note."""
    if not elf.startswith(ELF_MAGIC) or elf[4] != 2 or elf[5] != 1:
        return False
    (phoff,) = struct.unpack_from("<Q", elf, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    for i in range(phnum):
        p_type, _flags, p_offset, _va, _pa, p_filesz = struct.unpack_from(
            "<IIQQQQ", elf, phoff + i * phentsize
        )
        if p_type != PT_NOTE:
            continue
        pos, end = p_offset, p_offset + p_filesz
        while pos + 12 <= end:
            namesz, descsz, ntype = struct.unpack_from("<III", elf, pos)
            name = elf[pos + 12 : pos + 12 + namesz].rstrip(b"\0")
            if name == b"Xen" and ntype == XEN_ELFNOTE_PHYS32_ENTRY:
                return True
            pos += 12 + (namesz + 3) // 4 * 4 + (descsz + 3) // 4 * 4
    return False


def extract_vmlinux(bzimage: Path, out: Path) -> None:
    """Write the PVH-bootable ELF inside ``bzimage`` to ``out``.

    Raises ExtractError when the image cannot be unpacked or the result is
    not an ELF with a PVH note (callers then boot the bzImage instead).
    """
    elf = decompress(_payload(bzimage.read_bytes()))
    if not elf.startswith(ELF_MAGIC):
        raise ExtractError("decompressed payload is not an ELF file")
    if not has_pvh_note(elf):
        raise ExtractError("vmlinux has no PVH entry note (kernel built without CONFIG_PVH)")
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_bytes(elf)
    tmp.replace(out)
