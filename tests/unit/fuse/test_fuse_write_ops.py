"""Dispatcher tests of the write-side opcodes: exact decoding, exact replies,
errors, lying requests, zero-copy WRITE, locks, and a fuzz over every opcode.

The in-memory backend extends the one of ``test_fuse_dispatcher`` with every
write-side ``Filesystem`` method, recording each call with its arguments.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import struct
from typing import Any

import pytest
from dispatcher_rig import (
    MemFs,
    Reply,
    call,
    check_reply,
    init_args,
    request,
    split_at,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from virtiofsd_py.fs.api import (
    NOW,
    ROOT_ID,
    AttrReply,
    Context,
    Entry,
    Lock,
    Opened,
    SetAttr,
    StatxReply,
)
from virtiofsd_py.fuse import abi
from virtiofsd_py.fuse.dispatcher import (
    DEFAULT_INIT_FLAGS,
    IMPLEMENTED,
    MAY_BLOCK,
    MIN_MINOR,
    OUR_MAX_MINOR,
    Dispatcher,
    FuseConfig,
)

HELLO = 2  # node ids of MemFs's tree: / { hello, link, sub/ }
SUB = 4
OFFSET_MAX = (1 << 63) - 1

# -- the backend -----------------------------------------------------------------------------------


class WriteFs(MemFs):
    """MemFs plus every write-side method; ``fail`` makes them all raise it."""

    def __init__(self) -> None:
        super().__init__()
        self.fail: OSError | None = None
        self.write_result: Any = None  # overrides write()'s return value when set
        self.getlk_result = Lock(0, OFFSET_MAX, fcntl.F_UNLCK, 0)
        self.ioctl_result: tuple[Any, bytes] = (0, b"")

    def _rec(self, *call: Any) -> None:
        self.calls.append(call)
        if self.fail is not None:
            raise self.fail

    def _new(self, parent: int, name: bytes, mode: int, data: bytes = b"") -> Entry:
        p = self._node(parent)
        if name in p.children:
            raise OSError(errno.EEXIST, "exists")
        return self._entry(self._add(parent, name, mode, data))

    def create(
        self, ctx: Context, parent: int, name: bytes, mode: int, flags: int, umask: int, **kw: Any
    ) -> tuple[Entry, Opened]:
        self._rec("create", ctx, parent, name, mode, flags, umask, kw)
        e = self._new(parent, name, stat.S_IFREG | (mode & 0o7777))
        return e, Opened(500 + e.nodeid, direct_io=True)

    def tmpfile(
        self, ctx: Context, parent: int, mode: int, flags: int, umask: int
    ) -> tuple[Entry, Opened]:
        self._rec("tmpfile", ctx, parent, mode, flags, umask)
        e = self._new(parent, b"#tmp%d" % len(self.nodes), stat.S_IFREG | (mode & 0o7777))
        return e, Opened(600 + e.nodeid)

    def mknod(
        self, ctx: Context, parent: int, name: bytes, mode: int, rdev: int, umask: int
    ) -> Entry:
        self._rec("mknod", ctx, parent, name, mode, rdev, umask)
        return self._new(parent, name, mode)

    def mkdir(self, ctx: Context, parent: int, name: bytes, mode: int, umask: int) -> Entry:
        self._rec("mkdir", ctx, parent, name, mode, umask)
        return self._new(parent, name, stat.S_IFDIR | (mode & 0o7777))

    def symlink(self, ctx: Context, parent: int, name: bytes, target: bytes) -> Entry:
        self._rec("symlink", ctx, parent, name, target)
        return self._new(parent, name, stat.S_IFLNK | 0o777, target)

    def link(self, ctx: Context, nodeid: int, newparent: int, newname: bytes) -> Entry:
        self._rec("link", ctx, nodeid, newparent, newname)
        self._node(nodeid)
        self._node(newparent).children[newname] = nodeid
        return self._entry(nodeid)

    def unlink(self, ctx: Context, parent: int, name: bytes) -> None:
        self._rec("unlink", ctx, parent, name)
        if self._node(parent).children.pop(name, None) is None:
            raise OSError(errno.ENOENT, "no entry")

    def rmdir(self, ctx: Context, parent: int, name: bytes) -> None:
        self._rec("rmdir", ctx, parent, name)
        raise OSError(errno.ENOTEMPTY, "not empty")

    def rename(
        self, ctx: Context, parent: int, name: bytes, newparent: int, newname: bytes, flags: int
    ) -> None:
        self._rec("rename", ctx, parent, name, newparent, newname, flags)

    def setattr(self, ctx: Context, nodeid: int, attr: SetAttr) -> AttrReply:
        self._rec("setattr", ctx, nodeid, attr)
        return AttrReply(self._stat(self._node(nodeid)), 4.5)

    def write(
        self,
        ctx: Context,
        nodeid: int,
        fh: int,
        offset: int,
        bufs: list[memoryview],
        kill_suidgid: bool,
    ) -> int:
        self._rec("write", ctx, nodeid, fh, offset, list(bufs), kill_suidgid)
        node = self._node(nodeid)
        payload = b"".join(bytes(b) for b in bufs)
        data = bytearray(node.data.ljust(offset, b"\0"))
        data[offset : offset + len(payload)] = payload
        node.data = bytes(data)
        return len(payload) if self.write_result is None else self.write_result

    def fsync(self, ctx: Context, nodeid: int, fh: int, datasync: bool) -> None:
        self._rec("fsync", ctx, nodeid, fh, datasync)

    def fsyncdir(self, ctx: Context, nodeid: int, fh: int, datasync: bool) -> None:
        self._rec("fsyncdir", ctx, nodeid, fh, datasync)

    def fallocate(
        self, ctx: Context, nodeid: int, fh: int, mode: int, offset: int, length: int
    ) -> None:
        self._rec("fallocate", ctx, nodeid, fh, mode, offset, length)

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
        self._rec("copy_file_range", ctx, nodeid_in, fh_in, off_in, nodeid_out, fh_out, off_out,
                  length, flags)  # fmt: skip
        return min(length, 3)

    def syncfs(self, ctx: Context, nodeid: int) -> None:
        self._rec("syncfs", ctx, nodeid)

    def statx(self, ctx: Context, nodeid: int, fh: int | None, flags: int, mask: int) -> StatxReply:
        self._rec("statx", ctx, nodeid, fh, flags, mask)
        self._node(nodeid)
        return StatxReply(
            {"mask": mask, "mode": 0o100640, "ino": 77, "size": 11, "uid": 5, "gid": 6,
             "nlink": 2, "blksize": 4096, "btime_sec": 1_700_000_000, "btime_nsec": 123,
             "mtime_sec": -2, "rdev_major": 259, "rdev_minor": 3},
            1.25,
            submount=True,
        )  # fmt: skip

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
        self._rec("ioctl", ctx, nodeid, fh, compat32, cmd, arg, in_data, out_size)
        return self.ioctl_result

    def getlk(self, ctx: Context, nodeid: int, fh: int, owner: int, lock: Lock) -> Lock:
        self._rec("getlk", ctx, nodeid, fh, owner, lock)
        return self.getlk_result

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
        self._rec("setlk", ctx, nodeid, fh, owner, lock, sleep, flock)

    def setxattr(
        self, ctx: Context, nodeid: int, name: bytes, value: bytes, flags: int, acl_kill_sgid: bool
    ) -> None:
        self._rec("setxattr", ctx, nodeid, name, value, flags, acl_kill_sgid)
        self._node(nodeid).xattrs[name] = value

    def removexattr(self, ctx: Context, nodeid: int, name: bytes) -> None:
        self._rec("removexattr", ctx, nodeid, name)
        if self._node(nodeid).xattrs.pop(name, None) is None:
            raise OSError(errno.ENODATA, "no xattr")

    def release(
        self, ctx: Context, nodeid: int, fh: int, flags: int, **kw: Any
    ) -> None:  # keyword only when the guest asks (FLOCK_UNLOCK)
        self.calls.append(("release", nodeid, fh, flags, kw))

    def open(self, ctx: Context, nodeid: int, flags: int, **kw: Any) -> Opened:
        self.calls.append(("open", nodeid, flags, kw))
        return Opened(fh=100 + nodeid)


ALL_KNOBS = FuseConfig(
    writeback=True, killpriv_v2=True, posix_acl=True, security_label=True, allow_mmap=True
)


def make(
    config: FuseConfig | None = None, minor: int = OUR_MAX_MINOR
) -> tuple[Dispatcher, WriteFs]:
    fs = WriteFs()
    d = Dispatcher(fs, config or FuseConfig())
    r = call(d, request(abi.FUSE_INIT, init_args(minor, flags2=0xFFFF_FFFF)))
    assert r.error == 0
    return d, fs


def last(fs: WriteFs) -> tuple[Any, ...]:
    return fs.calls[-1]


def entry_of(r: Reply) -> dict[str, int]:
    assert r.error == 0, r.error
    return dict(zip(abi.ENTRY_OUT_FIELDS, abi.ENTRY_OUT.unpack_from(r.body), strict=True))


# -- INIT knobs ------------------------------------------------------------------------------------


def negotiated(config: FuseConfig) -> int:
    d, _ = make(config)
    assert d.session is not None
    return d.session.flags


def test_knobs_map_onto_init_flags() -> None:
    base = negotiated(FuseConfig())
    assert base & abi.FUSE_POSIX_LOCKS and base & abi.FUSE_FLOCK_LOCKS
    assert base & abi.FUSE_SUBMOUNTS
    optional = (
        abi.FUSE_WRITEBACK_CACHE | abi.FUSE_HANDLE_KILLPRIV_V2 | abi.FUSE_POSIX_ACL
        | abi.FUSE_DONT_MASK | abi.FUSE_SETXATTR_EXT | abi.FUSE_SECURITY_CTX
        | abi.FUSE_DIRECT_IO_ALLOW_MMAP
    )  # fmt: skip
    assert base & optional == 0
    assert negotiated(ALL_KNOBS) & optional == optional
    for knob, bits in [
        ("writeback", abi.FUSE_WRITEBACK_CACHE),
        ("killpriv_v2", abi.FUSE_HANDLE_KILLPRIV_V2),
        ("posix_acl", abi.FUSE_POSIX_ACL | abi.FUSE_DONT_MASK | abi.FUSE_SETXATTR_EXT),
        ("security_label", abi.FUSE_SECURITY_CTX),
        ("allow_mmap", abi.FUSE_DIRECT_IO_ALLOW_MMAP),
    ]:
        assert negotiated(FuseConfig(**{knob: True})) ^ base == bits, knob
    off = negotiated(FuseConfig(posix_locks=False, flock_locks=False, submounts=False))
    assert base ^ off == abi.FUSE_POSIX_LOCKS | abi.FUSE_FLOCK_LOCKS | abi.FUSE_SUBMOUNTS
    assert not DEFAULT_INIT_FLAGS & abi.FUSE_SUBMOUNTS


def test_flags2_knobs_reach_init_out() -> None:
    fs = WriteFs()
    d = Dispatcher(fs, ALL_KNOBS)
    r = call(d, request(abi.FUSE_INIT, init_args(flags2=0xFFFF_FFFF)))
    out = dict(zip(abi.INIT_OUT_FIELDS, r.unpack(abi.INIT_OUT), strict=False))
    assert out["flags2"] & (abi.FUSE_SECURITY_CTX >> 32)
    assert out["flags2"] & (abi.FUSE_DIRECT_IO_ALLOW_MMAP >> 32)
    assert fs.sessions[-1].security_ctx


def test_session_info_is_what_was_agreed() -> None:
    """The backend sees the agreed INIT flags as SessionInfo's booleans."""
    fields = ("writeback_cache", "create_supp_group", "posix_locks", "flock_locks", "posix_acl",
              "handle_killpriv_v2", "security_ctx", "submounts")  # fmt: skip
    _, fs = make(ALL_KNOBS)
    assert all(getattr(fs.sessions[-1], f) for f in fields)
    _, fs = make(FuseConfig(posix_locks=False, flock_locks=False, submounts=False))
    s = fs.sessions[-1]
    assert [f for f in fields if getattr(s, f)] == ["create_supp_group"]  # always offered
    fs = WriteFs()
    d = Dispatcher(fs, ALL_KNOBS)
    call(d, request(abi.FUSE_INIT, init_args(flags=abi.FUSE_WRITEBACK_CACHE, flags2=0)))
    s = fs.sessions[-1]
    assert s.writeback_cache and not (s.posix_locks or s.security_ctx or s.create_supp_group)
    assert (s.major, s.max_write) == (abi.FUSE_KERNEL_VERSION, ALL_KNOBS.max_write)


