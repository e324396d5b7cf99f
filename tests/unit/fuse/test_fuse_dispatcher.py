"""Dispatcher tests: real FUSE request bytes against an in-memory backend.

Requests and replies go through bytearray buffers split at odd places, the
way a guest's descriptor chain splits them.
"""

from __future__ import annotations

import errno
import itertools
import os
import stat
import struct
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from dispatcher_rig import (
    MemFs,
    Reply,
    call,
    check_reply,
    init_args,
    init_out,
    lookup,
    make,
    read_in,
    request,
    split_at,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from virtiofsd_py.fs.api import (
    AttrReply,
    Context,
    DirEntry,
)
from virtiofsd_py.fuse import abi
from virtiofsd_py.fuse.dispatcher import (
    MIN_MINOR,
    OUR_MAX_MINOR,
    Dispatcher,
    FuseConfig,
    SessionState,
)

# -- INIT / DESTROY -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("guest_minor", "agreed"),
    [
        (MIN_MINOR, MIN_MINOR),
        (36, 36),
        (38, 38),
        (OUR_MAX_MINOR, OUR_MAX_MINOR),
        (45, OUR_MAX_MINOR),
    ],
)
def test_init_negotiates_minor(guest_minor: int, agreed: int) -> None:
    d, fs = make(init=False)
    out = init_out(call(d, request(abi.FUSE_INIT, init_args(guest_minor))))
    assert (out["major"], out["minor"]) == (7, agreed)
    assert out["max_readahead"] == 65536
    assert out["max_write"] == 1 << 20 and out["max_pages"] == 256
    assert d.session is not None and d.session.minor == agreed
    assert fs.sessions[0].minor == agreed
    assert OUR_MAX_MINOR >= 38


@pytest.mark.parametrize(("major", "minor"), [(7, 26), (7, 0), (6, 99)])
def test_init_refuses_old_protocols(major: int, minor: int) -> None:
    d, fs = make(init=False)
    r = call(d, request(abi.FUSE_INIT, init_args(minor, major=major)))
    assert r.error == -errno.EPROTO
    assert d.session is None and fs.sessions == []


def test_init_newer_major_gets_our_version_only() -> None:
    d, fs = make(init=False)
    out = init_out(call(d, request(abi.FUSE_INIT, init_args(1, major=8))))
    assert (out["major"], out["minor"], out["flags"], out["max_write"]) == (7, OUR_MAX_MINOR, 0, 0)
    assert d.session is None and fs.sessions == []
    # the kernel then retries with major 7
    assert call(d, request(abi.FUSE_INIT, init_args())).error == 0
    assert d.session is not None


def test_init_flags_are_the_intersection() -> None:
    d, _ = make(init=False)
    guest = abi.FUSE_ASYNC_READ | abi.FUSE_POSIX_LOCKS | abi.FUSE_FLOCK_LOCKS | abi.FUSE_INIT_EXT
    guest |= abi.FUSE_DO_READDIRPLUS | abi.FUSE_WRITEBACK_CACHE | abi.FUSE_EXPORT_SUPPORT
    out = init_out(call(d, request(abi.FUSE_INIT, init_args(flags=guest, flags2=1 << 2))))
    assert out["flags"] == (
        abi.FUSE_ASYNC_READ | abi.FUSE_INIT_EXT | abi.FUSE_DO_READDIRPLUS
        | abi.FUSE_POSIX_LOCKS | abi.FUSE_FLOCK_LOCKS
    )  # fmt: skip
    assert out["flags2"] == 1 << 2  # FUSE_CREATE_SUPP_GROUP
    assert d.session is not None
    assert d.session.flags == abi.join_init_flags(out["flags"], out["flags2"])


def test_init_without_init_ext_ignores_flags2_and_accepts_short_init_in() -> None:
    d, _ = make(init=False)
    short = abi.INIT_IN_COMPAT.pack(7, 31, 4096, abi.FUSE_ASYNC_READ | abi.FUSE_MAX_PAGES)
    out = init_out(call(d, request(abi.FUSE_INIT, short)))
    assert out["minor"] == 31
    assert out["flags"] == abi.FUSE_ASYNC_READ | abi.FUSE_MAX_PAGES
    assert out["flags2"] == 0


