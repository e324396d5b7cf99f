"""The passthrough backend's core: configuration, state and the helpers every
group of operations shares.

``PassthroughCore`` holds the tables (inodes, open files, lock owners), the
cache policy, the guest's fd budget and the uid/gid maps, and answers the
questions every operation asks: which node is this id (``_node``), what may
the guest hold (``_fd_guard``), as whom do we act (``_creds``), how is a node
opened again (``_reopen``, ``_open``), how does a host stat look to the guest
(``_entry``, ``_guest_stat``).  The FUSE operations are in the modules beside
it, one group each, composed into ``PassthroughFS`` (filesystem.py).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final

from virtiofsd_py.fs.api import ROOT_ID, Context, Entry, Filesystem, Opened, SessionInfo, fs_error
from virtiofsd_py.fs.cache import CacheMode, CachePolicy
from virtiofsd_py.fs.passthrough.creds import CAP_FSETID, Credentials, DropCap
from virtiofsd_py.fs.passthrough.file_handles import InodeFileHandles, InodeHandles
from virtiofsd_py.fs.passthrough.hooks import PendingNodes, Stoppable
from virtiofsd_py.fs.passthrough.idmap import IdMap
from virtiofsd_py.fs.passthrough.inodes import InodeData, InodeTable
from virtiofsd_py.fs.passthrough.locks import LockTable
from virtiofsd_py.fs.passthrough.open_files import HandleTable
from virtiofsd_py.fs.passthrough.xattrmap import XattrMap
from virtiofsd_py.host import syscalls
from virtiofsd_py.host.fdbudget import FdBudget
from virtiofsd_py.host.syscalls import stat_fd

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

log = logging.getLogger("virtiofsd_py.passthrough")


@dataclass(frozen=True, slots=True)
class PassthroughConfig:
    """What the passthrough backend serves and how (``virtiofsd`` options).

    ``--readonly`` is not here: it is the ``ReadOnlyFS`` wrapper (fs/readonly.py).
    """

    shared_dir: str | os.PathLike[str]
    cache: CacheMode = "auto"
    #: Extended attributes; off by default as in the Rust virtiofsd (ENOSYS).
    xattr: bool = False
    #: Flag directories on another mount as submounts (``Entry.submount``).
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
    #: ``--killpriv-v2``: honour the guest's ``kill_suidgid`` requests.
    killpriv_v2: bool = False
    #: ``--translate-uid`` / ``--translate-gid``.
    uid_map: IdMap | None = None
    gid_map: IdMap | None = None
    #: ``--inode-file-handles``: nodes as file handles instead of O_PATH fds.
    inode_file_handles: InodeFileHandles = "never"


class PassthroughCore(Filesystem):
    """State and shared helpers of ``PassthroughFS``; no FUSE operation of its own."""

    def __init__(self, config: PassthroughConfig) -> None:
        self.config = config
        self.policy = CachePolicy.from_mode(config.cache)
        self._entry_timeout = self.policy.entry_timeout
        self._attr_timeout = self.policy.attr_timeout
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
        #: Migrated nodes still to be found after the switch-over (deferred_nodes.py).
        self.deferred: PendingNodes | None = None
        #: Migrated locks still being taken again (the source may hold them a while).
        self.lock_restorer: Stoppable | None = None

    def close(self) -> None:
        """Close every fd, the root's included (for tests and shutdown)."""
        self.destroy()
        self.inodes.detach_mirror()
        self.handles.detach_mirror()
        self.locks.detach_mirror()
        self.inodes.root.close()
        if self._proc_fd >= 0:
            os.close(self._proc_fd)
            self._proc_fd = -1

    @property
    def translates_ids(self) -> bool:
        """Whether uid/gid are mapped between guest and host (--translate-uid/gid)."""
        return self._uid_map is not None or self._gid_map is not None

    @property
    def remaps_capability(self) -> bool:
        """Whether writes must first remove a renamed security.capability (``_drop_capability``)."""
        return self._remapped_cap is not None

    def _node(self, nodeid: int) -> InodeData:
        node = self.inodes.get(nodeid)
        if node is None:
            raise fs_error(errno.EBADF, f"no node {nodeid}")
        deferred = self.deferred
        if deferred is not None:
            deferred.ensure(node)
        return node

    def settle_migration(self) -> None:
        """Find every migrated node still deferred (before paths may change)."""
        deferred = self.deferred
        if deferred is not None:
            deferred.settle()

    def _entry(self, node: InodeData, st: os.stat_result, submount: bool = False) -> Entry:
        st = self._guest_stat(st)
        return Entry(node.nodeid, 0, st, self._entry_timeout, self._attr_timeout, submount)

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
        raise fs_error(errno.ENFILE, "the guest's file descriptor budget is used up")

    def _reopen(self, node: InodeData, flags: int) -> int:
        """A real fd for ``node`` (regular file or directory only)."""
        self._fd_guard()
        if not (stat.S_ISREG(node.mode) or stat.S_ISDIR(node.mode)):
            raise fs_error(errno.EBADF, "not a regular file or directory")
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

    def init(self, session: SessionInfo) -> None:
        self.session = session
        self._writeback = session.writeback_cache
        self._supp_group_ext = session.create_supp_group

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
                walked = syscalls.open_beneath(root_fd, rel)
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
        submount = (
            self.config.announce_submounts
            and stat.S_ISDIR(st.st_mode)
            and (st.st_dev != p.key[0] or mnt_id != p.key[2])
        )
        return self._entry(node, st, submount)

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

    def _open(self, nodeid: int, flags: int, directory: bool, kill_suidgid: bool = False) -> Opened:
        node = self._node(nodeid)
        if flags & os.O_TRUNC and stat.S_ISREG(node.mode):
            self._drop_node_capability(node)
        with self._kill_priv(kill_suidgid and bool(flags & os.O_TRUNC)):
            fd = self._reopen_flags(node, flags)
        h = self.handles.add(nodeid, fd, flags)
        return self.policy.opened(h.fh, directory)
