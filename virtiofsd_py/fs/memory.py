"""An in-memory ``Filesystem``: the second backend, and the example of writing one.

Everything lives in Python objects: a table of nodes keyed by node id (which
is also the inode number the guest sees; ids are never reused, so the FUSE
generation is always 0), file data in ``bytearray``, directories as ordered
``name -> (cookie, node id)`` maps.  Files, directories, symlinks, fifos,
sockets and device nodes, hard links, xattrs, rename (with NOREPLACE and
EXCHANGE), setattr, tmpfile, readdir with stable cookies and statfs are
supported; locks are not (``supports_locks`` is False, so the daemon does
not offer POSIX_LOCKS/FLOCK_LOCKS and the guest keeps locks local).

Thread safety is one re-entrant lock around every operation: each one is a
few dict and bytearray operations, so finer locking would buy nothing in
CPython.  Permission checks are the guest kernel's job (virtio-fs always
mounts with ``default_permissions``, and so does ``virtiofsd-py mount``).

A node lives while a directory entry names it, the guest holds a lookup
count on it, or a handle is open on it (an unlinked file stays readable
through its open handles), as on any POSIX file system.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

from virtiofsd_py.fs.api import (
    NOW,
    ROOT_ID,
    AttrReply,
    Context,
    DirEntry,
    Entry,
    Filesystem,
    Opened,
    SetAttr,
    dirent_type,
    make_stat,
)
from virtiofsd_py.fs.cache import CachePolicy
from virtiofsd_py.host.syscalls import RENAME_EXCHANGE, RENAME_NOREPLACE, RENAME_WHITEOUT

if TYPE_CHECKING:
    from virtiofsd_py.app.options import Options

#: Cookies of "." and ".."; real entries get cookies from 3 upwards.
_DOT_COOKIE: Final = 1
_DOTDOT_COOKIE: Final = 2
_FIRST_COOKIE: Final = 3
_NAME_MAX: Final = 255
_XATTR_NAME_MAX: Final = 255
_XATTR_SIZE_MAX: Final = 65536
_BLOCK: Final = 4096
_XATTR_CREATE: Final = 1
_XATTR_REPLACE: Final = 2
#: Namespaces stored as given; system.* (POSIX ACLs) is not supported.
_XATTR_PREFIXES: Final = (b"user.", b"trusted.", b"security.")
_SEEK_DATA: Final = 3
_SEEK_HOLE: Final = 4
_FALLOC_FL_KEEP_SIZE: Final = 0x01
_FALLOC_FL_PUNCH_HOLE: Final = 0x02


def _err(code: int, what: str) -> OSError:
    return OSError(code, f"{what}: {os.strerror(code)}")


@dataclass(frozen=True, slots=True)
class MemoryConfig:
    """Limits and policy of one in-memory file system."""

    #: Bytes of file data (and xattr values) it may hold: ENOSPC beyond.
    capacity: int = 1 << 30
    #: Nodes it may hold: ENOSPC beyond.
    max_nodes: int = 1 << 20
    cache: str = "auto"
    readonly: bool = False
    #: Extended attributes (off: ENOSYS, like the passthrough's ``--xattr``).
    xattr: bool = True
    #: Owner and mode of the root directory.
    root_mode: int = 0o755
    root_uid: int = 0
    root_gid: int = 0


@dataclass(slots=True, eq=False)
class _Node:
    ino: int
    mode: int
    uid: int
    gid: int
    rdev: int = 0
    #: Directory entries naming this node (a directory's own "." and its
    #: subdirectories' ".." are added in ``nlink``).
    links: int = 0
    lookups: int = 0
    opens: int = 0
    data: bytearray = field(default_factory=bytearray)
    target: bytes = b""
    #: name -> (cookie, node id), in cookie order (directories only).
    entries: dict[bytes, tuple[int, int]] = field(default_factory=dict)
    next_cookie: int = _FIRST_COOKIE
    subdirs: int = 0
    parent: int = ROOT_ID  # directories only: the one directory naming it
    xattrs: dict[bytes, bytes] = field(default_factory=dict)
    atime_ns: int = 0
    mtime_ns: int = 0
    ctime_ns: int = 0

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    def nlink(self) -> int:
        return self.links + 1 + self.subdirs if self.is_dir else self.links

    def size(self) -> int:
        if stat.S_ISREG(self.mode):
            return len(self.data)
        if stat.S_ISLNK(self.mode):
            return len(self.target)
        return _BLOCK if self.is_dir else 0

    def stat(self) -> os.stat_result:
        size = self.size()
        blocks = (len(self.data) + _BLOCK - 1) // _BLOCK * (_BLOCK // 512)
        return make_stat(
            mode=self.mode,
            ino=self.ino,
            size=size,
            nlink=self.nlink(),
            uid=self.uid,
            gid=self.gid,
            rdev=self.rdev,
            blksize=_BLOCK,
            blocks=blocks,
            atime_ns=self.atime_ns,
            mtime_ns=self.mtime_ns,
            ctime_ns=self.ctime_ns,
        )

    def touch(self, now: int, *, data: bool) -> None:
        """ctime (and mtime for a content change) to ``now``."""
        self.ctime_ns = now
        if data:
            self.mtime_ns = now


@dataclass(slots=True)
class _Handle:
    ino: int
    flags: int
    is_dir: bool


class MemoryFS(Filesystem):
    """A complete POSIX-ish file system held in memory; see the module docstring."""

    #: The daemon offers POSIX_LOCKS/FLOCK_LOCKS only for backends that take locks.
    supports_locks = False

    def __init__(self, config: MemoryConfig | None = None) -> None:
        self.config = config if config is not None else MemoryConfig()
        self.policy = CachePolicy.from_mode(self.config.cache)
        self._lock = threading.RLock()
        self._nodes: dict[int, _Node] = {}
        self._handles: dict[int, _Handle] = {}
        self._next_ino = ROOT_ID + 1
        self._next_fh = 1
        self._used = 0
        now = time.time_ns()
        root = _Node(
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

    # -- helpers ------------------------------------------------------------
    def _node(self, nodeid: int) -> _Node:
        node = self._nodes.get(nodeid)
        if node is None:
            raise _err(errno.ESTALE, f"node {nodeid}")
        return node

    def _dir(self, nodeid: int) -> _Node:
        node = self._node(nodeid)
        if not node.is_dir:
            raise _err(errno.ENOTDIR, f"node {nodeid}")
        return node

    def _check_write(self) -> None:
        if self.config.readonly:
            raise _err(errno.EROFS, "read-only file system")

    def _check_xattr(self) -> None:
        if not self.config.xattr:
            raise _err(errno.ENOSYS, "extended attributes are off")

    @staticmethod
    def _check_name(name: bytes) -> None:
        if not name:
            raise _err(errno.ENOENT, "empty name")
        if b"/" in name or b"\0" in name:
            raise _err(errno.EINVAL, f"invalid name {name!r}")
        if len(name) > _NAME_MAX:
            raise _err(errno.ENAMETOOLONG, "name")

    def _entry(self, node: _Node) -> Entry:
        """An Entry for ``node`` with one more lookup taken."""
        node.lookups += 1
        p = self.policy
        return Entry(node.ino, 0, node.stat(), p.entry_timeout, p.attr_timeout)

    def _child(self, parent: _Node, name: bytes) -> _Node | None:
        found = parent.entries.get(name)
        return None if found is None else self._nodes[found[1]]

    def _maybe_drop(self, node: _Node) -> None:
        if node.ino != ROOT_ID and node.links == 0 and node.lookups == 0 and node.opens == 0:
            del self._nodes[node.ino]
            self._used -= len(node.data) + sum(len(v) for v in node.xattrs.values())

    def _charge(self, delta: int) -> None:
        if delta > 0 and self._used + delta > self.config.capacity:
            raise _err(errno.ENOSPC, "in-memory file system is full")
        self._used += delta

    def _new_node(self, ctx: Context, parent: _Node | None, mode: int, rdev: int = 0) -> _Node:
        if len(self._nodes) >= self.config.max_nodes:
            raise _err(errno.ENOSPC, "too many nodes")
        gid = ctx.gid
        if parent is not None and parent.mode & stat.S_ISGID:
            gid = parent.gid  # BSD group semantics of a set-gid directory
            if stat.S_ISDIR(mode):
                mode |= stat.S_ISGID
        now = time.time_ns()
        node = _Node(
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

    def _link_in(self, parent: _Node, name: bytes, node: _Node) -> None:
        parent.entries[name] = (parent.next_cookie, node.ino)
        parent.next_cookie += 1
        node.links += 1
        if node.is_dir:
            parent.subdirs += 1
            node.parent = parent.ino
        parent.touch(time.time_ns(), data=True)

    def _unlink_from(self, parent: _Node, name: bytes, node: _Node) -> None:
        del parent.entries[name]
        node.links -= 1
        if node.is_dir:
            parent.subdirs -= 1
        now = time.time_ns()
        parent.touch(now, data=True)
        node.touch(now, data=False)

    def _create_node(
        self, ctx: Context, parent: int, name: bytes, mode: int, umask: int, rdev: int = 0
    ) -> _Node:
        self._check_write()
        self._check_name(name)
        p = self._dir(parent)
        if name in p.entries:
            raise _err(errno.EEXIST, repr(name))
        fmt = stat.S_IFMT(mode)
        node = self._new_node(ctx, p, fmt | (mode & 0o7777 & ~umask), rdev)
        self._link_in(p, name, node)
        return node

    def _open_handle(self, node: _Node, flags: int) -> Opened:
        fh = self._next_fh
        self._next_fh += 1
        self._handles[fh] = _Handle(node.ino, flags, node.is_dir)
        node.opens += 1
        return self.policy.opened(fh, node.is_dir)

    def _handle(self, fh: int, nodeid: int) -> tuple[_Handle, _Node]:
        h = self._handles.get(fh)
        if h is None or h.ino != nodeid:
            raise _err(errno.EBADF, f"handle {fh}")
        return h, self._nodes[h.ino]

    def _truncate(self, node: _Node, size: int) -> None:
        delta = size - len(node.data)
        self._charge(delta)
        if delta < 0:
            del node.data[size:]
        else:
            node.data.extend(bytes(delta))

    # -- session ------------------------------------------------------------
    def destroy(self) -> None:
        """Every lookup count and handle goes; the contents stay (a remount sees them)."""
        with self._lock:
            for h in self._handles.values():
                self._nodes[h.ino].opens -= 1
            self._handles.clear()
            for node in list(self._nodes.values()):
                node.lookups = 0
                self._maybe_drop(node)

    # -- names ----------------------------------------------------------------
    def lookup(self, ctx: Context, parent: int, name: bytes) -> Entry:
        with self._lock:
            p = self._dir(parent)
            if name == b".":
                return self._entry(p)
            if name == b"..":
                return self._entry(self._nodes[p.parent])
            if len(name) > _NAME_MAX:
                raise _err(errno.ENAMETOOLONG, "name")
            node = self._child(p, name)
            if node is None:
                raise _err(errno.ENOENT, repr(name))
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

    # -- attributes -------------------------------------------------------------
    def getattr(self, ctx: Context, nodeid: int, fh: int | None) -> AttrReply:
        with self._lock:
            return AttrReply(self._node(nodeid).stat(), self.policy.attr_timeout)

    def statfs(self, ctx: Context, nodeid: int) -> os.statvfs_result:
        with self._lock:
            cfg = self.config
            blocks = cfg.capacity // _BLOCK
            free = max(0, cfg.capacity - self._used) // _BLOCK
            files_free = max(0, cfg.max_nodes - len(self._nodes))
            flag = os.ST_RDONLY if cfg.readonly else 0
            return os.statvfs_result(
                (_BLOCK, _BLOCK, blocks, free, free, cfg.max_nodes, files_free, files_free, flag,
                 _NAME_MAX)
            )  # fmt: skip

    def readlink(self, ctx: Context, nodeid: int) -> bytes:
        with self._lock:
            node = self._node(nodeid)
            if not stat.S_ISLNK(node.mode):
                raise _err(errno.EINVAL, "not a symlink")
            return node.target

    def access(self, ctx: Context, nodeid: int, mask: int) -> None:
        """Existence only: the guest kernel checks permissions (default_permissions)."""
        with self._lock:
            self._node(nodeid)
            if mask & os.W_OK and self.config.readonly:
                raise _err(errno.EROFS, "read-only file system")

    def setattr(self, ctx: Context, nodeid: int, attr: SetAttr) -> AttrReply:
        with self._lock:
            self._check_write()
            node = self._node(nodeid)
            if attr.fh is not None:
                self._handle(attr.fh, nodeid)
            now = time.time_ns()
            if attr.size is not None:
                if not stat.S_ISREG(node.mode):
                    code = errno.EISDIR if node.is_dir else errno.EINVAL
                    raise _err(code, "truncate of a file that is not regular")
                self._truncate(node, attr.size)
                node.touch(now, data=True)
            if attr.mode is not None:
                node.mode = stat.S_IFMT(node.mode) | (attr.mode & 0o7777)
            if attr.uid is not None:
                node.uid = attr.uid
            if attr.gid is not None:
                node.gid = attr.gid
            if attr.kill_suidgid and stat.S_ISREG(node.mode):
                node.mode &= ~(stat.S_ISUID | stat.S_ISGID)
            if attr.atime_ns is not None:
                node.atime_ns = now if attr.atime_ns is NOW else attr.atime_ns
            if attr.mtime_ns is not None:
                node.mtime_ns = now if attr.mtime_ns is NOW else attr.mtime_ns
            node.ctime_ns = attr.ctime_ns if attr.ctime_ns is not None else now
            return AttrReply(node.stat(), self.policy.attr_timeout)

    # -- files ------------------------------------------------------------------
    def open(self, ctx: Context, nodeid: int, flags: int, *, kill_suidgid: bool = False) -> Opened:
        with self._lock:
            node = self._node(nodeid)
            writing = flags & os.O_ACCMODE != os.O_RDONLY or flags & os.O_TRUNC
            if writing:
                self._check_write()
            if node.is_dir and writing:
                raise _err(errno.EISDIR, "open a directory for writing")
            if not (stat.S_ISREG(node.mode) or node.is_dir):
                # The guest opens fifos and devices itself; one reaching us is refused.
                raise _err(errno.ENXIO, "only regular files and directories are opened")
            if flags & os.O_TRUNC and stat.S_ISREG(node.mode):
                self._truncate(node, 0)
                node.touch(time.time_ns(), data=True)
                if kill_suidgid:
                    node.mode &= ~(stat.S_ISUID | stat.S_ISGID)
            return self._open_handle(node, flags)

    def read(
        self, ctx: Context, nodeid: int, fh: int, offset: int, size: int, bufs: list[memoryview]
    ) -> int:
        with self._lock:
            _, node = self._handle(fh, nodeid)
            if node.is_dir:
                raise _err(errno.EISDIR, "read of a directory")
            data = memoryview(node.data)[offset : offset + size]
            done = 0
            for buf in bufs:
                n = min(len(buf), len(data) - done)
                if n <= 0:
                    break
                buf[:n] = data[done : done + n]
                done += n
            data.release()
            return done

    def write(
        self,
        ctx: Context,
        nodeid: int,
        fh: int,
        offset: int,
        bufs: list[memoryview],
        kill_suidgid: bool,
    ) -> int:
        with self._lock:
            self._check_write()
            h, node = self._handle(fh, nodeid)
            if h.flags & os.O_ACCMODE == os.O_RDONLY:
                raise _err(errno.EBADF, "handle not open for writing")
            if h.flags & os.O_APPEND:
                offset = len(node.data)
            total = sum(len(b) for b in bufs)
            if total == 0:
                return 0  # write(2) of nothing changes nothing, not even the size
            end = offset + total
            if end > len(node.data):
                self._charge(end - len(node.data))
                node.data.extend(bytes(end - len(node.data)))
            pos = offset
            for buf in bufs:
                node.data[pos : pos + len(buf)] = buf
                pos += len(buf)
            if kill_suidgid:
                node.mode &= ~(stat.S_ISUID | stat.S_ISGID)
            node.touch(time.time_ns(), data=True)
            return total

    def flush(self, ctx: Context, nodeid: int, fh: int, lock_owner: int) -> None:
        with self._lock:
            self._handle(fh, nodeid)

    def release(
        self, ctx: Context, nodeid: int, fh: int, flags: int, *, lock_owner: int | None = None
    ) -> None:
        with self._lock:
            _, node = self._handle(fh, nodeid)
            del self._handles[fh]
            node.opens -= 1
            self._maybe_drop(node)

    def fsync(self, ctx: Context, nodeid: int, fh: int, datasync: bool) -> None:
        with self._lock:
            self._handle(fh, nodeid)

    def lseek(self, ctx: Context, nodeid: int, fh: int, offset: int, whence: int) -> int:
        """SEEK_DATA/SEEK_HOLE: files here have no holes (the kernel does the rest)."""
        with self._lock:
            _, node = self._handle(fh, nodeid)
            size = len(node.data)
            if whence not in (_SEEK_DATA, _SEEK_HOLE):
                raise _err(errno.EINVAL, f"whence {whence}")
            if offset < 0 or offset >= size:
                raise _err(errno.ENXIO, "offset beyond end of file")
            return offset if whence == _SEEK_DATA else size

    def fallocate(
        self, ctx: Context, nodeid: int, fh: int, mode: int, offset: int, length: int
    ) -> None:
        with self._lock:
            self._check_write()
            _, node = self._handle(fh, nodeid)
            end = offset + length
            if mode & _FALLOC_FL_PUNCH_HOLE:
                if not mode & _FALLOC_FL_KEEP_SIZE:
                    raise _err(errno.EOPNOTSUPP, "PUNCH_HOLE needs KEEP_SIZE")
                stop = min(end, len(node.data))
                if offset < stop:
                    node.data[offset:stop] = bytes(stop - offset)
            elif mode & ~_FALLOC_FL_KEEP_SIZE:
                raise _err(errno.EOPNOTSUPP, f"fallocate mode {mode:#x}")
            elif not mode & _FALLOC_FL_KEEP_SIZE and end > len(node.data):
                self._truncate(node, end)
            node.touch(time.time_ns(), data=True)

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
        with self._lock:
            _, src = self._handle(fh_in, nodeid_in)
            data = bytes(src.data[off_in : off_in + length])
        if not data:
            return 0
        return self.write(ctx, nodeid_out, fh_out, off_out, [memoryview(data)], False)

    def syncfs(self, ctx: Context, nodeid: int) -> None:
        """Nothing to sync: memory is the storage."""

    # -- directories ----------------------------------------------------------------
    def opendir(self, ctx: Context, nodeid: int, flags: int) -> Opened:
        with self._lock:
            return self._open_handle(self._dir(nodeid), flags)

    def readdir(
        self, ctx: Context, nodeid: int, fh: int, offset: int, plus: bool
    ) -> Iterator[DirEntry]:
        """Entries whose cookie is after ``offset``.

        A name keeps its cookie while it exists (a rename in gives a new
        one, at the end), so a listing resumed from any cookie neither
        repeats nor skips the names that stayed.  The listing is a snapshot
        taken now; lookups for ``plus`` are taken as entries are yielded,
        skipping names removed in between.
        """
        with self._lock:
            _, d = self._handle(fh, nodeid)
            if not d.is_dir:
                raise _err(errno.ENOTDIR, f"node {nodeid}")
            snap: list[tuple[int, int, bytes]] = []
            if offset < _DOT_COOKIE:
                snap.append((_DOT_COOKIE, d.ino, b"."))
            if offset < _DOTDOT_COOKIE:
                snap.append((_DOTDOT_COOKIE, d.parent, b".."))
            snap += [(c, ino, name) for name, (c, ino) in d.entries.items() if c > offset]
        return self._dir_entries(d, snap, plus)

    def _dir_entries(
        self, d: _Node, snap: list[tuple[int, int, bytes]], plus: bool
    ) -> Iterator[DirEntry]:
        for cookie, ino, name in snap:
            with self._lock:
                node = self._nodes.get(ino)
                if node is None:
                    continue
                entry = None
                if name not in (b".", b".."):
                    if d.entries.get(name, (0, 0))[1] != ino:
                        continue  # removed or replaced since the snapshot
                    if plus:
                        entry = self._entry(node)
                de = DirEntry(ino, cookie, dirent_type(node.mode), name, entry)
            yield de

    def releasedir(self, ctx: Context, nodeid: int, fh: int, flags: int) -> None:
        self.release(ctx, nodeid, fh, flags)

    def fsyncdir(self, ctx: Context, nodeid: int, fh: int, datasync: bool) -> None:
        with self._lock:
            self._handle(fh, nodeid)

    # -- extended attributes ---------------------------------------------------------
    def _xattr_node(self, nodeid: int, name: bytes) -> _Node:
        self._check_xattr()
        node = self._node(nodeid)
        if not name.startswith(_XATTR_PREFIXES):
            raise _err(errno.EOPNOTSUPP, f"xattr namespace of {name!r}")
        if len(name) > _XATTR_NAME_MAX:
            raise _err(errno.ERANGE, "xattr name too long")
        return node

    def getxattr(self, ctx: Context, nodeid: int, name: bytes) -> bytes:
        with self._lock:
            node = self._xattr_node(nodeid, name)
            value = node.xattrs.get(name)
            if value is None:
                raise _err(errno.ENODATA, repr(name))
            return value

    def listxattr(self, ctx: Context, nodeid: int) -> bytes:
        with self._lock:
            self._check_xattr()
            return b"".join(n + b"\0" for n in self._node(nodeid).xattrs)

    def setxattr(
        self, ctx: Context, nodeid: int, name: bytes, value: bytes, flags: int, acl_kill_sgid: bool
    ) -> None:
        with self._lock:
            self._check_write()
            node = self._xattr_node(nodeid, name)
            if name.startswith(b"user.") and not (stat.S_ISREG(node.mode) or node.is_dir):
                # xattr(7): user attributes only on regular files and directories.
                raise _err(errno.EPERM, "user xattr on a special file")
            if len(value) > _XATTR_SIZE_MAX:
                raise _err(errno.E2BIG, "xattr value too large")
            old = node.xattrs.get(name)
            if flags & _XATTR_CREATE and old is not None:
                raise _err(errno.EEXIST, repr(name))
            if flags & _XATTR_REPLACE and old is None:
                raise _err(errno.ENODATA, repr(name))
            self._charge(len(value) - (len(old) if old is not None else 0))
            node.xattrs[name] = bytes(value)
            node.touch(time.time_ns(), data=False)

    def removexattr(self, ctx: Context, nodeid: int, name: bytes) -> None:
        with self._lock:
            self._check_write()
            node = self._xattr_node(nodeid, name)
            old = node.xattrs.pop(name, None)
            if old is None:
                raise _err(errno.ENODATA, repr(name))
            self._used -= len(old)
            node.touch(time.time_ns(), data=False)

    # -- changing the tree ---------------------------------------------------------------
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
                    raise _err(errno.EEXIST, repr(name))
                if node.is_dir:
                    raise _err(errno.EISDIR, repr(name))
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
            raise _err(errno.EINVAL, f"mknod type {fmt:#o}")
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
            raise _err(errno.ENAMETOOLONG if target else errno.ENOENT, "symlink target")
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
                raise _err(errno.EPERM, "hard link to a directory")
            if node.links == 0 and node.opens == 0:
                raise _err(errno.ENOENT, "link to a removed file")
            p = self._dir(newparent)
            if newname in p.entries:
                raise _err(errno.EEXIST, repr(newname))
            self._link_in(p, newname, node)
            node.touch(time.time_ns(), data=False)
            return self._entry(node)

    def unlink(self, ctx: Context, parent: int, name: bytes) -> None:
        with self._lock:
            self._check_write()
            p = self._dir(parent)
            node = self._child(p, name)
            if node is None:
                raise _err(errno.ENOENT, repr(name))
            if node.is_dir:
                raise _err(errno.EISDIR, repr(name))
            self._unlink_from(p, name, node)
            self._maybe_drop(node)

    def rmdir(self, ctx: Context, parent: int, name: bytes) -> None:
        with self._lock:
            self._check_write()
            if name == b".":
                raise _err(errno.EINVAL, "rmdir .")
            p = self._dir(parent)
            node = self._child(p, name)
            if node is None:
                raise _err(errno.ENOENT, repr(name))
            if not node.is_dir:
                raise _err(errno.ENOTDIR, repr(name))
            if node.entries:
                raise _err(errno.ENOTEMPTY, repr(name))
            self._unlink_from(p, name, node)
            self._maybe_drop(node)

    def _is_ancestor(self, maybe: _Node, d: _Node) -> bool:
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
            raise _err(errno.EINVAL, "RENAME_WHITEOUT")
        if flags & RENAME_NOREPLACE and flags & RENAME_EXCHANGE:
            raise _err(errno.EINVAL, "NOREPLACE with EXCHANGE")
        with self._lock:
            self._check_write()
            self._check_name(newname)
            p, np = self._dir(parent), self._dir(newparent)
            src = self._child(p, name)
            if src is None:
                raise _err(errno.ENOENT, repr(name))
            dst = self._child(np, newname)
            if flags & RENAME_EXCHANGE:
                if dst is None:
                    raise _err(errno.ENOENT, repr(newname))
                self._exchange(p, name, src, np, newname, dst)
                return
            if dst is not None and flags & RENAME_NOREPLACE:
                raise _err(errno.EEXIST, repr(newname))
            if src.is_dir and self._is_ancestor(src, np):
                raise _err(errno.EINVAL, "move a directory into itself")
            if dst is src:
                return  # two names of one node: rename(2) does nothing
            if dst is not None:
                if src.is_dir and not dst.is_dir:
                    raise _err(errno.ENOTDIR, repr(newname))
                if dst.is_dir and not src.is_dir:
                    raise _err(errno.EISDIR, repr(newname))
                if dst.is_dir and dst.entries:
                    raise _err(errno.ENOTEMPTY, repr(newname))
                self._unlink_from(np, newname, dst)
                self._maybe_drop(dst)
            self._unlink_from(p, name, src)
            self._link_in(np, newname, src)

    def _exchange(
        self, p: _Node, name: bytes, src: _Node, np: _Node, newname: bytes, dst: _Node
    ) -> None:
        if (src.is_dir and self._is_ancestor(src, np)) or (
            dst.is_dir and self._is_ancestor(dst, p)
        ):
            raise _err(errno.EINVAL, "exchange a directory with its own descendant")
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


def memory_fs_from_options(opts: Options) -> MemoryFS:
    """``--backend memory``: the options that apply to it (cache, readonly, xattr)."""
    return MemoryFS(MemoryConfig(cache=opts.cache, readonly=opts.readonly, xattr=opts.xattr))