def test_init_knobs() -> None:
    all_flags = init_args(flags2=0xFFFF_FFFF)
    d, _ = make(FuseConfig(readdirplus=False, writeback=True), init=False)
    out = init_out(call(d, request(abi.FUSE_INIT, all_flags)))
    assert out["flags"] & abi.FUSE_WRITEBACK_CACHE
    assert not out["flags"] & (abi.FUSE_DO_READDIRPLUS | abi.FUSE_READDIRPLUS_AUTO)
    d, _ = make(init=False)
    out = init_out(call(d, request(abi.FUSE_INIT, all_flags)))
    assert not out["flags"] & abi.FUSE_WRITEBACK_CACHE
    assert out["flags"] & abi.FUSE_DO_READDIRPLUS and out["flags"] & abi.FUSE_READDIRPLUS_AUTO
    # locks go to the backend by default (the Rust virtiofsd keeps them guest-local)
    assert out["flags"] & abi.FUSE_POSIX_LOCKS and out["flags"] & abi.FUSE_FLOCK_LOCKS


def test_second_init_starts_a_new_session() -> None:
    # A rebooted guest sends INIT again without DESTROY: the old state goes.
    d, fs = make()
    before = d.session
    out = init_out(call(d, request(abi.FUSE_INIT, init_args(38))))
    assert out["minor"] == 38
    assert fs.destroyed == 1 and len(fs.sessions) == 2
    assert d.session is not None and d.session is not before


def test_requests_before_init_get_eio() -> None:
    d, fs = make(init=False)
    assert lookup(d, b"hello").error == -errno.EIO
    assert call(d, request(abi.FUSE_GETATTR, abi.GETATTR_IN.pack(0, 0, 0))).error == -errno.EIO
    assert call(d, request(abi.FUSE_FORGET, abi.FORGET_IN.pack(1), nodeid=2)).n == 0
    assert fs.calls == [] and fs.forgets == []


def test_init_backend_failure_leaves_no_session() -> None:
    d, fs = make(init=False)
    fs.fail_init = OSError(errno.EPROTO, "nope")
    assert call(d, request(abi.FUSE_INIT, init_args())).error == -errno.EPROTO
    assert d.session is None
    fs.fail_init = None
    assert call(d, request(abi.FUSE_INIT, init_args())).error == 0


def test_destroy_replies_with_bare_header_and_allows_new_init() -> None:
    d, fs = make()
    r = call(d, request(abi.FUSE_DESTROY, nodeid=0))
    assert (r.n, r.error) == (16, 0)
    assert fs.destroyed == 1 and d.session is None
    assert lookup(d, b"hello").error == -errno.EIO
    assert call(d, request(abi.FUSE_INIT, init_args())).error == 0
    assert lookup(d, b"hello").error == 0


def test_reset_allows_a_fresh_init() -> None:
    d, fs = make()
    d.reset()
    assert d.session is None and fs.destroyed == 1
    assert call(d, request(abi.FUSE_INIT, init_args(38))).error == 0
    assert d.session is not None and d.session.minor == 38


def test_session_export_restore_roundtrip() -> None:
    d, _ = make()
    state = d.export_session()
    assert state is not None and SessionState.from_dict(state) == d.session
    d2, fs2 = make(init=False)
    d2.restore_session(state)
    assert d2.session == d.session and fs2.sessions == []
    assert lookup(d2, b"hello").error == 0  # no INIT needed after restore
    with pytest.raises(ValueError):
        SessionState.from_dict({**state, "minor": "41"})
    with pytest.raises(ValueError):
        SessionState.from_dict({k: v for k, v in state.items() if k != "flags"})
    d2.restore_session(None)
    assert d2.session is None


# -- names and attributes ----------------------------------------------------------------


