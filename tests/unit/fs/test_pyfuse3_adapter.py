"""The pyfuse3 adapter against a tiny ``pyfuse3.Operations``, through the
dispatcher and the async bridge as the daemon runs them (no guest, no
libfuse): pyfuse3's types in, FUSE replies out, lookup counts kept."""

from __future__ import annotations

import asyncio
import errno
import os
import stat
from collections.abc import Sequence
from typing import Any

import pytest

pyfuse3 = pytest.importorskip("pyfuse3")

from dispatcher_rig import Reply, init_args, read_in, request, split_at  # noqa: E402
from pyfuse3 import EntryAttributes, FileInfo, FUSEError, RequestContext  # noqa: E402

from virtiofsd_py.fs.awaiting import AwaitingFS  # noqa: E402
from virtiofsd_py.fs.pyfuse3_adapter import shims, wrap  # noqa: E402
from virtiofsd_py.fuse import abi  # noqa: E402
from virtiofsd_py.fuse.asyncbridge import AsyncRequests  # noqa: E402
from virtiofsd_py.fuse.dispatcher import Dispatcher, FuseConfig  # noqa: E402
from virtiofsd_py.testing.frontend.fuse_client import parse_dirents  # noqa: E402

ROOT = pyfuse3.ROOT_INODE
MANY = 500


class MiniOps(pyfuse3.Operations):
    """/ { file "hello" (ino 2), MANY files "e{i}" (ino 100+i) }, plus what is made."""

    def __init__(self) -> None:
        super().__init__()
        self.inits = 0
        self.lookups: dict[int, int] = {}
        self.contexts: list[RequestContext] = []
        self.names: dict[bytes, int] = {b"hello": 2, **{b"e%d" % i: 100 + i for i in range(MANY)}}
        self.data: dict[int, bytearray] = {2: bytearray(b"hello pyfuse3\n")}
        self.modes: dict[int, int] = {2: stat.S_IFREG | 0o644}
        self.xattrs: dict[bytes, bytes] = {b"user.a": b"1"}
        self.setattr_calls: list[tuple[Any, ...]] = []
        self.renames: list[tuple[Any, ...]] = []
        self.next_ino = 10_000

    def init(self) -> None:
        self.inits += 1

    def _attr(self, ino: int) -> EntryAttributes:
        a = EntryAttributes()
        a.st_ino = ino
        a.st_mode = (
            stat.S_IFDIR | 0o755 if ino == ROOT else self.modes.get(ino, stat.S_IFREG | 0o600)
        )
        a.st_size = len(self.data.get(ino, b""))
        a.st_uid, a.st_gid = 7, 8
        a.st_mtime_ns = 1_500_000_000_123_456_789
        return a

    def _counted(self, ino: int) -> EntryAttributes:
        self.lookups[ino] = self.lookups.get(ino, 0) + 1
        return self._attr(ino)

    async def lookup(self, parent: int, name: bytes, ctx: RequestContext) -> EntryAttributes:
        self.contexts.append(ctx)
        if name == b"negative":
            return EntryAttributes()  # st_ino 0: a negative entry
        if name == b"wrongtype":
            return "no"  # type: ignore[return-value]
        if name == b"bug":
            raise KeyError("a bug in the file system")
        if name not in self.names:
            raise FUSEError(errno.ENOENT)
        return self._counted(self.names[name])

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for ino, n in inode_list:
            self.lookups[ino] -= n
            if not self.lookups[ino]:
                del self.lookups[ino]

    async def getattr(self, inode: int, ctx: RequestContext) -> EntryAttributes:
        await asyncio.sleep(0)
        return self._attr(inode)

    async def setattr(self, inode: int, attr: EntryAttributes, fields: Any, fh: int | None,
                      ctx: RequestContext) -> EntryAttributes:  # fmt: skip
        self.setattr_calls.append(
            (inode, fields.update_size, fields.update_mode, fields.update_mtime,
             attr.st_size, attr.st_mtime_ns, fh)
        )  # fmt: skip
        if fields.update_size:
            del self.data[inode][attr.st_size :]
        return self._attr(inode)

    async def open(self, inode: int, flags: int, ctx: RequestContext) -> FileInfo:
        return FileInfo(fh=inode, keep_cache=False, direct_io=True)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        await asyncio.sleep(0.001)
        return bytes(self.data[fh][off : off + size])

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        d = self.data.setdefault(fh, bytearray())
        d[off : off + len(buf)] = buf
        return len(buf)

    async def release(self, fh: int) -> None:
        pass

    async def opendir(self, inode: int, ctx: RequestContext) -> int:
        return inode

    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        if fh == 2:
            pyfuse3.readdir_reply(token, b"one", self._attr(2), 1)
            self.lookups[2] = self.lookups.get(2, 0) + 1
            raise FUSEError(errno.EIO)  # after one entry: the entry is still a reply
        entries = sorted(self.names.items(), key=lambda kv: kv[1])
        for name, ino in entries:
            if ino <= start_id:
                continue
            await asyncio.sleep(0)
            if not pyfuse3.readdir_reply(token, name, self._attr(ino), ino):
                return
            self.lookups[ino] = self.lookups.get(ino, 0) + 1

    async def releasedir(self, fh: int) -> None:
        pass

    async def statfs(self, ctx: RequestContext) -> Any:
        s = pyfuse3.StatvfsData()
        s.f_bsize, s.f_frsize, s.f_blocks, s.f_bfree, s.f_namemax = 4096, 4096, 100, 50, 255
        return s

    async def create(self, parent: int, name: bytes, mode: int, flags: int,
                     ctx: RequestContext) -> tuple[FileInfo, EntryAttributes]:  # fmt: skip
        self.next_ino += 1
        ino = self.next_ino
        self.names[name], self.modes[ino], self.data[ino] = ino, mode, bytearray()
        return FileInfo(fh=ino), self._counted(ino)

    async def mkdir(
        self, parent: int, name: bytes, mode: int, ctx: RequestContext
    ) -> EntryAttributes:
        self.next_ino += 1
        self.names[name], self.modes[self.next_ino] = self.next_ino, mode
        return self._counted(self.next_ino)

    async def rename(self, p: int, name: bytes, np: int, newname: bytes, flags: int,
                     ctx: RequestContext) -> None:  # fmt: skip
        self.renames.append((p, name, np, newname, flags))
        self.names[newname] = self.names.pop(name)

    async def access(self, inode: int, mode: int, ctx: RequestContext) -> bool:
        return inode != 2

    async def getxattr(self, inode: int, name: bytes, ctx: RequestContext) -> bytes:
        if name not in self.xattrs:
            raise FUSEError(pyfuse3.ENOATTR)
        return self.xattrs[name]

    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: RequestContext) -> None:
        self.xattrs[name] = value

    async def listxattr(self, inode: int, ctx: RequestContext) -> list[bytes]:
        return list(self.xattrs)


