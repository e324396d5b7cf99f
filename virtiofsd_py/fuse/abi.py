"""The FUSE kernel ABI (Linux ``include/uapi/linux/fuse.h``, protocol 7.45) in Python.

Constants keep their C names.  Every request and reply struct has a
precompiled little-endian ``struct.Struct`` named after the C struct without
its ``fuse_`` prefix, upper-cased (``struct fuse_entry_out`` -> ``ENTRY_OUT``);
field order is the C field order.  virtio-fs is little-endian on every host
(virtio spec 5.11.6.1: "the FUSE protocol in little-endian byte order").

Nested structs are flattened: ``ENTRY_OUT`` is the entry fields followed by
the 16 ``ATTR`` fields.  ``*_FIELDS`` tuples name the fields of the structs
that tests and front-ends most often unpack, so code can build dicts or
``namedtuple``s without re-listing them.
"""

from __future__ import annotations

import enum
import struct
from typing import Final

# -- version (fuse.h "Version negotiation") --------------------------------
FUSE_KERNEL_VERSION: Final = 7
#: Newest minor this ABI module describes (not what the dispatcher offers).
FUSE_KERNEL_MINOR_VERSION: Final = 45
FUSE_ROOT_ID: Final = 1
FUSE_MIN_READ_BUFFER: Final = 8192


class Opcode(enum.IntEnum):
    """``enum fuse_opcode``."""

    LOOKUP = 1
    FORGET = 2  # no reply
    GETATTR = 3
    SETATTR = 4
    READLINK = 5
    SYMLINK = 6
    MKNOD = 8
    MKDIR = 9
    UNLINK = 10
    RMDIR = 11
    RENAME = 12
    LINK = 13
    OPEN = 14
    READ = 15
    WRITE = 16
    STATFS = 17
    RELEASE = 18
    FSYNC = 20
    SETXATTR = 21
    GETXATTR = 22
    LISTXATTR = 23
    REMOVEXATTR = 24
    FLUSH = 25
    INIT = 26
    OPENDIR = 27
    READDIR = 28
    RELEASEDIR = 29
    FSYNCDIR = 30
    GETLK = 31
    SETLK = 32
    SETLKW = 33
    ACCESS = 34
    CREATE = 35
    INTERRUPT = 36
    BMAP = 37
    DESTROY = 38
    IOCTL = 39
    POLL = 40
    NOTIFY_REPLY = 41
    BATCH_FORGET = 42  # no reply
    FALLOCATE = 43
    READDIRPLUS = 44
    RENAME2 = 45
    LSEEK = 46
    COPY_FILE_RANGE = 47
    SETUPMAPPING = 48
    REMOVEMAPPING = 49
    SYNCFS = 50
    TMPFILE = 51
    STATX = 52
    COPY_FILE_RANGE_64 = 53
    CUSE_INIT = 4096


