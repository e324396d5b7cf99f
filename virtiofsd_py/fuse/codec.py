"""Sans-IO FUSE codec: request bytes -> values, values -> reply bytes.

No I/O and no session state here: only the layouts of
``include/uapi/linux/fuse.h`` (see ``abi``) applied to the buffers of one
descriptor chain (see ``iov``).  The dispatcher strings these together.

Replies are packed straight into the guest's writable buffers with
``struct.pack_into`` when the bytes lie within one buffer, and packed into a
temporary and scattered only when they straddle a buffer boundary.
"""

from __future__ import annotations

import functools
import os
import struct
from collections.abc import Sequence
from typing import Final, NamedTuple

from virtiofsd_py.fs.api import AttrReply, Entry, Opened
from virtiofsd_py.fuse import abi, iov
from virtiofsd_py.fuse.iov import Buffer, Buffers

_U32: Final = 0xFFFF_FFFF
_U64: Final = 0xFFFF_FFFF_FFFF_FFFF
_NS: Final = 1_000_000_000

IN_HEADER_SIZE: Final = abi.IN_HEADER.size
OUT_HEADER_SIZE: Final = abi.OUT_HEADER.size


class Malformed(ValueError):
    """The request violates the FUSE ABI; the message says how (for the log)."""


# -- request side --------------------------------------------------------------


def parse_in_header(readable: Buffers) -> tuple[int, int, int, int, int, int, int, int, int]:
    """Unpack ``fuse_in_header`` from the start of the chain.

    Raises ``Malformed`` if the chain holds fewer than 40 bytes.
    """
    first = readable[0] if readable else b""
    if len(first) >= IN_HEADER_SIZE:
        return abi.IN_HEADER.unpack_from(first)
    if iov.total_len(readable) < IN_HEADER_SIZE:
        raise Malformed("request shorter than fuse_in_header")
    return abi.IN_HEADER.unpack_from(iov.view(readable, 0, IN_HEADER_SIZE))


class Extensions(NamedTuple):
    """What the request extensions carried (fuse.h 7.38, ``fuse_ext_header``)."""

    #: Supplementary groups of the caller (``FUSE_EXT_GROUPS``), else empty.
    groups: tuple[int, ...] = ()
    #: (xattr name, value) of the first security context (types 0..31), else None.
    secctx: tuple[bytes, bytes] | None = None


NO_EXTENSIONS: Final = Extensions()


def parse_extensions(ext: memoryview) -> Extensions:
    """Walk the request extensions (fuse.h 7.38, ``fuse_ext_header``).

    Returns the supplementary groups of a ``FUSE_EXT_GROUPS`` extension and
    the security context of a ``fuse_secctx_header`` (whose ``nr_secctx`` is
    the extension type, 0..31).  Unknown types are skipped; no extension
    ever reaches the operation's arguments.
    """
    groups: tuple[int, ...] = ()
    secctx: tuple[bytes, bytes] | None = None
    pos = 0
    end = len(ext)
    hdr = abi.EXT_HEADER
    while pos < end:
        if end - pos < hdr.size:
            raise Malformed("truncated extension header")
        size, etype = hdr.unpack_from(ext, pos)
        if size < hdr.size or size > end - pos:
            raise Malformed(f"extension size {size} out of bounds")
        body = pos + hdr.size
        if etype == abi.FUSE_EXT_GROUPS:
            if size - hdr.size < abi.SUPP_GROUPS.size:
                raise Malformed("truncated supplementary groups extension")
            (nr,) = abi.SUPP_GROUPS.unpack_from(ext, body)
            if nr > (size - hdr.size - abi.SUPP_GROUPS.size) // 4:
                raise Malformed(f"supplementary groups count {nr} exceeds extension")
            groups = struct.unpack_from(f"<{nr}I", ext, body + abi.SUPP_GROUPS.size)
        elif etype <= abi.FUSE_MAX_NR_SECCTX:
            secctx = parse_secctx(ext[body : pos + size], etype)
        pos += (size + 7) & ~7
    return Extensions(groups, secctx)