@pytest.mark.parametrize("rsplit", [(40,), (), (13,), (40, 42), (1, 2, 3, 41, 44)])
def test_lookup_success_any_split(rsplit: tuple[int, ...]) -> None:
    d, fs = make()
    r = call(d, request(abi.FUSE_LOOKUP, b"hello\0", unique=77), rsplit=rsplit)
    vals = dict(zip(abi.ENTRY_OUT_FIELDS, r.unpack(abi.ENTRY_OUT), strict=True))
    assert vals["nodeid"] == 2 and vals["ino"] == 1002 and vals["size"] == 11
    assert (vals["entry_valid"], vals["entry_valid_nsec"]) == (1, 500_000_000)
    assert (vals["attr_valid"], vals["attr_valid_nsec"]) == (2, 250_000_000)
    assert vals["mode"] == stat.S_IFREG | 0o644
    _, ctx, parent, name = fs.calls[-1]
    assert (ctx.uid, ctx.gid, ctx.pid, ctx.groups) == (1000, 1000, 42, ())
    assert (parent, name) == (1, b"hello")


@pytest.mark.parametrize("wsizes", [(16, 128), (144,), (100, 44), (1,) * 144, (7, 9, 200)])
def test_lookup_reply_any_writable_split(wsizes: tuple[int, ...]) -> None:
    d, _ = make()
    r = call(d, request(abi.FUSE_LOOKUP, b"hello\0"), wsizes=wsizes)
    assert r.n == 144 and r.unpack(abi.ENTRY_OUT)[0] == 2


def test_lookup_errors() -> None:
    d, fs = make()
    assert lookup(d, b"missing").error == -errno.ENOENT
    for bad in (b"hello", b"a/b\0", b"\0", b""):
        assert call(d, request(abi.FUSE_LOOKUP, bad)).error == -errno.EINVAL
    assert [c[3] for c in fs.calls] == [b"missing"]


def test_lookup_with_groups_extension() -> None:
    d, fs = make()
    body = struct.pack("<III", 2, 5, 6)
    ext = abi.EXT_HEADER.pack(8 + len(body), abi.FUSE_EXT_GROUPS) + body + bytes(4)
    r = call(d, request(abi.FUSE_LOOKUP, b"hello\0\0\0", ext=ext))
    assert r.error == 0
    _, ctx, _, name = fs.calls[-1]
    assert ctx.groups == (5, 6) and name == b"hello"


def test_extension_is_not_taken_as_args() -> None:
    """A name that is unterminated within the args stays malformed even if the
    extension that follows holds a NUL byte."""
    d, fs = make()
    ext = abi.EXT_HEADER.pack(16, abi.FUSE_EXT_GROUPS) + struct.pack("<II", 1, 0)
    assert call(d, request(abi.FUSE_LOOKUP, b"hello", ext=ext)).error == -errno.EINVAL
    assert fs.calls == []


def test_malformed_extension_is_einval() -> None:
    d, fs = make()
    ext = abi.EXT_HEADER.pack(64, abi.FUSE_EXT_GROUPS)
    assert call(d, request(abi.FUSE_LOOKUP, b"hello\0", ext=ext)).error == -errno.EINVAL
    assert fs.calls == []


def test_forget_and_batch_forget() -> None:
    d, fs = make()
    assert call(d, request(abi.FUSE_FORGET, abi.FORGET_IN.pack(3), nodeid=2)).n == 0
    items = [(2, 1), (3, 4), (4, 2**64 - 1)]
    args = abi.BATCH_FORGET_IN.pack(3, 0) + b"".join(abi.FORGET_ONE.pack(*i) for i in items)
    assert call(d, request(abi.FUSE_BATCH_FORGET, args, nodeid=0), rsplit=(40, 57)).n == 0
    assert fs.forgets == [(2, 3), *items]


@pytest.mark.parametrize("count", [4, 2**32 - 1])
def test_batch_forget_count_beyond_buffer_is_ignored(count: int) -> None:
    d, fs = make()
    args = abi.BATCH_FORGET_IN.pack(count, 0) + abi.FORGET_ONE.pack(2, 1) * 3
    assert call(d, request(abi.FUSE_BATCH_FORGET, args, nodeid=0)).n == 0
    assert fs.forgets == []


