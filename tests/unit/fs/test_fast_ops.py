"""The passthrough's fast operations (virtiofsd_py/fastops) against the dispatcher.

Differential: random requests of the covered opcodes (valid, truncated,
lying lengths, unknown ids, huge sizes and offsets), split at random places,
give the same used length, the same writable bytes and the same file
contents through either twin's ``handle`` as through ``Dispatcher.handle``
on the same ``PassthroughFS``, or are declined without changing anything.
Then the rules that make them decline, and the fd-reuse stress test of the
compiled twin's mirrored tables.
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from dispatcher_rig import call, init_args, split_at
from dispatcher_rig import request as _request
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from virtiofsd_py import fastops
from virtiofsd_py.fastops import DECLINED, PureFastOps
from virtiofsd_py.fs.api import Context
from virtiofsd_py.fs.passthrough.filesystem import PassthroughConfig, PassthroughFS
from virtiofsd_py.fs.passthrough.idmap import IdMap
from virtiofsd_py.fs.passthrough.migration.config import MigrationConfig
from virtiofsd_py.fs.passthrough.migration.migratable import PassthroughMigration
from virtiofsd_py.fs.readonly import ReadOnlyFS
from virtiofsd_py.fuse import abi
from virtiofsd_py.fuse.dispatcher import Dispatcher, FuseConfig
from virtiofsd_py.migration.envelope import StateProvider

try:
    from virtiofsd_py.fastops._cpassthrough import FastOps as CompiledFastOps
except ImportError:  # not built: the compiled cases are skipped
    CompiledFastOps = None

TWINS = [
    pytest.param(PureFastOps, id="pure"),
    pytest.param(
        CompiledFastOps,
        id="compiled",
        marks=pytest.mark.skipif(CompiledFastOps is None, reason="compiled core not built"),
    ),
]

S64_MAX = (1 << 63) - 1
CTX = Context(0, 0, 0)
FILES = {b"a": os.urandom(9000), b"b": b"short file\n", b"empty": b""}


def request(opcode: int, args: bytes = b"", nodeid: int = 1, **kw: Any) -> tuple[bytes, int]:
    return _request(opcode, args, nodeid=nodeid, uid=0, gid=0, **kw)


@dataclass
class Rig:
    share: Path
    fs: PassthroughFS
    d: Dispatcher
    fast: Any
    nodes: dict[bytes, int] = field(default_factory=dict)
    fhs: list[tuple[int, int]] = field(default_factory=list)  # (nodeid, fh)

    def lookup(self, name: bytes) -> int:
        r = call(self.d, request(abi.FUSE_LOOKUP, name + b"\0"))
        assert r.error == 0, r.error
        nodeid = int(abi.ENTRY_OUT.unpack_from(r.body)[0])
        self.nodes[name] = nodeid
        return nodeid

    def open(self, name: bytes, flags: int) -> int:
        """Open ``name`` on the backend itself (also for writing behind --readonly)."""
        nodeid = self.nodes[name]
        ctx = CTX
        if flags & os.O_DIRECTORY:
            fh = self.fs.opendir(ctx, nodeid, flags).fh
        else:
            fh = self.fs.open(ctx, nodeid, flags).fh
        self.fhs.append((nodeid, fh))
        return fh

    def contents(self) -> dict[bytes, bytes]:
        """The files' bytes, read without touching their atime (GETATTR shows it)."""
        out = {}
        for n in FILES:
            fd = os.open(self.share / n.decode(), os.O_RDONLY | os.O_NOATIME)
            try:
                out[n] = os.pread(fd, 1 << 20, 0)
            finally:
                os.close(fd)
        return out

    def restore(self, before: dict[bytes, bytes]) -> None:
        for n, data in before.items():
            fd = os.open(self.share / n.decode(), os.O_WRONLY)
            try:
                os.pwrite(fd, data, 0)
                os.ftruncate(fd, len(data))
            finally:
                os.close(fd)