def test_knobs_not_granted_by_an_old_guest() -> None:
    d, _ = make(ALL_KNOBS)
    fs = WriteFs()
    d = Dispatcher(fs, ALL_KNOBS)
    guest = abi.FUSE_ASYNC_READ | abi.FUSE_POSIX_ACL  # no INIT_EXT: no flags2
    call(d, request(abi.FUSE_INIT, init_args(flags=guest, flags2=0xFFFF_FFFF)))
    assert d.session is not None
    assert d.session.flags == abi.FUSE_ASYNC_READ | abi.FUSE_POSIX_ACL


# -- creating nodes --------------------------------------------------------------------------------


def create_args(name: bytes, flags: int = os.O_RDWR | os.O_CREAT, mode: int = 0o100644,
                umask: int = 0o022, open_flags: int = 0) -> bytes:  # fmt: skip
    return abi.CREATE_IN.pack(flags, mode, umask, open_flags) + name + b"\0"


def test_create_decodes_and_replies_entry_then_open() -> None:
    d, fs = make()
    r = call(d, request(abi.FUSE_CREATE, create_args(b"new", os.O_WRONLY | os.O_CREAT, 0o100640),
                        uid=7, gid=8, pid=9))  # fmt: skip
    assert r.n == 16 + 128 + 16
    e = dict(zip(abi.ENTRY_OUT_FIELDS, abi.ENTRY_OUT.unpack_from(r.body), strict=True))
    nid = fs.nodes[ROOT_ID].children[b"new"]
    assert (e["nodeid"], e["mode"], e["entry_valid"], e["attr_valid_nsec"]) == (
        nid,
        stat.S_IFREG | 0o640,
        1,
        250_000_000,
    )
    assert abi.OPEN_OUT.unpack_from(r.body, 128) == (500 + nid, abi.FOPEN_DIRECT_IO, 0)
    _, ctx, parent, name, mode, flags, umask, kw = last(fs)
    assert (ctx.uid, ctx.gid, ctx.pid, ctx.umask, ctx.security_ctx) == (7, 8, 9, None, None)
    assert (parent, name, mode, flags, kw) == (1, b"new", 0o100640, os.O_WRONLY | os.O_CREAT, {})
    assert umask == 0  # without DONT_MASK the guest kernel applied the umask itself
    assert fs.lookups[nid] == 1


def test_create_with_dont_mask_passes_umask() -> None:
    d, fs = make(FuseConfig(posix_acl=True))
    assert call(d, request(abi.FUSE_CREATE, create_args(b"f", umask=0o027))).error == 0
    ctx, umask = last(fs)[1], last(fs)[6]
    assert (umask, ctx.umask) == (0o027, 0o027)
    assert call(d, request(abi.FUSE_MKDIR, abi.MKDIR_IN.pack(0o777, 0o002) + b"d\0")).error == 0
    assert last(fs)[4:] == (0o777, 0o002) and last(fs)[1].umask == 0o002
    args = abi.MKNOD_IN.pack(stat.S_IFIFO | 0o666, 0, 0o077, 0) + b"p\0"
    assert call(d, request(abi.FUSE_MKNOD, args)).error == 0
    assert last(fs)[-1] == 0o077