def test_getattr_with_and_without_fh() -> None:
    d, fs = make()
    r = call(d, request(abi.FUSE_GETATTR, abi.GETATTR_IN.pack(0, 0, 99), nodeid=2))
    vals = dict(zip(abi.ATTR_OUT_FIELDS, r.unpack(abi.ATTR_OUT), strict=True))
    assert (vals["attr_valid"], vals["attr_valid_nsec"], vals["ino"]) == (3, 0, 1002)
    args = abi.GETATTR_IN.pack(abi.FUSE_GETATTR_FH, 0, 99)
    call(d, request(abi.FUSE_GETATTR, args, nodeid=2))
    assert fs.calls[-2:] == [("getattr", 2, None), ("getattr", 2, 99)]
    assert call(d, request(abi.FUSE_GETATTR, b"\0" * 8)).error == -errno.EINVAL
    assert call(d, request(abi.FUSE_GETATTR, abi.GETATTR_IN.pack(0, 0, 0), nodeid=99)).error == (
        -errno.ESTALE
    )


def test_statfs() -> None:
    d, _ = make()
    vals = call(d, request(abi.FUSE_STATFS)).unpack(abi.STATFS_OUT)
    assert vals[:9] == (100, 50, 40, 1000, 900, 4096, 255, 512, 0)


def test_readlink() -> None:
    d, _ = make()
    r = call(d, request(abi.FUSE_READLINK, nodeid=3))
    assert (r.error, r.body) == (0, b"hello")
    assert call(d, request(abi.FUSE_READLINK, nodeid=2)).error == -errno.EINVAL


def test_access() -> None:
    d, fs = make()
    assert call(d, request(abi.FUSE_ACCESS, abi.ACCESS_IN.pack(os.R_OK, 0))).n == 16
    assert call(d, request(abi.FUSE_ACCESS, abi.ACCESS_IN.pack(os.W_OK, 0))).error == (
        -errno.EACCES
    )
    assert fs.calls == [("access", 1, os.R_OK), ("access", 1, os.W_OK)]


# -- files ---------------------------------------------------------------------------


def test_open_read_flush_release() -> None:
    d, fs = make()
    fh, oflags, backing = call(
        d, request(abi.FUSE_OPEN, abi.OPEN_IN.pack(os.O_RDONLY, 0), nodeid=2)
    ).unpack(abi.OPEN_OUT)
    assert (fh, oflags, backing) == (102, abi.FOPEN_KEEP_CACHE, 0)
    r = call(d, request(abi.FUSE_READ, read_in(fh, 6, 4096), nodeid=2), wsizes=(16, 3, 4096))
    assert (r.error, r.body) == (0, b"world")
    assert fs.calls[-1] == ("read", 2, 102, 6, 4096, [3, 4093])
    fl = abi.FLUSH_IN.pack(fh, 0, 0, 555)
    assert call(d, request(abi.FUSE_FLUSH, fl, nodeid=2)).n == 16
    rel = abi.RELEASE_IN.pack(fh, os.O_RDONLY, 0, 0)
    assert call(d, request(abi.FUSE_RELEASE, rel, nodeid=2)).n == 16
    assert fs.calls[-2:] == [("flush", 2, 102, 555), ("release", 2, 102, os.O_RDONLY)]


def test_read_writes_into_guest_buffers_and_caps_size() -> None:
    d, fs = make(FuseConfig(max_read=8))
    writable = [bytearray(16), bytearray(4), bytearray(100)]
    data, unique = request(abi.FUSE_READ, read_in(1, 0, 4096), nodeid=2)
    n = d.handle([bytearray(data)], writable)
    assert n == 16 + 8
    assert abi.OUT_HEADER.unpack(writable[0]) == (24, 0, unique)
    assert writable[1] == bytearray(b"hell") and writable[2][:4] == bytearray(b"o wo")
    assert fs.calls[-1][4] == 8
    # capped by the writable space too
    d2, fs2 = make()
    r = call(d2, request(abi.FUSE_READ, read_in(1, 0, 4096), nodeid=2), wsizes=(16, 5))
    assert r.body == b"hello" and fs2.calls[-1][4] == 5


def test_read_errors() -> None:
    d, _ = make()
    assert call(d, request(abi.FUSE_READ, read_in(1, 0, 10), nodeid=42)).error == -errno.ESTALE
    assert call(d, request(abi.FUSE_READ, read_in(1, 2**63, 10), nodeid=2)).error == -errno.EINVAL
    assert call(d, request(abi.FUSE_READ, read_in(1, 0, 10)[:39], nodeid=2)).error == (
        -errno.EINVAL
    )