def parse_secctx(body: memoryview, nr: int) -> tuple[bytes, bytes] | None:
    """The first of ``nr`` security contexts in ``body`` (after ``fuse_secctx_header``).

    Each is ``fuse_secctx`` (u32 size, u32 padding), a NUL-terminated xattr
    name, then ``size`` bytes of context (Linux fs/fuse/dir.c lays them out
    so; today it sends at most one).  Zero contexts means no LSM labels nodes.
    """
    first: tuple[bytes, bytes] | None = None
    pos = 0
    data = bytes(body)
    for _ in range(nr):
        if len(data) - pos < abi.SECCTX.size:
            raise Malformed("truncated fuse_secctx")
        (ctxlen, _) = abi.SECCTX.unpack_from(data, pos)
        pos += abi.SECCTX.size
        nul = data.find(b"\0", pos)
        if nul <= pos:
            raise Malformed("security context name missing or not NUL-terminated")
        name = data[pos:nul]
        pos = nul + 1
        if ctxlen == 0 or ctxlen > len(data) - pos:
            raise Malformed(f"security context size {ctxlen} out of bounds")
        if first is None:
            first = (name, data[pos : pos + ctxlen])
        pos += ctxlen
    return first


def parse_name(args: memoryview, off: int = 0) -> tuple[bytes, int]:
    """A NUL-terminated path component at ``off``; returns (name, offset after NUL).

    Rejects names without a terminator, empty names and names containing '/'
    (a component, never a path: the guest kernel resolves paths itself).
    """
    data = bytes(args[off:])
    nul = data.find(b"\0")
    if nul < 0:
        raise Malformed("name is not NUL-terminated")
    name = data[:nul]
    if not name:
        raise Malformed("empty name")
    if b"/" in name:
        raise Malformed("name contains '/'")
    return name, off + nul + 1


def parse_two_names(args: memoryview, off: int = 0) -> tuple[bytes, bytes, int]:
    """Two NUL-terminated path components in a row (RENAME, RENAME2)."""
    first, off = parse_name(args, off)
    second, off = parse_name(args, off)
    return first, second, off


def parse_cstring(args: memoryview, off: int = 0) -> tuple[bytes, int]:
    """Any NUL-terminated byte string (a symlink target, TMPFILE's "/" name)."""
    data = bytes(args[off:])
    nul = data.find(b"\0")
    if nul < 0:
        raise Malformed("string is not NUL-terminated")
    return data[:nul], off + nul + 1


def parse_xattr_name(args: memoryview, off: int = 0) -> tuple[bytes, int]:
    """A NUL-terminated xattr name (may contain '/', must not be empty)."""
    data = bytes(args[off:])
    nul = data.find(b"\0")
    if nul < 0:
        raise Malformed("xattr name is not NUL-terminated")
    if nul == 0:
        raise Malformed("empty xattr name")
    return data[:nul], off + nul + 1


# -- reply values --------------------------------------------------------------


@functools.lru_cache(maxsize=64)  # a backend uses a handful of timeouts, on every reply
def timeout_split(seconds: float) -> tuple[int, int]:
    """Float seconds -> (sec, nsec) for entry_valid/attr_valid; clamped to >= 0."""
    if not seconds > 0.0:  # also catches NaN
        return 0, 0
    if seconds >= 2.0**64:
        return _U64, 0
    sec = int(seconds)
    nsec = int((seconds - sec) * _NS)
    return sec, min(nsec, _NS - 1)


def statx_values(f: dict[str, int]) -> tuple[int, ...]:
    """``StatxReply.fields`` -> the ``fuse_statx`` fields in ``abi.STATX_FIELDS`` order.

    Missing names are 0; each value is wrapped to its field's width and sign.
    """
    get = f.get
    out = []
    for name, mask, sign in _STATX_CONV:
        v = get(name, 0) & mask
        out.append(v - (sign << 1) if v & sign else v)
    return tuple(out)


#: struct code -> (mask, sign bit or 0 for unsigned)
_CONV: Final = {
    "H": (0xFFFF, 0), "I": (_U32, 0), "Q": (_U64, 0), "i": (_U32, 1 << 31), "q": (_U64, 1 << 63),
}  # fmt: skip
_STATX_CONV: Final = tuple(
    (name, *_CONV[code])
    for name, code in zip(
        abi.STATX_FIELDS, abi.STATX.format.lstrip("<").replace("14Q", "Q" * 14), strict=True
    )
)