# C-named aliases (plain ints, the fastest to compare and index with).
FUSE_LOOKUP: Final = 1
FUSE_FORGET: Final = 2
FUSE_GETATTR: Final = 3
FUSE_SETATTR: Final = 4
FUSE_READLINK: Final = 5
FUSE_SYMLINK: Final = 6
FUSE_MKNOD: Final = 8
FUSE_MKDIR: Final = 9
FUSE_UNLINK: Final = 10
FUSE_RMDIR: Final = 11
FUSE_RENAME: Final = 12
FUSE_LINK: Final = 13
FUSE_OPEN: Final = 14
FUSE_READ: Final = 15
FUSE_WRITE: Final = 16
FUSE_STATFS: Final = 17
FUSE_RELEASE: Final = 18
FUSE_FSYNC: Final = 20
FUSE_SETXATTR: Final = 21
FUSE_GETXATTR: Final = 22
FUSE_LISTXATTR: Final = 23
FUSE_REMOVEXATTR: Final = 24
FUSE_FLUSH: Final = 25
FUSE_INIT: Final = 26
FUSE_OPENDIR: Final = 27
FUSE_READDIR: Final = 28
FUSE_RELEASEDIR: Final = 29
FUSE_FSYNCDIR: Final = 30
FUSE_GETLK: Final = 31
FUSE_SETLK: Final = 32
FUSE_SETLKW: Final = 33
FUSE_ACCESS: Final = 34
FUSE_CREATE: Final = 35
FUSE_INTERRUPT: Final = 36
FUSE_BMAP: Final = 37
FUSE_DESTROY: Final = 38
FUSE_IOCTL: Final = 39
FUSE_POLL: Final = 40
FUSE_NOTIFY_REPLY: Final = 41
FUSE_BATCH_FORGET: Final = 42
FUSE_FALLOCATE: Final = 43
FUSE_READDIRPLUS: Final = 44
FUSE_RENAME2: Final = 45
FUSE_LSEEK: Final = 46
FUSE_COPY_FILE_RANGE: Final = 47
FUSE_SETUPMAPPING: Final = 48
FUSE_REMOVEMAPPING: Final = 49
FUSE_SYNCFS: Final = 50
FUSE_TMPFILE: Final = 51
FUSE_STATX: Final = 52
FUSE_COPY_FILE_RANGE_64: Final = 53
CUSE_INIT: Final = 4096
#: Opcodes that reveal a peer of the other byte order (``FUSE_INIT << 24``).
CUSE_INIT_BSWAP_RESERVED: Final = 1048576
FUSE_INIT_BSWAP_RESERVED: Final = 436207616


def opcode_name(opcode: int) -> str:
    """``"LOOKUP"`` for 1, ``"OPCODE_99"`` for an unknown number (for logs)."""
    try:
        return Opcode(opcode).name
    except ValueError:
        return f"OPCODE_{opcode}"


class NotifyCode(enum.IntEnum):
    """``enum fuse_notify_code`` (server -> kernel; unused by virtio-fs today)."""

    POLL = 1
    INVAL_INODE = 2
    INVAL_ENTRY = 3
    STORE = 4
    RETRIEVE = 5
    DELETE = 6
    RESEND = 7
    INC_EPOCH = 8
    PRUNE = 9


# -- fuse_setattr_in.valid ---------------------------------------------------
FATTR_MODE: Final = 1 << 0
FATTR_UID: Final = 1 << 1
FATTR_GID: Final = 1 << 2
FATTR_SIZE: Final = 1 << 3
FATTR_ATIME: Final = 1 << 4
FATTR_MTIME: Final = 1 << 5
FATTR_FH: Final = 1 << 6
FATTR_ATIME_NOW: Final = 1 << 7
FATTR_MTIME_NOW: Final = 1 << 8
FATTR_LOCKOWNER: Final = 1 << 9
FATTR_CTIME: Final = 1 << 10
FATTR_KILL_SUIDGID: Final = 1 << 11

# -- fuse_open_out.open_flags ------------------------------------------------
FOPEN_DIRECT_IO: Final = 1 << 0
FOPEN_KEEP_CACHE: Final = 1 << 1
FOPEN_NONSEEKABLE: Final = 1 << 2
FOPEN_CACHE_DIR: Final = 1 << 3
FOPEN_STREAM: Final = 1 << 4
FOPEN_NOFLUSH: Final = 1 << 5
FOPEN_PARALLEL_DIRECT_WRITES: Final = 1 << 6
FOPEN_PASSTHROUGH: Final = 1 << 7

