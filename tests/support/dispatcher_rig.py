"""An in-memory backend and the request/reply plumbing of the dispatcher tests.

Requests and replies go through bytearray buffers split at odd places, the
way a guest's descriptor chain splits them.  Shared by the FUSE unit suites
(tests/unit/fuse, tests/unit/fs).
"""

from __future__ import annotations

import errno
import os
import stat
import struct
from collections.abc import Iterator, Sequence
from typing import Any

from virtiofsd_py.fs.api import (
    ROOT_ID,
    AttrReply,
    Context,
    DirEntry,
    Entry,
    Filesystem,
    Opened,
    SessionInfo,
    dirent_type,
    make_stat,
)
from virtiofsd_py.fuse import abi
from virtiofsd_py.fuse.dispatcher import (
    OUR_MAX_MINOR,
    Dispatcher,
    FuseConfig,
)

# -- an in-memory backend ---------------------------------------------------------


class Node:
    def __init__(self, nodeid: int, mode: int, data: bytes = b"") -> None:
        self.nodeid = nodeid
        self.mode = mode
        self.data = data
        self.children: dict[bytes, int] = {}
        self.xattrs: dict[bytes, bytes] = {}


class MemFs(Filesystem):
    """Tiny tree: / { hello (file), link -> hello, sub/ { a..z files } }."""

    def __init__(self) -> None:
        self.nodes: dict[int, Node] = {ROOT_ID: Node(ROOT_ID, stat.S_IFDIR | 0o755)}
        self.lookups: dict[int, int] = {}
        self.forgets: list[tuple[int, int]] = []
        self.calls: list[tuple[Any, ...]] = []
        self.sessions: list[SessionInfo] = []
        self.destroyed = 0
        self.fail_init: OSError | None = None
        hello = self._add(ROOT_ID, b"hello", stat.S_IFREG | 0o644, b"hello world")
        self._add(ROOT_ID, b"link", stat.S_IFLNK | 0o777, b"hello")
        sub = self._add(ROOT_ID, b"sub", stat.S_IFDIR | 0o755)
        for c in "abcdefghijklmnopqrstuvwxyz":
            self._add(sub, c.encode() * 3, stat.S_IFREG | 0o600)
        self.nodes[hello].xattrs = {b"user.k": b"value", b"user.e": b""}

    def _add(self, parent: int, name: bytes, mode: int, data: bytes = b"") -> int:
        nid = len(self.nodes) + 1
        self.nodes[nid] = Node(nid, mode, data)
        self.nodes[parent].children[name] = nid
        return nid

    def _node(self, nodeid: int) -> Node:
        try:
            return self.nodes[nodeid]
        except KeyError:
            raise OSError(errno.ESTALE, "no such node") from None

    def _stat(self, n: Node) -> os.stat_result:
        return make_stat(mode=n.mode, ino=n.nodeid + 1000, size=len(n.data), uid=1, gid=2)

    def _entry(self, nid: int) -> Entry:
        self.lookups[nid] = self.lookups.get(nid, 0) + 1
        return Entry(nid, 1, self._stat(self.nodes[nid]), 1.5, 2.25)

    def init(self, session: SessionInfo) -> None:
        if self.fail_init is not None:
            raise self.fail_init
        self.sessions.append(session)

    def destroy(self) -> None:
        self.destroyed += 1

    def lookup(self, ctx: Context, parent: int, name: bytes) -> Entry:
        self.calls.append(("lookup", ctx, parent, name))
        p = self._node(parent)
        if name not in p.children:
            raise OSError(errno.ENOENT, "no entry")
        return self._entry(p.children[name])

    def forget(self, nodeid: int, nlookup: int) -> None:
        self.forgets.append((nodeid, nlookup))
        self.lookups[nodeid] = self.lookups.get(nodeid, 0) - nlookup

    def getattr(self, ctx: Context, nodeid: int, fh: int | None) -> AttrReply:
        self.calls.append(("getattr", nodeid, fh))
        return AttrReply(self._stat(self._node(nodeid)), 3.0)

    def statfs(self, ctx: Context, nodeid: int) -> os.statvfs_result:
        return os.statvfs_result((4096, 512, 100, 50, 40, 1000, 900, 800, 0, 255))

    def readlink(self, ctx: Context, nodeid: int) -> bytes:
        n = self._node(nodeid)
        if not stat.S_ISLNK(n.mode):
            raise OSError(errno.EINVAL, "not a symlink")
        return n.data

    def access(self, ctx: Context, nodeid: int, mask: int) -> None:
        self.calls.append(("access", nodeid, mask))
        if mask & os.W_OK:
            raise OSError(errno.EACCES, "read-only")

    def open(self, ctx: Context, nodeid: int, flags: int) -> Opened:
        self.calls.append(("open", nodeid, flags))
        self._node(nodeid)
        return Opened(fh=100 + nodeid, keep_cache=True)

    def read(
        self, ctx: Context, nodeid: int, fh: int, offset: int, size: int, bufs: list[memoryview]
    ) -> int:
        self.calls.append(("read", nodeid, fh, offset, size, [len(b) for b in bufs]))
        assert sum(len(b) for b in bufs) == size
        data = self._node(nodeid).data[offset : offset + size]
        pos = 0
        for b in bufs:
            k = min(len(b), len(data) - pos)
            b[:k] = data[pos : pos + k]
            pos += k
        return pos

    def flush(self, ctx: Context, nodeid: int, fh: int, lock_owner: int) -> None:
        self.calls.append(("flush", nodeid, fh, lock_owner))

    def release(self, ctx: Context, nodeid: int, fh: int, flags: int) -> None:
        self.calls.append(("release", nodeid, fh, flags))

    def lseek(self, ctx: Context, nodeid: int, fh: int, offset: int, whence: int) -> int:
        if whence == os.SEEK_DATA:
            return offset
        raise OSError(errno.ENXIO, "no hole")

    def opendir(self, ctx: Context, nodeid: int, flags: int) -> Opened:
        if not stat.S_ISDIR(self._node(nodeid).mode):
            raise OSError(errno.ENOTDIR, "not a dir")
        return Opened(fh=7)

    def readdir(
        self, ctx: Context, nodeid: int, fh: int, offset: int, plus: bool
    ) -> Iterator[DirEntry]:
        n = self._node(nodeid)
        listing: list[tuple[bytes, int | None]] = [(b".", None), (b"..", None)]
        listing += [(k, v) for k, v in n.children.items()]
        for i, (name, nid) in enumerate(listing):
            if i < offset:
                continue
            ino = nid + 1000 if nid is not None else 1
            mode = self.nodes[nid].mode if nid is not None else stat.S_IFDIR
            entry = self._entry(nid) if plus and nid is not None else None
            yield DirEntry(ino, i + 1, dirent_type(mode), name, entry)

    def releasedir(self, ctx: Context, nodeid: int, fh: int, flags: int) -> None:
        self.calls.append(("releasedir", nodeid, fh, flags))

    def getxattr(self, ctx: Context, nodeid: int, name: bytes) -> bytes:
        try:
            return self._node(nodeid).xattrs[name]
        except KeyError:
            raise OSError(errno.ENODATA, "no xattr") from None

    def listxattr(self, ctx: Context, nodeid: int) -> bytes:
        return b"".join(k + b"\0" for k in self._node(nodeid).xattrs)