def make_rig(
    share: Path,
    twin: Any,
    *,
    config: FuseConfig | None = None,
    readonly: bool = False,
    init: bool = True,
    **pt: Any,
) -> Rig:
    for name, data in FILES.items():
        (share / name.decode()).write_bytes(data)
    (share / "dir").mkdir(exist_ok=True)
    if not (share / "fifo").exists():
        os.mkfifo(share / "fifo")
    fs = PassthroughFS(PassthroughConfig(shared_dir=share, **pt))
    fast = twin(fs, readonly=readonly)
    served = ReadOnlyFS(fs) if readonly else fs
    d = Dispatcher(served, config or FuseConfig(), on_session=fast.session_changed)
    rig = Rig(share, fs, d, fast)
    if init:
        assert call(d, request(abi.FUSE_INIT, init_args(flags2=0xFFFF_FFFF))).error == 0
        for name in (b"a", b"b", b"empty", b"dir", b"fifo"):
            rig.lookup(name)
        rig.open(b"a", os.O_RDWR)
        rig.open(b"b", os.O_RDONLY)
        rig.open(b"a", os.O_WRONLY)
        rig.open(b"dir", os.O_RDONLY | os.O_DIRECTORY)
        rig.open(b"empty", os.O_RDWR | os.O_APPEND)
    return rig


@pytest.fixture(params=TWINS)
def rig(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Rig]:
    share = tmp_path / "share"
    share.mkdir()
    r = make_rig(share, request.param)
    yield r
    r.fast.close()
    r.fs.close()


# -- requests ----------------------------------------------------------------------

OPS = (abi.FUSE_GETATTR, abi.FUSE_READ, abi.FUSE_WRITE, abi.FUSE_FLUSH, abi.FUSE_STATFS)
U64 = st.one_of(
    st.integers(0, 64), st.integers(0, (1 << 64) - 1), st.sampled_from([S64_MAX, S64_MAX + 1])
)
U32 = st.one_of(st.integers(0, 70000), st.integers(0, (1 << 32) - 1))


@st.composite
def requests(draw: st.DrawFn, rig: Rig) -> tuple[list[bytearray], list[bytearray], int]:
    opcode = draw(st.sampled_from(OPS))
    known = [n for n, _ in rig.fhs] + list(rig.nodes.values()) + [1]
    if draw(st.booleans()):
        nodeid, fh = draw(st.sampled_from(rig.fhs))
    else:
        nodeid = draw(st.one_of(st.sampled_from(known), U64))
        fh = draw(st.one_of(st.sampled_from([f for _, f in rig.fhs]), U64))
    data = b""
    if opcode == abi.FUSE_GETATTR:
        flags = draw(st.sampled_from([0, abi.FUSE_GETATTR_FH, 0xFFFFFFFF]))
        args = abi.GETATTR_IN.pack(flags, 0, fh)
    elif opcode == abi.FUSE_READ:
        offset = draw(st.one_of(st.integers(0, 10000), U64))
        size = draw(st.one_of(st.integers(0, 10000), U32))
        args = abi.READ_IN.pack(fh, offset, size, 0, 0, 0, 0)
    elif opcode == abi.FUSE_WRITE:
        offset = draw(st.one_of(st.integers(0, 10000), U64))
        data = draw(st.binary(max_size=5000))
        size = len(data) if draw(st.booleans()) else draw(U32)
        wflags = draw(st.sampled_from([0, abi.FUSE_WRITE_KILL_SUIDGID, 0xFFFFFFFF]))
        args = abi.WRITE_IN.pack(fh, offset, size, wflags, 0, 0, 0) + data
    elif opcode == abi.FUSE_FLUSH:
        args = abi.FLUSH_IN.pack(fh, 0, 0, draw(U64))
    else:
        args = b""
    length = None
    if draw(st.integers(0, 9)) == 0:
        length = draw(st.integers(0, 40 + len(args) + 64))
    ext = b""
    if draw(st.integers(0, 19)) == 0:
        ext = bytes(8)
    raw, _ = request(opcode, args, nodeid, length=length, ext=ext)
    if draw(st.integers(0, 9)) == 0:
        raw = raw[: draw(st.integers(0, len(raw)))]
    cuts = draw(st.lists(st.integers(0, max(0, len(raw))), max_size=4))
    readable = split_at(raw, [40, *cuts])
    wsizes = draw(
        st.one_of(
            st.just([16, 16384]),
            st.lists(st.integers(0, 5000), min_size=1, max_size=5),
        )
    )
    writable = [bytearray(b"\xa5" * n) for n in wsizes]
    return readable, writable, opcode


def copy(bufs: Sequence[bytearray]) -> list[bytearray]:
    return [bytearray(b) for b in bufs]