class Rig:
    """The dispatcher over the adapter, each request through the async bridge."""

    def __init__(self, ops: MiniOps) -> None:
        self.ops = ops
        self.fs = wrap(ops)
        self.d = Dispatcher(AwaitingFS(self.fs), FuseConfig(readdirplus_auto=False))
        self.bridge = AsyncRequests(asyncio.get_running_loop(), self.d.handle)

    async def call(self, req: tuple[bytes, int], wsizes: Sequence[int] = (16, 8192)) -> Reply:
        data, unique = req
        writable = [bytearray(b"\xaa" * n) for n in wsizes]
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        n = self.bridge.submit(split_at(data, (40,)), writable, fut.set_result)
        if n is None:
            n = await asyncio.wait_for(fut, 10)
        r = Reply(n, b"".join(writable))
        if n:
            assert r.unique == unique
        return r

    async def op(self, opcode: int, args: bytes = b"", nodeid: int = ROOT, **kw: Any) -> Reply:
        return await self.call(
            request(opcode, args, nodeid=nodeid, uid=1000, gid=100, pid=77), **kw
        )


@pytest.fixture
async def rig() -> Rig:
    r = Rig(MiniOps())
    assert (await r.op(abi.FUSE_INIT, init_args(flags2=0xFFFF_FFFF))).error == 0
    return r