def test_create_kill_suidgid_and_errors() -> None:
    d, fs = make(FuseConfig(killpriv_v2=True))
    args = create_args(b"hello", open_flags=abi.FUSE_OPEN_KILL_SUIDGID)
    assert call(d, request(abi.FUSE_CREATE, args)).error == -errno.EEXIST
    assert last(fs)[-1] == {"kill_suidgid": True}
    fixed = abi.CREATE_IN.pack(0, 0, 0, 0)
    for bad in (fixed + b"x", fixed + b"a/b\0", fixed[:15], fixed + b"\0"):
        n = len(fs.calls)
        assert call(d, request(abi.FUSE_CREATE, bad)).error == -errno.EINVAL
        assert len(fs.calls) == n


def test_create_reply_that_does_not_fit_gives_everything_back() -> None:
    d, fs = make()
    r = call(d, request(abi.FUSE_CREATE, create_args(b"big")), wsizes=(16, 100))
    assert (r.n, r.error) == (16, -errno.EIO)
    nid = fs.nodes[ROOT_ID].children[b"big"]
    assert fs.lookups[nid] == 0 and fs.forgets[-1] == (nid, 1)
    assert fs.calls[-1] == ("release", nid, 500 + nid, 0, {})
    r = call(d, request(abi.FUSE_MKDIR, abi.MKDIR_IN.pack(0o755, 0) + b"dir\0"), wsizes=(16,))
    assert r.error == -errno.EIO
    assert fs.lookups[fs.nodes[ROOT_ID].children[b"dir"]] == 0


def test_tmpfile_ignores_the_slash_name() -> None:
    d, fs = make(FuseConfig(posix_acl=True))
    r = call(d, request(abi.FUSE_TMPFILE, create_args(b"/", os.O_RDWR, 0o100600, 0o077),
                        nodeid=SUB))  # fmt: skip
    assert r.n == 160
    _, ctx, parent, mode, flags, umask = last(fs)
    assert (parent, mode, flags, umask, ctx.umask) == (SUB, 0o100600, os.O_RDWR, 0o077, 0o077)
    nid = abi.ENTRY_OUT.unpack_from(r.body)[0]
    assert abi.OPEN_OUT.unpack_from(r.body, 128)[0] == 600 + nid
    assert call(d, request(abi.FUSE_TMPFILE, abi.CREATE_IN.pack(0, 0, 0, 0) + b"/")).error == (
        -errno.EINVAL
    )


def test_mknod_mkdir_symlink_link() -> None:
    d, fs = make()
    rdev = (8 << 8) | 1
    args = abi.MKNOD_IN.pack(stat.S_IFCHR | 0o600, rdev, 0o022, 0) + b"dev\0"
    e = entry_of(call(d, request(abi.FUSE_MKNOD, args, nodeid=SUB)))
    assert last(fs)[2:] == (SUB, b"dev", stat.S_IFCHR | 0o600, rdev, 0)
    assert e["mode"] == stat.S_IFCHR | 0o600
    e = entry_of(call(d, request(abi.FUSE_MKDIR, abi.MKDIR_IN.pack(0o750, 0o022) + b"dd\0")))
    assert last(fs)[2:] == (ROOT_ID, b"dd", 0o750, 0) and e["mode"] == stat.S_IFDIR | 0o750
    e = entry_of(call(d, request(abi.FUSE_SYMLINK, b"sl\0../a/b c\0", nodeid=SUB)))
    assert last(fs)[2:] == (SUB, b"sl", b"../a/b c")
    assert e["mode"] == stat.S_IFLNK | 0o777 and e["size"] == 8
    e = entry_of(call(d, request(abi.FUSE_LINK, abi.LINK_IN.pack(HELLO) + b"hl\0", nodeid=SUB)))
    assert last(fs)[2:] == (HELLO, SUB, b"hl") and e["nodeid"] == HELLO
    assert fs.lookups[HELLO] == 1


@pytest.mark.parametrize(
    ("opcode", "args"),
    [
        (abi.FUSE_SYMLINK, b"sl\0"),  # no target
        (abi.FUSE_SYMLINK, b"sl\0target"),  # target not terminated
        (abi.FUSE_SYMLINK, b"s/l\0t\0"),
        (abi.FUSE_SYMLINK, b"\0t\0"),
        (abi.FUSE_LINK, abi.LINK_IN.pack(HELLO) + b"x"),
        (abi.FUSE_LINK, b"\2\0\0\0"),
        (abi.FUSE_MKNOD, abi.MKNOD_IN.pack(0, 0, 0, 0)[:8] + b"x\0"),  # pre-7.12 layout
        (abi.FUSE_MKDIR, abi.MKDIR_IN.pack(0o755, 0) + b"."[:0]),
        (abi.FUSE_MKDIR, b"\0" * 7),
    ],
)
def test_creating_ops_reject_malformed(opcode: int, args: bytes) -> None:
    d, fs = make()
    assert call(d, request(opcode, args)).error == -errno.EINVAL
    assert fs.calls == []


def test_existing_name_is_eexist_from_backend() -> None:
    d, _ = make()
    assert call(d, request(abi.FUSE_MKDIR, abi.MKDIR_IN.pack(0o755, 0) + b"sub\0")).error == (
        -errno.EEXIST
    )
    assert call(d, request(abi.FUSE_SYMLINK, b"hello\0x\0")).error == -errno.EEXIST


# -- security contexts -----------------------------------------------------------------------------


def secctx_ext(name: bytes, value: bytes) -> bytes:
    body = abi.SECCTX.pack(len(value), 0) + name + b"\0" + value
    size = abi.rec_align(8 + len(body))
    return abi.SECCTX_HEADER.pack(size, 1) + body.ljust(size - 8, b"\0")


def groups_ext(*groups: int) -> bytes:
    body = struct.pack(f"<I{len(groups)}I", len(groups), *groups)
    size = abi.rec_align(8 + len(body))
    return abi.EXT_HEADER.pack(size, abi.FUSE_EXT_GROUPS) + body.ljust(size - 8, b"\0")


LABEL = (b"security.selinux", b"unconfined_u:object_r:user_home_t:s0\0")


@pytest.mark.parametrize(
    ("opcode", "args"),
    [
        (abi.FUSE_CREATE, create_args(b"c")),
        (abi.FUSE_MKDIR, abi.MKDIR_IN.pack(0o755, 0) + b"m\0"),
        (abi.FUSE_MKNOD, abi.MKNOD_IN.pack(stat.S_IFIFO | 0o600, 0, 0, 0) + b"n\0"),
        (abi.FUSE_SYMLINK, b"s\0t\0"),
        (abi.FUSE_TMPFILE, create_args(b"/")),
    ],
)
def test_security_context_extension_reaches_backend(opcode: int, args: bytes) -> None:
    d, fs = make(FuseConfig(security_label=True))
    ext = secctx_ext(*LABEL) + groups_ext(44, 55)
    assert call(d, request(opcode, args, ext=ext)).error == 0
    ctx = last(fs)[1]
    assert ctx.security_ctx == LABEL and ctx.groups == (44, 55)


def test_security_context_ignored_unless_negotiated() -> None:
    d, fs = make()
    r = call(d, request(abi.FUSE_MKDIR, abi.MKDIR_IN.pack(0o755, 0) + b"m\0",
                        ext=secctx_ext(*LABEL)))  # fmt: skip
    assert r.error == 0 and last(fs)[1].security_ctx is None


def test_security_context_before_7_38_trails_the_arguments() -> None:
    d, fs = make(FuseConfig(security_label=True), minor=37)
    args = create_args(b"c") + secctx_ext(*LABEL)
    assert call(d, request(abi.FUSE_CREATE, args)).error == 0
    assert last(fs)[1].security_ctx == LABEL and last(fs)[3] == b"c"
    # a lying trailing context is EINVAL, not a crash
    bad = create_args(b"c2") + abi.SECCTX_HEADER.pack(16, 1) + abi.SECCTX.pack(99, 0)
    assert call(d, request(abi.FUSE_CREATE, bad)).error == -errno.EINVAL


