"""In-memory operations on names: LOOKUP, FORGET and every change of the tree
(CREATE, TMPFILE, MKNOD, MKDIR, SYMLINK, LINK, UNLINK, RMDIR, RENAME)."""

from __future__ import annotations

import errno
import os
import stat
import time
from collections.abc import Sequence

from virtiofsd_py.fs.api import ROOT_ID, Context, Entry, Opened, fs_error
from virtiofsd_py.fs.memory.core import MemoryCore
from virtiofsd_py.fs.memory.nodes import NAME_MAX, Node
from virtiofsd_py.host.syscalls import RENAME_EXCHANGE, RENAME_NOREPLACE, RENAME_WHITEOUT


class NameOps(MemoryCore):
    """LOOKUP, FORGET and the operations that change the tree."""

    def lookup(self, ctx: Context, parent: int, name: bytes) -> Entry:
        with self._lock:
            p = self._dir(parent)
            if name == b".":
                return self._entry(p)
            if name == b"..":
                return self._entry(self._nodes[p.parent])
            if len(name) > NAME_MAX:
                raise fs_error(errno.ENAMETOOLONG, "name")
            node = self._child(p, name)
            if node is None:
                raise fs_error(errno.ENOENT, repr(name))
            return self._entry(node)

    def forget(self, nodeid: int, nlookup: int) -> None:
        with self._lock:
            node = self._nodes.get(nodeid)
            if node is None or nodeid == ROOT_ID:
                return
            node.lookups = max(0, node.lookups - nlookup)
            self._maybe_drop(node)

    def batch_forget(self, items: Sequence[tuple[int, int]]) -> None:
        with self._lock:
            for nodeid, nlookup in items:
                self.forget(nodeid, nlookup)

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
        with self._lock:
            self._check_write()
            self._check_name(name)
            p = self._dir(parent)
            node = self._child(p, name)
            if node is not None:
                if flags & os.O_EXCL:
                    raise fs_error(errno.EEXIST, repr(name))
                if node.is_dir:
                    raise fs_error(errno.EISDIR, repr(name))
                opened = self.open(ctx, node.ino, flags, kill_suidgid=kill_suidgid)
                return self._entry(node), opened
            node = self._create_node(ctx, parent, name, stat.S_IFREG | (mode & 0o7777), umask)
            return self._entry(node), self._open_handle(node, flags)

    def tmpfile(
        self, ctx: Context, parent: int, mode: int, flags: int, umask: int
    ) -> tuple[Entry, Opened]:
        with self._lock:
            self._check_write()
            p = self._dir(parent)
            node = self._new_node(ctx, p, stat.S_IFREG | (mode & 0o7777 & ~umask))
            return self._entry(node), self._open_handle(node, flags)

    def mknod(
        self, ctx: Context, parent: int, name: bytes, mode: int, rdev: int, umask: int
    ) -> Entry:
        fmt = stat.S_IFMT(mode) or stat.S_IFREG
        if fmt not in (stat.S_IFREG, stat.S_IFIFO, stat.S_IFSOCK, stat.S_IFCHR, stat.S_IFBLK):
            raise fs_error(errno.EINVAL, f"mknod type {fmt:#o}")
        keep_rdev = fmt in (stat.S_IFCHR, stat.S_IFBLK)
        with self._lock:
            node = self._create_node(
                ctx, parent, name, fmt | (mode & 0o7777), umask, rdev if keep_rdev else 0
            )
            return self._entry(node)

    def mkdir(self, ctx: Context, parent: int, name: bytes, mode: int, umask: int) -> Entry:
        with self._lock:
            node = self._create_node(ctx, parent, name, stat.S_IFDIR | (mode & 0o7777), umask)
            return self._entry(node)

    def symlink(self, ctx: Context, parent: int, name: bytes, target: bytes) -> Entry:
        if not target or len(target) >= 4096:
            raise fs_error(errno.ENAMETOOLONG if target else errno.ENOENT, "symlink target")
        with self._lock:
            node = self._create_node(ctx, parent, name, stat.S_IFLNK | 0o777, 0)
            node.target = bytes(target)
            return self._entry(node)

    def link(self, ctx: Context, nodeid: int, newparent: int, newname: bytes) -> Entry:
        with self._lock:
            self._check_write()
            self._check_name(newname)
            node = self._node(nodeid)
            if node.is_dir:
                raise fs_error(errno.EPERM, "hard link to a directory")
            if node.links == 0 and node.opens == 0:
                raise fs_error(errno.ENOENT, "link to a removed file")
            p = self._dir(newparent)
            if newname in p.entries:
                raise fs_error(errno.EEXIST, repr(newname))
            self._link_in(p, newname, node)
            node.touch(time.time_ns(), data=False)
            return self._entry(node)

    def unlink(self, ctx: Context, parent: int, name: bytes) -> None:
        with self._lock:
            self._check_write()
            p = self._dir(parent)
            node = self._child(p, name)
            if node is None:
                raise fs_error(errno.ENOENT, repr(name))
            if node.is_dir:
                raise fs_error(errno.EISDIR, repr(name))
            self._unlink_from(p, name, node)
            self._maybe_drop(node)

    def rmdir(self, ctx: Context, parent: int, name: bytes) -> None:
        with self._lock:
            self._check_write()
            if name == b".":
                raise fs_error(errno.EINVAL, "rmdir .")
            p = self._dir(parent)
            node = self._child(p, name)
            if node is None:
                raise fs_error(errno.ENOENT, repr(name))
            if not node.is_dir:
                raise fs_error(errno.ENOTDIR, repr(name))
            if node.entries:
                raise fs_error(errno.ENOTEMPTY, repr(name))
            self._unlink_from(p, name, node)
            self._maybe_drop(node)

    def _is_ancestor(self, maybe: Node, d: Node) -> bool:
        """Whether directory ``maybe`` is ``d`` or one of its ancestors."""
        ino = d.ino
        while True:
            if ino == maybe.ino:
                return True
            if ino == ROOT_ID:
                return False
            ino = self._nodes[ino].parent

    def rename(
        self, ctx: Context, parent: int, name: bytes, newparent: int, newname: bytes, flags: int
    ) -> None:
        """rename(2)/renameat2(2): NOREPLACE and EXCHANGE; WHITEOUT is not supported."""
        if flags & RENAME_WHITEOUT:
            raise fs_error(errno.EINVAL, "RENAME_WHITEOUT")
        if flags & RENAME_NOREPLACE and flags & RENAME_EXCHANGE:
            raise fs_error(errno.EINVAL, "NOREPLACE with EXCHANGE")
        with self._lock:
            self._check_write()
            self._check_name(newname)
            p, np = self._dir(parent), self._dir(newparent)
            src = self._child(p, name)
            if src is None:
                raise fs_error(errno.ENOENT, repr(name))
            dst = self._child(np, newname)
            if flags & RENAME_EXCHANGE:
                if dst is None:
                    raise fs_error(errno.ENOENT, repr(newname))
                self._exchange(p, name, src, np, newname, dst)
                return
            if dst is not None and flags & RENAME_NOREPLACE:
                raise fs_error(errno.EEXIST, repr(newname))
            if src.is_dir and self._is_ancestor(src, np):
                raise fs_error(errno.EINVAL, "move a directory into itself")
            if dst is src:
                return  # two names of one node: rename(2) does nothing
            if dst is not None:
                if src.is_dir and not dst.is_dir:
                    raise fs_error(errno.ENOTDIR, repr(newname))
                if dst.is_dir and not src.is_dir:
                    raise fs_error(errno.EISDIR, repr(newname))
                if dst.is_dir and dst.entries:
                    raise fs_error(errno.ENOTEMPTY, repr(newname))
                self._unlink_from(np, newname, dst)
                self._maybe_drop(dst)
            self._unlink_from(p, name, src)
            self._link_in(np, newname, src)

    def _exchange(
        self, p: Node, name: bytes, src: Node, np: Node, newname: bytes, dst: Node
    ) -> None:
        if (src.is_dir and self._is_ancestor(src, np)) or (
            dst.is_dir and self._is_ancestor(dst, p)
        ):
            raise fs_error(errno.EINVAL, "exchange a directory with its own descendant")
        # Each name keeps its cookie; only what it names changes.
        p.entries[name] = (p.entries[name][0], dst.ino)
        np.entries[newname] = (np.entries[newname][0], src.ino)
        if src.is_dir != dst.is_dir:
            moved_dir, to, frm = (src, np, p) if src.is_dir else (dst, p, np)
            to.subdirs += 1
            frm.subdirs -= 1
            moved_dir.parent = to.ino
        elif src.is_dir:
            src.parent, dst.parent = np.ino, p.ino
        now = time.time_ns()
        for n in (p, np):
            n.touch(now, data=True)
        for n in (src, dst):
            n.touch(now, data=False)
