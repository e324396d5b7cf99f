"""The Filesystem interface: the seam between the FUSE dispatcher and a backend.

The dispatcher (``virtiofsd_py.fuse.dispatcher``) decodes a FUSE request,
calls one method here and encodes what it returns.  A backend never sees FUSE
bytes, FUSE bit masks, guest memory layouts or virtqueues; it sees node ids,
names (``bytes``, never ``str``: guest names need not be UTF-8), credentials,
typed arguments and buffers.  Flags that remain integers are the host's own
(open(2), renameat2(2), setxattr(2), fallocate(2), statx(2) flags), which a
Linux guest and host share.

Rules every backend follows:

* Methods are synchronous and may block on host I/O; the daemon decides
  whether a call runs on the event loop or in a worker thread, so every
  method must be safe to call from several threads at once.  Or they are
  coroutines (``async def``; ``readdir`` an async generator): such a backend
  runs on the event loop only, many requests in flight (fs/awaiting.py).
* Failures are raised as ``OSError`` with ``errno`` set; the dispatcher turns
  them into ``-errno`` replies.  Anything else raised is a bug in the backend,
  logged and answered with EIO.
* Node id 1 (``ROOT_ID``) is the root of the share and always exists.
* Every successful ``lookup`` (and every entry returned by
  ``readdir(plus=True)`` other than ``.`` and ``..``) adds one to the node's
  lookup count; ``forget`` takes counts away and the node may be dropped when
  its count reaches zero (FUSE protocol, ``fuse_forget_in``).
* Attributes are ``os.stat_result`` objects (host ``stat`` output for the
  passthrough backend; ``make_stat`` builds one for synthetic backends).
"""

from __future__ import annotations

import enum
import errno
import os
import stat as stat_mod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import ClassVar, Final, Protocol, TypeVar

ROOT_ID = 1

#: FS_IOC_GETFLAGS / FS_IOC_SETFLAGS (linux/fs.h, chattr/lsattr), native and
#: 32-bit compat numbers; the kernel reads and writes an int whatever the
#: number says.  The ioctls a backend is most likely to serve, and the only
#: ones the read-only wrapper (fs/readonly.py) knows the direction of.
FS_IOC_GETFLAGS: Final = frozenset((0x80086601, 0x80046601))
FS_IOC_SETFLAGS: Final = frozenset((0x40086602, 0x40046602))


@dataclass(slots=True)
class Context:
    """Credentials of the guest process that made the request (fuse_in_header).

    Built for every request: a plain (not frozen) dataclass costs a third of a
    frozen one to create.  Treat it as read-only.
    """

    uid: int
    gid: int
    pid: int
    groups: tuple[int, ...] = ()
    #: The creating process's umask, for requests that create a node when
    #: FUSE_DONT_MASK is negotiated (the guest kernel then leaves it to us).
    umask: int | None = None
    #: (xattr name, value) of the security context the guest wants on a node
    #: it creates (FUSE_SECURITY_CTX), e.g. (b"security.selinux", b"...\0").
    security_ctx: tuple[bytes, bytes] | None = None


@dataclass(slots=True)
class Entry:
    """Result of LOOKUP-like operations (fuse_entry_out)."""

    nodeid: int
    generation: int
    attr: os.stat_result
    entry_timeout: float
    attr_timeout: float
    #: A directory on another host file system (FUSE_ATTR_SUBMOUNT): the guest
    #: mounts it as a submount of its own, so st_dev/st_ino stay unique there.
    #: Honoured only when the session agreed ``SessionInfo.submounts``.
    submount: bool = False


@dataclass(slots=True)
class AttrReply:
    """Result of GETATTR and SETATTR (fuse_attr_out)."""

    attr: os.stat_result
    timeout: float
    #: As ``Entry.submount``.
    submount: bool = False