def test_malformed_security_context_is_einval() -> None:
    d, fs = make(FuseConfig(security_label=True))
    ext = abi.SECCTX_HEADER.pack(16, 1) + abi.SECCTX.pack(50, 0)
    r = call(d, request(abi.FUSE_MKDIR, abi.MKDIR_IN.pack(0o755, 0) + b"m\0", ext=ext))
    assert r.error == -errno.EINVAL and fs.calls == []


# -- removing and renaming -------------------------------------------------------------------------


def test_unlink_rmdir() -> None:
    d, fs = make()
    assert call(d, request(abi.FUSE_UNLINK, b"hello\0")).n == 16
    assert last(fs)[2:] == (ROOT_ID, b"hello")
    assert call(d, request(abi.FUSE_UNLINK, b"hello\0")).error == -errno.ENOENT
    assert call(d, request(abi.FUSE_RMDIR, b"sub\0")).error == -errno.ENOTEMPTY
    assert last(fs)[2:] == (ROOT_ID, b"sub")
    n = len(fs.calls)
    for bad in (b"sub", b"", b"\0", b"../x\0"):
        assert call(d, request(abi.FUSE_RMDIR, bad)).error == -errno.EINVAL
        assert call(d, request(abi.FUSE_UNLINK, bad)).error == -errno.EINVAL
    assert len(fs.calls) == n


def test_rename_and_rename2() -> None:
    d, fs = make()
    r = call(d, request(abi.FUSE_RENAME, abi.RENAME_IN.pack(SUB) + b"hello\0bye\0"))
    assert (r.n, r.error) == (16, 0)
    assert last(fs)[2:] == (ROOT_ID, b"hello", SUB, b"bye", 0)
    flags = abi.RENAME_EXCHANGE
    r = call(d, request(abi.FUSE_RENAME2, abi.RENAME2_IN.pack(ROOT_ID, flags, 0) + b"a\0b\0",
                        nodeid=SUB))  # fmt: skip
    assert r.error == 0 and last(fs)[2:] == (SUB, b"a", ROOT_ID, b"b", abi.RENAME_EXCHANGE)
    n = len(fs.calls)
    for args in (
        abi.RENAME2_IN.pack(1, 8, 0) + b"a\0b\0",  # unknown flag: EINVAL as renameat2(2)
        abi.RENAME2_IN.pack(1, 0, 0) + b"a\0b",
        abi.RENAME2_IN.pack(1, 0, 0)[:12] + b"a\0b\0",
    ):
        assert call(d, request(abi.FUSE_RENAME2, args)).error == -errno.EINVAL
    for args in (abi.RENAME_IN.pack(1) + b"a\0", abi.RENAME_IN.pack(1) + b"a\0b/c\0", b"a\0b\0"):
        assert call(d, request(abi.FUSE_RENAME, args)).error == -errno.EINVAL
    assert len(fs.calls) == n


# -- SETATTR ---------------------------------------------------------------------------------------


def setattr_args(valid: int, **kw: int) -> bytes:
    vals = dict.fromkeys(abi.SETATTR_IN_FIELDS, 0)
    vals.update(kw, valid=valid)
    return abi.SETATTR_IN.pack(*(vals[f] for f in abi.SETATTR_IN_FIELDS))


def test_setattr_decodes_every_field() -> None:
    d, fs = make()
    valid = (abi.FATTR_MODE | abi.FATTR_UID | abi.FATTR_GID | abi.FATTR_SIZE | abi.FATTR_ATIME
             | abi.FATTR_MTIME | abi.FATTR_CTIME | abi.FATTR_FH | abi.FATTR_LOCKOWNER
             | abi.FATTR_KILL_SUIDGID)  # fmt: skip
    args = setattr_args(valid, fh=33, size=4096, lock_owner=0xABC, atime=10, atimensec=5,
                        mtime=2**64 - 2, mtimensec=999_999_999, ctime=3, ctimensec=1,
                        mode=0o104755, uid=1001, gid=1002)  # fmt: skip
    r = call(d, request(abi.FUSE_SETATTR, args, nodeid=HELLO))
    vals = dict(zip(abi.ATTR_OUT_FIELDS, r.unpack(abi.ATTR_OUT), strict=True))
    assert (vals["attr_valid"], vals["attr_valid_nsec"], vals["ino"]) == (4, 500_000_000, 1002)
    _, _, nodeid, attr = last(fs)
    assert nodeid == HELLO
    assert attr == SetAttr(
        mode=0o104755, uid=1001, gid=1002, size=4096,
        atime_ns=10 * 10**9 + 5, mtime_ns=-2 * 10**9 + 999_999_999, ctime_ns=3 * 10**9 + 1,
        fh=33, lock_owner=0xABC, kill_suidgid=True,
    )  # fmt: skip


def test_setattr_now_and_unset_fields() -> None:
    d, fs = make()
    valid = abi.FATTR_ATIME | abi.FATTR_ATIME_NOW | abi.FATTR_MTIME
    args = setattr_args(valid, fh=33, atime=10, atimensec=2**32 - 1, mtime=7, lock_owner=5)
    assert call(d, request(abi.FUSE_SETATTR, args, nodeid=HELLO)).error == 0
    attr = last(fs)[3]
    # NOW wins over the given (and here invalid) time; unset fields stay None.
    assert attr == SetAttr(atime_ns=NOW, mtime_ns=7 * 10**9)


@pytest.mark.parametrize(
    "args",
    [
        setattr_args(abi.FATTR_MTIME, mtimensec=10**9),
        setattr_args(abi.FATTR_CTIME, ctimensec=2**32 - 1),
        setattr_args(abi.FATTR_SIZE, size=2**63),
        setattr_args(abi.FATTR_MODE)[:87],
    ],
)
def test_setattr_rejects_bad_values(args: bytes) -> None:
    d, fs = make()
    assert call(d, request(abi.FUSE_SETATTR, args, nodeid=HELLO)).error == -errno.EINVAL
    assert fs.calls == []


# -- WRITE -----------------------------------------------------------------------------------------


def write_args(fh: int, offset: int, data: bytes, size: int | None = None, flags: int = 0,
               lock_owner: int = 0) -> bytes:  # fmt: skip
    n = len(data) if size is None else size
    return abi.WRITE_IN.pack(fh, offset, n, flags, lock_owner, os.O_RDWR, 0) + data


def test_write_split_across_many_buffers_is_zero_copy() -> None:
    d, fs = make()
    payload = bytes(range(256)) * 64  # 16 KiB
    data, unique = request(abi.FUSE_WRITE, write_args(102, 3, payload), nodeid=HELLO)
    # header, write_in, then data in uneven pieces, as a guest's descriptor chain
    readable = split_at(data, [40, 80, 81, 81 + 4096, 81 + 4096 + 7, 12000])
    originals = list(readable)
    writable = [bytearray(16), bytearray(64)]
    n = d.handle(readable, writable)
    assert n == 16 + 8
    assert abi.OUT_HEADER.unpack_from(writable[0]) == (24, 0, unique)
    assert abi.WRITE_OUT.unpack_from(writable[1]) == (len(payload), 0)
    _, _, nodeid, fh, offset, bufs, kill_suidgid = last(fs)
    assert (nodeid, fh, offset, kill_suidgid) == (HELLO, 102, 3, False)
    assert b"".join(bytes(b) for b in bufs) == payload
    assert [len(b) for b in bufs] == [1, 4096, 7, 12000 - 4096 - 88, len(data) - 12000]
    for b in bufs:  # views of the request's own buffers, no copy
        assert isinstance(b, memoryview)
        assert any(b.obj is o for o in originals)
    assert fs.nodes[HELLO].data == b"hel" + payload