def views(bufs: Sequence[bytearray]) -> list[memoryview]:
    return [memoryview(b) for b in bufs]


def compare(rig: Rig, readable: list[bytearray], writable: list[bytearray]) -> int:
    """Run one request both ways; returns the fast path's answer."""
    before = rig.contents()
    w_fast = copy(writable)
    n_fast = rig.fast.handle(views(copy(readable)), views(w_fast))
    if n_fast == DECLINED:
        assert rig.contents() == before, "declined after changing a file"
        return n_fast
    after_fast = rig.contents()
    if after_fast != before:
        rig.restore(before)  # new mtimes: only after a WRITE, whose reply shows none
    w_py = copy(writable)
    n_py = rig.d.handle(views(copy(readable)), views(w_py))
    assert n_fast == n_py
    assert settled(w_fast) == settled(w_py)
    assert after_fast == rig.contents()
    return n_fast


def settled(writable: Sequence[bytearray]) -> bytes:
    """The chain's bytes, with a STATFS reply's free counts (which any process
    writing to the same file system changes meanwhile) blanked out."""
    flat = bytearray(b"".join(writable))
    if len(flat) >= 16 + abi.STATFS_OUT.size:
        length, error, _ = abi.OUT_HEADER.unpack_from(flat)
        if error == 0 and length == 16 + abi.STATFS_OUT.size:
            flat[24:40] = bytes(16)  # bfree, bavail
            flat[48:56] = bytes(8)  # ffree
    return bytes(flat)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_same_replies_as_the_dispatcher(rig: Rig, data: st.DataObject) -> None:
    readable, writable, _ = data.draw(requests(rig))
    compare(rig, readable, writable)


def test_the_common_requests_are_answered(rig: Rig) -> None:
    nodeid_a, fh_rw = rig.fhs[0]
    cases = [
        request(abi.FUSE_GETATTR, abi.GETATTR_IN.pack(0, 0, 0), nodeid_a),
        request(abi.FUSE_GETATTR, abi.GETATTR_IN.pack(0, 0, 0), 1),
        request(abi.FUSE_GETATTR, abi.GETATTR_IN.pack(abi.FUSE_GETATTR_FH, 0, fh_rw), nodeid_a),
        request(abi.FUSE_READ, abi.READ_IN.pack(fh_rw, 100, 4096, 0, 0, 0, 0), nodeid_a),
        request(abi.FUSE_READ, abi.READ_IN.pack(fh_rw, 1 << 40, 4096, 0, 0, 0, 0), nodeid_a),
        request(abi.FUSE_WRITE, abi.WRITE_IN.pack(fh_rw, 10, 5, 0, 0, 0, 0) + b"hello", nodeid_a),
        request(abi.FUSE_FLUSH, abi.FLUSH_IN.pack(fh_rw, 0, 0, 7), nodeid_a),
        request(abi.FUSE_STATFS, b"", nodeid_a),
        request(abi.FUSE_STATFS, b"", rig.nodes[b"fifo"]),
        # A directory handle: the host's EISDIR, answered as the dispatcher does.
        request(abi.FUSE_READ, abi.READ_IN.pack(rig.fhs[3][1], 0, 10, 0, 0, 0, 0), rig.fhs[3][0]),
        # A write-only handle read: EBADF from the host.
        request(abi.FUSE_READ, abi.READ_IN.pack(rig.fhs[2][1], 0, 10, 0, 0, 0, 0), nodeid_a),
    ]
    for raw, _ in cases:
        for split in ([40], [40, 60], [3, 41, 50]):
            for wsizes in ([16, 8192], [120], [7, 30, 5000]):
                writable = [bytearray(b"\x5a" * n) for n in wsizes]
                assert compare(rig, split_at(raw, split), writable) != DECLINED


# -- when they decline ----------------------------------------------------------------


def answered(rig: Rig, raw: bytes, wsizes: Sequence[int] = (16, 8192)) -> bool:
    return compare(rig, split_at(raw, [40]), [bytearray(n) for n in wsizes]) != DECLINED


def getattr_req(nodeid: int) -> bytes:
    return request(abi.FUSE_GETATTR, abi.GETATTR_IN.pack(0, 0, 0), nodeid)[0]