@dataclass(slots=True)
class Opened:
    """Result of OPEN, OPENDIR, CREATE, TMPFILE (fuse_open_out): the handle and
    what the guest may cache of the file while it is open.

    ``fh`` is any u64 the backend picks; it comes back in ``read``, ``write``,
    ``release``...  ``CachePolicy.opened`` (fs/cache.py) fills the cache
    fields as the ``--cache`` modes of the Rust virtiofsd do.
    """

    fh: int
    #: Bypass the guest's page cache for this open file (FOPEN_DIRECT_IO):
    #: every read and write reaches the backend.
    direct_io: bool = False
    #: Keep the pages the guest cached from earlier opens (FOPEN_KEEP_CACHE);
    #: without it the guest drops them on open (close-to-open consistency).
    #: For a directory: keep its cached entries (with ``cache_dir``).
    keep_cache: bool = False
    #: A directory whose READDIR results the guest may cache (FOPEN_CACHE_DIR).
    cache_dir: bool = False


@dataclass(slots=True)
class DirEntry:
    """One directory entry.

    ``offset`` is the cookie the guest passes back to continue *after* this
    entry.  ``entry`` is set only for READDIRPLUS, with the lookup count
    already taken (``None`` for ``.`` and ``..``, which the kernel never
    looks up).
    """

    ino: int
    offset: int
    type: int  # DT_* value (stat.S_IFMT(mode) >> 12)
    name: bytes
    entry: Entry | None = None


@dataclass(slots=True)
class SessionInfo:
    """What FUSE_INIT negotiated, handed to the backend so it can adapt.

    The booleans are the capabilities both sides agreed on (fuse.h INIT
    flags of the same names) that change what the backend receives or may
    return.
    """

    major: int
    minor: int
    max_write: int
    max_readahead: int
    #: The guest caches writes (FUSE_WRITEBACK_CACHE): it reads pages of files
    #: opened write-only and computes O_APPEND offsets itself.
    writeback_cache: bool = False
    #: Creating requests carry the caller's supplementary groups in
    #: ``Context.groups`` (FUSE_CREATE_SUPP_GROUP).
    create_supp_group: bool = False
    #: fcntl() record locks reach ``getlk``/``setlk`` (FUSE_POSIX_LOCKS).
    posix_locks: bool = False
    #: flock() locks reach ``setlk(flock=True)`` (FUSE_FLOCK_LOCKS).
    flock_locks: bool = False
    #: The guest enforces POSIX ACLs served as system.posix_acl_* (FUSE_POSIX_ACL).
    posix_acl: bool = False
    #: ``kill_suidgid`` arguments arrive (FUSE_HANDLE_KILLPRIV_V2).
    handle_killpriv_v2: bool = False
    #: Creating requests carry ``Context.security_ctx`` (FUSE_SECURITY_CTX).
    security_ctx: bool = False
    #: The guest honours ``Entry.submount`` (FUSE_SUBMOUNTS).
    submounts: bool = False


class Now(enum.Enum):
    """The type of ``NOW``."""

    NOW = "now"


#: ``SetAttr.atime_ns`` / ``mtime_ns``: "the current time" (utimensat's UTIME_NOW).
NOW: Final = Now.NOW


@dataclass(slots=True)
class SetAttr:
    """What SETATTR changes (fuse_setattr_in); a field left None stays as it is."""

    #: New mode; only its permission bits (``stat.S_IMODE``) apply.
    mode: int | None = None
    uid: int | None = None
    gid: int | None = None
    #: Truncate or extend to this size (regular files only).
    size: int | None = None
    #: Nanoseconds since the epoch (negative before it), or ``NOW``.
    atime_ns: int | Now | None = None
    mtime_ns: int | Now | None = None
    #: The host sets ctime itself on every change; a backend of its own may
    #: take this one.
    ctime_ns: int | None = None
    #: The open handle the change comes through (ftruncate, fchmod...), if any.
    fh: int | None = None
    lock_owner: int | None = None
    #: Clear setuid/setgid as the change does it (FUSE_HANDLE_KILLPRIV_V2:
    #: the guest decided the caller may not keep them).
    kill_suidgid: bool = False


@dataclass(slots=True)
class Lock:
    """A POSIX record lock (fuse_file_lock): byte range, F_RDLCK/F_WRLCK/F_UNLCK, pid."""

    start: int
    end: int  # inclusive; 0x7fffffffffffffff (OFFSET_MAX) means to EOF
    type: int
    pid: int = 0