def test_write_in_one_buffer_and_flags() -> None:
    d, fs = make()
    wflags = abi.FUSE_WRITE_KILL_SUIDGID | abi.FUSE_WRITE_LOCKOWNER | abi.FUSE_WRITE_CACHE
    req = request(abi.FUSE_WRITE, write_args(7, 0, b"HE", flags=wflags, lock_owner=9),
                  nodeid=HELLO)  # fmt: skip
    r = call(d, req, rsplit=())
    assert r.unpack(abi.WRITE_OUT) == (2, 0)
    assert last(fs)[-1] is True and fs.nodes[HELLO].data == b"HEllo world"
    # Only FUSE_WRITE_KILL_SUIDGID reaches the backend (as kill_suidgid).
    wflags = abi.FUSE_WRITE_LOCKOWNER | abi.FUSE_WRITE_CACHE
    call(d, request(abi.FUSE_WRITE, write_args(7, 0, b"HE", flags=wflags), nodeid=HELLO))
    assert last(fs)[-1] is False
    r = call(d, request(abi.FUSE_WRITE, write_args(7, 5, b""), nodeid=HELLO))
    assert r.unpack(abi.WRITE_OUT) == (0, 0) and last(fs)[5] == []


def test_write_short_count_and_errors() -> None:
    d, fs = make()
    fs.write_result = 1
    r = call(d, request(abi.FUSE_WRITE, write_args(7, 0, b"abc"), nodeid=HELLO))
    assert r.unpack(abi.WRITE_OUT) == (1, 0)
    for bogus in (4, -1, None, "3"):
        fs.write_result = bogus if bogus is not None else 10**9
        r = call(d, request(abi.FUSE_WRITE, write_args(7, 0, b"abc"), nodeid=HELLO))
        assert r.error == -errno.EIO
    fs.write_result = None
    fs.fail = OSError(errno.ENOSPC, "full")
    assert call(d, request(abi.FUSE_WRITE, write_args(7, 0, b"x"), nodeid=HELLO)).error == (
        -errno.ENOSPC
    )


@pytest.mark.parametrize(
    "args",
    [
        write_args(1, 0, b"abc", size=4),  # size claims more than sent
        write_args(1, 0, b"a" * 64, size=2**32 - 1),
        write_args(1, 2**63, b"abc"),
        write_args(1, 0, b"")[:39],
    ],
)
def test_write_lying_requests(args: bytes) -> None:
    d, fs = make()
    assert call(d, request(abi.FUSE_WRITE, args, nodeid=HELLO)).error == -errno.EINVAL
    assert fs.calls == []


def test_write_respects_max_write() -> None:
    d, fs = make(FuseConfig(max_write=8))
    assert call(d, request(abi.FUSE_WRITE, write_args(1, 0, b"x" * 8), nodeid=HELLO)).error == 0
    r = call(d, request(abi.FUSE_WRITE, write_args(1, 0, b"x" * 9), nodeid=HELLO))
    assert r.error == -errno.EINVAL and len(fs.calls) == 1


def test_write_size_smaller_than_data_takes_size() -> None:
    d, fs = make()
    r = call(d, request(abi.FUSE_WRITE, write_args(1, 0, b"abcdef", size=2), nodeid=HELLO))
    assert r.unpack(abi.WRITE_OUT) == (2, 0) and fs.nodes[HELLO].data.startswith(b"abllo")


# -- syncing and space -----------------------------------------------------------------------------


@pytest.mark.parametrize(("opcode", "name"), [(abi.FUSE_FSYNC, "fsync"),
                                              (abi.FUSE_FSYNCDIR, "fsyncdir")])  # fmt: skip
def test_fsync_and_fsyncdir(opcode: int, name: str) -> None:
    d, fs = make()
    assert call(d, request(opcode, abi.FSYNC_IN.pack(12, 0, 0), nodeid=HELLO)).n == 16
    assert last(fs)[0] == name and last(fs)[2:] == (HELLO, 12, False)
    assert call(d, request(opcode, abi.FSYNC_IN.pack(12, 3, 0), nodeid=HELLO)).n == 16
    assert last(fs)[2:] == (HELLO, 12, True)  # bit 0: FUSE_FSYNC_FDATASYNC
    fs.fail = OSError(errno.EIO, "disk")
    assert call(d, request(opcode, abi.FSYNC_IN.pack(12, 0, 0))).error == -errno.EIO
    assert opcode in MAY_BLOCK


def test_syncfs() -> None:
    d, fs = make()
    assert call(d, request(abi.FUSE_SYNCFS, abi.SYNCFS_IN.pack(0), nodeid=SUB)).n == 16
    assert last(fs)[2:] == (SUB,)
    assert call(d, request(abi.FUSE_SYNCFS, b"\0" * 4)).error == -errno.EINVAL
    data, _ = request(abi.FUSE_SYNCFS, abi.SYNCFS_IN.pack(0))
    assert Dispatcher.may_block([bytearray(data)])


def test_fallocate() -> None:
    d, fs = make()
    args = abi.FALLOCATE_IN.pack(5, 4096, 8192, 3, 0)  # KEEP_SIZE | PUNCH_HOLE
    assert call(d, request(abi.FUSE_FALLOCATE, args, nodeid=HELLO)).n == 16
    assert last(fs)[2:] == (HELLO, 5, 3, 4096, 8192)
    for bad in (abi.FALLOCATE_IN.pack(5, 2**63, 1, 0, 0), abi.FALLOCATE_IN.pack(5, 0, 2**64 - 1,
                                                                                0, 0)):  # fmt: skip
        assert call(d, request(abi.FUSE_FALLOCATE, bad)).error == -errno.EINVAL
    fs.fail = OSError(errno.EOPNOTSUPP, "no")
    assert call(d, request(abi.FUSE_FALLOCATE, args)).error == -errno.EOPNOTSUPP


def test_copy_file_range() -> None:
    d, fs = make()
    args = abi.COPY_FILE_RANGE_IN.pack(11, 100, SUB, 22, 200, 50, 0)
    r = call(d, request(abi.FUSE_COPY_FILE_RANGE, args, nodeid=HELLO))
    assert r.unpack(abi.WRITE_OUT) == (3, 0)
    assert last(fs)[2:] == (HELLO, 11, 100, SUB, 22, 200, 50, 0)
    # a length beyond fuse_write_out's 32 bits is capped
    args = abi.COPY_FILE_RANGE_IN.pack(11, 0, SUB, 22, 0, 2**40, 0)
    assert call(d, request(abi.FUSE_COPY_FILE_RANGE, args, nodeid=HELLO)).error == 0
    assert last(fs)[8] == 2**32 - 1
    bad = abi.COPY_FILE_RANGE_IN.pack(11, 2**63, SUB, 22, 0, 5, 0)
    assert call(d, request(abi.FUSE_COPY_FILE_RANGE, bad)).error == -errno.EINVAL
    # COPY_FILE_RANGE_64 is fuse 7.45, beyond what we negotiate
    assert call(d, request(abi.FUSE_COPY_FILE_RANGE_64, args)).error == -errno.ENOSYS


# -- xattrs ----------------------------------------------------------------------------------------


def test_setxattr_compat_layout_without_setxattr_ext() -> None:
    d, fs = make()
    args = abi.SETXATTR_IN_COMPAT.pack(5, 1) + b"user.new\0" + b"v\0l\xffe"
    assert call(d, request(abi.FUSE_SETXATTR, args, nodeid=HELLO)).n == 16
    assert last(fs)[2:] == (HELLO, b"user.new", b"v\0l\xffe", 1, False)
    # empty value
    args = abi.SETXATTR_IN_COMPAT.pack(0, 2) + b"user.e\0"
    assert call(d, request(abi.FUSE_SETXATTR, args, nodeid=HELLO)).n == 16
    assert last(fs)[2:] == (HELLO, b"user.e", b"", 2, False)