# -- INIT flags: one 64-bit space; bits 32..63 travel in flags2 ----------------
FUSE_ASYNC_READ: Final = 1 << 0
FUSE_POSIX_LOCKS: Final = 1 << 1
FUSE_FILE_OPS: Final = 1 << 2
FUSE_ATOMIC_O_TRUNC: Final = 1 << 3
FUSE_EXPORT_SUPPORT: Final = 1 << 4
FUSE_BIG_WRITES: Final = 1 << 5
FUSE_DONT_MASK: Final = 1 << 6
FUSE_SPLICE_WRITE: Final = 1 << 7
FUSE_SPLICE_MOVE: Final = 1 << 8
FUSE_SPLICE_READ: Final = 1 << 9
FUSE_FLOCK_LOCKS: Final = 1 << 10
FUSE_HAS_IOCTL_DIR: Final = 1 << 11
FUSE_AUTO_INVAL_DATA: Final = 1 << 12
FUSE_DO_READDIRPLUS: Final = 1 << 13
FUSE_READDIRPLUS_AUTO: Final = 1 << 14
FUSE_ASYNC_DIO: Final = 1 << 15
FUSE_WRITEBACK_CACHE: Final = 1 << 16
FUSE_NO_OPEN_SUPPORT: Final = 1 << 17
FUSE_PARALLEL_DIROPS: Final = 1 << 18
FUSE_HANDLE_KILLPRIV: Final = 1 << 19
FUSE_POSIX_ACL: Final = 1 << 20
FUSE_ABORT_ERROR: Final = 1 << 21
FUSE_MAX_PAGES: Final = 1 << 22
FUSE_CACHE_SYMLINKS: Final = 1 << 23
FUSE_NO_OPENDIR_SUPPORT: Final = 1 << 24
FUSE_EXPLICIT_INVAL_DATA: Final = 1 << 25
FUSE_MAP_ALIGNMENT: Final = 1 << 26
FUSE_SUBMOUNTS: Final = 1 << 27
FUSE_HANDLE_KILLPRIV_V2: Final = 1 << 28
FUSE_SETXATTR_EXT: Final = 1 << 29
FUSE_INIT_EXT: Final = 1 << 30
FUSE_INIT_RESERVED: Final = 1 << 31
FUSE_SECURITY_CTX: Final = 1 << 32
FUSE_HAS_INODE_DAX: Final = 1 << 33
FUSE_CREATE_SUPP_GROUP: Final = 1 << 34
FUSE_HAS_EXPIRE_ONLY: Final = 1 << 35
FUSE_DIRECT_IO_ALLOW_MMAP: Final = 1 << 36
FUSE_PASSTHROUGH: Final = 1 << 37
FUSE_NO_EXPORT_SUPPORT: Final = 1 << 38
FUSE_HAS_RESEND: Final = 1 << 39
FUSE_ALLOW_IDMAP: Final = 1 << 40
FUSE_OVER_IO_URING: Final = 1 << 41
FUSE_REQUEST_TIMEOUT: Final = 1 << 42
FUSE_DIRECT_IO_RELAX: Final = FUSE_DIRECT_IO_ALLOW_MMAP  # obsolete alias


def split_init_flags(flags: int) -> tuple[int, int]:
    """64-bit INIT flags -> (flags, flags2) as carried in fuse_init_in/out (7.36)."""
    return flags & 0xFFFF_FFFF, (flags >> 32) & 0xFFFF_FFFF


def join_init_flags(flags: int, flags2: int) -> int:
    """(flags, flags2) -> one 64-bit INIT flag word."""
    return (flags2 << 32) | flags


CUSE_UNRESTRICTED_IOCTL: Final = 1 << 0

