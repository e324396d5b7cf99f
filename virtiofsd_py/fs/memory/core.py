"""The in-memory backend's core: the node table, the open handles, the capacity
accounting and the one lock, with the helpers every group of operations uses
(``MemoryFS`` in filesystem.py composes the groups)."""

from __future__ import annotations

import errno
import stat
import threading
import time

from virtiofsd_py.fs.api import ROOT_ID, Context, Entry, Filesystem, Opened, fs_error
from virtiofsd_py.fs.cache import CachePolicy
from virtiofsd_py.fs.memory.nodes import NAME_MAX, Handle, MemoryConfig, Node


class MemoryCore(Filesystem):
    """State and shared helpers of ``MemoryFS``; no FUSE operation of its own."""

    def __init__(self, config: MemoryConfig | None = None) -> None:
        self.config = config if config is not None else MemoryConfig()
        self.policy = CachePolicy.from_mode(self.config.cache)
        self._lock = threading.RLock()
        self._nodes: dict[int, Node] = {}
        self._handles: dict[int, Handle] = {}
        self._next_ino = ROOT_ID + 1
        self._next_fh = 1
        self._used = 0
        now = time.time_ns()
        root = Node(
            ino=ROOT_ID,
            mode=stat.S_IFDIR | (self.config.root_mode & 0o7777),
            uid=self.config.root_uid,
            gid=self.config.root_gid,
            links=1,  # the share itself names it
            atime_ns=now,
            mtime_ns=now,
            ctime_ns=now,
        )
        self._nodes[ROOT_ID] = root

    @property
    def readonly(self) -> bool:  # type: ignore[override]
        return self.config.readonly

    def close(self) -> None:
        """Nothing to release: the contents simply go away with the object."""

    def _node(self, nodeid: int) -> Node:
        node = self._nodes.get(nodeid)
        if node is None:
            raise fs_error(errno.ESTALE, f"node {nodeid}")
        return node

    def _dir(self, nodeid: int) -> Node:
        node = self._node(nodeid)
        if not node.is_dir:
            raise fs_error(errno.ENOTDIR, f"node {nodeid}")
        return node

    def _check_write(self) -> None:
        if self.config.readonly:
            raise fs_error(errno.EROFS, "read-only file system")

    def _check_xattr(self) -> None:
        if not self.config.xattr:
            raise fs_error(errno.ENOSYS, "extended attributes are off")

    @staticmethod
    def _check_name(name: bytes) -> None:
        if not name:
            raise fs_error(errno.ENOENT, "empty name")
        if b"/" in name or b"\0" in name:
            raise fs_error(errno.EINVAL, f"invalid name {name!r}")
        if len(name) > NAME_MAX:
            raise fs_error(errno.ENAMETOOLONG, "name")

    def _entry(self, node: Node) -> Entry:
        """An Entry for ``node`` with one more lookup taken."""
        node.lookups += 1
        p = self.policy
        return Entry(node.ino, 0, node.stat(), p.entry_timeout, p.attr_timeout)

    def _child(self, parent: Node, name: bytes) -> Node | None:
        found = parent.entries.get(name)
        return None if found is None else self._nodes[found[1]]

    def _maybe_drop(self, node: Node) -> None:
        if node.ino != ROOT_ID and node.links == 0 and node.lookups == 0 and node.opens == 0:
            del self._nodes[node.ino]
            self._used -= len(node.data) + sum(len(v) for v in node.xattrs.values())

    def _charge(self, delta: int) -> None:
        if delta > 0 and self._used + delta > self.config.capacity:
            raise fs_error(errno.ENOSPC, "in-memory file system is full")
        self._used += delta

    def _new_node(self, ctx: Context, parent: Node | None, mode: int, rdev: int = 0) -> Node:
        if len(self._nodes) >= self.config.max_nodes:
            raise fs_error(errno.ENOSPC, "too many nodes")
        gid = ctx.gid
        if parent is not None and parent.mode & stat.S_ISGID:
            gid = parent.gid  # BSD group semantics of a set-gid directory
            if stat.S_ISDIR(mode):
                mode |= stat.S_ISGID
        now = time.time_ns()
        node = Node(
            ino=self._next_ino,
            mode=mode,
            uid=ctx.uid,
            gid=gid,
            rdev=rdev,
            atime_ns=now,
            mtime_ns=now,
            ctime_ns=now,
        )
        self._next_ino += 1
        self._nodes[node.ino] = node
        return node

    def _link_in(self, parent: Node, name: bytes, node: Node) -> None:
        parent.entries[name] = (parent.next_cookie, node.ino)
        parent.next_cookie += 1
        node.links += 1
        if node.is_dir:
            parent.subdirs += 1
            node.parent = parent.ino
        parent.touch(time.time_ns(), data=True)

    def _unlink_from(self, parent: Node, name: bytes, node: Node) -> None:
        del parent.entries[name]
        node.links -= 1
        if node.is_dir:
            parent.subdirs -= 1
        now = time.time_ns()
        parent.touch(now, data=True)
        node.touch(now, data=False)

    def _create_node(
        self, ctx: Context, parent: int, name: bytes, mode: int, umask: int, rdev: int = 0
    ) -> Node:
        self._check_write()
        self._check_name(name)
        p = self._dir(parent)
        if name in p.entries:
            raise fs_error(errno.EEXIST, repr(name))
        fmt = stat.S_IFMT(mode)
        node = self._new_node(ctx, p, fmt | (mode & 0o7777 & ~umask), rdev)
        self._link_in(p, name, node)
        return node

    def _open_handle(self, node: Node, flags: int) -> Opened:
        fh = self._next_fh
        self._next_fh += 1
        self._handles[fh] = Handle(node.ino, flags, node.is_dir)
        node.opens += 1
        return self.policy.opened(fh, node.is_dir)

    def _handle(self, fh: int, nodeid: int) -> tuple[Handle, Node]:
        h = self._handles.get(fh)
        if h is None or h.ino != nodeid:
            raise fs_error(errno.EBADF, f"handle {fh}")
        return h, self._nodes[h.ino]

    def _truncate(self, node: Node, size: int) -> None:
        delta = size - len(node.data)
        self._charge(delta)
        if delta < 0:
            del node.data[size:]
        else:
            node.data.extend(bytes(delta))

    def destroy(self) -> None:
        """Every lookup count and handle goes; the contents stay (a remount sees them)."""
        with self._lock:
            for h in self._handles.values():
                self._nodes[h.ino].opens -= 1
            self._handles.clear()
            for node in list(self._nodes.values()):
                node.lookups = 0
                self._maybe_drop(node)
