"""The passthrough backend: serve a host directory, confined to it.

Confinement rules (the guest is not trusted):

* Every host object is reached relative to an inode's O_PATH fd, one name
  at a time: ``openat(parent_fd, name, O_PATH | O_NOFOLLOW)``.  Names with
  ``/`` or NUL are refused, so a name never walks more than one step, and a
  symlink is never followed by the daemon (the guest resolves symlinks; we
  return their target bytes on READLINK).  ``..`` looked up at the root is
  the root.  (A directory that a host process moves out of the share takes
  its O_PATH fd along; only a sandbox -- mount namespace / chroot -- closes
  that gap, as for the Rust virtiofsd.)
* OPEN reopens the O_PATH fd through ``/proc/self/fd/N`` and only for
  regular files and directories: fifos, sockets and device nodes are never
  opened other than O_PATH (CVE-2020-35517); OPEN of one fails with EBADF as
  in the Rust virtiofsd (``is_safe_inode``).  Reopening a symlink's O_PATH
  fd fails with ELOOP in the kernel.
* An error of one request (EMFILE/ENFILE included, CVE-2020-10717) is raised
  to that request only and leaves the tables as they were.

Hot path: LOOKUP is openat + statx (attributes and mount id in one call);
GETATTR is one fstat; READ is one preadv straight into the guest buffers.

``--inode-file-handles`` (mountfds.py): nodes keep a file handle instead of
their O_PATH fd.  Every use of a node's fd goes through ``node.opened()``
(an O_PATH fd opened by handle for the one operation); OPEN opens the handle
with the guest's flags directly.  Handle nodes do not count against the
guest's fd budget.  Outside the ``with`` nothing is held: an inode unlinked
on the host and no longer open anywhere gives ESTALE, as in the Rust
virtiofsd.  Node fds are always opened before switching to the guest's
credentials (open_by_handle_at needs CAP_DAC_READ_SEARCH in the effective
set, which a non-zero effective uid clears).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Final

from virtiofsd_py.fs.api import (
    ROOT_ID,
    AttrReply,
    Context,
    DirEntry,
    Entry,
    Filesystem,
    Lock,
    Opened,
    SessionInfo,
    SetAttr,
    StatxReply,
)
from virtiofsd_py.fs.cache import CacheMode, CachePolicy
from virtiofsd_py.fs.passthrough.creds import CAP_FSETID, Credentials, DropCap, Umask
from virtiofsd_py.fs.passthrough.file_handles import InodeFileHandles, InodeHandles
from virtiofsd_py.fs.passthrough.hooks import PendingNodes, Stoppable
from virtiofsd_py.fs.passthrough.idmap import IdMap
from virtiofsd_py.fs.passthrough.inodes import InodeData, InodeTable, NodeFd
from virtiofsd_py.fs.passthrough.locks import LockTable
from virtiofsd_py.fs.passthrough.open_files import HandleData, HandleTable
from virtiofsd_py.fs.passthrough.xattrmap import XattrMap
from virtiofsd_py.fuse import abi
from virtiofsd_py.host import syscalls as linux
from virtiofsd_py.host.fdbudget import FdBudget
from virtiofsd_py.host.syscalls import getdents64, stat_fd

FUSE_ATTR_SUBMOUNT: Final = 1 << 0  # fuse_attr.flags (fuse.h, 7.32)

_O_PATH_FLAGS: Final = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
# open(2) flags passed through to the host on OPEN; everything else (O_CREAT,
# O_EXCL, O_NOCTTY, O_NOFOLLOW, O_PATH, O_TMPFILE's extra bit, ...) is dropped.
_OPEN_PASS: Final = (
    os.O_ACCMODE
    | os.O_TRUNC
    | os.O_NONBLOCK
    | os.O_DSYNC
    | os.O_SYNC
    | os.O_DIRECT
    | os.O_LARGEFILE
    | os.O_NOATIME
    | os.O_DIRECTORY
)
_O_TMPFILE_BIT: Final = os.O_TMPFILE & ~os.O_DIRECTORY
_CREATE_TYPES: Final = frozenset(
    (stat.S_IFREG, stat.S_IFIFO, stat.S_IFSOCK, stat.S_IFCHR, stat.S_IFBLK)
)
_RENAME_FLAGS: Final = linux.RENAME_NOREPLACE | linux.RENAME_EXCHANGE | linux.RENAME_WHITEOUT
_ACL_NAMES: Final = (b"system.posix_acl_access", b"system.posix_acl_default")
# FS_IOC_GETFLAGS / FS_IOC_SETFLAGS (linux/fs.h), native and 32-bit compat
# numbers; the kernel reads and writes an int whatever the number says.
_FS_IOC_GETFLAGS: Final = frozenset((0x80086601, 0x80046601))
_FS_IOC_SETFLAGS: Final = frozenset((0x40086602, 0x40046602))
_TIME_BITS: Final = abi.FATTR_ATIME | abi.FATTR_MTIME | abi.FATTR_ATIME_NOW | abi.FATTR_MTIME_NOW
_SEEK_WHENCE: Final = frozenset((os.SEEK_SET, os.SEEK_CUR, os.SEEK_END, os.SEEK_DATA, os.SEEK_HOLE))
_DIRENT_BUF: Final = 8192
#: First getdents64 buffer of a READDIR / READDIRPLUS (see ``_entries``).
_DIRENT_FIRST: Final = 4608
_DIRENT_FIRST_PLUS: Final = 1024
_DOTS: Final = (b".", b"..")


log = logging.getLogger("virtiofsd_py.passthrough")


def _err(code: int, what: str) -> OSError:
    return OSError(code, f"{what}: {os.strerror(code)}")


_AT_REMOVEDIR: Final = 0x200


def _unlink_quietly(dirfd: int, name: bytes, flags: int) -> None:
    """Undo a creation whose follow-up failed; the original error is what counts."""
    with contextlib.suppress(OSError):
        if flags & _AT_REMOVEDIR:
            os.rmdir(name, dir_fd=dirfd)
        else:
            os.unlink(name, dir_fd=dirfd)


def check_name(name: bytes) -> None:
    """Refuse names that are not one path component (FUSE sends single names)."""
    if not name:
        raise _err(errno.ENOENT, "empty name")
    if b"/" in name or b"\0" in name:
        raise _err(errno.EINVAL, f"invalid name {name!r}")


@dataclass(frozen=True, slots=True)
class PassthroughConfig:
    """What the passthrough backend serves and how (``virtiofsd`` options)."""

    shared_dir: str | os.PathLike[str]
    cache: CacheMode = "auto"
    readonly: bool = False
    #: Extended attributes; off by default as in the Rust virtiofsd (ENOSYS).
    xattr: bool = False
    #: Flag directories on another mount with FUSE_ATTR_SUBMOUNT.
    announce_submounts: bool = False
    #: Honour the guest's O_DIRECT (the Rust virtiofsd drops it by default).
    allow_direct_io: bool = False
    #: Keep the guest's O_NOATIME (dropped by default: it needs file ownership).
    preserve_noatime: bool = False
    #: Where this process's fds appear (changes once a sandbox pivots root).
    proc_self_fd: str = "/proc/self/fd"
    #: ``--xattrmap``: rename/hide/refuse xattr names (needs ``xattr``).
    xattrmap: XattrMap | None = None
    #: ``--posix-acl``: serve system.posix_acl_* (else they are ENOTSUP).
    posix_acl: bool = False
    #: ``--killpriv-v2``: honour FUSE_WRITE_KILL_SUIDGID / FATTR_KILL_SUIDGID.
    killpriv_v2: bool = False
    #: ``--translate-uid`` / ``--translate-gid``.
    uid_map: IdMap | None = None
    gid_map: IdMap | None = None
    #: ``--inode-file-handles``: nodes as file handles instead of O_PATH fds.
    inode_file_handles: InodeFileHandles = "never"


class PassthroughFS(Filesystem):
    """``Filesystem`` over a host directory.  Thread-safe."""

    def __new__(cls, config: PassthroughConfig) -> PassthroughFS:
        if config.readonly and not cls.readonly:
            cls = ReadOnlyPassthroughFS
        return super().__new__(cls)

    def __init__(self, config: PassthroughConfig) -> None:
        self.config = config
        self.policy = CachePolicy.from_mode(config.cache)
        self._entry_timeout = self.policy.entry_timeout
        self._attr_timeout = self.policy.attr_timeout
        self._file_open_flags = self.policy.file_open_flags
        self._dir_open_flags = self.policy.dir_open_flags
        self._proc_prefix = config.proc_self_fd.rstrip("/") + "/"
        self._drop_flags = (0 if config.allow_direct_io else os.O_DIRECT) | (
            0 if config.preserve_noatime else os.O_NOATIME
        )
        self.session: SessionInfo | None = None
        path = os.fspath(config.shared_dir)
        try:
            root_fd = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:
            raise OSError(e.errno, f"shared directory {path!r}: {e.strerror}", path) from None
        try:
            self._proc_fd = os.open(config.proc_self_fd, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            os.close(root_fd)
            raise
        try:
            #: Makes the file handles of new nodes (--inode-file-handles).
            self.file_handles = InodeHandles(config.inode_file_handles, root_fd, self._proc_prefix)
        except OSError:
            os.close(root_fd)
            os.close(self._proc_fd)
            raise
        st, mnt_id = stat_fd(root_fd)
        root = InodeData(ROOT_ID, root_fd, (st.st_dev, st.st_ino, mnt_id), st.st_mode, 0, b"")
        self.inodes = InodeTable(root)
        self.handles = HandleTable()
        self.locks = LockTable()
        self._writeback = False
        self._supp_group_ext = False
        self._uid_map = config.uid_map if config.uid_map else None
        self._gid_map = config.gid_map if config.gid_map else None
        #: Guest fd budget (CVE-2020-10717): nodes + handles + lock OFDs the
        #: guest may make us hold; past it requests get ENFILE and the daemon
        #: keeps the rest of RLIMIT_NOFILE for itself.
        self.fd_limit = FdBudget.from_rlimit().limit
        self._fd_warned = False
        #: Host name of the guest's security.capability when --xattrmap renames it.
        self._remapped_cap = (
            config.xattrmap.remapped_capability()
            if config.xattr and config.xattrmap is not None
            else None
        )
        #: Guest renames/unlinks so far: prepared migration paths are stale after one.
        self.namespace_changes = 0
        #: Migrated nodes still to be found after the switch-over (hooks.py).
        self.deferred: PendingNodes | None = None
        #: Migrated locks still being taken again (the source may hold them a while).
        self.lock_restorer: Stoppable | None = None

    def close(self) -> None:
        """Close every fd, the root's included (for tests and shutdown)."""
        self.destroy()
        self.inodes.root.close()
        if self._proc_fd >= 0:
            os.close(self._proc_fd)
            self._proc_fd = -1

    # -- helpers ---------------------------------------------------------
    def _node(self, nodeid: int) -> InodeData:
        node = self.inodes.get(nodeid)
        if node is None:
            raise _err(errno.EBADF, f"no node {nodeid}")
        deferred = self.deferred
        if deferred is not None:
            deferred.ensure(node)
        return node

    def settle_migration(self) -> None:
        """Find every migrated node still deferred (before paths may change)."""
        deferred = self.deferred
        if deferred is not None:
            deferred.settle()

    def _entry(self, node: InodeData, st: os.stat_result, attr_flags: int = 0) -> Entry:
        st = self._guest_stat(st)
        return Entry(node.nodeid, 0, st, self._entry_timeout, self._attr_timeout, attr_flags)

    def _guest_stat(self, st: os.stat_result) -> os.stat_result:
        """``st`` with host uid/gid translated to the guest's (--translate-uid/gid)."""
        if self._uid_map is None and self._gid_map is None:
            return st
        uid = self._uid_map.to_guest(st.st_uid) if self._uid_map else st.st_uid
        gid = self._gid_map.to_guest(st.st_gid) if self._gid_map else st.st_gid
        return os.stat_result(
            (
                *(st.st_mode, st.st_ino, st.st_dev, st.st_nlink, uid, gid, st.st_size),
                *(int(st.st_atime), int(st.st_mtime), int(st.st_ctime)),
                *(st.st_atime, st.st_mtime, st.st_ctime),
                *(st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns),
                *(st.st_blksize, st.st_blocks, st.st_rdev),
            )
        )

    def _host_uid(self, uid: int) -> int:
        return self._uid_map.to_host(uid) if self._uid_map else uid

    def _host_gid(self, gid: int) -> int:
        return self._gid_map.to_host(gid) if self._gid_map else gid

    def _creds(self, ctx: Context) -> Credentials:
        """The guest caller's credentials on the host, for creating requests (creds.py)."""
        return Credentials(
            self._host_uid(ctx.uid),
            self._host_gid(ctx.gid),
            tuple(self._host_gid(g) for g in ctx.groups),
            keep_dac_override=not self._supp_group_ext,
        )

    @contextlib.contextmanager
    def _node_path(self, node: InodeData) -> Iterator[str]:
        """The /proc/self/fd path of ``node``'s fd, valid inside the ``with``."""
        with node.opened() as fd:
            yield self._proc_prefix + str(fd)

    def proc_path(self, fd: int) -> str:
        """The /proc/self/fd magic link of ``fd`` as this process can name it.

        Under a sandbox the prefix may be relative (the daemon's working
        directory is its fd directory), so callers never spell ``/proc``.
        """
        return self._proc_prefix + str(fd)

    def fdinfo_path(self, fd: int) -> str:
        """``/proc/self/fdinfo/N`` of ``fd``, reached from the fd directory."""
        return f"{self._proc_prefix}../fdinfo/{fd}"

    def _drop_capability(self, target: int | str) -> None:
        """Remove the remapped security.capability before a write, truncate or chown.

        CVE-2021-20263: the host kernel only clears the attribute it knows
        by that name; when --xattrmap stores the guest's elsewhere, a
        modified file would keep its capabilities in the guest.  ``target``
        is an open fd or a /proc/self/fd path of a regular file.  Failing to
        remove it fails the request (before anything changed), as in the
        Rust and C virtiofsd.
        """
        if self._remapped_cap is None:
            return
        try:
            os.removexattr(target, self._remapped_cap)
        except OSError as e:
            if e.errno not in (errno.ENODATA, errno.ENOTSUP):
                raise

    def _drop_node_capability(self, node: InodeData) -> None:
        """``_drop_capability`` through the node (opened only when there is work)."""
        if self._remapped_cap is not None:
            with self._node_path(node) as path:
                self._drop_capability(path)

    def _fd_guard(self) -> None:
        """ENFILE once the guest holds its whole fd budget (``fd_limit``).

        Nodes kept as file handles hold no fd and do not count.
        """
        held = self.inodes.fd_nodes + len(self.handles) + len(self.locks)
        deferred = self.deferred
        if deferred is not None and not self.file_handles.enabled:
            held += len(deferred.pending)  # each will hold an fd once found
        if held < self.fd_limit:
            self._fd_warned = False
            return
        if not self._fd_warned:
            self._fd_warned = True
            log.error(
                "the guest holds %d file descriptors, its whole budget: requests get ENFILE "
                "until it forgets some (raise --rlimit-nofile for more)",
                held,
            )
        raise _err(errno.ENFILE, "the guest's file descriptor budget is used up")

    def _reopen(self, node: InodeData, flags: int) -> int:
        """A real fd for ``node`` (regular file or directory only)."""
        self._fd_guard()
        if not (stat.S_ISREG(node.mode) or stat.S_ISDIR(node.mode)):
            raise _err(errno.EBADF, "not a regular file or directory")
        return self.reopen_node(node, flags)

    def reopen_node(self, node: InodeData, flags: int) -> int:
        """A new open file of ``node`` with ``flags``: by handle, or via /proc/self/fd.

        The caller has made sure that ``node`` is a regular file or directory.
        """
        mount = node.mount
        if node.handle is not None and mount is not None:
            return mount.open(node.handle, flags)
        with node.opened() as fd:  # EIO for a node migration did not find
            return os.open(str(fd), flags | os.O_CLOEXEC, dir_fd=self._proc_fd)

    # -- session ---------------------------------------------------------
    def init(self, session: SessionInfo) -> None:
        self.session = session
        self._writeback = bool(session.flags & abi.FUSE_WRITEBACK_CACHE)
        self._supp_group_ext = bool(session.flags & abi.FUSE_CREATE_SUPP_GROUP)

    def destroy(self) -> None:
        deferred, self.deferred = self.deferred, None
        if deferred is not None:
            deferred.cancel()
        restorer, self.lock_restorer = self.lock_restorer, None
        if restorer is not None:
            restorer.stop()
        self.locks.interrupt()
        self.locks.clear()
        self.handles.clear()
        self.inodes.clear()

    # -- names -----------------------------------------------------------
    def lookup(self, ctx: Context, parent: int, name: bytes) -> Entry:
        check_name(name)
        self._fd_guard()
        p = self._node(parent)
        if parent == ROOT_ID and name == b"..":
            name = b"."
        with p.opened() as pfd:
            fd = os.open(name, _O_PATH_FLAGS, dir_fd=pfd)
        if name == b".." and self.share_path(fd) is None:
            # A directory a host process moved out of the share: its ".." is
            # outside.  (The guest kernel resolves ".." itself; only NFS-style
            # exports ask, and they must not climb out.)
            os.close(fd)
            raise _err(errno.EACCES, "'..' leads outside the shared directory")
        return self._add_entry(p, name, fd)

    def share_path(
        self, fd: int, root: bytes | None = None, *, ident: tuple[int, int] | None = None
    ) -> bytes | None:
        """``fd``'s current path relative to the share (b"" for the share itself),
        or None when it lies outside (or is unlinked).

        The path the kernel shows for an fd cannot decide this alone: inside
        ``--sandbox chroot`` the share reads "/" and a directory a host process
        moved out of it reads as its host path, which starts with "/" too.  So
        the path must lead from the share to the same inode again: walked one
        component at a time without following symlinks or "..", which decides
        whether an fd is inside the share.  A caller that knows the inode
        already, as ``ident`` (st_dev, st_ino), wants only its path: one
        fstatat from the share confirms it (migration's source, which needs the
        path of every node at switch-over; the destination walks it strictly
        itself).  ``root`` is ``share_root()``, for a caller asking about many fds.
        """
        root_fd = self.inodes.root.fd
        try:
            if root is None:
                root = self.share_root()
            where = os.readlink(self.proc_path(fd).encode())
        except OSError:
            return None
        prefix = root.rstrip(b"/") + b"/"
        if where == root:
            rel = b""
        elif where.startswith(prefix):
            rel = where[len(prefix) :]
        else:
            return None
        try:
            if ident is not None:
                found = os.stat(rel or b".", dir_fd=root_fd, follow_symlinks=False)
                return rel if (found.st_dev, found.st_ino) == ident else None
            st = os.fstat(fd)
            if not rel:
                found = os.fstat(root_fd)
            else:
                walked = linux.open_beneath(root_fd, rel)
                try:
                    found = os.fstat(walked)
                finally:
                    os.close(walked)
        except OSError:
            return None
        return rel if (found.st_dev, found.st_ino) == (st.st_dev, st.st_ino) else None

    def share_root(self) -> bytes:
        """The share's own path as this process reads it ("/" inside a chroot)."""
        return os.readlink(self.proc_path(self.inodes.root.fd).encode())

    def _add_entry(self, p: InodeData, name: bytes, fd: int) -> Entry:
        """Count one lookup of the O_PATH ``fd`` found as ``name`` in ``p``; takes ``fd``."""
        parent = p.nodeid
        try:
            st, mnt_id = stat_fd(fd)
            key = (st.st_dev, st.st_ino, mnt_id)
            handles = self.file_handles
            # Made for known nodes too: a handle node does not pin its inode,
            # so the same (dev, ino) may now be another file (see add_lookup).
            handle = handles.make(fd, st.st_mode) if handles.enabled else None
            deferred = self.deferred
            if deferred is not None:
                deferred.before_lookup(key)
            node, taken = self.inodes.add_lookup(fd, key, st.st_mode, parent, name, handle)
        except BaseException:
            os.close(fd)
            raise
        if not taken:
            os.close(fd)
        attr_flags = 0
        if (
            self.config.announce_submounts
            and stat.S_ISDIR(st.st_mode)
            and (st.st_dev != p.key[0] or mnt_id != p.key[2])
        ):
            attr_flags = FUSE_ATTR_SUBMOUNT
        return self._entry(node, st, attr_flags)

    def forget(self, nodeid: int, nlookup: int) -> None:
        self.inodes.forget(nodeid, nlookup)

    def batch_forget(self, items: Sequence[tuple[int, int]]) -> None:
        self.inodes.forget_many(items)

    # -- attributes ------------------------------------------------------
    def getattr(self, ctx: Context, nodeid: int, fh: int | None) -> AttrReply:
        if fh is not None:
            h = self.handles.get(fh, nodeid)
            return AttrReply(self._guest_stat(os.stat(h.fd)), self._attr_timeout)
        node = self._node(nodeid)
        with node.opened() as fd:
            st = os.stat(fd)
        return AttrReply(self._guest_stat(st), self._attr_timeout)

    def statfs(self, ctx: Context, nodeid: int) -> os.statvfs_result:
        node = self._node(nodeid)
        with node.opened() as fd:
            return os.fstatvfs(fd)

    def readlink(self, ctx: Context, nodeid: int) -> bytes:
        node = self._node(nodeid)
        if not stat.S_ISLNK(node.mode):
            raise _err(errno.EINVAL, "not a symlink")
        with node.opened() as fd:
            return os.readlink(b"", dir_fd=fd)

    def access(self, ctx: Context, nodeid: int, mask: int) -> None:
        """Permission check of the mode bits for ``ctx`` as the host kernel does it.

        POSIX classes (owner, else group incl. supplementary groups, else
        other); uid 0 passes reads and writes, and executes when any x bit is
        set or the node is a directory.  ACLs are not consulted.  (Issue 3:
        run the check under the request's effective ids instead.)
        """
        node = self._node(nodeid)
        with node.opened() as fd:
            st = os.stat(fd)
        want = mask & (os.R_OK | os.W_OK | os.X_OK)
        if want & os.W_OK and self.readonly:
            raise _err(errno.EROFS, "read-only share")
        if want == os.F_OK:
            return
        mode = st.st_mode
        if ctx.uid == 0:
            if want & os.X_OK and not (mode & 0o111 or stat.S_ISDIR(mode)):
                raise _err(errno.EACCES, "access")
            return
        if st.st_uid == ctx.uid:
            bits = (mode >> 6) & 7
        elif st.st_gid == ctx.gid or st.st_gid in ctx.groups:
            bits = (mode >> 3) & 7
        else:
            bits = mode & 7
        if want & ~bits:
            raise _err(errno.EACCES, "access")

    # -- files -----------------------------------------------------------
    def _check_open_flags(self, flags: int) -> None:
        """Refusals of the read-only share."""

    def _check_write(self) -> None:
        """Refusal of every change by the read-only share."""

    def _host_flags(self, flags: int) -> int:
        """open(2) flags for the host from the guest's.

        With the writeback cache the guest kernel reads pages of files opened
        write-only and computes append offsets itself, so O_WRONLY becomes
        O_RDWR and O_APPEND is dropped (as the Rust virtiofsd does).  Otherwise
        O_APPEND stays, so appends from several guests and the host land at the
        real end of file.
        """
        host = flags & (_OPEN_PASS | os.O_APPEND) & ~self._drop_flags
        if self._writeback:
            host &= ~os.O_APPEND
            if host & os.O_ACCMODE == os.O_WRONLY:
                host = (host & ~os.O_ACCMODE) | os.O_RDWR
        return host

    def _reopen_flags(self, node: InodeData, flags: int) -> int:
        """Reopen with ``_host_flags``; a write-only file refused for O_RDWR stays write-only."""
        host = self._host_flags(flags)
        try:
            return self._reopen(node, host)
        except PermissionError:
            if flags & os.O_ACCMODE != os.O_WRONLY or host & os.O_ACCMODE != os.O_RDWR:
                raise
            return self._reopen(node, (host & ~os.O_ACCMODE) | os.O_WRONLY)

    def _kill_priv(self, kill_suidgid: bool) -> contextlib.AbstractContextManager[object]:
        """Without CAP_FSETID for the block when the guest asks to kill set-id bits.

        FUSE_HANDLE_KILLPRIV_V2 (--killpriv-v2): the guest tells us when the
        writer / truncater may not keep setuid/setgid; as root the host kernel
        would keep them, without CAP_FSETID it clears them itself.
        """
        if kill_suidgid and self.config.killpriv_v2:
            return DropCap(CAP_FSETID)
        return contextlib.nullcontext()

    def _open(
        self, nodeid: int, flags: int, cache_flags: int, kill_suidgid: bool = False
    ) -> Opened:
        self._check_open_flags(flags)
        node = self._node(nodeid)
        if flags & os.O_TRUNC and stat.S_ISREG(node.mode):
            self._drop_node_capability(node)
        with self._kill_priv(kill_suidgid and bool(flags & os.O_TRUNC)):
            fd = self._reopen_flags(node, flags)
        h = self.handles.add(nodeid, fd, flags)
        return Opened(h.fh, cache_flags)

    def open(self, ctx: Context, nodeid: int, flags: int, *, kill_suidgid: bool = False) -> Opened:
        # As the Rust virtiofsd: cache flags follow O_DIRECTORY, not the node type.
        cache = self._dir_open_flags if flags & os.O_DIRECTORY else self._file_open_flags
        return self._open(nodeid, flags, cache, kill_suidgid)

    def read(
        self, ctx: Context, nodeid: int, fh: int, offset: int, size: int, bufs: list[memoryview]
    ) -> int:
        h = self.handles.get(fh, nodeid)
        if not bufs:
            return 0
        return os.preadv(h.fd, bufs, offset)

    def flush(self, ctx: Context, nodeid: int, fh: int, lock_owner: int) -> None:
        # What close(2) of the guest's fd means on the host: close a dup, so
        # close-time work (NFS flush, lock release) happens now.
        h = self.handles.get(fh, nodeid)
        os.close(os.dup(h.fd))
        self.locks.drop_owner(nodeid, lock_owner)

    def release(
        self, ctx: Context, nodeid: int, fh: int, flags: int, *, lock_owner: int | None = None
    ) -> None:
        if lock_owner is not None:  # FUSE_RELEASE_FLOCK_UNLOCK
            h = self.handles.get(fh, nodeid)
            self.locks.flock(h.fd, fcntl.F_UNLCK, sleep=False)
            del h
        self.handles.remove(fh, nodeid)

    def lseek(self, ctx: Context, nodeid: int, fh: int, offset: int, whence: int) -> int:
        if whence not in _SEEK_WHENCE:
            raise _err(errno.EINVAL, f"lseek whence {whence}")
        h = self.handles.get(fh, nodeid)
        return os.lseek(h.fd, offset, whence)

    # -- directories -----------------------------------------------------
    def opendir(self, ctx: Context, nodeid: int, flags: int) -> Opened:
        return self._open(nodeid, flags | os.O_DIRECTORY, self._dir_open_flags)

    def readdir(
        self, ctx: Context, nodeid: int, fh: int, offset: int, plus: bool
    ) -> Iterator[DirEntry]:
        """Entries after the kernel cookie ``offset`` (getdents64 ``d_off``).

        The handle is checked now; entries come lazily.  With ``plus`` each
        entry but ``.``/``..`` is looked up as it is yielded; an entry that
        vanished in between is skipped, any other lookup error is raised.
        """
        h = self.handles.get(fh, nodeid)
        return self._entries(ctx, h, offset, plus)

    def _entries(self, ctx: Context, h: HandleData, offset: int, plus: bool) -> Iterator[DirEntry]:
        # The first getdents64 asks for about what one reply page holds
        # (host records are 24-32 bytes for short names, fuse_dirent 32,
        # fuse_direntplus 160): the dispatcher stops at a full reply and
        # records read past it would be parsed for nothing.  Later calls grow.
        buf = bytearray(_DIRENT_FIRST_PLUS if plus else _DIRENT_FIRST)
        cookie = offset
        while True:
            with h.lock:  # the fd's position is shared by every READDIR on it
                os.lseek(h.fd, cookie, os.SEEK_SET)
                batch = getdents64(h.fd, buf)
            if not batch:
                return
            if len(buf) < _DIRENT_BUF:
                buf = bytearray(min(2 * len(buf), _DIRENT_BUF))
            if not plus:
                for d in batch:
                    yield DirEntry(d.ino, d.off, d.type, d.name)
                cookie = batch[-1].off
                continue
            # READDIRPLUS: each name but . and .. looked up as LOOKUP does,
            # with the directory opened once per batch (its handle pins it:
            # the guest cannot forget it meanwhile) and the name checks
            # skipped (the host's own names are single components).
            p = self._node(h.nodeid)
            inodes = self.inodes
            # _fd_guard's sum with the handles and locks counted once per batch
            # (only the nodes grow here); _fd_guard itself reports a full budget.
            room = self.fd_limit - len(self.handles) - len(self.locks)
            with p.opened() as pfd:
                for d in batch:
                    cookie = d.off
                    name = d.name
                    entry = None
                    if name not in _DOTS:
                        if inodes.fd_nodes >= room:
                            self._fd_guard()
                        try:
                            fd = os.open(name, _O_PATH_FLAGS, dir_fd=pfd)
                        except FileNotFoundError:
                            continue
                        entry = self._add_entry(p, name, fd)
                    yield DirEntry(d.ino, d.off, d.type, name, entry)

    def releasedir(self, ctx: Context, nodeid: int, fh: int, flags: int) -> None:
        self.handles.remove(fh, nodeid)

    # -- extended attributes --------------------------------------------
    def _xattr_path(self, nodeid: int) -> contextlib.AbstractContextManager[str]:
        """``with``: the path xattr calls use for ``nodeid``, valid inside the block."""
        if not self.config.xattr:
            raise _err(errno.ENOSYS, "xattr support is off")
        node = self._node(nodeid)
        # f*xattr() refuse O_PATH fds; the /proc/self/fd/N magic link names
        # the inode itself (a symlink's own xattrs, a device node's without
        # opening it), so one path call serves every file type.
        return self._node_path(node)

    def _host_xattr_name(self, name: bytes) -> bytes:
        """The host name of a guest xattr name (--xattrmap; ACLs need --posix-acl)."""
        if not name or b"\0" in name:
            raise _err(errno.EINVAL, f"invalid xattr name {name!r}")
        if not self.config.posix_acl and name in _ACL_NAMES:
            raise _err(errno.ENOTSUP, "POSIX ACLs are off (--posix-acl)")
        xmap = self.config.xattrmap
        return xmap.to_host(name) if xmap is not None else name

    def getxattr(self, ctx: Context, nodeid: int, name: bytes) -> bytes:
        with self._xattr_path(nodeid) as path:
            try:
                host_name = self._host_xattr_name(name)
            except PermissionError:  # a "bad" name reads as absent (Rust virtiofsd)
                raise _err(errno.ENODATA, f"xattr {name!r}") from None
            return os.getxattr(path, host_name)

    def listxattr(self, ctx: Context, nodeid: int) -> bytes:
        with self._xattr_path(nodeid) as path:
            names = [os.fsencode(n) for n in os.listxattr(path)]
        if not self.config.posix_acl:
            names = [n for n in names if n not in _ACL_NAMES]
        xmap = self.config.xattrmap
        if xmap is not None:
            names = [g for g in map(xmap.to_guest, names) if g is not None]
        return b"".join(n + b"\0" for n in names)

    def setxattr(
        self, ctx: Context, nodeid: int, name: bytes, value: bytes, flags: int, setxattr_flags: int
    ) -> None:
        with self._xattr_path(nodeid) as path:
            self._check_write()
            host_name = self._host_xattr_name(name)
            os.setxattr(path, host_name, value, flags)
            if (
                setxattr_flags & abi.FUSE_SETXATTR_ACL_KILL_SGID
                and host_name == b"system.posix_acl_access"
            ):
                # The guest decided the caller may not keep S_ISGID (not in the
                # group, no CAP_FSETID); as root the host kernel would keep it.
                mode = os.stat(path, follow_symlinks=False).st_mode
                if mode & stat.S_ISGID:
                    os.chmod(path, stat.S_IMODE(mode) & ~stat.S_ISGID)

    def removexattr(self, ctx: Context, nodeid: int, name: bytes) -> None:
        with self._xattr_path(nodeid) as path:
            self._check_write()
            os.removexattr(path, self._host_xattr_name(name))

    # -- changing the tree ------------------------------------------------------------
    def _set_security_ctx(self, ctx: Context, path: str) -> None:
        """Label a node the guest just created (FUSE_SECURITY_CTX, --security-label)."""
        if ctx.security_ctx is None:
            return
        name, value = ctx.security_ctx
        xmap = self.config.xattrmap
        os.setxattr(path, xmap.to_host(name) if xmap is not None else name, value)

    def _new_node(
        self, ctx: Context, p: InodeData, pfd: int, name: bytes, rmflags: int = 0
    ) -> Entry:
        """Label and look up the node just created as ``name`` in ``p`` (fd ``pfd``).

        Runs as the daemon.  If labelling fails the node is removed again
        (``rmflags`` for unlinkat) and the request fails, as the Rust
        virtiofsd does.
        """
        fd = os.open(name, _O_PATH_FLAGS, dir_fd=pfd)
        try:
            self._set_security_ctx(ctx, self._proc_prefix + str(fd))
        except BaseException:
            os.close(fd)
            _unlink_quietly(pfd, name, rmflags)
            raise
        return self._add_entry(p, name, fd)

    def _handle_entry(self, p: InodeData, name: bytes, fd: int, flags: int) -> tuple[Entry, Opened]:
        """Entry and handle for the open file ``fd`` (takes ``fd``)."""
        try:
            path_fd = os.open(str(fd), os.O_PATH | os.O_CLOEXEC, dir_fd=self._proc_fd)
            entry = self._add_entry(p, name, path_fd)
        except BaseException:
            os.close(fd)
            raise
        h = self.handles.add(entry.nodeid, fd, flags)
        return entry, Opened(h.fh, self._file_open_flags)

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
        """CREATE: a new regular file, opened (O_CREAT | O_EXCL on the host).

        If the name exists and the guest did not ask for O_EXCL (its dentry
        cache was stale), the existing file is opened instead -- if it is a
        regular file: a fifo, socket or device node is never opened
        (CVE-2020-35517).
        """
        self._check_write()
        self._fd_guard()
        check_name(name)
        p = self._node(parent)
        host = self._host_flags(flags) & ~os.O_TRUNC
        with p.opened() as pfd:
            existing = False
            with self._creds(ctx), Umask(umask) as um:
                try:
                    fd = os.open(
                        name,
                        host | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                        um.mode(stat.S_IMODE(mode)),
                        dir_fd=pfd,
                    )
                except FileExistsError:
                    if flags & os.O_EXCL:
                        raise
                    with self._kill_priv(kill_suidgid and bool(flags & os.O_TRUNC)):
                        fd = self._open_existing(pfd, name, flags)
                    existing = True
            if not existing:
                try:
                    self._set_security_ctx(ctx, self._proc_prefix + str(fd))
                except BaseException:
                    os.close(fd)
                    _unlink_quietly(pfd, name, 0)
                    raise
        # As the daemon, like every other entry: the node table's bookkeeping
        # (and finding a migrated node) is not the guest's business.
        return self._handle_entry(p, name, fd, flags)

    def _open_existing(self, pfd: int, name: bytes, flags: int) -> int:
        path_fd = os.open(name, _O_PATH_FLAGS, dir_fd=pfd)
        try:
            mode = os.stat(path_fd).st_mode
            if stat.S_ISDIR(mode):
                raise _err(errno.EISDIR, f"{name!r} is a directory")
            if not stat.S_ISREG(mode):
                raise _err(errno.EEXIST, f"{name!r} exists and is not a regular file")
            if flags & os.O_TRUNC:
                self._drop_capability(self._proc_prefix + str(path_fd))
            host = self._host_flags(flags) | os.O_CLOEXEC
            return os.open(str(path_fd), host, dir_fd=self._proc_fd)
        finally:
            os.close(path_fd)

    def mknod(
        self, ctx: Context, parent: int, name: bytes, mode: int, rdev: int, umask: int
    ) -> Entry:
        """Regular files, fifos, sockets; device nodes where the host lets the caller."""
        self._check_write()
        self._fd_guard()
        check_name(name)
        fmt = stat.S_IFMT(mode) or stat.S_IFREG
        if fmt not in _CREATE_TYPES:
            raise _err(errno.EINVAL, f"mknod of file type {fmt:o}")
        p = self._node(parent)
        with p.opened() as pfd:
            with self._creds(ctx), Umask(umask) as um:
                os.mknod(name, fmt | um.mode(stat.S_IMODE(mode)), rdev, dir_fd=pfd)
            return self._new_node(ctx, p, pfd, name)

    def mkdir(self, ctx: Context, parent: int, name: bytes, mode: int, umask: int) -> Entry:
        self._check_write()
        self._fd_guard()
        check_name(name)
        p = self._node(parent)
        with p.opened() as pfd:
            with self._creds(ctx), Umask(umask) as um:
                os.mkdir(name, um.mode(stat.S_IMODE(mode)), dir_fd=pfd)
            return self._new_node(ctx, p, pfd, name, _AT_REMOVEDIR)

    def symlink(self, ctx: Context, parent: int, name: bytes, target: bytes) -> Entry:
        self._check_write()
        self._fd_guard()
        check_name(name)
        if not target or b"\0" in target:
            raise _err(errno.ENOENT if not target else errno.EINVAL, "symlink target")
        p = self._node(parent)
        with p.opened() as pfd:
            with self._creds(ctx):
                os.symlink(target, name, dir_fd=pfd)
            return self._new_node(ctx, p, pfd, name)

    def link(self, ctx: Context, nodeid: int, newparent: int, newname: bytes) -> Entry:
        """A hard link to the node (any type) through its /proc/self/fd magic link."""
        self._check_write()
        self._fd_guard()
        check_name(newname)
        node = self._node(nodeid)
        np = self._node(newparent)
        with self._node_path(node) as path, np.opened() as npfd:
            os.link(path, newname, dst_dir_fd=npfd, follow_symlinks=True)
            return self._add_entry(np, newname, os.open(newname, _O_PATH_FLAGS, dir_fd=npfd))

    def unlink(self, ctx: Context, parent: int, name: bytes) -> None:
        self._check_write()
        check_name(name)
        self.settle_migration()
        p = self._node(parent)
        with p.opened() as pfd:
            os.unlink(name, dir_fd=pfd)
        self.namespace_changes += 1

    def rmdir(self, ctx: Context, parent: int, name: bytes) -> None:
        self._check_write()
        check_name(name)
        self.settle_migration()
        p = self._node(parent)
        with p.opened() as pfd:
            os.rmdir(name, dir_fd=pfd)
        self.namespace_changes += 1

    def rename(
        self, ctx: Context, parent: int, name: bytes, newparent: int, newname: bytes, flags: int
    ) -> None:
        """RENAME / RENAME2 (renameat2(2) flags NOREPLACE, EXCHANGE, WHITEOUT)."""
        self._check_write()
        check_name(name)
        check_name(newname)
        if flags & ~_RENAME_FLAGS:
            raise _err(errno.EINVAL, f"rename flags {flags:#x}")
        self.settle_migration()
        p = self._node(parent)
        np = self._node(newparent)
        with p.opened() as pfd, np.opened() as npfd:
            if flags:
                # WHITEOUT creates a character device (0/0): only as the host allows.
                linux.renameat2(pfd, name, npfd, newname, flags)
            else:
                os.rename(name, newname, src_dir_fd=pfd, dst_dir_fd=npfd)
        self.namespace_changes += 1

    def tmpfile(
        self, ctx: Context, parent: int, mode: int, flags: int, umask: int
    ) -> tuple[Entry, Opened]:
        """TMPFILE: an unnamed regular file in ``parent`` (O_TMPFILE), opened."""
        self._check_write()
        self._fd_guard()
        p = self._node(parent)
        host = self._host_flags(flags) & ~(os.O_TRUNC | os.O_APPEND)
        if host & os.O_ACCMODE == os.O_RDONLY:
            raise _err(errno.EINVAL, "O_TMPFILE needs write access")
        with p.opened() as pfd, self._creds(ctx), Umask(umask) as um:
            fd = os.open(
                ".", host | os.O_TMPFILE | os.O_CLOEXEC, um.mode(stat.S_IMODE(mode)), dir_fd=pfd
            )
        return self._handle_entry(p, b"", fd, flags)

    # -- changing files -----------------------------------------------------------------
    def setattr(self, ctx: Context, nodeid: int, attr: SetAttr) -> AttrReply:
        """SETATTR: through the open handle when the guest names one, else the inode.

        Without a handle nothing is ever opened: chmod/truncate/utimensat go
        through the /proc/self/fd magic link (which acts on a symlink itself),
        chown through fchownat(AT_EMPTY_PATH) -- so a device node or fifo is
        never opened (CVE-2020-35517).  truncate(2) refuses non-regular files.
        """
        self._check_write()
        node = self._node(nodeid)
        v = attr.valid
        fd = -1
        h: HandleData | None = None
        if attr.fh is not None and v & abi.FATTR_FH:
            h = self.handles.get(attr.fh, nodeid)
            fd = h.fd
        # The node's own fd only where the open file cannot serve: a handle
        # node is then opened for this request only.
        need_node = fd < 0 or bool(v & (abi.FATTR_UID | abi.FATTR_GID))
        with node.opened() if need_node else NodeFd(-1, False) as nfd:
            st = self._setattr(node, nfd, fd, attr)
        del h
        return AttrReply(self._guest_stat(st), self._attr_timeout)

    def _setattr(self, node: InodeData, nfd: int, fd: int, attr: SetAttr) -> os.stat_result:
        """SETATTR's changes through the open file ``fd`` if >= 0, else the node's ``nfd``."""
        v = attr.valid
        path = self._proc_prefix + str(nfd)
        kill = attr.kill_suidgid and self.config.killpriv_v2
        if v & (abi.FATTR_UID | abi.FATTR_GID | abi.FATTR_SIZE) and stat.S_ISREG(node.mode):
            self._drop_capability(fd if fd >= 0 else path)
        if v & abi.FATTR_MODE:
            if fd >= 0:
                os.fchmod(fd, stat.S_IMODE(attr.mode))
            else:
                os.chmod(path, stat.S_IMODE(attr.mode))
        if v & (abi.FATTR_UID | abi.FATTR_GID):
            uid = self._host_uid(attr.uid) if v & abi.FATTR_UID else -1
            gid = self._host_gid(attr.gid) if v & abi.FATTR_GID else -1
            linux.fchown_empty(nfd, uid, gid)
        if v & abi.FATTR_SIZE:
            if not stat.S_ISREG(node.mode):
                code = errno.EISDIR if stat.S_ISDIR(node.mode) else errno.EINVAL
                raise _err(code, "truncate of a file that is not regular")
            with DropCap(CAP_FSETID) if kill else contextlib.nullcontext():
                if fd >= 0:
                    os.ftruncate(fd, attr.size)
                else:
                    os.truncate(path, attr.size)
        if v & _TIME_BITS:
            linux.utimens(
                fd if fd >= 0 else self._proc_fd,
                None if fd >= 0 else str(nfd).encode(),
                attr.atime_ns if v & abi.FATTR_ATIME else None,
                attr.mtime_ns if v & abi.FATTR_MTIME else None,
                atime_now=bool(v & abi.FATTR_ATIME_NOW),
                mtime_now=bool(v & abi.FATTR_MTIME_NOW),
            )
        # FATTR_CTIME: the host sets ctime itself on every change above.
        return os.stat(fd) if fd >= 0 else os.stat(nfd)

    def write(
        self,
        ctx: Context,
        nodeid: int,
        fh: int,
        offset: int,
        bufs: list[memoryview],
        write_flags: int,
    ) -> int:
        """pwritev straight from guest memory; the host fd's O_APPEND appends.

        FUSE_WRITE_KILL_SUIDGID (with --killpriv-v2): the writer may not keep
        setuid/setgid, so the write runs without CAP_FSETID and the host kernel
        clears them.
        """
        self._check_write()
        h = self.handles.get(fh, nodeid)
        if not bufs:
            return 0
        self._drop_capability(h.fd)
        if write_flags & abi.FUSE_WRITE_KILL_SUIDGID and self.config.killpriv_v2:
            with DropCap(CAP_FSETID):
                return os.pwritev(h.fd, bufs, offset)
        return os.pwritev(h.fd, bufs, offset)

    def fsync(self, ctx: Context, nodeid: int, fh: int, datasync: bool) -> None:
        h = self.handles.get(fh, nodeid)
        (os.fdatasync if datasync else os.fsync)(h.fd)

    def fsyncdir(self, ctx: Context, nodeid: int, fh: int, datasync: bool) -> None:
        self.fsync(ctx, nodeid, fh, datasync)

    def fallocate(
        self, ctx: Context, nodeid: int, fh: int, mode: int, offset: int, length: int
    ) -> None:
        self._check_write()
        h = self.handles.get(fh, nodeid)
        self._drop_capability(h.fd)
        linux.fallocate(h.fd, mode, offset, length)

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
        self._check_write()
        if flags:
            raise _err(errno.EINVAL, "copy_file_range flags must be 0")
        src = self.handles.get(fh_in, nodeid_in)
        dst = self.handles.get(fh_out, nodeid_out)
        self._drop_capability(dst.fd)
        return os.copy_file_range(src.fd, dst.fd, length, off_in, off_out)

    def syncfs(self, ctx: Context, nodeid: int) -> None:
        node = self._node(nodeid)
        # syncfs(2) refuses O_PATH fds; a fifo or device is never opened, so
        # those sync the filesystem of the share's root.
        target = node if stat.S_ISREG(node.mode) or stat.S_ISDIR(node.mode) else self.inodes.root
        fd = self._reopen(target, os.O_RDONLY | os.O_NONBLOCK)
        try:
            linux.syncfs(fd)
        finally:
            os.close(fd)

    def statx(self, ctx: Context, nodeid: int, fh: int | None, flags: int, mask: int) -> StatxReply:
        if fh is not None:
            h = self.handles.get(fh, nodeid)
            fields = linux.statx_fields(h.fd, flags, mask)
        else:
            node = self._node(nodeid)
            with node.opened() as nfd:
                fields = linux.statx_fields(nfd, flags, mask)
        if self._uid_map is not None:
            fields["uid"] = self._uid_map.to_guest(fields["uid"])
        if self._gid_map is not None:
            fields["gid"] = self._gid_map.to_guest(fields["gid"])
        return StatxReply(fields, self._attr_timeout)

    def ioctl(
        self,
        ctx: Context,
        nodeid: int,
        fh: int,
        flags: int,
        cmd: int,
        arg: int,
        in_data: bytes,
        out_size: int,
    ) -> tuple[int, bytes]:
        """FS_IOC_GETFLAGS / FS_IOC_SETFLAGS (chattr/lsattr) only; ENOTTY otherwise.

        SETFLAGS runs under the caller's credentials: the guest kernel checks
        nothing for a FUSE ioctl, the host checks ownership and
        CAP_LINUX_IMMUTABLE.
        """
        h = self.handles.get(fh, nodeid)
        if cmd in _FS_IOC_GETFLAGS:
            buf = fcntl.ioctl(h.fd, cmd, bytes(4))
            return 0, bytes(buf[:4])
        if cmd in _FS_IOC_SETFLAGS:
            self._check_write()
            if len(in_data) < 4:
                raise _err(errno.EINVAL, "FS_IOC_SETFLAGS needs an int")
            with self._creds(ctx):
                fcntl.ioctl(h.fd, cmd, in_data[:4])
            return 0, b""
        raise _err(errno.ENOTTY, f"ioctl {cmd:#x}")

    # -- locks ----------------------------------------------------------------------------
    def _owner_fd(self, node: InodeData, h: HandleData, owner: int) -> int:
        accmode = h.flags & os.O_ACCMODE
        if stat.S_ISDIR(node.mode):
            accmode = os.O_RDONLY
        o = self.locks.owner_fd(
            node.nodeid, owner, accmode, lambda mode: self._reopen(node, mode | os.O_NONBLOCK)
        )
        return o.fd

    def getlk(self, ctx: Context, nodeid: int, fh: int, owner: int, lock: Lock) -> Lock:
        h = self.handles.get(fh, nodeid)
        node = self._node(nodeid)
        return self.locks.getlk(self._owner_fd(node, h, owner), lock)

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
        h = self.handles.get(fh, nodeid)
        if flock:
            self.locks.flock(h.fd, lock.type, sleep=sleep)
            return
        node = self._node(nodeid)
        if lock.type == fcntl.F_UNLCK and (nodeid, owner) not in self.locks:
            return  # nothing held: do not open an OFD just to unlock it
        self.locks.setlk(self._owner_fd(node, h, owner), lock, sleep=sleep)

    def interrupt_waits(self) -> None:
        self.locks.interrupt()

    def lock_owner_fd(self, node: InodeData, owner: int, write: bool) -> int:
        """``owner``'s OFD on ``node`` (opened for writing if ``write``)."""
        accmode = os.O_RDWR if write and not stat.S_ISDIR(node.mode) else os.O_RDONLY
        o = self.locks.owner_fd(
            node.nodeid, owner, accmode, lambda mode: self._reopen(node, mode | os.O_NONBLOCK)
        )
        return o.fd


class ReadOnlyPassthroughFS(PassthroughFS):
    """``--readonly``: every request that could change the share gets EROFS."""

    readonly = True

    def _check_write(self) -> None:
        raise _err(errno.EROFS, "read-only share")

    def _check_open_flags(self, flags: int) -> None:
        if flags & os.O_ACCMODE != os.O_RDONLY or flags & (
            os.O_TRUNC | os.O_CREAT | os.O_EXCL | _O_TMPFILE_BIT
        ):
            raise _err(errno.EROFS, "read-only share")
