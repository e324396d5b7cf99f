"""Unit tests of the sans-IO FUSE codec, the ABI tables and the iov helpers."""

from __future__ import annotations

import os
import stat
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from virtiofsd_py.fs.api import AttrReply, Entry, Opened, make_stat
from virtiofsd_py.fuse import abi, codec, iov

_NS = 10**9


def ref_attr(s: os.stat_result, flags: int = 0) -> tuple[int, ...]:
    """The 16 fuse_attr fields of ``s``, in ``abi.ATTR_FIELDS`` order: the test's
    own reading of fuse.h, independent of the codec's packing."""
    a, m, c = (divmod(t, _NS) for t in (s.st_atime_ns, s.st_mtime_ns, s.st_ctime_ns))
    return (
        s.st_ino % 2**64, s.st_size % 2**64, s.st_blocks % 2**64,
        a[0] % 2**64, m[0] % 2**64, c[0] % 2**64, a[1], m[1], c[1],
        s.st_mode % 2**32, min(s.st_nlink, 2**32 - 1), s.st_uid % 2**32, s.st_gid % 2**32,
        s.st_rdev % 2**32, s.st_blksize % 2**32, flags,
    )  # fmt: skip


def ref_entry(e: Entry) -> tuple[int, ...]:
    """The fuse_entry_out fields of ``e``, in ``abi.ENTRY_OUT_FIELDS`` order."""
    esec, ensec = codec.timeout_split(e.entry_timeout)
    asec, ansec = codec.timeout_split(e.attr_timeout)
    flags = abi.FUSE_ATTR_SUBMOUNT if e.submount else 0
    return (e.nodeid, e.generation, esec, asec, ensec, ansec, *ref_attr(e.attr, flags))


def split_at(data: bytes, points: list[int]) -> list[bytearray]:
    cuts = sorted({p for p in points if 0 < p < len(data)})
    out, prev = [], 0
    for c in [*cuts, len(data)]:
        out.append(bytearray(data[prev:c]))
        prev = c
    return out


# -- ABI -------------------------------------------------------------------------


def test_struct_sizes_match_fuse_h() -> None:
    assert abi.IN_HEADER.size == 40
    assert abi.OUT_HEADER.size == 16
    assert abi.ATTR.size == 88
    assert abi.ENTRY_OUT.size == 128
    assert abi.ATTR_OUT.size == 104
    assert abi.INIT_IN.size == 64
    assert abi.INIT_OUT.size == 64
    assert abi.KSTATFS.size == 80
    assert abi.DIRENTPLUS.size == abi.ENTRY_OUT.size + abi.DIRENT.size
    assert len(abi.ENTRY_OUT_FIELDS) == len(abi.ENTRY_OUT.unpack(bytes(128)))
    assert len(abi.IN_HEADER_FIELDS) == 9


def test_init_flags_split_and_join() -> None:
    flags = abi.FUSE_ASYNC_READ | abi.FUSE_INIT_EXT | abi.FUSE_CREATE_SUPP_GROUP
    lo, hi = abi.split_init_flags(flags)
    assert lo == abi.FUSE_ASYNC_READ | abi.FUSE_INIT_EXT
    assert hi == 1 << 2  # bit 34 travels as bit 2 of flags2
    assert abi.join_init_flags(lo, hi) == flags


def test_opcode_names() -> None:
    assert abi.opcode_name(abi.FUSE_LOOKUP) == "LOOKUP"
    assert abi.opcode_name(abi.FUSE_READDIRPLUS) == "READDIRPLUS"
    assert abi.opcode_name(7) == "OPCODE_7"
    assert int(abi.Opcode.STATX) == abi.FUSE_STATX == 52


@pytest.mark.parametrize(("namelen", "size"), [(0, 24), (1, 32), (8, 32), (9, 40)])
def test_dirent_sizes_are_8_aligned(namelen: int, size: int) -> None:
    assert abi.dirent_size(namelen) == size
    assert abi.direntplus_size(namelen) == size + 128


# -- iov -------------------------------------------------------------------------


@given(st.binary(min_size=0, max_size=64), st.lists(st.integers(0, 64), max_size=6), st.data())
def test_iov_view_and_slices_agree_with_flat_bytes(
    data: bytes, points: list[int], draw: st.DataObject
) -> None:
    bufs = split_at(data, points)
    off = draw.draw(st.integers(0, len(data)))
    n = draw.draw(st.integers(0, len(data) - off))
    assert bytes(iov.view(bufs, off, n)) == data[off : off + n]
    assert b"".join(bytes(s) for s in iov.slices(bufs, off, n)) == data[off : off + n]
    with pytest.raises(iov.IovError):
        iov.slices(bufs, off, len(data) - off + 1)