def test_setxattr_ext_layout() -> None:
    d, fs = make(FuseConfig(posix_acl=True))
    value = b"\x02\0\0\0" + bytes(40)
    args = abi.SETXATTR_IN.pack(len(value), 0, abi.FUSE_SETXATTR_ACL_KILL_SGID, 0)
    args += b"system.posix_acl_access\0" + value
    assert call(d, request(abi.FUSE_SETXATTR, args, nodeid=HELLO), rsplit=(40, 50, 70)).n == 16
    assert last(fs)[2:] == (HELLO, b"system.posix_acl_access", value, 0, True)
    # the 8-byte layout is now misread: its name's NUL falls inside the 16-byte struct
    compat = abi.SETXATTR_IN_COMPAT.pack(3, 0) + b"user.k\0abc"
    n = len(fs.calls)
    assert call(d, request(abi.FUSE_SETXATTR, compat, nodeid=HELLO)).error == -errno.EINVAL
    assert call(d, request(abi.FUSE_SETXATTR, abi.SETXATTR_IN.pack(0, 0, 0, 0)[:12])).error == (
        -errno.EINVAL
    )
    assert len(fs.calls) == n


@pytest.mark.parametrize(
    "args",
    [
        abi.SETXATTR_IN_COMPAT.pack(3, 0) + b"user.k\0ab",  # size says 3, 2 sent
        abi.SETXATTR_IN_COMPAT.pack(1, 0) + b"user.k\0ab",  # size says 1, 2 sent
        abi.SETXATTR_IN_COMPAT.pack(0, 0) + b"user.k",  # name unterminated
        abi.SETXATTR_IN_COMPAT.pack(0, 0) + b"\0",  # empty name
        abi.SETXATTR_IN_COMPAT.pack(0, 0)[:7],
    ],
)
def test_setxattr_lying_requests(args: bytes) -> None:
    d, fs = make()
    assert call(d, request(abi.FUSE_SETXATTR, args, nodeid=HELLO)).error == -errno.EINVAL
    assert fs.calls == []


def test_removexattr() -> None:
    d, fs = make()
    assert call(d, request(abi.FUSE_REMOVEXATTR, b"user.k\0", nodeid=HELLO)).n == 16
    assert last(fs)[2:] == (HELLO, b"user.k")
    assert call(d, request(abi.FUSE_REMOVEXATTR, b"user.k\0", nodeid=HELLO)).error == (
        -errno.ENODATA
    )
    assert call(d, request(abi.FUSE_REMOVEXATTR, b"user.k", nodeid=HELLO)).error == -errno.EINVAL


# -- STATX -----------------------------------------------------------------------------------------


def test_statx_layout() -> None:
    assert OUR_MAX_MINOR >= 39 and abi.FUSE_STATX in IMPLEMENTED
    d, fs = make()
    args = abi.STATX_IN.pack(abi.FUSE_GETATTR_FH, 0, 77, 0x2000, 0xFFF)  # AT_STATX_FORCE_SYNC
    r = call(d, request(abi.FUSE_STATX, args, nodeid=HELLO))
    assert r.n == 16 + 288
    out = dict(zip(abi.STATX_OUT_FIELDS, r.unpack(abi.STATX_OUT), strict=True))
    assert last(fs)[2:] == (HELLO, 77, 0x2000, 0xFFF)
    assert (out["attr_valid"], out["attr_valid_nsec"], out["flags"]) == (
        1,
        250_000_000,
        abi.FUSE_ATTR_SUBMOUNT,
    )
    assert (out["mask"], out["mode"], out["ino"], out["size"], out["nlink"]) == (
        0xFFF,
        0o100640,
        77,
        11,
        2,
    )
    assert (out["btime_sec"], out["btime_nsec"], out["mtime_sec"]) == (1_700_000_000, 123, -2)
    assert (out["rdev_major"], out["rdev_minor"], out["atime_sec"]) == (259, 3, 0)
    # fields at the byte offsets of struct fuse_statx_out in fuse.h
    body = r.body
    assert struct.unpack_from("<QIIQQ", body, 0) == (1, 250_000_000, abi.FUSE_ATTR_SUBMOUNT, 0, 0)
    assert struct.unpack_from("<IIQIIIH", body, 32) == (0xFFF, 4096, 0, 2, 5, 6, 0o100640)
    assert struct.unpack_from("<Q", body, 32 + 32) == (77,)
    assert struct.unpack_from("<qI", body, 32 + 80) == (1_700_000_000, 123)
    assert struct.unpack_from("<II", body, 32 + 128) == (259, 3)
    # without FUSE_GETATTR_FH there is no handle
    call(d, request(abi.FUSE_STATX, abi.STATX_IN.pack(0, 0, 77, 0, 1), nodeid=HELLO))
    assert last(fs)[3] is None
    assert call(d, request(abi.FUSE_STATX, args, nodeid=99)).error == -errno.ESTALE
    assert call(d, request(abi.FUSE_STATX, args[:20])).error == -errno.EINVAL


# -- IOCTL -----------------------------------------------------------------------------------------

FS_IOC_GETFLAGS = 0x80086601
FS_IOC_SETFLAGS = 0x40086602


def ioctl_args(cmd: int, in_data: bytes = b"", out_size: int = 0, flags: int = 0,
               in_size: int | None = None) -> bytes:  # fmt: skip
    n = len(in_data) if in_size is None else in_size
    return abi.IOCTL_IN.pack(9, flags, cmd, 0xDEADBEEF, n, out_size) + in_data


def test_ioctl_out_data() -> None:
    d, fs = make()
    fs.ioctl_result = (0, struct.pack("<q", 0x10))
    r = call(d, request(abi.FUSE_IOCTL, ioctl_args(FS_IOC_GETFLAGS, out_size=8), nodeid=HELLO),
             wsizes=(16, 8, 100))  # fmt: skip
    assert r.n == 16 + 16 + 8
    assert abi.IOCTL_OUT.unpack_from(r.body) == (0, 0, 0, 0)
    assert r.body[16:] == struct.pack("<q", 0x10)
    assert last(fs)[2:] == (HELLO, 9, False, FS_IOC_GETFLAGS, 0xDEADBEEF, b"", 8)
    # A 32-bit caller (FUSE_IOCTL_32BIT, with COMPAT) reaches the backend as compat32.
    compat = abi.FUSE_IOCTL_COMPAT | abi.FUSE_IOCTL_32BIT
    call(d, request(abi.FUSE_IOCTL, ioctl_args(0x80046601, out_size=4, flags=compat),
                    nodeid=HELLO))  # fmt: skip
    assert last(fs)[2:5] == (HELLO, 9, True)


def test_ioctl_in_data_split_and_negative_result() -> None:
    d, fs = make()
    fs.ioctl_result = (-5, b"")
    req = request(abi.FUSE_IOCTL, ioctl_args(FS_IOC_SETFLAGS, b"\1\2\3\4\5\6\7\x08",
                                             flags=abi.FUSE_IOCTL_DIR), nodeid=SUB)  # fmt: skip
    r = call(d, req, rsplit=(40, 72, 75))
    assert r.n == 32 and abi.IOCTL_OUT.unpack_from(r.body) == (-5, 0, 0, 0)
    assert last(fs)[2:] == (SUB, 9, False, FS_IOC_SETFLAGS, 0xDEADBEEF,
                            b"\1\2\3\4\5\6\7\x08", 0)  # fmt: skip