# -- fuse_release_in.release_flags -----------------------------------------
FUSE_RELEASE_FLUSH: Final = 1 << 0
FUSE_RELEASE_FLOCK_UNLOCK: Final = 1 << 1
# -- fuse_getattr_in.getattr_flags -----------------------------------------
FUSE_GETATTR_FH: Final = 1 << 0
# -- fuse_lk_in.lk_flags ----------------------------------------------------
FUSE_LK_FLOCK: Final = 1 << 0
# -- fuse_write_in.write_flags -----------------------------------------------
FUSE_WRITE_CACHE: Final = 1 << 0
FUSE_WRITE_LOCKOWNER: Final = 1 << 1
FUSE_WRITE_KILL_SUIDGID: Final = 1 << 2
FUSE_WRITE_KILL_PRIV: Final = FUSE_WRITE_KILL_SUIDGID  # obsolete alias
# -- fuse_read_in.read_flags -------------------------------------------------
FUSE_READ_LOCKOWNER: Final = 1 << 1
# -- fuse_ioctl_in.flags -------------------------------------------------------
FUSE_IOCTL_COMPAT: Final = 1 << 0
FUSE_IOCTL_UNRESTRICTED: Final = 1 << 1
FUSE_IOCTL_RETRY: Final = 1 << 2
FUSE_IOCTL_32BIT: Final = 1 << 3
FUSE_IOCTL_DIR: Final = 1 << 4
FUSE_IOCTL_COMPAT_X32: Final = 1 << 5
FUSE_IOCTL_MAX_IOV: Final = 256
# -- fuse_poll_in.flags --------------------------------------------------------
FUSE_POLL_SCHEDULE_NOTIFY: Final = 1 << 0
# -- fuse_fsync_in.fsync_flags -----------------------------------------------
FUSE_FSYNC_FDATASYNC: Final = 1 << 0
# -- fuse_attr.flags -----------------------------------------------------------
FUSE_ATTR_SUBMOUNT: Final = 1 << 0
FUSE_ATTR_DAX: Final = 1 << 1
# -- fuse_open_in.open_flags / fuse_create_in.open_flags ---------------------
FUSE_OPEN_KILL_SUIDGID: Final = 1 << 0
# -- fuse_setxattr_in.setxattr_flags -----------------------------------------
FUSE_SETXATTR_ACL_KILL_SGID: Final = 1 << 0
# -- fuse_notify_inval_entry_out.flags -----------------------------------------
FUSE_EXPIRE_ONLY: Final = 1 << 0
# -- fuse_setupmapping_in.flags ------------------------------------------------
FUSE_SETUPMAPPING_FLAG_WRITE: Final = 1 << 0
FUSE_SETUPMAPPING_FLAG_READ: Final = 1 << 1

# -- fuse_rename2_in.flags: renameat2(2) flags (include/uapi/linux/fs.h) ------
RENAME_NOREPLACE: Final = 1 << 0
RENAME_EXCHANGE: Final = 1 << 1
RENAME_WHITEOUT: Final = 1 << 2

# -- request extensions (7.38: fuse_in_header.total_extlen, in 8-byte units) --
#: ``fuse_ext_header.type`` values 0..31 are security-context headers
#: (``fuse_secctx_header.nr_secctx``, which shares the layout).
FUSE_MAX_NR_SECCTX: Final = 31
FUSE_EXT_GROUPS: Final = 32

#: Set in ``fuse_in_header.unique`` of a request the kernel resends (7.40).
FUSE_UNIQUE_RESEND: Final = 1 << 63
#: uid/gid the kernel sends when it cannot map an id (FUSE_ALLOW_IDMAP).
FUSE_INVALID_UIDGID: Final = 0xFFFF_FFFF

FUSE_COMPAT_ENTRY_OUT_SIZE: Final = 120
FUSE_COMPAT_ATTR_OUT_SIZE: Final = 96
FUSE_COMPAT_MKNOD_IN_SIZE: Final = 8
FUSE_COMPAT_WRITE_IN_SIZE: Final = 24
FUSE_COMPAT_STATFS_SIZE: Final = 48
FUSE_COMPAT_SETXATTR_IN_SIZE: Final = 8
FUSE_COMPAT_INIT_OUT_SIZE: Final = 8
FUSE_COMPAT_22_INIT_OUT_SIZE: Final = 24