def test_iov_view_is_zero_copy_within_one_buffer() -> None:
    bufs = [bytearray(40), bytearray(b"abcdef")]
    v = iov.view(bufs, 41, 3)
    assert bytes(v) == b"bcd"
    assert v.obj is bufs[1]


def test_iov_scatter_writes_across_buffers() -> None:
    bufs = [bytearray(3), bytearray(0), bytearray(4)]
    iov.scatter(bufs, 1, b"wxyz")
    assert bufs[0] == bytearray(b"\0wx") and bufs[2] == bytearray(b"yz\0\0")
    assert iov.window(bufs, 3, 2) is not None
    assert iov.window(bufs, 1, 3) is None


# -- request parsing ---------------------------------------------------------------


def test_parse_in_header_split_anywhere() -> None:
    raw = abi.IN_HEADER.pack(40, 1, 7, 1, 2, 3, 4, 0, 0)
    for cut in range(1, 40):
        assert codec.parse_in_header(split_at(raw, [cut])) == (40, 1, 7, 1, 2, 3, 4, 0, 0)
    with pytest.raises(codec.Malformed):
        codec.parse_in_header([bytearray(raw[:39])])
    with pytest.raises(codec.Malformed):
        codec.parse_in_header([])


def test_parse_name_rules() -> None:
    assert codec.parse_name(memoryview(b"foo\0rest")) == (b"foo", 4)
    assert codec.parse_name(memoryview(b"x\0y\0"), 2) == (b"y", 4)
    for bad in (b"foo", b"\0", b"a/b\0", b""):
        with pytest.raises(codec.Malformed):
            codec.parse_name(memoryview(bad))
    assert codec.parse_xattr_name(memoryview(b"user.a/b\0")) == (b"user.a/b", 9)
    with pytest.raises(codec.Malformed):
        codec.parse_xattr_name(memoryview(b"user.x"))


def groups_ext(groups: list[int]) -> bytes:
    body = struct.pack(f"<I{len(groups)}I", len(groups), *groups)
    size = abi.EXT_HEADER.size + len(body)
    pad = (-size) % 8
    return abi.EXT_HEADER.pack(size, abi.FUSE_EXT_GROUPS) + body + bytes(pad)


def secctx_ext(name: bytes, ctx: bytes, nr: int = 1) -> bytes:
    """A security-context extension laid out as Linux fs/fuse/dir.c does."""
    body = b"".join(abi.SECCTX.pack(len(ctx), 0) + name + b"\0" + ctx for _ in range(nr))
    size = abi.rec_align(abi.SECCTX_HEADER.size + len(body))
    return abi.SECCTX_HEADER.pack(size, nr) + body.ljust(size - abi.SECCTX_HEADER.size, b"\0")


def test_parse_extensions_groups_and_secctx() -> None:
    secctx = secctx_ext(b"security.selinux", b"system_u:object_r:tmp_t:s0\0")
    ext = codec.parse_extensions(memoryview(secctx + groups_ext([10, 20, 30])))
    assert ext.groups == (10, 20, 30)
    assert ext.secctx == (b"security.selinux", b"system_u:object_r:tmp_t:s0\0")
    assert codec.parse_extensions(memoryview(groups_ext([7]) + secctx)).groups == (7,)
    assert codec.parse_extensions(memoryview(secctx)) == (
        (),
        (b"security.selinux", b"system_u:object_r:tmp_t:s0\0"),
    )
    assert codec.parse_extensions(memoryview(b"")) == codec.NO_EXTENSIONS == ((), None)
    # zero contexts (no LSM labels files) and unknown extension types
    assert codec.parse_extensions(memoryview(abi.SECCTX_HEADER.pack(8, 0))) == ((), None)
    assert codec.parse_extensions(memoryview(abi.EXT_HEADER.pack(16, 99) + bytes(8))) == ((), None)
    # several contexts: the first is taken
    two = secctx_ext(b"security.a", b"x", nr=2)
    assert codec.parse_extensions(memoryview(two)).secctx == (b"security.a", b"x")


