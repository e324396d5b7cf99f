"""The inode table: FUSE node ids -> host inodes, held as O_PATH fds or file handles.

A node is one host inode, identified by ``(st_dev, st_ino, mount id)``; two
names for one file (hard links) are one node.  Node ids count up from 2 and
are never reused while the daemon runs (they are not host inode numbers, so
the guest cannot learn or guess them; the FUSE generation stays 0).  Node
id 1 is the shared directory and is never dropped.

Every node records how to find it again -- the parent node and the name it
was last looked up by -- for migration, and holds one reference on that
parent so that the chain up to the root stays valid while the node lives.

A node holds either an O_PATH fd or, with ``--inode-file-handles``
(mountfds.py), a file handle plus a reference on its mount's fd and no fd
at all.  Every user of a node's fd goes through ``InodeData.opened``, which
lends the O_PATH fd or opens one by handle for the length of the ``with``.

Closing: an ``InodeData`` owns its fd and closes it when the object dies.
An operation keeps the ``InodeData`` it got from ``get`` in a local
variable for as long as it uses the fd, so a concurrent FORGET can never
close an fd under a running operation (nor let the fd number be reused for
another file while it is in use).  The table drops its reference outside
its lock, so closing never happens under the lock.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
from collections.abc import Iterable, Iterator
from types import TracebackType
from typing import Final

from virtiofsd_py.fs.api import ROOT_ID
from virtiofsd_py.fs.passthrough.file_handles import MountFd, NodeHandle
from virtiofsd_py.fs.passthrough.mirror import TableMirror
from virtiofsd_py.fs.passthrough.owned import OwnedFd
from virtiofsd_py.host.syscalls import O_PATH_NOFOLLOW

#: (st_dev, st_ino, mount id)
InodeKey = tuple[int, int, int]

#: Lookup count that the root never gets below (it is never forgotten).
_ROOT_PIN: Final = 1 << 62


class NodeFd:
    """``with node.opened() as fd``: the node's O_PATH fd for one operation.

    Lent (not closed afterwards) for an fd node; opened by handle and closed
    on exit for a handle node.
    """

    __slots__ = ("fd", "owned")

    def __init__(self, fd: int, owned: bool) -> None:
        self.fd = fd
        self.owned = owned

    def __enter__(self) -> int:
        return self.fd

    def __exit__(
        self,
        et: type[BaseException] | None,
        ev: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.owned:
            self.owned = False
            os.close(self.fd)


class InodeData(OwnedFd):
    """One node: plain fields only, so that migration can serialize it."""

    __slots__ = (
        "children",
        "handle",
        "key",
        "lookups",
        "mode",
        "mount",
        "name",
        "nodeid",
        "parent",
    )

    nodeid: int
    fd: int  # O_PATH | O_NOFOLLOW; -1 for a handle node, once closed, or unusable
    handle: bytes | None  # struct file_handle (--inode-file-handles), else None
    mount: MountFd | None  # where ``handle`` opens (held while the node lives)
    key: InodeKey
    mode: int  # st_mode at lookup; the file type never changes
    lookups: int  # the guest's lookup count (FUSE nlookup)
    children: int  # nodes whose ``parent`` is this node
    parent: int  # node id this node was last looked up in (0 for the root)
    name: bytes  # name it was last looked up by (b"" for the root)

    def __init__(
        self,
        nodeid: int,
        fd: int,
        key: InodeKey,
        mode: int,
        parent: int,
        name: bytes,
        handle: NodeHandle | None = None,
    ) -> None:
        self.nodeid = nodeid
        self.attach(fd, key, mode, handle)
        self.lookups = 0
        self.children = 0
        self.parent = parent
        self.name = name

    def attach(self, fd: int, key: InodeKey, mode: int, handle: NodeHandle | None) -> None:
        """Give a node made without its host inode (a migrated one) that inode."""
        self.fd = fd
        self.key = key
        self.mode = mode
        self.handle, self.mount = handle if handle is not None else (None, None)

    @property
    def usable(self) -> bool:
        """False for a node migration could not find again (its requests fail)."""
        return self.fd >= 0 or self.handle is not None

    def opened(self, flags: int = O_PATH_NOFOLLOW) -> NodeFd:
        """The node's fd for one operation (``with node.opened() as fd``).

        A handle node is opened by handle (``flags``; O_PATH by default) and
        closed when the block ends: ESTALE once the inode is gone from the
        host (unlinked and no longer open anywhere).  A node migration could
        not find again gives EIO.
        """
        mount = self.mount
        if self.handle is None or mount is None:
            if self.fd < 0:
                raise OSError(errno.EIO, "node not found again after migration")
            return NodeFd(self.fd, False)
        return NodeFd(mount.open(self.handle, flags), True)

    def close(self) -> None:
        self.mount = None
        super().close()

    def __repr__(self) -> str:
        kind = f"fd={self.fd}" if self.handle is None else f"handle={self.handle.hex()}"
        return (
            f"InodeData(nodeid={self.nodeid}, {kind}, key={self.key}, "
            f"mode={self.mode:o}, lookups={self.lookups}, children={self.children}, "
            f"parent={self.parent}, name={self.name!r})"
        )


class InodeTable:
    """Thread-safe map of node id -> ``InodeData`` with a reverse map by key."""

    def __init__(self, root: InodeData) -> None:
        if root.nodeid != ROOT_ID:
            raise ValueError("the root node must have node id 1")
        root.lookups = _ROOT_PIN
        root.parent = 0
        self._lock = threading.Lock()
        self._nodes: dict[int, InodeData] = {ROOT_ID: root}
        self._by_key: dict[InodeKey, InodeData] = {root.key: root}
        self._next_id = ROOT_ID + 1
        self._fd_nodes = 1
        #: Told of every node that gains or loses its fd (mirror.py), if set.
        self._mirror: TableMirror | None = None

    def attach_mirror(self, mirror: TableMirror) -> None:
        """Report to ``mirror`` from now on, starting with every node holding an fd."""
        with self._lock:
            if self._mirror is not None:
                raise ValueError("the inode table already has a mirror")
            self._mirror = mirror
            for node in self._nodes.values():
                if node.fd >= 0:
                    mirror.node_added(node.nodeid, node.fd)

    def detach_mirror(self) -> None:
        """Stop reporting; the mirror forgets every node (once no one uses it)."""
        with self._lock:
            mirror, self._mirror = self._mirror, None
            if mirror is not None:
                mirror.detached()

    @property
    def fd_nodes(self) -> int:
        """Nodes holding an fd (the root included): what counts against the fd budget."""
        return self._fd_nodes

    def get(self, nodeid: int) -> InodeData | None:
        """The live node, or None.  (A dict read is atomic: no lock needed.)"""
        return self._nodes.get(nodeid)

    @property
    def root(self) -> InodeData:
        return self._nodes[ROOT_ID]

    def __len__(self) -> int:
        return len(self._nodes)

    def __iter__(self) -> Iterator[InodeData]:
        """A snapshot of the live nodes (for migration and tests)."""
        with self._lock:
            return iter(list(self._nodes.values()))

    def add_lookup(
        self,
        fd: int,
        key: InodeKey,
        mode: int,
        parent: int,
        name: bytes,
        handle: NodeHandle | None = None,
    ) -> tuple[InodeData, bool]:
        """Count one lookup of the inode ``key`` just opened as ``fd``.

        Returns the node and whether ``fd`` was taken over.  When the inode
        already has a node, or ``handle`` is given (a new node then keeps the
        handle, no fd), ``fd`` is not used: the caller closes it.

        A node that holds only a file handle does not keep its inode alive:
        once the file is deleted the host may give its inode number to a new
        file.  Such a key match (other handle, or other file type) is a new
        inode: it gets a new node, and the stale one stays reachable only by
        its node id (its requests get ESTALE) until the guest forgets it.
        Reusing it would show the guest one node id with two identities,
        which Linux answers by marking the inode bad (EIO).
        """
        with self._lock:
            p = self._nodes.get(parent)
            if p is None:  # parent forgotten while we looked up in it
                raise OSError(errno.ESTALE, "parent node was forgotten")
            node = self._by_key.get(key)
            if node is not None and _reused(node, mode, handle):
                del self._by_key[key]
                node = None
            if node is not None:
                node.lookups += 1
                dropped = []
                if (node.parent != parent or node.name != name) and self._may_relink_locked(
                    node, parent, name
                ):
                    old = node.parent
                    node.parent, node.name = parent, name
                    p.children += 1
                    dropped = self._unref_locked(old)
                taken = False
            else:
                taken = handle is None
                own_fd = fd if taken else -1
                node = InodeData(self._next_id, own_fd, key, mode, parent, name, handle)
                self._next_id += 1
                node.lookups = 1
                p.children += 1
                self._nodes[node.nodeid] = node
                self._by_key[key] = node
                self._fd_nodes += taken
                dropped = []
                if taken and self._mirror is not None:
                    self._mirror.node_added(node.nodeid, fd)
        del dropped  # closes fds of dropped nodes, outside the lock
        return node, taken

    def forget(self, nodeid: int, nlookup: int) -> None:
        """Take ``nlookup`` guest lookups away; drop the node at zero."""
        self.forget_many(((nodeid, nlookup),))

    def forget_many(self, items: Iterable[tuple[int, int]]) -> None:
        dropped: list[InodeData] = []
        with self._lock:
            for nodeid, nlookup in items:
                node = self._nodes.get(nodeid)
                if node is None or nodeid == ROOT_ID:
                    continue
                node.lookups = max(0, node.lookups - nlookup)
                if node.lookups == 0 and node.children == 0:
                    dropped.extend(self._drop_locked(node))
        del dropped

    def clear(self) -> None:
        """Drop every node but the root (FUSE_DESTROY)."""
        with self._lock:
            dropped = [n for n in self._nodes.values() if n.nodeid != ROOT_ID]
            root = self._nodes[ROOT_ID]
            root.children = 0
            if self._mirror is not None:
                self._mirror.nodes_cleared()
            self._nodes = {ROOT_ID: root}
            self._by_key = {root.key: root}
            self._fd_nodes = 1
        del dropped

    def restore(self, nodes: list[InodeData], next_id: int) -> None:
        """Install migrated nodes (ids, lookup counts and parents as on the source).

        The table must hold only the root.  Each node's ``parent`` must be the
        root or another node of ``nodes`` and the parent links must not form a
        cycle (the migration schema's ``decode`` sees to it for any state).
        """
        with self._lock:
            if len(self._nodes) != 1:
                raise ValueError("migration state loaded into a daemon that is already in use")
            root = self._nodes[ROOT_ID]
            for node in nodes:
                self._nodes[node.nodeid] = node
                self._fd_nodes += node.fd >= 0
                if node.fd >= 0 and self._mirror is not None:
                    self._mirror.node_added(node.nodeid, node.fd)
                if node.usable:
                    self._by_key.setdefault(node.key, node)
            for node in nodes:
                self._nodes[node.parent].children += 1
            self._next_id = max(next_id, max(self._nodes) + 1)
            root.lookups = _ROOT_PIN

    def found(self, node: InodeData, found: tuple[int, InodeKey, int, NodeHandle | None]) -> bool:
        """Attach the host inode migration found after the switch-over to ``node``
        (a placeholder ``restore`` installed).  False (nothing changes, the caller
        closes the fd) when the guest forgot the node meanwhile."""
        with self._lock:
            if self._nodes.get(node.nodeid) is not node:
                return False
            node.attach(*found)
            self._fd_nodes += node.fd >= 0
            if node.fd >= 0 and self._mirror is not None:
                self._mirror.node_added(node.nodeid, node.fd)
            self._by_key.setdefault(node.key, node)
        return True

    @property
    def next_id(self) -> int:
        return self._next_id

    def _may_relink_locked(self, node: InodeData, parent: int, name: bytes) -> bool:
        """Whether (parent, name) may become ``node``'s record: a real name, no cycle."""
        if node.nodeid == ROOT_ID or name in (b".", b".."):
            return False
        cur = self._nodes.get(parent)
        while cur is not None and cur.nodeid != ROOT_ID:
            if cur is node:
                return False
            cur = self._nodes.get(cur.parent)
        return True

    def _unref_locked(self, nodeid: int) -> list[InodeData]:
        node = self._nodes.get(nodeid)
        if node is None:
            return []
        node.children -= 1
        if node.lookups == 0 and node.children == 0:
            return self._drop_locked(node)
        return []

    def _drop_locked(self, node: InodeData) -> list[InodeData]:
        """Remove ``node`` and release its parent, iteratively up the chain."""
        out: list[InodeData] = []
        cur: InodeData | None = node
        while cur is not None and cur.nodeid != ROOT_ID:
            del self._nodes[cur.nodeid]
            self._fd_nodes -= cur.fd >= 0
            if cur.fd >= 0 and self._mirror is not None:
                self._mirror.node_dropped(cur.nodeid)
            if self._by_key.get(cur.key) is cur:
                del self._by_key[cur.key]
            out.append(cur)
            parent = self._nodes.get(cur.parent)
            cur = None
            if parent is not None:
                parent.children -= 1
                if parent.lookups == 0 and parent.children == 0:
                    cur = parent
        return out


def _reused(node: InodeData, mode: int, handle: NodeHandle | None) -> bool:
    """Whether the inode number of ``node`` now names another file (see ``add_lookup``)."""
    if stat.S_IFMT(node.mode) != stat.S_IFMT(mode):
        return True
    return node.handle is not None and handle is not None and node.handle != handle[0]