# -- structs -------------------------------------------------------------------
# Formats are kept as strings too, so composite structs are built from parts.
_ATTR = "QQQQQQIIIIIIIIII"
_KSTATFS = "QQQQQIIII6I"
_FILE_LOCK = "QQII"
_ENTRY_OUT = "QQQQII" + _ATTR
_DIRENT = "QQII"
_SX_TIME = "qIi"
_STATX = "IIQIIIHHQQQQ" + _SX_TIME * 4 + "IIII14Q"

IN_HEADER = struct.Struct("<IIQQIIIHH")
IN_HEADER_FIELDS: Final = (
    "len", "opcode", "unique", "nodeid", "uid", "gid", "pid", "total_extlen", "padding",
)  # fmt: skip
OUT_HEADER = struct.Struct("<IiQ")
OUT_HEADER_FIELDS: Final = ("len", "error", "unique")

ATTR = struct.Struct("<" + _ATTR)
ATTR_FIELDS: Final = (
    "ino", "size", "blocks", "atime", "mtime", "ctime", "atimensec", "mtimensec",
    "ctimensec", "mode", "nlink", "uid", "gid", "rdev", "blksize", "flags",
)  # fmt: skip
KSTATFS = struct.Struct("<" + _KSTATFS)
KSTATFS_FIELDS: Final = (
    "blocks", "bfree", "bavail", "files", "ffree", "bsize", "namelen", "frsize", "padding",
)  # fmt: skip
# (fuse_kstatfs is followed by u32 spare[6])
FILE_LOCK = struct.Struct("<" + _FILE_LOCK)  # start, end, type, pid
SX_TIME = struct.Struct("<" + _SX_TIME)  # tv_sec, tv_nsec, reserved
STATX = struct.Struct("<" + _STATX)
STATX_FIELDS: Final = (
    "mask", "blksize", "attributes", "nlink", "uid", "gid", "mode", "spare0", "ino", "size",
    "blocks", "attributes_mask",
    *(f"{t}_{part}" for t in ("atime", "btime", "ctime", "mtime")
      for part in ("sec", "nsec", "reserved")),
    "rdev_major", "rdev_minor", "dev_major", "dev_minor",
    *(f"spare2_{i}" for i in range(14)),
)  # fmt: skip

ENTRY_OUT = struct.Struct("<" + _ENTRY_OUT)
ENTRY_OUT_FIELDS: Final = (
    "nodeid", "generation", "entry_valid", "attr_valid", "entry_valid_nsec", "attr_valid_nsec",
    *ATTR_FIELDS,
)  # fmt: skip
FORGET_IN = struct.Struct("<Q")  # nlookup
FORGET_ONE = struct.Struct("<QQ")  # nodeid, nlookup
BATCH_FORGET_IN = struct.Struct("<II")  # count, dummy
GETATTR_IN = struct.Struct("<IIQ")  # getattr_flags, dummy, fh
ATTR_OUT = struct.Struct("<QII" + _ATTR)  # attr_valid, attr_valid_nsec, dummy, attr...
ATTR_OUT_FIELDS: Final = ("attr_valid", "attr_valid_nsec", "dummy", *ATTR_FIELDS)
STATX_IN = struct.Struct("<IIQII")  # getattr_flags, reserved, fh, sx_flags, sx_mask
STATX_OUT = struct.Struct("<QIIQQ" + _STATX)  # attr_valid, nsec, flags, spare[2], statx
STATX_OUT_FIELDS: Final = ("attr_valid", "attr_valid_nsec", "flags", "spare0", "spare1",
                           *STATX_FIELDS)  # fmt: skip