def test_ioctl_refusals() -> None:
    d, fs = make()
    unres = ioctl_args(0x5401, flags=abi.FUSE_IOCTL_UNRESTRICTED)
    assert call(d, request(abi.FUSE_IOCTL, unres)).error == -errno.ENOSYS
    assert fs.calls == []
    fs.fail = OSError(errno.ENOSYS, "no ioctls here")
    assert call(d, request(abi.FUSE_IOCTL, ioctl_args(FS_IOC_GETFLAGS, out_size=8))).error == (
        -errno.ENOTTY
    )
    fs.fail = OSError(errno.EPERM, "nope")
    assert call(d, request(abi.FUSE_IOCTL, ioctl_args(FS_IOC_GETFLAGS, out_size=8))).error == (
        -errno.EPERM
    )
    fs.fail = None
    n = len(fs.calls)
    assert call(d, request(abi.FUSE_IOCTL, ioctl_args(1, b"ab", in_size=3))).error == -errno.EINVAL
    assert len(fs.calls) == n


def test_ioctl_base_backend_is_enotty() -> None:
    d, _ = make_plain()
    assert call(d, request(abi.FUSE_IOCTL, ioctl_args(FS_IOC_GETFLAGS, out_size=8))).error == (
        -errno.ENOTTY
    )


@pytest.mark.parametrize("result", [(0, b"x" * 9), (2**31, b""), ("0", b""), None])
def test_ioctl_bogus_backend_result_is_eio(result: Any) -> None:
    d, fs = make()
    fs.ioctl_result = result
    assert call(d, request(abi.FUSE_IOCTL, ioctl_args(FS_IOC_GETFLAGS, out_size=8))).error == (
        -errno.EIO
    )


def test_ioctl_out_size_capped_by_writable_room() -> None:
    d, fs = make()
    call(d, request(abi.FUSE_IOCTL, ioctl_args(FS_IOC_GETFLAGS, out_size=4096)), wsizes=(16, 40))
    assert last(fs)[-1] == 24
    r = call(d, request(abi.FUSE_IOCTL, ioctl_args(FS_IOC_GETFLAGS, out_size=8)), wsizes=(16, 8))
    assert r.error == -errno.EIO


# -- locks -----------------------------------------------------------------------------------------


def lk_args(fh: int = 3, owner: int = 0x1234, start: int = 0, end: int = OFFSET_MAX,
            typ: int = fcntl.F_WRLCK, pid: int = 42, lk_flags: int = 0) -> bytes:  # fmt: skip
    return abi.LK_IN.pack(fh, owner, start, end, typ, pid, lk_flags, 0)


def test_getlk_converts_both_ways() -> None:
    d, fs = make()
    fs.getlk_result = Lock(100, 199, fcntl.F_RDLCK, 4321)
    r = call(d, request(abi.FUSE_GETLK, lk_args(start=10, end=20, typ=fcntl.F_WRLCK),
                        nodeid=HELLO))  # fmt: skip
    assert r.unpack(abi.LK_OUT) == (100, 199, fcntl.F_RDLCK, 4321)
    assert last(fs)[2:] == (HELLO, 3, 0x1234, Lock(10, 20, fcntl.F_WRLCK, 42))
    fs.getlk_result = Lock(0, OFFSET_MAX, fcntl.F_UNLCK, 0)
    r = call(d, request(abi.FUSE_GETLK, lk_args(), nodeid=HELLO))
    assert r.unpack(abi.LK_OUT) == (0, OFFSET_MAX, fcntl.F_UNLCK, 0)
    # a holder outside the guest (OFD lock: pid -1) is reported without a pid
    fs.getlk_result = Lock(0, 5, fcntl.F_WRLCK, -1)
    r = call(d, request(abi.FUSE_GETLK, lk_args(), nodeid=HELLO))
    assert r.unpack(abi.LK_OUT) == (0, 5, fcntl.F_WRLCK, 0)
    fs.getlk_result = Lock(0, 5, 7, 1)
    assert call(d, request(abi.FUSE_GETLK, lk_args(), nodeid=HELLO)).error == -errno.EIO


@pytest.mark.parametrize(("opcode", "sleep"), [(abi.FUSE_SETLK, False), (abi.FUSE_SETLKW, True)])
def test_setlk_posix_and_flock(opcode: int, sleep: bool) -> None:
    d, fs = make()
    r = call(d, request(opcode, lk_args(start=5, end=9, typ=fcntl.F_RDLCK, pid=7), nodeid=HELLO))
    assert (r.n, r.error) == (16, 0)
    assert last(fs)[2:] == (HELLO, 3, 0x1234, Lock(5, 9, fcntl.F_RDLCK, 7), sleep, False)
    r = call(d, request(opcode, lk_args(typ=fcntl.F_UNLCK, lk_flags=abi.FUSE_LK_FLOCK)))
    assert r.error == 0
    assert last(fs)[2:] == (ROOT_ID, 3, 0x1234, Lock(0, OFFSET_MAX, fcntl.F_UNLCK, 42), sleep,
                            True)  # fmt: skip
    fs.fail = OSError(errno.EAGAIN if not sleep else errno.EINTR, "held")
    assert call(d, request(opcode, lk_args())).error == -fs.fail.errno
    assert (opcode in MAY_BLOCK) == sleep


@pytest.mark.parametrize(
    "args",
    [
        lk_args(typ=3),
        lk_args(start=2**63),
        lk_args(end=2**64 - 1),
        lk_args(start=10, end=9),
        lk_args()[:47],
    ],
)
@pytest.mark.parametrize("opcode", [abi.FUSE_GETLK, abi.FUSE_SETLK, abi.FUSE_SETLKW])
def test_lock_requests_rejected(opcode: int, args: bytes) -> None:
    d, fs = make()
    assert call(d, request(opcode, args, nodeid=HELLO)).error == -errno.EINVAL
    assert fs.calls == []


# -- OPEN / RELEASE flags --------------------------------------------------------------------------


def test_release_flock_unlock_passes_the_owner() -> None:
    d, fs = make()
    rel = abi.RELEASE_IN.pack(102, os.O_RDWR, abi.FUSE_RELEASE_FLOCK_UNLOCK, 0x77)
    assert call(d, request(abi.FUSE_RELEASE, rel, nodeid=HELLO)).n == 16
    assert last(fs) == ("release", HELLO, 102, os.O_RDWR, {"lock_owner": 0x77})
    rel = abi.RELEASE_IN.pack(102, os.O_RDWR, abi.FUSE_RELEASE_FLUSH, 0x77)
    assert call(d, request(abi.FUSE_RELEASE, rel, nodeid=HELLO)).n == 16
    assert last(fs) == ("release", HELLO, 102, os.O_RDWR, {})


def test_open_kill_suidgid() -> None:
    d, fs = make(FuseConfig(killpriv_v2=True))
    args = abi.OPEN_IN.pack(os.O_WRONLY | os.O_TRUNC, abi.FUSE_OPEN_KILL_SUIDGID)
    assert call(d, request(abi.FUSE_OPEN, args, nodeid=HELLO)).error == 0
    assert last(fs) == ("open", HELLO, os.O_WRONLY | os.O_TRUNC, {"kill_suidgid": True})
    assert call(d, request(abi.FUSE_OPEN, abi.OPEN_IN.pack(0, 0), nodeid=HELLO)).error == 0
    assert last(fs) == ("open", HELLO, 0, {})


# -- every new opcode: errors, truncation, fuzz ----------------------------------------------------