def test_read_bogus_backend_count_is_eio() -> None:
    class Liar(MemFs):
        def read(self, *a: Any) -> int:
            return 10**6

    d = Dispatcher(Liar(), FuseConfig())
    call(d, request(abi.FUSE_INIT, init_args()))
    assert call(d, request(abi.FUSE_READ, read_in(1, 0, 10), nodeid=2)).error == -errno.EIO


def test_lseek() -> None:
    d, _ = make()
    r = call(d, request(abi.FUSE_LSEEK, abi.LSEEK_IN.pack(1, 5, os.SEEK_DATA, 0), nodeid=2))
    assert r.unpack(abi.LSEEK_OUT) == (5,)
    r = call(d, request(abi.FUSE_LSEEK, abi.LSEEK_IN.pack(1, 5, os.SEEK_HOLE, 0), nodeid=2))
    assert r.error == -errno.ENXIO


# -- directories ---------------------------------------------------------------------


def parse_dirents(body: bytes, plus: bool) -> list[tuple[Any, ...]]:
    out, pos = [], 0
    while pos < len(body):
        if plus:
            entry = abi.ENTRY_OUT.unpack_from(body, pos)
            pos += abi.ENTRY_OUT.size
        ino, off, namelen, typ = abi.DIRENT.unpack_from(body, pos)
        name = body[pos + 24 : pos + 24 + namelen]
        pad = body[pos + 24 + namelen : pos + abi.dirent_size(namelen)]
        assert pad == bytes(len(pad)), "padding must be zeroed"
        pos += abi.dirent_size(namelen)
        out.append((name, ino, off, typ, entry[0]) if plus else (name, ino, off, typ))
    assert pos == len(body)
    return out


def test_opendir_readdir_releasedir() -> None:
    d, fs = make()
    fh, _, _ = call(d, request(abi.FUSE_OPENDIR, abi.OPEN_IN.pack(0, 0))).unpack(abi.OPEN_OUT)
    assert call(d, request(abi.FUSE_OPENDIR, abi.OPEN_IN.pack(0, 0), nodeid=2)).error == (
        -errno.ENOTDIR
    )
    r = call(d, request(abi.FUSE_READDIR, read_in(fh, 0, 4096)), wsizes=(16, 4096))
    ents = parse_dirents(r.body, plus=False)
    assert [e[0] for e in ents] == [b".", b"..", b"hello", b"link", b"sub"]
    assert ents[2] == (b"hello", 1002, 3, stat.S_IFREG >> 12)
    r = call(d, request(abi.FUSE_READDIR, read_in(fh, 3, 4096)), wsizes=(20, 30, 4096))
    assert [e[0] for e in parse_dirents(r.body, plus=False)] == [b"link", b"sub"]
    rel = abi.RELEASE_IN.pack(fh, 0, 0, 0)
    assert call(d, request(abi.FUSE_RELEASEDIR, rel)).n == 16
    assert fs.calls[-1] == ("releasedir", 1, fh, 0)


def test_readdir_stops_at_guest_size() -> None:
    d, _ = make()
    r = call(d, request(abi.FUSE_READDIR, read_in(7, 0, 64 + 31), nodeid=4))
    assert [e[0] for e in parse_dirents(r.body, plus=False)] == [b".", b".."]
    r = call(d, request(abi.FUSE_READDIR, read_in(7, 0, 63), nodeid=4))
    assert [e[0] for e in parse_dirents(r.body, plus=False)] == [b"."]
    # too small for even one entry: an empty (EOF-looking) reply, not an error
    r = call(d, request(abi.FUSE_READDIR, read_in(7, 0, 10), nodeid=4))
    assert (r.error, r.body) == (0, b"")