@pytest.mark.parametrize(
    "ext",
    [
        b"\x08\0\0\0",  # truncated header
        abi.EXT_HEADER.pack(4, 32),  # size smaller than its header
        abi.EXT_HEADER.pack(64, 32) + bytes(8),  # size beyond the region
        abi.EXT_HEADER.pack(8, 32),  # groups without nr_groups
        abi.EXT_HEADER.pack(16, 32) + struct.pack("<II", 5, 1),  # nr_groups lies
        abi.SECCTX_HEADER.pack(8, 1),  # one context announced, none there
        abi.SECCTX_HEADER.pack(24, 1) + abi.SECCTX.pack(5, 0) + b"lbl\0\0\0\0\0",  # size lies
        abi.SECCTX_HEADER.pack(24, 1) + abi.SECCTX.pack(1, 0) + b"no-nul-x",  # name unended
        abi.SECCTX_HEADER.pack(24, 1) + abi.SECCTX.pack(1, 0) + b"\0xxxxxxx",  # empty name
        abi.SECCTX_HEADER.pack(24, 1) + abi.SECCTX.pack(0, 0) + b"a\0xxxxxx",  # empty context
        secctx_ext(b"security.a", b"x", nr=2)[:-16],  # second context cut off
    ],
)
def test_parse_extensions_rejects_malformed(ext: bytes) -> None:
    with pytest.raises(codec.Malformed):
        codec.parse_extensions(memoryview(ext))


def test_parse_two_names_and_cstring() -> None:
    assert codec.parse_two_names(memoryview(b"xxold\0new\0tail"), 2) == (b"old", b"new", 10)
    for bad in (b"old\0new", b"old\0\0", b"a/b\0c\0", b"old\0n/w\0"):
        with pytest.raises(codec.Malformed):
            codec.parse_two_names(memoryview(bad))
    assert codec.parse_cstring(memoryview(b"n\0/etc/../x\0"), 2) == (b"/etc/../x", 12)
    assert codec.parse_cstring(memoryview(b"\0")) == (b"", 1)
    with pytest.raises(codec.Malformed):
        codec.parse_cstring(memoryview(b"abc"))


def test_statx_values_layout_and_widths() -> None:
    fields = {
        "mask": 0x7FF, "blksize": 4096, "attributes": 1 << 40, "nlink": 3, "uid": 1000,
        "gid": 100, "mode": 0o100644, "ino": 2**64 - 1, "size": 12345, "blocks": 24,
        "attributes_mask": 0x20, "atime_sec": -1, "atime_nsec": 5, "btime_sec": 2**40,
        "mtime_sec": 7, "mtime_nsec": 999_999_999, "ctime_sec": 8, "rdev_major": 8,
        "rdev_minor": 1, "dev_major": 253, "dev_minor": 2, "not_a_field": 1,
    }  # fmt: skip
    vals = codec.statx_values(fields)
    packed = abi.STATX.pack(*vals)
    assert len(packed) == 256
    # offsets from struct fuse_statx in fuse.h
    assert struct.unpack_from("<IIQIIIH", packed, 0) == (0x7FF, 4096, 1 << 40, 3, 1000, 100,
                                                         0o100644)  # fmt: skip
    assert struct.unpack_from("<QQQQ", packed, 32) == (2**64 - 1, 12345, 24, 0x20)
    assert struct.unpack_from("<qI", packed, 64) == (-1, 5)  # atime
    assert struct.unpack_from("<q", packed, 80) == (2**40,)  # btime
    assert struct.unpack_from("<q", packed, 96) == (8,)  # ctime
    assert struct.unpack_from("<qI", packed, 112) == (7, 999_999_999)  # mtime
    assert struct.unpack_from("<IIII", packed, 128) == (8, 1, 253, 2)
    assert packed[144:] == bytes(112)
    # values wider than their field are cut, never an exception
    wide = codec.statx_values({"mode": 0o170777 | 1 << 20, "uid": 2**40 + 5, "atime_sec": 2**64})
    abi.STATX.pack(*wide)
    assert dict(zip(abi.STATX_FIELDS, wide, strict=True))["uid"] == 5


def test_write_struct_bytes_any_split() -> None:
    for sizes in ((16, 100), (20, 3, 100), (1,) * 40, (40,)):
        bufs = [bytearray(n) for n in sizes]
        n = codec.write_struct_bytes(bufs, 9, abi.IOCTL_OUT, (-2, 0, 0, 0), b"abcdefgh")
        flat = b"".join(bufs)
        assert n == 40 and abi.OUT_HEADER.unpack_from(flat) == (40, 0, 9)
        assert abi.IOCTL_OUT.unpack_from(flat, 16) == (-2, 0, 0, 0) and flat[32:40] == b"abcdefgh"
    with pytest.raises(codec.ReplyTooLarge):
        codec.write_struct_bytes([bytearray(39)], 9, abi.IOCTL_OUT, (0, 0, 0, 0), b"abcdefgh")