# -- request/reply plumbing ----------------------------------------------------------

_unique = iter(range(1, 1 << 40))


def request(
    opcode: int,
    args: bytes = b"",
    nodeid: int = ROOT_ID,
    unique: int | None = None,
    ext: bytes = b"",
    uid: int = 1000,
    gid: int = 1000,
    pid: int = 42,
    length: int | None = None,
) -> tuple[bytes, int]:
    u = next(_unique) if unique is None else unique
    assert len(ext) % 8 == 0
    total = 40 + len(args) + len(ext) if length is None else length
    hdr = abi.IN_HEADER.pack(total, opcode, u, nodeid, uid, gid, pid, len(ext) // 8, 0)
    return hdr + args + ext, u


def split_at(data: bytes, points: Sequence[int]) -> list[bytearray]:
    cuts = sorted({p for p in points if 0 < p < len(data)})
    out, prev = [], 0
    for c in [*cuts, len(data)]:
        out.append(bytearray(data[prev:c]))
        prev = c
    return out


class Reply:
    def __init__(self, n: int, raw: bytes) -> None:
        self.n = n
        self.raw = raw
        if n:
            self.len, self.error, self.unique = abi.OUT_HEADER.unpack_from(raw)
            self.body = raw[16:n]

    def unpack(self, s: struct.Struct) -> tuple[Any, ...]:
        assert self.error == 0, self.error
        assert len(self.body) == s.size
        return s.unpack(self.body)


def call(
    d: Dispatcher,
    req: tuple[bytes, int],
    rsplit: Sequence[int] = (40,),
    wsizes: Sequence[int] = (16, 8192),
) -> Reply:
    data, unique = req
    writable = [bytearray(b"\xaa" * n) for n in wsizes]
    n = d.handle(split_at(data, rsplit), writable)
    r = Reply(n, b"".join(writable))
    if n:
        assert r.len == n, "reply len must equal the bytes written"
        assert r.unique == unique, "reply unique must echo the request's"
    return r


def init_args(
    minor: int = OUR_MAX_MINOR, flags: int = -1, flags2: int = 0, major: int = 7
) -> bytes:
    if flags == -1:
        flags = 0xFFFF_FFFF & ~abi.FUSE_INIT_RESERVED
    return abi.INIT_IN.pack(major, minor, 65536, flags, flags2, *([0] * 11))


def make(config: FuseConfig | None = None, init: bool = True) -> tuple[Dispatcher, MemFs]:
    fs = MemFs()
    d = Dispatcher(fs, config or FuseConfig())
    if init:
        r = call(d, request(abi.FUSE_INIT, init_args(flags2=0xFFFF_FFFF)))
        assert r.error == 0
    return d, fs


def lookup(d: Dispatcher, name: bytes, parent: int = ROOT_ID) -> Reply:
    return call(d, request(abi.FUSE_LOOKUP, name + b"\0", nodeid=parent))


def read_in(fh: int, offset: int, size: int) -> bytes:
    return abi.READ_IN.pack(fh, offset, size, 0, 0, 0, 0)


def init_out(r: Reply) -> dict[str, int]:
    vals = r.unpack(abi.INIT_OUT)
    return dict(zip(abi.INIT_OUT_FIELDS, vals, strict=False))


def check_reply(n: int, writable: list[bytearray], unique: int | None) -> None:
    assert n == 0 or n >= 16
    assert n <= sum(len(b) for b in writable)
    if n:
        flat = b"".join(writable)
        length, error, u = abi.OUT_HEADER.unpack_from(flat)
        assert length == n
        assert -4096 < error <= 0
        if unique is not None:
            assert u == unique
        if error:
            assert n == 16