def statfs_values(sv: os.statvfs_result) -> tuple[int, ...]:
    """``os.statvfs_result`` -> ``fuse_kstatfs`` fields (spare words zero)."""
    return (
        sv.f_blocks & _U64,
        sv.f_bfree & _U64,
        sv.f_bavail & _U64,
        sv.f_files & _U64,
        sv.f_ffree & _U64,
        sv.f_bsize & _U32,
        sv.f_namemax & _U32,
        sv.f_frsize & _U32,
        0,
        0, 0, 0, 0, 0, 0,
    )  # fmt: skip


# -- reply writing -------------------------------------------------------------


class ReplyTooLarge(Exception):
    """The writable buffers cannot hold the reply."""


def _with_header(body: struct.Struct) -> struct.Struct:
    return struct.Struct(abi.OUT_HEADER.format + body.format.lstrip("<"))


#: Per body struct, the same struct prefixed with fuse_out_header: one
#: ``pack_into`` writes a whole reply when the first writable buffer holds it.
_HEADED: dict[struct.Struct, struct.Struct] = {}


def headed(body: struct.Struct) -> struct.Struct:
    """``fuse_out_header`` + ``body`` as one struct (cached)."""
    s = _HEADED.get(body)
    if s is None:
        s = _HEADED[body] = _with_header(body)
    return s


def write_header(writable: Buffers, unique: int, error: int, length: int) -> None:
    """Write ``fuse_out_header`` at the start of the chain."""
    first = writable[0] if writable else b""
    if len(first) >= OUT_HEADER_SIZE:
        abi.OUT_HEADER.pack_into(first, 0, length, error, unique)
    else:
        iov.scatter(writable, 0, abi.OUT_HEADER.pack(length, error, unique))


def write_error(writable: Buffers, unique: int, errno_: int) -> int:
    """An error reply (header only, ``error = -errno``); 0 if not even that fits."""
    if iov.total_len(writable) < OUT_HEADER_SIZE:
        raise ReplyTooLarge("no room for fuse_out_header")
    write_header(writable, unique, -errno_, OUT_HEADER_SIZE)
    return OUT_HEADER_SIZE


def body_place(writable: Buffers, size: int) -> tuple[Buffer, int] | None:
    """(buffer, offset) where a ``size``-byte reply body goes, if in one buffer.

    The layouts Linux produces: header and body in the first buffer, or the
    16-byte header alone and the body at the start of the second.  None
    when the body would straddle a boundary (the caller then scatters).
    """
    if not writable:
        return None
    first = writable[0]
    n = len(first)
    if n >= OUT_HEADER_SIZE + size:
        return first, OUT_HEADER_SIZE
    if n == OUT_HEADER_SIZE and len(writable) > 1 and len(writable[1]) >= size:
        return writable[1], 0
    return None


def write_struct(writable: Buffers, unique: int, body: struct.Struct, *values: int) -> int:
    """A success reply whose body is one struct; returns the reply length."""
    total = OUT_HEADER_SIZE + body.size
    first = writable[0] if writable else b""
    nfirst = len(first)
    if nfirst >= total:
        headed(body).pack_into(first, 0, total, 0, unique, *values)
        return total
    if nfirst == OUT_HEADER_SIZE and len(writable) > 1 and len(writable[1]) >= body.size:
        body.pack_into(writable[1], 0, *values)
        abi.OUT_HEADER.pack_into(first, 0, total, 0, unique)
        return total
    if iov.total_len(writable) < total:
        raise ReplyTooLarge(f"reply needs {total} bytes")
    write_header(writable, unique, 0, total)
    win = iov.window(writable, OUT_HEADER_SIZE, body.size)
    if win is not None:
        body.pack_into(win, 0, *values)
    else:
        iov.scatter(writable, OUT_HEADER_SIZE, body.pack(*values))
    return total


_ATTR_SUBMOUNT: Final = abi.FUSE_ATTR_SUBMOUNT