# -- reply values -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("t", "expected"),
    [
        (0.0, (0, 0)),
        (1.5, (1, 500_000_000)),
        (-3.0, (0, 0)),
        (float("nan"), (0, 0)),
        (float("inf"), (2**64 - 1, 0)),
        (86400.25, (86400, 250_000_000)),
    ],
)
def test_timeout_split(t: float, expected: tuple[int, int]) -> None:
    assert codec.timeout_split(t) == expected


def test_pack_attr_from_stat() -> None:
    s = make_stat(
        mode=stat.S_IFREG | 0o644,
        ino=42,
        size=5000,
        nlink=2,
        uid=1000,
        gid=100,
        rdev=os.makedev(8, 1),
        blksize=4096,
        atime_ns=1_700_000_000_123_456_789,
        mtime_ns=-1_500_000_000,  # before the epoch
        ctime_ns=5,
    )
    buf = bytearray(b"\xee" * (abi.ATTR.size + 8))
    codec.pack_attr(buf, 4, s, True)
    assert buf[:4] == buf[4 + abi.ATTR.size :] == b"\xee" * 4  # nothing written around it
    vals = dict(zip(abi.ATTR_FIELDS, abi.ATTR.unpack_from(buf, 4), strict=True))
    assert vals["ino"] == 42 and vals["size"] == 5000 and vals["blocks"] == 10
    assert (vals["atime"], vals["atimensec"]) == (1_700_000_000, 123_456_789)
    assert (vals["mtime"], vals["mtimensec"]) == (2**64 - 2, 500_000_000)  # -2 s + 0.5 s
    assert (vals["ctime"], vals["ctimensec"]) == (0, 5)
    assert vals["mode"] == stat.S_IFREG | 0o644 and vals["nlink"] == 2
    assert (vals["uid"], vals["gid"]) == (1000, 100)
    assert vals["rdev"] == (1 | 8 << 8)  # new_encode_dev(8, 1)
    assert vals["flags"] == abi.FUSE_ATTR_SUBMOUNT
    assert tuple(vals.values()) == ref_attr(s, abi.FUSE_ATTR_SUBMOUNT)
    codec.pack_attr(buf, 0, s, False)
    assert abi.ATTR.unpack_from(buf)[-1] == 0


def test_entry_out_layout() -> None:
    s = make_stat(mode=stat.S_IFDIR | 0o755, ino=9)
    e = Entry(nodeid=5, generation=3, attr=s, entry_timeout=1.25, attr_timeout=2.0)
    bufs = [bytearray(16), bytearray(abi.ENTRY_OUT.size)]
    assert codec.write_entry_out(bufs, 1, e) == 16 + abi.ENTRY_OUT.size
    vals = dict(zip(abi.ENTRY_OUT_FIELDS, abi.ENTRY_OUT.unpack_from(bufs[1]), strict=True))
    assert vals["nodeid"] == 5 and vals["generation"] == 3
    assert (vals["entry_valid"], vals["entry_valid_nsec"]) == (1, 250_000_000)
    assert (vals["attr_valid"], vals["attr_valid_nsec"]) == (2, 0)
    assert vals["ino"] == 9 and vals["flags"] == 0
    assert tuple(vals.values()) == ref_entry(e)


@pytest.mark.parametrize(
    ("opened", "flags"),
    [
        (Opened(1), 0),
        (Opened(1, direct_io=True), abi.FOPEN_DIRECT_IO),
        (Opened(1, keep_cache=True), abi.FOPEN_KEEP_CACHE),
        (Opened(1, keep_cache=True, cache_dir=True), abi.FOPEN_KEEP_CACHE | abi.FOPEN_CACHE_DIR),
        (Opened(1, True, True, True),
         abi.FOPEN_DIRECT_IO | abi.FOPEN_KEEP_CACHE | abi.FOPEN_CACHE_DIR),
    ],
)  # fmt: skip
def test_open_out_flags(opened: Opened, flags: int) -> None:
    bufs = [bytearray(16), bytearray(16)]
    assert codec.write_open_out(bufs, 3, opened) == 32
    assert abi.OPEN_OUT.unpack_from(bufs[1]) == (1, flags, 0)