#: A valid request (args, nodeid) per write-side opcode, as the Linux client sends it.
VALID: dict[int, tuple[bytes, int]] = {
    abi.FUSE_CREATE: (create_args(b"c"), ROOT_ID),
    abi.FUSE_TMPFILE: (create_args(b"/"), ROOT_ID),
    abi.FUSE_MKNOD: (abi.MKNOD_IN.pack(stat.S_IFIFO | 0o600, 0, 0, 0) + b"n\0", ROOT_ID),
    abi.FUSE_MKDIR: (abi.MKDIR_IN.pack(0o755, 0) + b"m\0", ROOT_ID),
    abi.FUSE_SYMLINK: (b"s\0target\0", ROOT_ID),
    abi.FUSE_LINK: (abi.LINK_IN.pack(HELLO) + b"l\0", SUB),
    abi.FUSE_UNLINK: (b"hello\0", ROOT_ID),
    abi.FUSE_RMDIR: (b"sub\0", ROOT_ID),
    abi.FUSE_RENAME: (abi.RENAME_IN.pack(SUB) + b"hello\0x\0", ROOT_ID),
    abi.FUSE_RENAME2: (abi.RENAME2_IN.pack(SUB, 1, 0) + b"hello\0x\0", ROOT_ID),
    abi.FUSE_SETATTR: (setattr_args(abi.FATTR_MODE, mode=0o600), HELLO),
    abi.FUSE_WRITE: (write_args(1, 0, b"data"), HELLO),
    abi.FUSE_FSYNC: (abi.FSYNC_IN.pack(1, 1, 0), HELLO),
    abi.FUSE_FSYNCDIR: (abi.FSYNC_IN.pack(1, 0, 0), SUB),
    abi.FUSE_FALLOCATE: (abi.FALLOCATE_IN.pack(1, 0, 10, 0, 0), HELLO),
    abi.FUSE_COPY_FILE_RANGE: (abi.COPY_FILE_RANGE_IN.pack(1, 0, HELLO, 2, 0, 5, 0), HELLO),
    abi.FUSE_SETXATTR: (abi.SETXATTR_IN_COMPAT.pack(1, 0) + b"user.x\0y", HELLO),
    abi.FUSE_REMOVEXATTR: (b"user.k\0", HELLO),
    abi.FUSE_SYNCFS: (abi.SYNCFS_IN.pack(0), ROOT_ID),
    abi.FUSE_STATX: (abi.STATX_IN.pack(0, 0, 0, 0, 0x7FF), HELLO),
    abi.FUSE_IOCTL: (ioctl_args(FS_IOC_GETFLAGS, out_size=8), HELLO),
    abi.FUSE_GETLK: (lk_args(), HELLO),
    abi.FUSE_SETLK: (lk_args(), HELLO),
    abi.FUSE_SETLKW: (lk_args(), HELLO),
}


def test_every_write_side_opcode_is_implemented() -> None:
    assert set(VALID) <= IMPLEMENTED


@pytest.mark.parametrize("opcode", sorted(VALID), ids=abi.opcode_name)
def test_valid_request_succeeds(opcode: int) -> None:
    d, fs = make()
    args, nodeid = VALID[opcode]
    r = call(d, request(opcode, args, nodeid=nodeid))
    assert r.n >= 16 and r.error in (0, -errno.ENOTEMPTY), (r.error, fs.calls)


@pytest.mark.parametrize("err", [errno.EACCES, errno.EROFS, errno.ESTALE])
@pytest.mark.parametrize("opcode", sorted(VALID), ids=abi.opcode_name)
def test_backend_errors_become_minus_errno(opcode: int, err: int) -> None:
    d, fs = make()
    fs.fail = OSError(err, "fail")
    args, nodeid = VALID[opcode]
    r = call(d, request(opcode, args, nodeid=nodeid))
    assert (r.n, r.error) == (16, -err)
    assert fs.calls, "the backend was called"


@pytest.mark.parametrize("opcode", sorted(VALID), ids=abi.opcode_name)
def test_backend_bug_is_eio(opcode: int) -> None:
    class Buggy(WriteFs):
        def _rec(self, *call: Any) -> None:
            raise ZeroDivisionError("bug")

    fs = Buggy()
    d = Dispatcher(fs, FuseConfig())
    call(d, request(abi.FUSE_INIT, init_args()))
    args, nodeid = VALID[opcode]
    assert call(d, request(opcode, args, nodeid=nodeid)).error == -errno.EIO


@pytest.mark.parametrize("opcode", sorted(VALID), ids=abi.opcode_name)
def test_truncated_arguments_are_einval_and_never_reach_backend(opcode: int) -> None:
    args, nodeid = VALID[opcode]
    for cut in range(len(args)):  # every proper prefix, data and names included
        d, fs = make()
        r = call(d, request(opcode, args[:cut], nodeid=nodeid))
        assert r.error == -errno.EINVAL, (cut, r.error)
        assert fs.calls == [], cut


@pytest.mark.parametrize("opcode", sorted(VALID), ids=abi.opcode_name)
def test_len_beyond_buffers_is_einval(opcode: int) -> None:
    d, fs = make()
    args, nodeid = VALID[opcode]
    r = call(d, request(opcode, args, nodeid=nodeid, length=40 + len(args) + 1))
    assert r.error == -errno.EINVAL and fs.calls == []


def make_plain() -> tuple[Dispatcher, MemFs]:
    fs = MemFs()
    d = Dispatcher(fs, FuseConfig())
    call(d, request(abi.FUSE_INIT, init_args()))
    return d, fs


@pytest.mark.parametrize("opcode", sorted(set(VALID) - {abi.FUSE_IOCTL}), ids=abi.opcode_name)
def test_backend_without_the_method_gives_enosys(opcode: int) -> None:
    d, _ = make_plain()
    args, nodeid = VALID[opcode]
    assert call(d, request(opcode, args, nodeid=nodeid)).error == -errno.ENOSYS


# -- fuzzing ---------------------------------------------------------------------------------------

_FUZZ_OPS = sorted({*abi.Opcode, 0, 19, 54, 4095})
_CONFIGS = [FuseConfig(), ALL_KNOBS, FuseConfig(max_write=16)]


def _mutate(data: bytes, flips: list[tuple[int, int]]) -> bytes:
    b = bytearray(data)
    for pos, val in flips:
        if b:
            b[pos % len(b)] = val
    return bytes(b)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(
    opcode=st.sampled_from(sorted(VALID)),
    flips=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=6),
    tail=st.binary(max_size=40),
    ext=st.sampled_from([b"", secctx_ext(*LABEL), groups_ext(1, 2), bytes(8), b"\xff" * 16]),
    cut=st.integers(0, 400),
    length_delta=st.integers(-20, 8),
    rpoints=st.lists(st.integers(0, 400), max_size=6),
    wsizes=st.lists(st.integers(0, 400), min_size=0, max_size=4),
    config=st.sampled_from(range(len(_CONFIGS))),
    minor=st.sampled_from([MIN_MINOR, 37, OUR_MAX_MINOR]),
)
def test_fuzz_mutated_valid_requests_never_raise(
    opcode: int,
    flips: list[tuple[int, int]],
    tail: bytes,
    ext: bytes,
    cut: int,
    length_delta: int,
    rpoints: list[int],
    wsizes: list[int],
    config: int,
    minor: int,
) -> None:
    d, _ = make(_CONFIGS[config], minor=minor)
    args, nodeid = VALID[opcode]
    args = _mutate(args, flips)[:cut] + tail
    data, _ = request(opcode, args, nodeid=nodeid, ext=ext, unique=777)
    length = max(0, len(data) + length_delta)
    data = abi.IN_HEADER.pack(length, *abi.IN_HEADER.unpack_from(data)[1:]) + data[40:]
    writable = [bytearray(n) for n in wsizes]
    n = d.handle(split_at(data, rpoints), writable)
    check_reply(n, writable, 777)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(
    opcode=st.sampled_from(_FUZZ_OPS),
    args=st.binary(max_size=300),
    extlen=st.integers(0, 6),
    rpoints=st.lists(st.integers(0, 400), max_size=5),
    wsizes=st.lists(st.integers(0, 400), max_size=4),
    config=st.sampled_from(range(len(_CONFIGS))),
)
def test_fuzz_random_args_every_opcode_never_raise(
    opcode: int,
    args: bytes,
    extlen: int,
    rpoints: list[int],
    wsizes: list[int],
    config: int,
) -> None:
    d, _ = make(_CONFIGS[config])
    hdr = abi.IN_HEADER.pack(40 + len(args), opcode, 4242, HELLO, 0, 0, 0, extlen, 0)
    writable = [bytearray(n) for n in wsizes]
    n = d.handle(split_at(hdr + args, rpoints), writable)
    check_reply(n, writable, 4242)