def write_req(nodeid: int, fh: int, wflags: int = 0) -> bytes:
    args = abi.WRITE_IN.pack(fh, 0, 3, wflags, 0, 0, 0) + b"xyz"
    return request(abi.FUSE_WRITE, args, nodeid)[0]


def test_declined_without_a_session(rig: Rig) -> None:
    nodeid, _ = rig.fhs[0]
    assert answered(rig, getattr_req(nodeid))
    rig.fast.session_changed(None)
    assert not answered(rig, getattr_req(nodeid))
    # DESTROY through the dispatcher: no session, empty tables.
    rig.d.handle(split_at(request(abi.FUSE_DESTROY)[0], [40]), [bytearray(16)])
    assert rig.d.session is None
    assert rig.fast.handle(split_at(getattr_req(1), [40]), [bytearray(200)]) == DECLINED


def test_a_migrated_session_arms_them(rig: Rig) -> None:
    state = rig.d.export_session()
    rig.d.reset()
    assert rig.fast.handle(split_at(getattr_req(1), [40]), [bytearray(200)]) == DECLINED
    rig.d.restore_session(state)
    assert rig.fast.handle(split_at(getattr_req(1), [40]), [bytearray(200)]) == 120


def test_unknown_and_forgotten_ids_are_declined(rig: Rig) -> None:
    nodeid, fh = rig.fhs[1]
    assert not answered(rig, getattr_req(999))
    assert not answered(rig, write_req(nodeid + 1, fh))  # fh of another node
    rig.fs.release(CTX, nodeid, fh, 0)
    assert not answered(rig, write_req(nodeid, fh))
    fifo = rig.nodes[b"fifo"]
    assert answered(rig, getattr_req(fifo))
    rig.fs.forget(fifo, 1)
    assert not answered(rig, getattr_req(fifo))


def test_short_writable_buffers_are_declined(rig: Rig) -> None:
    nodeid, fh = rig.fhs[0]
    assert not answered(rig, getattr_req(nodeid), (16, 100))
    assert not answered(rig, write_req(nodeid, fh), (20,))
    assert answered(rig, write_req(nodeid, fh), (24,))


def test_flush_with_lock_owners_is_declined(rig: Rig) -> None:
    nodeid, fh = rig.fhs[0]
    flush_req = request(abi.FUSE_FLUSH, abi.FLUSH_IN.pack(fh, 0, 0, 42), nodeid)
    flush = flush_req[0]
    assert answered(rig, flush)
    lk = abi.LK_IN.pack(fh, 42, 0, 10, 1, 0, 0, 0)  # F_WRLCK of owner 42
    assert call(rig.d, request(abi.FUSE_SETLK, lk, nodeid)).error == 0
    assert len(rig.fs.locks) == 1
    assert not answered(rig, flush)
    assert call(rig.d, flush_req).n == 16  # the dispatcher drops the owner
    assert len(rig.fs.locks) == 0
    assert answered(rig, flush)


@pytest.mark.parametrize("twin", TWINS)
@pytest.mark.parametrize(
    "variant",
    ["readonly", "killpriv_v2", "translate", "file_handles"],
)
def test_configurations_they_do_not_mirror(twin: Any, variant: str, tmp_path: Path) -> None:
    share = tmp_path / "share"
    share.mkdir()
    kw: dict[str, Any] = {}
    if variant == "readonly":
        kw["readonly"] = True
    elif variant == "killpriv_v2":
        kw["killpriv_v2"] = True
        kw["config"] = FuseConfig(killpriv_v2=True)
    elif variant == "translate":
        kw["uid_map"] = IdMap([f"guest:0:{os.getuid()}:1"])
    else:
        kw["inode_file_handles"] = "prefer"
    try:
        r = make_rig(share, twin, **kw)
    except (OSError, ValueError) as e:
        pytest.skip(f"{variant} not available here: {e}")
    try:
        nodeid, fh = r.fhs[1] if variant == "readonly" else r.fhs[0]
        if variant == "readonly":
            assert answered(r, getattr_req(nodeid))
            assert not answered(r, write_req(nodeid, fh))
        elif variant == "killpriv_v2":
            assert answered(r, write_req(nodeid, fh))
            assert not answered(r, write_req(nodeid, fh, abi.FUSE_WRITE_KILL_SUIDGID))
        elif variant == "translate":
            assert not answered(r, getattr_req(nodeid))
            assert answered(r, write_req(nodeid, fh))
        else:
            assert answered(r, getattr_req(1))  # the root keeps its fd
            assert not answered(r, getattr_req(nodeid))  # a handle node has none
            read = abi.READ_IN.pack(fh, 0, 100, 0, 0, 0, 0)
            assert answered(r, request(abi.FUSE_READ, read, nodeid)[0])
    finally:
        r.fast.close()
        r.fs.close()


