"""The metadata fast paths (issue 7): one-pack dirent records, CREATE and empty
replies packed in place, and the passthrough READDIR(PLUS) batches.

Each fast path is checked against the generic packing it replaces, byte for
byte, and READDIRPLUS through the dispatcher against the host's listing and
the lookup counts fuse.h asks for.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from test_fuse_codec import ODD_STAT, ref_entry

from virtiofsd_py.fs.api import ROOT_ID, Context, Entry, Opened
from virtiofsd_py.fs.passthrough.filesystem import PassthroughConfig, PassthroughFS
from virtiofsd_py.fuse import abi, codec
from virtiofsd_py.fuse.dispatcher import Dispatcher

_STAT = ODD_STAT  # every field at an edge (test_fuse_codec)

names = st.binary(min_size=1, max_size=300).filter(lambda b: b"\0" not in b and b"/" not in b)


def _entry(nodeid: int = 5, timeout: float = 1.25) -> Entry:
    return Entry(nodeid, 3, _STAT, timeout, 2.0, submount=True)


@given(names, st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1), st.integers(0, 15))
def test_dirent_matches_generic_packing(name: bytes, ino: int, off: int, dtype: int) -> None:
    size = abi.dirent_size(len(name))
    expect = bytearray(b"\xee" * (size + 8))
    codec.pack_dirent(memoryview(expect), 0, ino, off, dtype, name)
    got = bytearray(b"\xee" * (size + 8))
    assert codec.DirentPacker(memoryview(got), size).dirent(0, ino, off, dtype, name) == size
    assert got == expect
    # One byte short: nothing written.
    untouched = bytearray(b"\xee" * (size + 8))
    assert codec.DirentPacker(memoryview(untouched), size - 1).dirent(0, ino, off, 0, name) == 0
    assert untouched == b"\xee" * (size + 8)


@given(names, st.booleans(), st.integers(0, 2**64 - 1))
def test_direntplus_matches_generic_packing(name: bytes, dot: bool, off: int) -> None:
    e = None if dot else _entry()
    size = abi.direntplus_size(len(name))
    vals = (0,) * len(abi.ENTRY_OUT_FIELDS) if e is None else ref_entry(e)
    rec = abi.DIRENTPLUS.pack(*vals, 77, off, len(name), 4) + name
    expect = bytearray(rec.ljust(size, b"\0") + b"\xee" * 8)
    generic = bytearray(b"\xee" * (size + 8))
    assert codec.pack_direntplus(memoryview(generic), 0, e, 77, off, 4, name) == size
    assert generic == expect
    got = bytearray(b"\xee" * (size + 8))
    packer = codec.DirentPacker(memoryview(got), size)
    assert packer.direntplus(0, e, 77, off, 4, name) == size
    assert got == expect
    assert packer.direntplus(8, e, 77, off, 4, name) == 0  # does not fit: nothing written
    assert got == expect


def test_direntplus_timeouts_follow_each_entry() -> None:
    """The cached timeout split is redone when an entry carries other timeouts."""
    buf = bytearray(4096)
    packer = codec.DirentPacker(memoryview(buf), len(buf))
    pos = 0
    for e in (_entry(5, 1.25), _entry(6, 1.25), _entry(7, 0.0), _entry(8, 1.25)):
        pos += packer.direntplus(pos, e, 1, 2, 8, b"name")
    size = abi.direntplus_size(4)
    got = [abi.DIRENTPLUS.unpack_from(buf, i * size)[:6] for i in range(4)]
    assert got == [
        (5, 3, 1, 2, 250_000_000, 0),
        (6, 3, 1, 2, 250_000_000, 0),
        (7, 3, 0, 2, 0, 0),
        (8, 3, 1, 2, 250_000_000, 0),
    ]


def _split(total: int, points: list[int]) -> list[bytearray]:
    cuts = sorted({p for p in points if 0 < p < total})
    edges = [0, *cuts, total]
    return [bytearray(b - a) for a, b in itertools.pairwise(edges)]


@given(st.lists(st.integers(0, 180), max_size=3))
def test_write_create_out_matches_generic_packing(points: list[int]) -> None:
    e = _entry()
    body = abi.ENTRY_OUT.size + abi.OPEN_OUT.size
    total = 16 + body
    expect = (
        abi.OUT_HEADER.pack(total, 0, 9)
        + abi.ENTRY_OUT.pack(*ref_entry(e))
        + abi.OPEN_OUT.pack(42, abi.FOPEN_DIRECT_IO | abi.FOPEN_KEEP_CACHE, 0)
    )
    opened = Opened(42, direct_io=True, keep_cache=True)
    bufs = _split(total, points)
    assert codec.write_create_out(bufs, 9, e, opened) == total
    assert b"".join(bufs) == expect
    with pytest.raises(codec.ReplyTooLarge):
        codec.write_create_out([bytearray(16), bytearray(body - 1)], 9, e, opened)


@pytest.mark.parametrize("sizes", [[16], [40], [8, 8], [3, 20], [16, 100]])
def test_write_empty_any_layout(sizes: list[int]) -> None:
    bufs = [bytearray(b"\xee" * n) for n in sizes]
    assert codec.write_empty(bufs, 12) == 16
    flat = b"".join(bufs)
    assert flat[:16] == abi.OUT_HEADER.pack(16, 0, 12) and flat[16:] == b"\xee" * (len(flat) - 16)
    with pytest.raises(codec.ReplyTooLarge):
        codec.write_empty([bytearray(10), bytearray(5)], 12)


# -- passthrough READDIR / READDIRPLUS through the dispatcher ------------------------

CTX = Context(0, 0, 0)


def _request(opcode: int, nodeid: int, args: bytes, unique: int = 2) -> bytes:
    total = abi.IN_HEADER.size + len(args)
    return abi.IN_HEADER.pack(total, opcode, unique, nodeid, 0, 0, 0, 0, 0) + args


def _records(data: bytes, plus: bool) -> list[tuple[bytes, int, int]]:
    """(name, cookie, nodeid) of each record of a READDIR(PLUS) reply body."""
    out = []
    pos = 0
    while pos < len(data):
        if plus:
            nodeid = abi.ENTRY_OUT.unpack_from(data, pos)[0]
            pos += abi.ENTRY_OUT.size
        else:
            nodeid = 0
        _, off, n, _ = abi.DIRENT.unpack_from(data, pos)
        start = pos + abi.DIRENT.size
        out.append((data[start : start + n], off, nodeid))
        pos += abi.dirent_size(n)
    return out


@pytest.mark.parametrize("plus", [True, False])
@pytest.mark.parametrize("namelen", [3, 200])
def test_passthrough_listing_in_pages(tmp_path: Path, plus: bool, namelen: int) -> None:
    """Page-sized replies cover the directory exactly once, whatever the name
    length (long names need more than the first, small getdents64 buffer);
    every direntplus with a node id counts one lookup (fuse.h), the entry that
    did not fit none."""
    share = tmp_path / "share"
    (share / "d").mkdir(parents=True)
    want = {f"{i:04d}".ljust(namelen, "x").encode() for i in range(150)}
    for n in want:
        (share / "d" / n.decode()).write_bytes(b"")
    fs = PassthroughFS(PassthroughConfig(shared_dir=str(share)))
    try:
        d = Dispatcher(fs)
        init = abi.INIT_IN.pack(7, 38, 1 << 17, abi.FUSE_DO_READDIRPLUS, 0, *(0,) * 11)
        out = [bytearray(16), bytearray(256)]
        assert d.handle([_request(abi.FUSE_INIT, 0, init)], out) > 16
        dirid = fs.lookup(CTX, ROOT_ID, b"d").nodeid
        fh = fs.opendir(CTX, dirid, os.O_RDONLY).fh
        op = abi.FUSE_READDIRPLUS if plus else abi.FUSE_READDIR
        seen: list[bytes] = []
        counted: dict[int, int] = {}
        cookie = 0
        for _ in range(200):
            args = abi.READ_IN.pack(fh, cookie, 4096, 0, 0, 0, 0)
            reply = [bytearray(16), bytearray(4096)]
            n = d.handle([_request(op, dirid, args)], reply)
            length, error, _ = abi.OUT_HEADER.unpack_from(reply[0])
            assert error == 0 and n == length
            recs = _records(bytes(reply[1][: n - 16]), plus)
            if not recs:
                break
            for name, off, nodeid in recs:
                seen.append(name)
                if nodeid:
                    counted[nodeid] = counted.get(nodeid, 0) + 1
                cookie = off
        assert sorted(seen) == sorted([b".", b"..", *want])
        if plus:
            assert len(counted) == len(want) and set(counted.values()) == {1}
            for nodeid in counted:
                node = fs.inodes.get(nodeid)
                assert node is not None and node.lookups == 1 and node.name in want
            fs.batch_forget([(n, 1) for n in counted])
        fs.releasedir(CTX, dirid, fh, 0)
        fs.forget(dirid, 1)
        assert len(fs.inodes) == 1  # nothing left counted
    finally:
        fs.close()
