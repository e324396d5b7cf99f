"""Passthrough operations on names: LOOKUP and FORGET, and every change of the
tree (CREATE, MKNOD, MKDIR, SYMLINK, LINK, UNLINK, RMDIR, RENAME, TMPFILE).

A name is one path component, looked up relative to its parent's fd with
O_PATH | O_NOFOLLOW (filesystem.py has the confinement rules).  A node the
guest creates is made under its credentials, labelled and looked up as the
daemon, and removed again if that fails.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Sequence
from typing import Final

from virtiofsd_py.fs.api import ROOT_ID, Context, Entry, Opened, fs_error
from virtiofsd_py.fs.passthrough.core import PassthroughCore
from virtiofsd_py.fs.passthrough.creds import Umask
from virtiofsd_py.fs.passthrough.inodes import InodeData
from virtiofsd_py.host import syscalls
from virtiofsd_py.host.syscalls import O_PATH_NOFOLLOW

_CREATE_TYPES: Final = frozenset(
    (stat.S_IFREG, stat.S_IFIFO, stat.S_IFSOCK, stat.S_IFCHR, stat.S_IFBLK)
)
_RENAME_FLAGS: Final = (
    syscalls.RENAME_NOREPLACE | syscalls.RENAME_EXCHANGE | syscalls.RENAME_WHITEOUT
)
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
        raise fs_error(errno.ENOENT, "empty name")
    if b"/" in name or b"\0" in name:
        raise fs_error(errno.EINVAL, f"invalid name {name!r}")


class NameOps(PassthroughCore):
    """LOOKUP, FORGET and the operations that change the tree."""

    def lookup(self, ctx: Context, parent: int, name: bytes) -> Entry:
        check_name(name)
        self._fd_guard()
        p = self._node(parent)
        if parent == ROOT_ID and name == b"..":
            name = b"."
        with p.opened() as pfd:
            fd = os.open(name, O_PATH_NOFOLLOW, dir_fd=pfd)
        if name == b".." and self.share_path(fd) is None:
            # A directory a host process moved out of the share: its ".." is
            # outside.  (The guest kernel resolves ".." itself; only NFS-style
            # exports ask, and they must not climb out.)
            os.close(fd)
            raise fs_error(errno.EACCES, "'..' leads outside the shared directory")
        return self._add_entry(p, name, fd)

    def forget(self, nodeid: int, nlookup: int) -> None:
        self.inodes.forget(nodeid, nlookup)

    def batch_forget(self, items: Sequence[tuple[int, int]]) -> None:
        self.inodes.forget_many(items)

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
        fd = os.open(name, O_PATH_NOFOLLOW, dir_fd=pfd)
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
        return entry, self.policy.opened(h.fh, False)

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
        path_fd = os.open(name, O_PATH_NOFOLLOW, dir_fd=pfd)
        try:
            mode = os.stat(path_fd).st_mode
            if stat.S_ISDIR(mode):
                raise fs_error(errno.EISDIR, f"{name!r} is a directory")
            if not stat.S_ISREG(mode):
                raise fs_error(errno.EEXIST, f"{name!r} exists and is not a regular file")
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
        self._fd_guard()
        check_name(name)
        fmt = stat.S_IFMT(mode) or stat.S_IFREG
        if fmt not in _CREATE_TYPES:
            raise fs_error(errno.EINVAL, f"mknod of file type {fmt:o}")
        p = self._node(parent)
        with p.opened() as pfd:
            with self._creds(ctx), Umask(umask) as um:
                os.mknod(name, fmt | um.mode(stat.S_IMODE(mode)), rdev, dir_fd=pfd)
            return self._new_node(ctx, p, pfd, name)

    def mkdir(self, ctx: Context, parent: int, name: bytes, mode: int, umask: int) -> Entry:
        self._fd_guard()
        check_name(name)
        p = self._node(parent)
        with p.opened() as pfd:
            with self._creds(ctx), Umask(umask) as um:
                os.mkdir(name, um.mode(stat.S_IMODE(mode)), dir_fd=pfd)
            return self._new_node(ctx, p, pfd, name, _AT_REMOVEDIR)

    def symlink(self, ctx: Context, parent: int, name: bytes, target: bytes) -> Entry:
        self._fd_guard()
        check_name(name)
        if not target or b"\0" in target:
            raise fs_error(errno.ENOENT if not target else errno.EINVAL, "symlink target")
        p = self._node(parent)
        with p.opened() as pfd:
            with self._creds(ctx):
                os.symlink(target, name, dir_fd=pfd)
            return self._new_node(ctx, p, pfd, name)

    def link(self, ctx: Context, nodeid: int, newparent: int, newname: bytes) -> Entry:
        """A hard link to the node (any type) through its /proc/self/fd magic link."""
        self._fd_guard()
        check_name(newname)
        node = self._node(nodeid)
        np = self._node(newparent)
        with self._node_path(node) as path, np.opened() as npfd:
            os.link(path, newname, dst_dir_fd=npfd, follow_symlinks=True)
            return self._add_entry(np, newname, os.open(newname, O_PATH_NOFOLLOW, dir_fd=npfd))

    def unlink(self, ctx: Context, parent: int, name: bytes) -> None:
        check_name(name)
        self.settle_migration()
        p = self._node(parent)
        with p.opened() as pfd:
            os.unlink(name, dir_fd=pfd)
        self.namespace_changes += 1

    def rmdir(self, ctx: Context, parent: int, name: bytes) -> None:
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
        check_name(name)
        check_name(newname)
        if flags & ~_RENAME_FLAGS:
            raise fs_error(errno.EINVAL, f"rename flags {flags:#x}")
        self.settle_migration()
        p = self._node(parent)
        np = self._node(newparent)
        with p.opened() as pfd, np.opened() as npfd:
            if flags:
                # WHITEOUT creates a character device (0/0): only as the host allows.
                syscalls.renameat2(pfd, name, npfd, newname, flags)
            else:
                os.rename(name, newname, src_dir_fd=pfd, dst_dir_fd=npfd)
        self.namespace_changes += 1

    def tmpfile(
        self, ctx: Context, parent: int, mode: int, flags: int, umask: int
    ) -> tuple[Entry, Opened]:
        """TMPFILE: an unnamed regular file in ``parent`` (O_TMPFILE), opened."""
        self._fd_guard()
        p = self._node(parent)
        host = self._host_flags(flags) & ~(os.O_TRUNC | os.O_APPEND)
        if host & os.O_ACCMODE == os.O_RDONLY:
            raise fs_error(errno.EINVAL, "O_TMPFILE needs write access")
        with p.opened() as pfd, self._creds(ctx), Umask(umask) as um:
            fd = os.open(
                ".", host | os.O_TMPFILE | os.O_CLOEXEC, um.mode(stat.S_IMODE(mode)), dir_fd=pfd
            )
        return self._handle_entry(p, b"", fd, flags)