# -- reply writing ------------------------------------------------------------------


@given(st.lists(st.integers(0, 40), max_size=4))
def test_write_struct_any_split(points: list[int]) -> None:
    total = 16 + abi.LSEEK_OUT.size
    bufs = split_at(bytes(total + 3), points)
    assert codec.write_struct(bufs, 99, abi.LSEEK_OUT, 12345) == total
    flat = b"".join(bufs)
    assert abi.OUT_HEADER.unpack_from(flat) == (total, 0, 99)
    assert abi.LSEEK_OUT.unpack_from(flat, 16) == (12345,)


def test_write_reply_too_small() -> None:
    with pytest.raises(codec.ReplyTooLarge):
        codec.write_struct([bytearray(20)], 1, abi.LSEEK_OUT, 0)
    with pytest.raises(codec.ReplyTooLarge):
        codec.write_error([bytearray(15)], 1, 2)
    bufs = [bytearray(8), bytearray(8)]
    assert codec.write_error(bufs, 5, 2) == 16
    assert abi.OUT_HEADER.unpack(b"".join(bufs)) == (16, -2, 5)


def test_pack_dirent_zeroes_padding() -> None:
    buf = memoryview(bytearray(b"\xff" * 64))
    n = codec.pack_dirent(buf, 0, 7, 3, 4, b"abc")
    assert n == 32
    assert abi.DIRENT.unpack_from(buf) == (7, 3, 3, 4)
    assert bytes(buf[24:32]) == b"abc" + bytes(5)
    assert bytes(buf[32:33]) == b"\xff"


ODD_STAT = make_stat(
    mode=stat.S_IFREG | 0o4755,
    ino=2**64 - 1,
    size=5000,
    nlink=2**40,  # clamped to u32
    uid=1000,
    gid=100,
    rdev=os.makedev(8, 1),
    blksize=4096,
    atime_ns=1_700_000_000_123_456_789,
    mtime_ns=-1_500_000_000,
    ctime_ns=5,
)


@given(st.lists(st.integers(0, 140), max_size=3))
def test_write_attr_out_matches_generic_packing(points: list[int]) -> None:
    """The reply is the fields fuse.h lays out, whatever the buffer split (header
    alone, header with body, straddling: packed in place or scattered)."""
    total = 16 + abi.ATTR_OUT.size
    expect = abi.OUT_HEADER.pack(total, 0, 7) + abi.ATTR_OUT.pack(
        1, 500_000_000, 0, *ref_attr(ODD_STAT, abi.FUSE_ATTR_SUBMOUNT)
    )
    bufs = split_at(bytes(total + 5), points)
    n = codec.write_attr_out(bufs, 7, AttrReply(ODD_STAT, 1.5, submount=True))
    assert n == total
    assert b"".join(bufs)[:total] == expect


@given(st.lists(st.integers(0, 160), max_size=3))
def test_write_entry_out_matches_generic_packing(points: list[int]) -> None:
    e = Entry(nodeid=5, generation=3, attr=ODD_STAT, entry_timeout=1.25, attr_timeout=2.0)
    total = 16 + abi.ENTRY_OUT.size
    expect = abi.OUT_HEADER.pack(total, 0, 9) + abi.ENTRY_OUT.pack(*ref_entry(e))
    bufs = split_at(bytes(total), points)
    assert codec.write_entry_out(bufs, 9, e) == total
    assert b"".join(bufs) == expect


def test_attr_and_entry_replies_too_small() -> None:
    e = Entry(nodeid=5, generation=3, attr=ODD_STAT, entry_timeout=1.0, attr_timeout=1.0)
    with pytest.raises(codec.ReplyTooLarge):
        codec.write_attr_out([bytearray(16), bytearray(50)], 1, AttrReply(ODD_STAT, 1.0))
    with pytest.raises(codec.ReplyTooLarge):
        codec.write_entry_out([bytearray(100)], 1, e)


@pytest.mark.parametrize(
    ("sizes", "where"),
    [([120], (0, 16)), ([16, 104], (1, 0)), ([16, 200], (1, 0)), ([20, 100], None), ([16], None)],
)
def test_body_place(sizes: list[int], where: tuple[int, int] | None) -> None:
    bufs = [bytearray(n) for n in sizes]
    got = codec.body_place(bufs, 104)
    if where is None:
        assert got is None
    else:
        assert got is not None and got[0] is bufs[where[0]] and got[1] == where[1]