async def test_init_lookup_context_and_entry(rig: Rig) -> None:
    assert rig.ops.inits == 1
    r = await rig.op(abi.FUSE_LOOKUP, b"hello\0")
    entry = dict(zip(abi.ENTRY_OUT_FIELDS, r.unpack(abi.ENTRY_OUT), strict=True))
    assert entry["nodeid"] == 2 and entry["ino"] == 2 and entry["size"] == 14
    assert entry["mode"] == stat.S_IFREG | 0o644 and entry["entry_valid"] == 300
    assert entry["mtime"] == 1_500_000_000 and entry["mtimensec"] == 123_456_789
    ctx = rig.ops.contexts[-1]
    assert isinstance(ctx, RequestContext)
    assert (ctx.uid, ctx.gid, ctx.pid, ctx.umask) == (1000, 100, 77, 0)
    assert rig.ops.lookups == {2: 1}
    assert -(await rig.op(abi.FUSE_LOOKUP, b"nope\0")).error == errno.ENOENT
    neg = await rig.op(abi.FUSE_LOOKUP, b"negative\0")
    assert neg.error == 0 and neg.unpack(abi.ENTRY_OUT)[0] == 0
    await rig.op(abi.FUSE_FORGET, abi.FORGET_IN.pack(1), nodeid=2, wsizes=())
    assert rig.ops.lookups == {}