def pack_attr(buf: Buffer, off: int, st: os.stat_result, submount: bool) -> None:
    """``fuse_attr`` from ``st`` at ``off``: the one place a stat becomes one.

    Times are split with ``//`` and ``%`` (floor division, so a time before
    the epoch gets a negative second and a nanosecond in 0..999999999) and
    the seconds wrapped to the u64 of the wire (s64 to the kernel).  ``rdev``
    keeps the low 32 bits of the host dev_t: glibc's encoding there is the
    kernel's ``new_encode_dev``, which is what fuse_attr.rdev carries.
    GETATTR, LOOKUP and READDIRPLUS replies are the commonest: the fields go
    straight from the stat result into the buffer, no tuple in between.
    """
    a = st.st_atime_ns
    m = st.st_mtime_ns
    c = st.st_ctime_ns
    nlink = st.st_nlink
    abi.ATTR.pack_into(
        buf, off,
        st.st_ino & _U64, st.st_size & _U64, st.st_blocks & _U64,
        (a // _NS) & _U64, (m // _NS) & _U64, (c // _NS) & _U64, a % _NS, m % _NS, c % _NS,
        st.st_mode & _U32, nlink if nlink < _U32 else _U32, st.st_uid & _U32, st.st_gid & _U32,
        st.st_rdev & _U32, st.st_blksize & _U32, _ATTR_SUBMOUNT if submount else 0,
    )  # fmt: skip


_ATTR_OUT_HEAD: Final = struct.Struct("<QII")  # attr_valid, attr_valid_nsec, dummy
_ENTRY_OUT_HEAD: Final = struct.Struct("<QQQQII")  # nodeid ... attr_valid_nsec
_ATTR_OUT_SIZE: Final = abi.ATTR_OUT.size
_ENTRY_OUT_SIZE: Final = abi.ENTRY_OUT.size
#: CREATE / TMPFILE reply body: fuse_entry_out then fuse_open_out.
_CREATE_OUT_SIZE: Final = _ENTRY_OUT_SIZE + abi.OPEN_OUT.size
_ATTR_OUT_TOTAL: Final = OUT_HEADER_SIZE + _ATTR_OUT_SIZE
_ENTRY_OUT_TOTAL: Final = OUT_HEADER_SIZE + _ENTRY_OUT_SIZE
_CREATE_OUT_TOTAL: Final = OUT_HEADER_SIZE + _CREATE_OUT_SIZE

# The reply writers below pack the body where ``body_place`` finds it, or,
# when it would straddle a buffer boundary, into a temporary that
# ``write_bytes`` then scatters: one packing code for both layouts.


def write_attr_out(writable: Buffers, unique: int, reply: AttrReply) -> int:
    """A ``fuse_attr_out`` reply (GETATTR, SETATTR)."""
    place = body_place(writable, _ATTR_OUT_SIZE)
    buf, off = place if place is not None else (bytearray(_ATTR_OUT_SIZE), 0)
    sec, nsec = timeout_split(reply.timeout)
    _ATTR_OUT_HEAD.pack_into(buf, off, sec, nsec, 0)
    pack_attr(buf, off + _ATTR_OUT_HEAD.size, reply.attr, reply.submount)
    if place is None:
        return write_bytes(writable, unique, buf)
    abi.OUT_HEADER.pack_into(writable[0], 0, _ATTR_OUT_TOTAL, 0, unique)
    return _ATTR_OUT_TOTAL


def write_entry_out(writable: Buffers, unique: int, entry: Entry) -> int:
    """A ``fuse_entry_out`` reply (LOOKUP, MKNOD, MKDIR, SYMLINK, LINK)."""
    place = body_place(writable, _ENTRY_OUT_SIZE)
    buf, off = place if place is not None else (bytearray(_ENTRY_OUT_SIZE), 0)
    _pack_entry(buf, off, entry)
    if place is None:
        return write_bytes(writable, unique, buf)
    abi.OUT_HEADER.pack_into(writable[0], 0, _ENTRY_OUT_TOTAL, 0, unique)
    return _ENTRY_OUT_TOTAL


def open_flags(opened: Opened) -> int:
    """``fuse_open_out.open_flags`` (FOPEN_*) of an ``Opened``."""
    return (
        (abi.FOPEN_DIRECT_IO if opened.direct_io else 0)
        | (abi.FOPEN_KEEP_CACHE if opened.keep_cache else 0)
        | (abi.FOPEN_CACHE_DIR if opened.cache_dir else 0)
    )


def write_open_out(writable: Buffers, unique: int, opened: Opened) -> int:
    """A ``fuse_open_out`` reply (OPEN, OPENDIR)."""
    return write_struct(writable, unique, abi.OPEN_OUT, opened.fh, open_flags(opened), 0)


def write_create_out(writable: Buffers, unique: int, entry: Entry, opened: Opened) -> int:
    """A CREATE / TMPFILE reply: ``fuse_entry_out`` then ``fuse_open_out``."""
    place = body_place(writable, _CREATE_OUT_SIZE)
    buf, off = place if place is not None else (bytearray(_CREATE_OUT_SIZE), 0)
    _pack_entry(buf, off, entry)
    abi.OPEN_OUT.pack_into(buf, off + _ENTRY_OUT_SIZE, opened.fh, open_flags(opened), 0)
    if place is None:
        return write_bytes(writable, unique, buf)
    abi.OUT_HEADER.pack_into(writable[0], 0, _CREATE_OUT_TOTAL, 0, unique)
    return _CREATE_OUT_TOTAL


def _pack_entry(buf: Buffer, off: int, entry: Entry) -> None:
    """``fuse_entry_out`` from ``entry`` at ``off``."""
    esec, ensec = timeout_split(entry.entry_timeout)
    asec, ansec = timeout_split(entry.attr_timeout)
    _ENTRY_OUT_HEAD.pack_into(
        buf, off, entry.nodeid & _U64, entry.generation & _U64, esec, asec, ensec, ansec
    )
    pack_attr(buf, off + _ENTRY_OUT_HEAD.size, entry.attr, entry.submount)


def write_struct_bytes(
    writable: Buffers, unique: int, body: struct.Struct, values: Sequence[int], data: bytes
) -> int:
    """A success reply of one struct followed by raw bytes (IOCTL's out data)."""
    total = OUT_HEADER_SIZE + body.size + len(data)
    if iov.total_len(writable) < total:
        raise ReplyTooLarge(f"reply needs {total} bytes")
    write_header(writable, unique, 0, total)
    iov.scatter(writable, OUT_HEADER_SIZE, body.pack(*values) + data)
    return total


def write_bytes(writable: Buffers, unique: int, data: Buffer) -> int:
    """A success reply whose body is raw bytes (READLINK, GETXATTR, ...)."""
    total = OUT_HEADER_SIZE + len(data)
    if iov.total_len(writable) < total:
        raise ReplyTooLarge(f"reply needs {total} bytes")
    write_header(writable, unique, 0, total)
    iov.scatter(writable, OUT_HEADER_SIZE, data)
    return total


def write_empty(writable: Buffers, unique: int) -> int:
    """A success reply with no body."""
    if writable and len(writable[0]) >= OUT_HEADER_SIZE:  # the usual layout
        abi.OUT_HEADER.pack_into(writable[0], 0, OUT_HEADER_SIZE, 0, unique)
        return OUT_HEADER_SIZE
    if iov.total_len(writable) < OUT_HEADER_SIZE:
        raise ReplyTooLarge("no room for fuse_out_header")
    write_header(writable, unique, 0, OUT_HEADER_SIZE)
    return OUT_HEADER_SIZE


# -- directory records -----------------------------------------------------------

_DIRENT = abi.DIRENT
_DIRENTPLUS = abi.DIRENTPLUS
_PAD: Final = bytes(8)


def pack_dirent(buf: memoryview, pos: int, ino: int, off: int, dtype: int, name: bytes) -> int:
    """Write one ``fuse_dirent`` (with zeroed padding) at ``pos``; return its size.

    The caller has checked that ``abi.dirent_size(len(name))`` bytes fit.
    """
    n = len(name)
    _DIRENT.pack_into(buf, pos, ino & _U64, off & _U64, n, dtype & _U32)
    p = pos + _DIRENT.size
    buf[p : p + n] = name
    size = abi.dirent_size(n)
    end = pos + size
    buf[p + n : end] = _PAD[: end - p - n]
    return size


def pack_direntplus(
    buf: memoryview, pos: int, entry: Entry | None, ino: int, off: int, dtype: int, name: bytes
) -> int:
    """Write one ``fuse_direntplus`` (entry_out, zeroed for no ``entry``, then the
    dirent and padded name) at ``pos``; return its size."""
    if entry is None:
        buf[pos : pos + _ENTRY_OUT_SIZE] = bytes(_ENTRY_OUT_SIZE)
    else:
        _pack_entry(buf, pos, entry)
    return _ENTRY_OUT_SIZE + pack_dirent(buf, pos + _ENTRY_OUT_SIZE, ino, off, dtype, name)


# Whole records in one ``pack_into``: a ``{n}s`` field writes the name and
# zero-fills its padding.  One Struct per name length up to NAME_MAX; longer
# names (never from a Linux host) take the functions above.  A READDIRPLUS
# record leaves fuse_attr as pad bytes (zeros), filled in by ``pack_attr``.
_NAME_MAX: Final = 255
_DIRENT_FMT: Final = abi.DIRENT.format.lstrip("<")
_ENTRY_OUT_HEAD_FMT: Final = _ENTRY_OUT_HEAD.format.lstrip("<")
_ATTR_AT: Final = _ENTRY_OUT_HEAD.size  # fuse_attr's offset in fuse_entry_out
_DIRENT_BY_LEN: Final = tuple(
    struct.Struct(f"<{_DIRENT_FMT}{abi.dirent_size(n) - _DIRENT.size}s")
    for n in range(_NAME_MAX + 1)
)
_DIRENTPLUS_BY_LEN: Final = tuple(
    struct.Struct(
        f"<{_ENTRY_OUT_HEAD_FMT}{abi.ATTR.size}x{_DIRENT_FMT}"
        f"{abi.direntplus_size(n) - _DIRENTPLUS.size}s"
    )
    for n in range(_NAME_MAX + 1)
)


class DirentPacker:
    """Packs READDIR / READDIRPLUS records straight into a reply buffer.

    One per reply: it remembers the split of the last entry's timeouts (all
    entries of one backend carry the same ones), so a record costs one
    ``pack_into`` (and a ``pack_attr`` for a READDIRPLUS entry).  ``dirent``
    / ``direntplus`` return the record's size, or 0 when it does not fit
    before ``end`` (nothing is written then).
    """

    __slots__ = ("_split", "_times", "buf", "end")

    def __init__(self, buf: memoryview, end: int) -> None:
        self.buf = buf
        self.end = end
        self._times: tuple[float, float] | None = None
        self._split = (0, 0, 0, 0)

    def dirent(self, pos: int, ino: int, off: int, dtype: int, name: bytes) -> int:
        n = len(name)
        if n > _NAME_MAX:
            if pos + abi.dirent_size(n) > self.end:
                return 0
            return pack_dirent(self.buf, pos, ino, off, dtype, name)
        rec = _DIRENT_BY_LEN[n]
        size = rec.size
        if pos + size > self.end:
            return 0
        rec.pack_into(self.buf, pos, ino & _U64, off & _U64, n, dtype & _U32, name)
        return size

    def direntplus(
        self, pos: int, entry: Entry | None, ino: int, off: int, dtype: int, name: bytes
    ) -> int:
        n = len(name)
        if n > _NAME_MAX:
            if pos + abi.direntplus_size(n) > self.end:
                return 0
            return pack_direntplus(self.buf, pos, entry, ino, off, dtype, name)
        rec = _DIRENTPLUS_BY_LEN[n]
        size = rec.size
        if pos + size > self.end:
            return 0
        if entry is None:  # "." and "..": no entry, all of fuse_entry_out zero
            rec.pack_into(self.buf, pos, 0, 0, 0, 0, 0, 0, ino & _U64, off & _U64, n,
                          dtype & _U32, name)  # fmt: skip
            return size
        times = (entry.entry_timeout, entry.attr_timeout)
        if times != self._times:
            self._times = times
            self._split = (*timeout_split(times[0]), *timeout_split(times[1]))
        esec, ensec, asec, ansec = self._split
        buf = self.buf
        rec.pack_into(
            buf, pos,
            entry.nodeid & _U64, entry.generation & _U64, esec, asec, ensec, ansec,
            ino & _U64, off & _U64, n, dtype & _U32, name,
        )  # fmt: skip
        pack_attr(buf, pos + _ATTR_AT, entry.attr, entry.submount)
        return size