def test_opcodes_mask_is_the_covered_set(rig: Rig) -> None:
    assert rig.fast.opcodes == sum(1 << op for op in fastops.OPCODES)


def test_the_chosen_twin_is_recorded() -> None:
    from virtiofsd_py.host import native

    if native.PURE or CompiledFastOps is None:
        assert fastops.FastOps is PureFastOps
    else:
        assert fastops.FastOps is CompiledFastOps
        assert CompiledFastOps is not None
        cap = CompiledFastOps.capsule  # noqa: F841 (the compiled twin has the C interface)


# -- the fd of a released handle is never used -------------------------------------------


@pytest.mark.parametrize("twin", TWINS)
def test_reads_never_see_a_reused_fd(twin: Any, tmp_path: Path) -> None:
    """Fast READs of handle X race RELEASE of X and OPENs of another file, whose
    fd may get X's number: every answer is X's data, an error or a decline."""
    share = tmp_path / "share"
    share.mkdir()
    r = make_rig(share, twin)
    size = 4096
    (share / "x").write_bytes(b"X" * size)
    (share / "y").write_bytes(b"Y" * size)
    x, y = r.lookup(b"x"), r.lookup(b"y")
    widen = getattr(r.fast, "_widen_race_window", None)
    if widen is not None:
        widen(1_000_000)  # 1 ms between finding X's fd and reading it
    stop = threading.Event()
    bad: list[bytes] = []
    current: list[int] = [r.open(b"x", os.O_RDONLY)]
    counts = {"answered": 0, "declined": 0}

    def reader() -> None:
        while not stop.is_set():
            fh = current[0]
            raw = request(abi.FUSE_READ, abi.READ_IN.pack(fh, 0, size, 0, 0, 0, 0), x)[0]
            w = bytearray(16 + size)
            n = r.fast.handle([memoryview(bytearray(raw))], [memoryview(w)])
            if n == DECLINED:
                counts["declined"] += 1
                continue
            counts["answered"] += 1
            _, error, _ = abi.OUT_HEADER.unpack_from(w)
            if error == 0 and w[16:n] != b"X" * (n - 16):
                bad.append(bytes(w[16:32]))

    def churn(rounds: int) -> None:
        for _ in range(rounds):
            fh = current[0]
            r.fs.release(CTX, x, fh, 0)
            ys = [r.open(b"y", os.O_RDONLY) for _ in range(3)]  # likely X's old fd number
            current[0] = r.open(b"x", os.O_RDONLY)
            for yfh in ys:
                r.fs.release(CTX, y, yfh, 0)

    readers = [threading.Thread(target=reader) for _ in range(3)]
    for t in readers:
        t.start()
    try:
        churn(400)
    finally:
        stop.set()
        for t in readers:
            t.join(timeout=30)
    r.fast.close()
    r.fs.close()
    assert not bad, bad[:3]
    assert counts["answered"] > 0


# -- live migration ----------------------------------------------------------------------