def test_readdirplus_entries_and_dot_entries_zeroed() -> None:
    d, fs = make()
    r = call(d, request(abi.FUSE_READDIRPLUS, read_in(7, 0, 4096)), wsizes=(16, 100, 4000))
    ents = parse_dirents(r.body, plus=True)
    assert [(e[0], e[4]) for e in ents] == [(b".", 0), (b"..", 0), (b"hello", 2), (b"link", 3),
                                            (b"sub", 4)]  # fmt: skip
    assert fs.lookups == {2: 1, 3: 1, 4: 1}


def test_readdirplus_forgets_entry_that_does_not_fit() -> None:
    d, fs = make()
    size = 2 * abi.direntplus_size(3) + 10  # room for two "xxx" entries, not three
    r = call(d, request(abi.FUSE_READDIRPLUS, read_in(7, 2, size), nodeid=4))
    ents = parse_dirents(r.body, plus=True)
    assert [e[0] for e in ents] == [b"aaa", b"bbb"]
    third = fs.nodes[4].children[b"ccc"]
    assert fs.forgets == [(third, 1)]
    assert fs.lookups[third] == 0 and fs.lookups[ents[0][4]] == 1


def test_readdir_backend_error() -> None:
    d, _ = make()
    assert call(d, request(abi.FUSE_READDIR, read_in(7, 0, 4096), nodeid=99)).error == (
        -errno.ESTALE
    )


def test_readdirplus_failure_gives_lookups_back() -> None:
    class Broken(MemFs):
        def readdir(self, *a: Any) -> Iterator[DirEntry]:
            yield from itertools.islice(super().readdir(*a), 4)
            raise RuntimeError("bug")

    fs = Broken()
    d = Dispatcher(fs, FuseConfig())
    call(d, request(abi.FUSE_INIT, init_args()))
    assert call(d, request(abi.FUSE_READDIRPLUS, read_in(7, 0, 4096))).error == -errno.EIO
    assert fs.lookups == {2: 0, 3: 0}


# -- xattrs -----------------------------------------------------------------------------


def getxattr(d: Dispatcher, size: int, name: bytes, nodeid: int = 2) -> Reply:
    return call(d, request(abi.FUSE_GETXATTR, abi.GETXATTR_IN.pack(size, 0) + name, nodeid=nodeid))


def test_getxattr_size_rules() -> None:
    d, _ = make()
    assert getxattr(d, 0, b"user.k\0").unpack(abi.GETXATTR_OUT) == (5, 0)
    assert getxattr(d, 4, b"user.k\0").error == -errno.ERANGE
    r = getxattr(d, 5, b"user.k\0")
    assert (r.error, r.body) == (0, b"value")
    r = getxattr(d, 100, b"user.k\0")
    assert (r.error, r.body) == (0, b"value")
    r = getxattr(d, 100, b"user.e\0")
    assert (r.error, r.n) == (0, 16)
    assert getxattr(d, 100, b"user.none\0").error == -errno.ENODATA
    assert getxattr(d, 100, b"user.k").error == -errno.EINVAL
    # the guest's size exceeds its own writable buffer: ERANGE, never an overrun
    r = call(d, request(abi.FUSE_GETXATTR, abi.GETXATTR_IN.pack(100, 0) + b"user.k\0", nodeid=2),
             wsizes=(16, 2))  # fmt: skip
    assert r.error == -errno.ERANGE


def test_listxattr_size_rules() -> None:
    d, _ = make()
    names = b"user.k\0user.e\0"
    r = call(d, request(abi.FUSE_LISTXATTR, abi.GETXATTR_IN.pack(0, 0), nodeid=2))
    assert r.unpack(abi.GETXATTR_OUT) == (len(names), 0)
    r = call(d, request(abi.FUSE_LISTXATTR, abi.GETXATTR_IN.pack(3, 0), nodeid=2))
    assert r.error == -errno.ERANGE
    r = call(d, request(abi.FUSE_LISTXATTR, abi.GETXATTR_IN.pack(64, 0), nodeid=2))
    assert r.body == names


# -- odd and malformed requests ------------------------------------------------------------