async def test_wrong_return_type_is_eio(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    r = await rig.op(abi.FUSE_LOOKUP, b"wrongtype\0")
    assert -r.error == errno.EIO
    assert "lookup() returned str, not EntryAttributes" in caplog.text


async def test_readdirplus_stops_at_the_buffer_and_counts_what_fitted(rig: Rig) -> None:
    fh = (await rig.op(abi.FUSE_OPENDIR, abi.OPEN_IN.pack(os.O_RDONLY, 0))).unpack(abi.OPEN_OUT)[0]
    seen: list[bytes] = []
    offset = 0
    while True:
        r = await rig.op(abi.FUSE_READDIRPLUS, read_in(fh, offset, 4096), wsizes=(16, 4096))
        assert r.error == 0
        ents = parse_dirents(r.body, plus=True)
        if not ents:
            break
        assert len(ents) < MANY  # the buffer is full long before
        seen += [e.name for e in ents]
        offset = ents[-1].off
    assert seen == [b"hello"] + [b"e%d" % i for i in range(MANY)]
    # One lookup per entry handed out, none for the entries that did not fit.
    assert rig.ops.lookups == {ino: 1 for ino in [2, *range(100, 100 + MANY)]}


async def test_plain_readdir_leaves_no_lookup_counts(rig: Rig) -> None:
    r = await rig.op(abi.FUSE_READDIR, read_in(1, 0, 4096), wsizes=(16, 4096))
    names = [e.name for e in parse_dirents(r.body, plus=False)]
    assert names[:2] == [b"hello", b"e0"] and len(names) < MANY
    assert rig.ops.lookups == {}


async def test_read_write_create_setattr(rig: Rig) -> None:
    r = await rig.op(abi.FUSE_OPEN, abi.OPEN_IN.pack(os.O_RDWR, 0), nodeid=2)
    fh, open_flags, _ = r.unpack(abi.OPEN_OUT)
    assert fh == 2 and open_flags & abi.FOPEN_DIRECT_IO
    r = await rig.op(abi.FUSE_READ, read_in(fh, 6, 100), nodeid=2)
    assert r.error == 0 and r.body == b"pyfuse3\n"
    w = abi.WRITE_IN.pack(fh, 0, 5, 0, 0, 0, 0) + b"HELLO"
    assert (await rig.op(abi.FUSE_WRITE, w, nodeid=2)).unpack(abi.WRITE_OUT)[0] == 5
    assert bytes(rig.ops.data[2]) == b"HELLO pyfuse3\n"
    sa = abi.SETATTR_IN.pack(abi.FATTR_SIZE | abi.FATTR_MTIME_NOW, 0, 0, 5, 0, 0, 0, 0, 0, 0, 0,
                             0, 0, 0, 0, 0)  # fmt: skip
    assert (await rig.op(abi.FUSE_SETATTR, sa, nodeid=2)).error == 0
    ino, size_set, mode_set, mtime_set, size, mtime_ns, sfh = rig.ops.setattr_calls[-1]
    assert (ino, size_set, mode_set, mtime_set, size, sfh) == (2, True, False, True, 5, None)
    assert mtime_ns > 1_700_000_000 * 10**9  # NOW: the current time
    assert bytes(rig.ops.data[2]) == b"HELLO"
    c = abi.CREATE_IN.pack(os.O_RDWR, stat.S_IFREG | 0o640, 0o022, 0) + b"new\0"
    r = await rig.op(abi.FUSE_CREATE, c)
    assert r.error == 0 and rig.ops.lookups[rig.ops.next_ino] == 1
    m = abi.MKDIR_IN.pack(0o750, 0) + b"dir\0"
    assert (await rig.op(abi.FUSE_MKDIR, m)).error == 0
    assert rig.ops.modes[rig.ops.next_ino] == stat.S_IFDIR | 0o750
    rn = abi.RENAME2_IN.pack(1, abi.RENAME_NOREPLACE, 0) + b"new\0newer\0"
    assert (await rig.op(abi.FUSE_RENAME2, rn)).error == 0
    assert rig.ops.renames == [(1, b"new", 1, b"newer", abi.RENAME_NOREPLACE)]


async def test_xattrs_statfs_access(rig: Rig) -> None:
    size_probe = await rig.op(abi.FUSE_LISTXATTR, abi.GETXATTR_IN.pack(0, 0))
    assert size_probe.unpack(abi.GETXATTR_OUT)[0] == len(b"user.a\0")
    create = abi.SETXATTR_IN_COMPAT.pack(1, os.XATTR_CREATE) + b"user.a\0" + b"2"
    assert -(await rig.op(abi.FUSE_SETXATTR, create)).error == errno.EEXIST
    replace = abi.SETXATTR_IN_COMPAT.pack(1, os.XATTR_REPLACE) + b"user.b\0" + b"2"
    assert -(await rig.op(abi.FUSE_SETXATTR, replace)).error == pyfuse3.ENOATTR
    plain = abi.SETXATTR_IN_COMPAT.pack(1, 0) + b"user.b\0" + b"2"
    assert (await rig.op(abi.FUSE_SETXATTR, plain)).error == 0
    r = await rig.op(abi.FUSE_GETXATTR, abi.GETXATTR_IN.pack(10, 0) + b"user.b\0")
    assert r.body == b"2"
    st = await rig.op(abi.FUSE_STATFS)
    blocks, bfree, *_ = st.unpack(abi.STATFS_OUT)
    assert (blocks, bfree) == (100, 50)
    assert (
        -(await rig.op(abi.FUSE_ACCESS, abi.ACCESS_IN.pack(os.R_OK, 0), nodeid=2)).error
        == errno.EACCES
    )
    assert (await rig.op(abi.FUSE_ACCESS, abi.ACCESS_IN.pack(os.R_OK, 0))).error == 0


async def test_what_pyfuse3_does_not_define_is_enosys(rig: Rig) -> None:
    lseek = abi.LSEEK_IN.pack(2, 0, os.SEEK_DATA, 0)
    assert -(await rig.op(abi.FUSE_LSEEK, lseek, nodeid=2)).error == errno.ENOSYS
    falloc = abi.FALLOCATE_IN.pack(2, 0, 10, 0, 0)
    assert -(await rig.op(abi.FUSE_FALLOCATE, falloc, nodeid=2)).error == errno.ENOSYS
    lk = abi.LK_IN.pack(2, 1, 0, 10, 1, 1, 0, 0)
    assert -(await rig.op(abi.FUSE_GETLK, lk, nodeid=2)).error == errno.ENOSYS


async def test_many_reads_in_flight_each_on_its_request(rig: Rig) -> None:
    reqs = [request(abi.FUSE_READ, read_in(2, i % 14, 3), nodeid=2) for i in range(100)]
    replies = await asyncio.gather(*(rig.call(q) for q in reqs))
    for i, r in enumerate(replies):
        assert r.body == b"hello pyfuse3\n"[i % 14 : i % 14 + 3]


def test_shims_never_raise() -> None:
    shims.install()
    pyfuse3.invalidate_inode(2)
    pyfuse3.invalidate_entry(1, b"x")
    pyfuse3.invalidate_entry_async(1, b"x", 0, True)
    pyfuse3.notify_store(2, 0, b"data")
    pyfuse3.terminate()
    with pytest.raises(TypeError):
        pyfuse3.readdir_reply(object(), b"x", EntryAttributes(), 1)


async def test_a_bug_in_the_file_system_is_eio_and_logged(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    assert -(await rig.op(abi.FUSE_LOOKUP, b"bug\0")).error == errno.EIO
    assert "a bug in the file system" in caplog.text
    assert (await rig.op(abi.FUSE_LOOKUP, b"hello\0")).error == 0  # serving on


async def test_readdir_failing_after_an_entry_keeps_the_entry(rig: Rig) -> None:
    r = await rig.op(abi.FUSE_READDIRPLUS, read_in(2, 0, 4096), nodeid=2, wsizes=(16, 4096))
    assert r.error == 0
    assert [e.name for e in parse_dirents(r.body, plus=True)] == [b"one"]
    assert rig.ops.lookups == {2: 1}