@dataclass(slots=True)
class StatxReply:
    """Result of STATX (fuse_statx_out): the host statx fields and a timeout.

    ``fields`` maps fuse_statx member names (mask, blksize, attributes,
    nlink, uid, gid, mode, ino, size, blocks, attributes_mask, atime_sec,
    atime_nsec, btime_*, ctime_*, mtime_*, rdev_major, rdev_minor,
    dev_major, dev_minor) to values; missing ones are 0.
    """

    fields: dict[str, int]
    timeout: float
    #: As ``Entry.submount``.
    submount: bool = False


def make_stat(
    *,
    mode: int,
    ino: int,
    size: int = 0,
    nlink: int = 1,
    uid: int = 0,
    gid: int = 0,
    rdev: int = 0,
    dev: int = 0,
    blksize: int = 4096,
    blocks: int | None = None,
    atime_ns: int = 0,
    mtime_ns: int = 0,
    ctime_ns: int = 0,
) -> os.stat_result:
    """Build an ``os.stat_result`` for backends that have no host file."""
    if blocks is None:
        blocks = (size + 511) // 512
    seq = (
        mode,
        ino,
        dev,
        nlink,
        uid,
        gid,
        size,
        atime_ns // 1_000_000_000,
        mtime_ns // 1_000_000_000,
        ctime_ns // 1_000_000_000,
    )
    extra = {
        "st_atime": atime_ns / 1e9,
        "st_mtime": mtime_ns / 1e9,
        "st_ctime": ctime_ns / 1e9,
        "st_atime_ns": atime_ns,
        "st_mtime_ns": mtime_ns,
        "st_ctime_ns": ctime_ns,
        "st_blksize": blksize,
        "st_blocks": blocks,
        "st_rdev": rdev,
    }
    return os.stat_result(seq, extra)


def dirent_type(mode: int) -> int:
    """DT_* value for a st_mode (the top bits of the file type, as getdents)."""
    return stat_mod.S_IFMT(mode) >> 12


def fs_error(code: int, what: str) -> OSError:
    """``OSError(code)`` whose message says what failed and the errno's text."""
    return OSError(code, f"{what}: {os.strerror(code)}")


def enosys(what: str) -> OSError:
    return OSError(errno.ENOSYS, f"{what} is not implemented by this backend")