@pytest.mark.parametrize("twin", TWINS)
@pytest.mark.parametrize("on_error", ["abort", "guest-error"])
def test_migrated_tables_are_served_on_the_destination(
    twin: Any, on_error: str, tmp_path: Path
) -> None:
    """The destination's fast operations answer for the nodes and handles the
    migration state brought (restored tables reach the mirror, the restored
    session arms them); ``guest-error`` finds most nodes after the load."""
    share = tmp_path / "share"
    share.mkdir()
    src = make_rig(share, twin)
    dst_fs = PassthroughFS(PassthroughConfig(shared_dir=share))
    dst_fast = twin(dst_fs)
    dst = Dispatcher(dst_fs, FuseConfig(), on_session=dst_fast.session_changed)
    try:
        nodeid, fh = src.fhs[0]
        cfg = MigrationConfig(on_error=on_error)  # type: ignore[arg-type]
        data = StateProvider(src.d, PassthroughMigration(src.fs, cfg), str(share)).save()
        StateProvider(dst, PassthroughMigration(dst_fs, cfg), str(share)).load(data)
        assert dst.session is not None
        dst_fs.settle_migration()  # every node found (guest-error: after the load)
        rig = Rig(share, dst_fs, dst, dst_fast)
        read = abi.READ_IN.pack(fh, 0, 100, 0, 0, 0, 0)
        for raw in (getattr_req(nodeid), request(abi.FUSE_READ, read, nodeid)[0]):
            assert answered(rig, raw)
        body = bytearray(16 + 100)
        assert dst_fast.handle(split_at(request(abi.FUSE_READ, read, nodeid)[0], [40]), [body]) > 0
        assert bytes(body[16:]) == FILES[b"a"][:100]
    finally:
        dst_fast.close()
        dst_fs.close()
        src.fast.close()
        src.fs.close()


# -- the C interface (include/vfsd_fastops.h) ----------------------------------------------


class _Iovec(ctypes.Structure):
    _fields_ = (("base", ctypes.c_void_p), ("len", ctypes.c_size_t))


class _Chain(ctypes.Structure):  # struct vfsd_chain
    _fields_ = (
        ("rd", ctypes.POINTER(_Iovec)),
        ("nrd", ctypes.c_uint32),
        ("rd_len", ctypes.c_uint64),
        ("wr", ctypes.POINTER(_Iovec)),
        ("nwr", ctypes.c_uint32),
        ("wr_len", ctypes.c_uint64),
    )


_FastFn = ctypes.CFUNCTYPE(ctypes.c_int64, ctypes.c_void_p, ctypes.POINTER(_Chain))


class _Ops(ctypes.Structure):  # struct vfsd_fast_ops
    _fields_ = (
        ("abi", ctypes.c_uint32),
        ("ctx", ctypes.c_void_p),
        ("handle", _FastFn),
        ("opcodes", ctypes.c_uint64),
    )


@pytest.mark.skipif(CompiledFastOps is None, reason="compiled core not built")
def test_the_capsule_answers_as_handle_does(tmp_path: Path) -> None:
    """What a compiled worker gets: the capsule's struct vfsd_fast_ops, whose
    handle() answers a chain of raw iovecs as ``handle`` does."""
    share = tmp_path / "share"
    share.mkdir()
    r = make_rig(share, CompiledFastOps)
    try:
        cap = r.fast.capsule()
        get = ctypes.pythonapi.PyCapsule_GetPointer
        get.restype = ctypes.c_void_p
        get.argtypes = (ctypes.py_object, ctypes.c_char_p)
        ops = _Ops.from_address(get(cap, b"virtiofsd_py.vfsd_fast_ops"))
        assert ops.abi == 1
        assert ops.opcodes == r.fast.opcodes
        nodeid, fh = r.fhs[0]
        raw = request(abi.FUSE_READ, abi.READ_IN.pack(fh, 0, 64, 0, 0, 0, 0), nodeid)[0]
        rd = ctypes.create_string_buffer(raw, len(raw))
        out_hdr, data = ctypes.create_string_buffer(16), ctypes.create_string_buffer(64)
        rd_iov = (_Iovec * 1)(_Iovec(ctypes.addressof(rd), len(raw)))
        wr_iov = (_Iovec * 2)(
            _Iovec(ctypes.addressof(out_hdr), 16), _Iovec(ctypes.addressof(data), 64)
        )
        chain = _Chain(rd_iov, 1, len(raw), wr_iov, 2, 80)
        assert ops.handle(ops.ctx, ctypes.byref(chain)) == 80
        assert data.raw == FILES[b"a"][:64]
        assert abi.OUT_HEADER.unpack(out_hdr.raw)[:2] == (80, 0)
        lookup = request(abi.FUSE_LOOKUP, b"a\0")[0]
        rd2 = ctypes.create_string_buffer(lookup, len(lookup))
        chain.rd = (_Iovec * 1)(_Iovec(ctypes.addressof(rd2), len(lookup)))
        chain.rd_len = len(lookup)
        assert ops.handle(ops.ctx, ctypes.byref(chain)) == DECLINED
        del cap
    finally:
        r.fast.close()
        r.fs.close()