def test_interrupt_unknown_and_unimplemented() -> None:
    d, _ = make()
    assert call(d, request(abi.FUSE_INTERRUPT, abi.INTERRUPT_IN.pack(5))).n == 0
    # an opcode the dispatcher knows, but this backend does not implement
    assert call(d, request(abi.FUSE_MKDIR, abi.MKDIR_IN.pack(0o755, 0) + b"x\0")).error == (
        -errno.ENOSYS
    )
    for op in (7, 19, 53, 54, 999, abi.CUSE_INIT, 2**32 - 1):
        assert call(d, request(op, b"x" * 64)).error == -errno.ENOSYS


def test_short_header_gets_no_reply() -> None:
    d, _ = make()
    data, _ = request(abi.FUSE_LOOKUP, b"hello\0")
    assert d.handle([bytearray(data[:39])], [bytearray(4096)]) == 0
    assert d.handle([], [bytearray(4096)]) == 0


def test_len_larger_than_buffers_is_einval() -> None:
    d, fs = make()
    r = call(d, request(abi.FUSE_LOOKUP, b"hello\0", length=40 + 6 + 1))
    assert r.error == -errno.EINVAL and fs.calls == []


def test_len_smaller_than_args_is_einval() -> None:
    d, fs = make()
    # GETATTR needs 16 argument bytes; len claims only 8 of the 16 supplied
    r = call(d, request(abi.FUSE_GETATTR, abi.GETATTR_IN.pack(0, 0, 0), length=48))
    assert r.error == -errno.EINVAL
    # len shorter than the header itself
    assert call(d, request(abi.FUSE_LOOKUP, b"hello\0", length=20)).error == -errno.EINVAL
    # extensions claim more than len holds
    data, u = request(abi.FUSE_LOOKUP, b"hello\0")
    data = data[:36] + struct.pack("<HH", 100, 0) + data[40:]
    assert call(d, (data, u)).error == -errno.EINVAL
    assert fs.calls == []


def test_len_trailing_bytes_are_ignored() -> None:
    """Readable buffers may hold more than len; only len bytes are the request."""
    d, fs = make()
    data, u = request(abi.FUSE_LOOKUP, b"hello\0")
    assert call(d, (data + b"junk", u)).error == 0
    assert fs.calls[-1][3] == b"hello"


def test_writable_too_small() -> None:
    d, _ = make()
    r = call(d, request(abi.FUSE_LOOKUP, b"hello\0"), wsizes=(15,))
    assert r.n == 0
    r = call(d, request(abi.FUSE_LOOKUP, b"hello\0"), wsizes=(16, 100))
    assert (r.n, r.error) == (16, -errno.EIO)
    assert call(d, request(abi.FUSE_GETATTR, abi.GETATTR_IN.pack(0, 0, 0)), wsizes=()).n == 0


def test_backend_bug_is_eio_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    class Buggy(MemFs):
        def statfs(self, ctx: Context, nodeid: int) -> os.statvfs_result:
            raise KeyError("oops")

        def getattr(self, ctx: Context, nodeid: int, fh: int | None) -> AttrReply:
            raise OSError("no errno")

    d = Dispatcher(Buggy(), FuseConfig())
    call(d, request(abi.FUSE_INIT, init_args()))
    assert call(d, request(abi.FUSE_STATFS, unique=31337)).error == -errno.EIO
    assert any(
        "STATFS" in rec.getMessage() and "31337" in rec.getMessage() and rec.exc_info
        for rec in caplog.records
    )
    assert call(d, request(abi.FUSE_GETATTR, abi.GETATTR_IN.pack(0, 0, 0))).error == -errno.EIO


def test_malformed_is_logged_with_opcode_unique_nodeid(caplog: pytest.LogCaptureFixture) -> None:
    d, _ = make()
    call(d, request(abi.FUSE_LOOKUP, b"a/b\0", unique=4242, nodeid=9))
    msgs = [r.getMessage() for r in caplog.records]
    assert any("LOOKUP" in m and "4242" in m and "nodeid=9" in m and "/" in m for m in msgs)


def test_concurrent_handle() -> None:
    d, _ = make()
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            for _ in range(200):
                assert lookup(d, b"hello").error == 0
                r = call(d, request(abi.FUSE_READ, read_in(1, 0, 5), nodeid=2))
                assert r.body == b"hello"
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert errors == []


# -- fuzzing --------------------------------------------------------------------------------