MKNOD_IN = struct.Struct("<IIII")  # mode, rdev, umask, padding
MKDIR_IN = struct.Struct("<II")  # mode, umask
RENAME_IN = struct.Struct("<Q")  # newdir
RENAME2_IN = struct.Struct("<QII")  # newdir, flags, padding
LINK_IN = struct.Struct("<Q")  # oldnodeid
SETATTR_IN = struct.Struct("<IIQQQQQQIIIIIIII")
SETATTR_IN_FIELDS: Final = (
    "valid", "padding", "fh", "size", "lock_owner", "atime", "mtime", "ctime",
    "atimensec", "mtimensec", "ctimensec", "mode", "unused4", "uid", "gid", "unused5",
)  # fmt: skip
OPEN_IN = struct.Struct("<II")  # flags, open_flags
CREATE_IN = struct.Struct("<IIII")  # flags, mode, umask, open_flags
OPEN_OUT = struct.Struct("<QIi")  # fh, open_flags, backing_id
RELEASE_IN = struct.Struct("<QIIQ")  # fh, flags, release_flags, lock_owner
FLUSH_IN = struct.Struct("<QIIQ")  # fh, unused, padding, lock_owner
READ_IN = struct.Struct("<QQIIQII")  # fh, offset, size, read_flags, lock_owner, flags, padding
WRITE_IN = struct.Struct("<QQIIQII")  # fh, offset, size, write_flags, lock_owner, flags, padding
WRITE_OUT = struct.Struct("<II")  # size, padding
STATFS_OUT = KSTATFS
FSYNC_IN = struct.Struct("<QII")  # fh, fsync_flags, padding
SETXATTR_IN = struct.Struct("<IIII")  # size, flags, setxattr_flags, padding (FUSE_SETXATTR_EXT)
SETXATTR_IN_COMPAT = struct.Struct("<II")  # size, flags (without FUSE_SETXATTR_EXT)
GETXATTR_IN = struct.Struct("<II")  # size, padding
GETXATTR_OUT = struct.Struct("<II")  # size, padding
LK_IN = struct.Struct("<QQ" + _FILE_LOCK + "II")  # fh, owner, lk..., lk_flags, padding
LK_OUT = struct.Struct("<" + _FILE_LOCK)
ACCESS_IN = struct.Struct("<II")  # mask, padding
INIT_IN = struct.Struct("<IIIII11I")  # major, minor, max_readahead, flags, flags2, unused[11]
#: The pre-7.36 fuse_init_in (no flags2); kernels send this unless INIT_EXT.
INIT_IN_COMPAT = struct.Struct("<IIII")
INIT_OUT = struct.Struct("<IIIIHHIIHHIIH11H")
INIT_OUT_FIELDS: Final = (
    "major", "minor", "max_readahead", "flags", "max_background", "congestion_threshold",
    "max_write", "time_gran", "max_pages", "map_alignment", "flags2", "max_stack_depth",
    "request_timeout",
)  # fmt: skip
# (fuse_init_out is followed by u16 unused[11])
CUSE_INIT_IN = struct.Struct("<IIII")  # major, minor, unused, flags
CUSE_INIT_OUT = struct.Struct("<IIIIIIII10I")
INTERRUPT_IN = struct.Struct("<Q")  # unique
BMAP_IN = struct.Struct("<QII")  # block, blocksize, padding
BMAP_OUT = struct.Struct("<Q")  # block
IOCTL_IN = struct.Struct("<QIIQII")  # fh, flags, cmd, arg, in_size, out_size
IOCTL_IOVEC = struct.Struct("<QQ")  # base, len
IOCTL_OUT = struct.Struct("<iIII")  # result, flags, in_iovs, out_iovs
POLL_IN = struct.Struct("<QQII")  # fh, kh, flags, events
POLL_OUT = struct.Struct("<II")  # revents, padding
NOTIFY_POLL_WAKEUP_OUT = struct.Struct("<Q")  # kh
FALLOCATE_IN = struct.Struct("<QQQII")  # fh, offset, length, mode, padding
LSEEK_IN = struct.Struct("<QQII")  # fh, offset, whence, padding
LSEEK_OUT = struct.Struct("<Q")  # offset
COPY_FILE_RANGE_IN = struct.Struct("<QQQQQQQ")  # fh_in, off_in, nodeid_out, fh_out, off_out,
# len, flags
COPY_FILE_RANGE_OUT = struct.Struct("<Q")  # bytes_copied (FUSE_COPY_FILE_RANGE_64)
SETUPMAPPING_IN = struct.Struct("<QQQQQ")  # fh, foffset, len, flags, moffset
REMOVEMAPPING_IN = struct.Struct("<I")  # count (4 bytes: the C struct has no padding)
REMOVEMAPPING_ONE = struct.Struct("<QQ")  # moffset, len
SYNCFS_IN = struct.Struct("<Q")  # padding