class Filesystem:
    """Base class of every backend.  Unimplemented operations raise ENOSYS.

    Subclasses override what they support.  ``read`` writes straight into
    the guest's buffers (``os.preadv`` for the passthrough backend) and
    returns the byte count, so that file data is never copied through a
    Python ``bytes`` object.
    """

    #: Whether this backend refuses every change (``--readonly``).
    readonly: ClassVar[bool] = False

    # -- session ---------------------------------------------------------
    def init(self, session: SessionInfo) -> None:
        """Called once FUSE_INIT is negotiated, before any other request."""

    def destroy(self) -> None:
        """FUSE_DESTROY: forget every node and close every handle."""

    # -- names -----------------------------------------------------------
    def lookup(self, ctx: Context, parent: int, name: bytes) -> Entry:
        raise enosys("lookup")

    def forget(self, nodeid: int, nlookup: int) -> None:
        """Drop ``nlookup`` references; never raises (FORGET has no reply)."""

    def batch_forget(self, items: Sequence[tuple[int, int]]) -> None:
        for nodeid, nlookup in items:
            self.forget(nodeid, nlookup)

    # -- attributes ------------------------------------------------------
    def getattr(self, ctx: Context, nodeid: int, fh: int | None) -> AttrReply:
        raise enosys("getattr")

    def statfs(self, ctx: Context, nodeid: int) -> os.statvfs_result:
        raise enosys("statfs")

    def readlink(self, ctx: Context, nodeid: int) -> bytes:
        raise enosys("readlink")

    def access(self, ctx: Context, nodeid: int, mask: int) -> None:
        raise enosys("access")

    # -- files -----------------------------------------------------------
    def open(self, ctx: Context, nodeid: int, flags: int, *, kill_suidgid: bool = False) -> Opened:
        """``kill_suidgid``: clear set-id bits if O_TRUNC truncates (HANDLE_KILLPRIV_V2,
        FUSE_OPEN_KILL_SUIDGID).  The dispatcher passes it only when set."""
        raise enosys("open")

    def read(
        self, ctx: Context, nodeid: int, fh: int, offset: int, size: int, bufs: list[memoryview]
    ) -> int:
        """Fill ``bufs`` (total length ``size``) from ``offset``; return bytes read."""
        raise enosys("read")

    def flush(self, ctx: Context, nodeid: int, fh: int, lock_owner: int) -> None:
        raise enosys("flush")

    def release(
        self, ctx: Context, nodeid: int, fh: int, flags: int, *, lock_owner: int | None = None
    ) -> None:
        """Close handle ``fh``.  ``lock_owner`` (FUSE_RELEASE_FLOCK_UNLOCK): also drop the
        flock(2) locks that owner holds.  The dispatcher passes it only when set."""
        raise enosys("release")

    def lseek(self, ctx: Context, nodeid: int, fh: int, offset: int, whence: int) -> int:
        raise enosys("lseek")

    # -- directories -----------------------------------------------------
    def opendir(self, ctx: Context, nodeid: int, flags: int) -> Opened:
        raise enosys("opendir")

    def readdir(
        self, ctx: Context, nodeid: int, fh: int, offset: int, plus: bool
    ) -> Iterator[DirEntry]:
        """Entries after cookie ``offset``, lazily.

        The dispatcher stops iterating when the guest's buffer is full; with
        ``plus`` it calls ``forget(entry.nodeid, 1)`` for a looked-up entry it
        could not fit, so the lookup count stays exact.
        """
        raise enosys("readdir")

    def releasedir(self, ctx: Context, nodeid: int, fh: int, flags: int) -> None:
        raise enosys("releasedir")

    # -- extended attributes --------------------------------------------
    def getxattr(self, ctx: Context, nodeid: int, name: bytes) -> bytes:
        """The whole value; the dispatcher applies the size/ERANGE rules."""
        raise enosys("getxattr")

    def listxattr(self, ctx: Context, nodeid: int) -> bytes:
        """NUL-terminated names, concatenated (as listxattr(2) returns)."""
        raise enosys("listxattr")

    def setxattr(
        self, ctx: Context, nodeid: int, name: bytes, value: bytes, flags: int, acl_kill_sgid: bool
    ) -> None:
        """``flags``: XATTR_CREATE/REPLACE.  ``acl_kill_sgid``: setting
        system.posix_acl_access also clears S_ISGID, as the guest decided the
        caller may not keep it (FUSE_SETXATTR_ACL_KILL_SGID)."""
        raise enosys("setxattr")

    def removexattr(self, ctx: Context, nodeid: int, name: bytes) -> None:
        raise enosys("removexattr")

    # -- changing the tree ----------------------------------------------------
    # Every method that creates a node returns its Entry with the lookup count
    # already taken, exactly as lookup() does.  ``umask`` is the creating
    # process's umask when FUSE_DONT_MASK is negotiated (apply it, unless a
    # default ACL governs), else 0: the guest kernel already applied it to mode.
    def create(
        self,
        ctx: Context,
        parent: int,
        name: bytes,
        mode: int,
        flags: int,
        umask: int,
        *,
        kill_suidgid: bool = False,
    ) -> tuple[Entry, Opened]:
        """``kill_suidgid`` as for ``open``; passed only when set."""
        raise enosys("create")

    def mknod(
        self, ctx: Context, parent: int, name: bytes, mode: int, rdev: int, umask: int
    ) -> Entry:
        raise enosys("mknod")

    def mkdir(self, ctx: Context, parent: int, name: bytes, mode: int, umask: int) -> Entry:
        raise enosys("mkdir")

    def symlink(self, ctx: Context, parent: int, name: bytes, target: bytes) -> Entry:
        raise enosys("symlink")

    def link(self, ctx: Context, nodeid: int, newparent: int, newname: bytes) -> Entry:
        raise enosys("link")

    def unlink(self, ctx: Context, parent: int, name: bytes) -> None:
        raise enosys("unlink")

    def rmdir(self, ctx: Context, parent: int, name: bytes) -> None:
        raise enosys("rmdir")

    def rename(
        self, ctx: Context, parent: int, name: bytes, newparent: int, newname: bytes, flags: int
    ) -> None:
        """RENAME and RENAME2; ``flags``: RENAME_NOREPLACE/EXCHANGE/WHITEOUT."""
        raise enosys("rename")

    def tmpfile(
        self, ctx: Context, parent: int, mode: int, flags: int, umask: int
    ) -> tuple[Entry, Opened]:
        raise enosys("tmpfile")

    # -- changing files ---------------------------------------------------------
    def setattr(self, ctx: Context, nodeid: int, attr: SetAttr) -> AttrReply:
        raise enosys("setattr")

    def write(
        self,
        ctx: Context,
        nodeid: int,
        fh: int,
        offset: int,
        bufs: list[memoryview],
        kill_suidgid: bool,
    ) -> int:
        """Write ``bufs`` (guest memory, os.pwritev) at ``offset``; bytes written.

        ``kill_suidgid``: the writer may not keep setuid/setgid, clear them
        (FUSE_WRITE_KILL_SUIDGID, with HANDLE_KILLPRIV_V2).
        """
        raise enosys("write")

    def fsync(self, ctx: Context, nodeid: int, fh: int, datasync: bool) -> None:
        raise enosys("fsync")

    def fsyncdir(self, ctx: Context, nodeid: int, fh: int, datasync: bool) -> None:
        raise enosys("fsyncdir")

    def fallocate(
        self, ctx: Context, nodeid: int, fh: int, mode: int, offset: int, length: int
    ) -> None:
        raise enosys("fallocate")

    def copy_file_range(
        self,
        ctx: Context,
        nodeid_in: int,
        fh_in: int,
        off_in: int,
        nodeid_out: int,
        fh_out: int,
        off_out: int,
        length: int,
        flags: int,
    ) -> int:
        raise enosys("copy_file_range")

    def syncfs(self, ctx: Context, nodeid: int) -> None:
        raise enosys("syncfs")

    def statx(self, ctx: Context, nodeid: int, fh: int | None, flags: int, mask: int) -> StatxReply:
        raise enosys("statx")

    def ioctl(
        self,
        ctx: Context,
        nodeid: int,
        fh: int,
        cmd: int,
        arg: int,
        in_data: bytes,
        out_size: int,
        *,
        compat32: bool = False,
    ) -> tuple[int, bytes]:
        """(result, out data) of a restricted ioctl; ENOTTY for unsupported cmds.

        ``compat32``: the caller is a 32-bit process (FUSE_IOCTL_32BIT), so
        pointer-sized fields of its argument are 4 bytes.
        """
        raise enosys("ioctl")

    # -- locks ------------------------------------------------------------------
    # Implemented with open file description locks on the host so that host
    # processes and other guests see them.  ``owner`` is the guest's
    # lock_owner; a backend maps each owner to its own open file description.
    def getlk(self, ctx: Context, nodeid: int, fh: int, owner: int, lock: Lock) -> Lock:
        raise enosys("getlk")

    def setlk(
        self,
        ctx: Context,
        nodeid: int,
        fh: int,
        owner: int,
        lock: Lock,
        *,
        sleep: bool,
        flock: bool,
    ) -> None:
        """SETLK/SETLKW (``sleep``); ``flock`` for BSD flock(2) semantics.

        With ``sleep`` this may block for as long as the lock is held
        elsewhere: the daemon runs such requests off the event loop.
        """
        raise enosys("setlk")

    def interrupt_waits(self) -> None:
        """Make every ``setlk(sleep=True)`` now waiting fail promptly with EINTR.

        Called when a ring stops (GET_VRING_BASE must complete in-flight
        requests, e.g. before migration): a lock wait must not hold it up.
        """


S = TypeVar("S")


class Migratable(Protocol[S]):
    """A backend whose tables can move to another daemon (live migration).

    Not every backend can: the daemon offers migration to the front-end only
    for one that has this (vhost-user.rst, "Migrating back-end state").  ``S``
    is the backend's typed state; the daemon carries it inside QEMU's
    migration stream (virtiofsd_py/migration, docs/migration-format.md).
    """

    def prepare_migration(self, enabled: bool) -> None:
        """Migration starts (True) or is cancelled (False): warm up or stop."""

    def export_state(self) -> S:
        """The backend's tables (called while the device is suspended)."""

    def import_state(self, state: S) -> None:
        """Rebuild the tables from another daemon's ``export_state``.

        Raises ``OSError``/``ValueError`` with a clear message when the state
        is unusable; on success node ids and fh values are those of the source.
        """