_VALID_OPS = sorted({*abi.Opcode, 0, 7, 19, 54, 9999})


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(
    opcode=st.sampled_from(_VALID_OPS),
    args=st.binary(max_size=200),
    ext=st.binary(max_size=40),
    extlen=st.integers(0, 10),
    length_delta=st.integers(-60, 20),
    rpoints=st.lists(st.integers(0, 300), max_size=5),
    wsizes=st.lists(st.integers(0, 300), max_size=4),
    nodeid=st.sampled_from([0, 1, 2, 3, 4, 2**64 - 1]),
    initialized=st.booleans(),
)
def test_fuzz_structured_requests_never_raise(
    opcode: int,
    args: bytes,
    ext: bytes,
    extlen: int,
    length_delta: int,
    rpoints: list[int],
    wsizes: list[int],
    nodeid: int,
    initialized: bool,
) -> None:
    d, _ = make(init=initialized)
    body = args + ext
    length = max(0, 40 + len(body) + length_delta)
    hdr = abi.IN_HEADER.pack(length, opcode, 12345, nodeid, 0, 0, 0, extlen, 0)
    writable = [bytearray(n) for n in wsizes]
    n = d.handle(split_at(hdr + body, rpoints), writable)
    check_reply(n, writable, 12345)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(data=st.binary(max_size=400), rpoints=st.lists(st.integers(0, 400), max_size=5),
       wsizes=st.lists(st.integers(0, 400), max_size=4))  # fmt: skip
def test_fuzz_random_bytes_never_raise(data: bytes, rpoints: list[int], wsizes: list[int]) -> None:
    d, _ = make()
    writable = [bytearray(n) for n in wsizes]
    n = d.handle(split_at(data, rpoints), writable)
    unique = abi.IN_HEADER.unpack_from(data)[2] if len(data) >= 40 else None
    check_reply(n, writable, unique)


@settings(max_examples=200, deadline=None)
@given(cut=st.integers(0, 200), rpoints=st.lists(st.integers(0, 200), max_size=4))
def test_fuzz_truncated_valid_requests(cut: int, rpoints: list[int]) -> None:
    d, _ = make()
    reqs = [
        request(abi.FUSE_LOOKUP, b"hello\0", unique=5),
        request(abi.FUSE_GETXATTR, abi.GETXATTR_IN.pack(100, 0) + b"user.k\0", nodeid=2, unique=5),
        request(abi.FUSE_READDIRPLUS, read_in(7, 0, 4096), unique=5),
        request(abi.FUSE_BATCH_FORGET, abi.BATCH_FORGET_IN.pack(2, 0) + bytes(32), unique=5),
        request(abi.FUSE_INIT, init_args(), unique=5),
    ]
    for data, _ in reqs:
        truncated = data[:cut]
        writable = [bytearray(16), bytearray(4096)]
        n = d.handle(split_at(truncated, rpoints), writable)
        check_reply(n, writable, 5 if cut >= 40 else None)


def test_contexts_follow_each_request() -> None:
    """Contexts are shared between requests of the same caller, never mixed up."""
    d, fs = make()
    seen = []
    for uid, gid, pid in [(1, 2, 3), (4, 5, 6), (1, 2, 3), (1, 2, 7), (0, 0, 0)]:
        call(d, request(abi.FUSE_LOOKUP, b"hello\0", uid=uid, gid=gid, pid=pid))
        ctx = fs.calls[-1][1]
        assert (ctx.uid, ctx.gid, ctx.pid, ctx.groups, ctx.umask) == (uid, gid, pid, (), None)
        seen.append(ctx)
    assert seen[0] is seen[2] and seen[0] is not seen[3]
    body = struct.pack("<III", 2, 10, 20)
    ext = abi.EXT_HEADER.pack(8 + len(body), abi.FUSE_EXT_GROUPS) + body + bytes(4)
    call(d, request(abi.FUSE_LOOKUP, b"hello\0\0\0", ext=ext, uid=1, gid=2, pid=3))
    assert fs.calls[-1][1].groups == (10, 20)
    call(d, request(abi.FUSE_LOOKUP, b"hello\0", uid=1, gid=2, pid=3))
    assert fs.calls[-1][1].groups == ()