DIRENT = struct.Struct("<" + _DIRENT)  # ino, off, namelen, type; name follows
DIRENTPLUS = struct.Struct("<" + _ENTRY_OUT + _DIRENT)  # entry_out, dirent; name follows

NOTIFY_INVAL_INODE_OUT = struct.Struct("<Qqq")  # ino, off, len
NOTIFY_INVAL_ENTRY_OUT = struct.Struct("<QII")  # parent, namelen, flags
NOTIFY_DELETE_OUT = struct.Struct("<QQII")  # parent, child, namelen, padding
NOTIFY_STORE_OUT = struct.Struct("<QQII")  # nodeid, offset, size, padding
NOTIFY_RETRIEVE_OUT = struct.Struct("<QQQII")  # notify_unique, nodeid, offset, size, padding
NOTIFY_RETRIEVE_IN = struct.Struct("<QQIIQQ")  # dummy1, offset, size, dummy2, dummy3, dummy4
NOTIFY_PRUNE_OUT = struct.Struct("<IIQ")  # count, padding, spare

SECCTX = struct.Struct("<II")  # size, padding; then name NUL, then context
SECCTX_HEADER = struct.Struct("<II")  # size, nr_secctx
EXT_HEADER = struct.Struct("<II")  # size (incl. this header), type
SUPP_GROUPS = struct.Struct("<I")  # nr_groups; u32 groups[] follow


def rec_align(n: int) -> int:
    """``FUSE_REC_ALIGN``: round up to the 8-byte record alignment."""
    return (n + 7) & ~7


FUSE_NAME_OFFSET: Final = DIRENT.size
FUSE_NAME_OFFSET_DIRENTPLUS: Final = DIRENTPLUS.size


def dirent_size(namelen: int) -> int:
    """``FUSE_DIRENT_SIZE``: one fuse_dirent record with its padded name."""
    return (FUSE_NAME_OFFSET + namelen + 7) & ~7


def direntplus_size(namelen: int) -> int:
    """``FUSE_DIRENTPLUS_SIZE``: one fuse_direntplus record with its padded name."""
    return (FUSE_NAME_OFFSET_DIRENTPLUS + namelen + 7) & ~7


# Sizes fixed by the C header; checked at import so a typo cannot ship.
_EXPECTED_SIZES = {
    IN_HEADER: 40, OUT_HEADER: 16, ATTR: 88, KSTATFS: 80, FILE_LOCK: 24, ENTRY_OUT: 128,
    ATTR_OUT: 104, GETATTR_IN: 16, SETATTR_IN: 88, OPEN_OUT: 16, RELEASE_IN: 24,
    FLUSH_IN: 24, READ_IN: 40, WRITE_IN: 40, LK_IN: 48, INIT_IN: 64, INIT_OUT: 64,
    CUSE_INIT_OUT: 72, IOCTL_IN: 32, FALLOCATE_IN: 32, LSEEK_IN: 24, COPY_FILE_RANGE_IN: 56,
    SETUPMAPPING_IN: 40, DIRENT: 24, DIRENTPLUS: 152, STATX: 256, STATX_OUT: 288,
    STATX_IN: 24, SX_TIME: 16, NOTIFY_RETRIEVE_IN: 40,
}  # fmt: skip
for _s, _n in _EXPECTED_SIZES.items():
    if _s.size != _n:  # pragma: no cover
        raise AssertionError(f"FUSE ABI struct {_s.format!r} is {_s.size} bytes, expected {_n}")
del _s, _n
