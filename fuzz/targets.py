"""Fuzz targets: one function per component, bytes in, AssertionError on a broken rule.

Each target is deterministic for its input and cleans up after itself, so the
same function serves atheris (``fuzz/fuzz_*.py``, coverage guided) and
hypothesis (``tests/test_fuzz_targets.py``).  A target may only raise
``AssertionError`` (an invariant broke); any other exception escaping it is a
bug in the component under test.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import struct
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from virtiofsd_py import fastops
from virtiofsd_py.fs.api import Context
from virtiofsd_py.fs.passthrough.filesystem import PassthroughConfig, PassthroughFS
from virtiofsd_py.fs.passthrough.xattrmap import XattrMap
from virtiofsd_py.fuse import abi
from virtiofsd_py.fuse.dispatcher import Dispatcher, FuseConfig
from virtiofsd_py.testing.frontend import driver as drv
from virtiofsd_py.vhost import protocol as p
from virtiofsd_py.vhost.backend import BackendConfig, VhostUserBackend
from virtiofsd_py.vhost.connection import StateTransfers
from virtiofsd_py.virtio.memory import GuestMemory, map_region
from virtiofsd_py.virtio.runner import QueueRunner
from virtiofsd_py.virtio.types import MemoryRegion, VringAddr
from virtiofsd_py.virtio.virtqueue import Chain, ChainError, QueueError, SplitQueue

Target = Callable[[bytes], None]


class Bytes:
    """Consumes fuzz input as numbers and slices; runs dry as zeros."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def __len__(self) -> int:
        return len(self.data) - self.pos

    def take(self, n: int) -> bytes:
        out = self.data[self.pos : self.pos + n]
        self.pos += len(out)
        return out

    def int(self, size: int) -> int:
        return int.from_bytes(self.take(size).ljust(size, b"\0"), "little")

    def rest(self) -> bytes:
        return self.take(len(self))


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


# -- vhost-user framing and payload decoders ---------------------------------------
_DECODERS = (
    p.decode_u64,
    p.decode_vring_state,
    p.decode_vring_addr,
    p.decode_vring_fd,
    p.decode_mem_table,
    p.decode_single_region,
    p.decode_log_desc,
    p.decode_config,
    p.decode_device_state_params,
)


def vhost_codec(data: bytes) -> None:
    """FrameParser over any split of the stream, then every payload decoder.

    Rules: only ProtocolError; each message's payload has the size its header
    said; fds stay with the message they arrived with (none lost, none doubled).
    """
    b = Bytes(data)
    cuts = sorted({b.int(1) * 3 for _ in range(b.int(1) % 6)})
    stream = b.rest()
    parser = p.FrameParser()
    pieces = [stream[i:j] for i, j in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    fake_fd = 1000
    sent: list[int] = []
    got: list[int] = []
    messages: list[p.Message] = []
    try:
        for piece in pieces:
            if not piece:
                continue
            sent.append(fake_fd)
            for m in parser.feed(piece, [fake_fd]):
                messages.append(m)
                got.extend(m.fds)
            fake_fd += 1
    except p.ProtocolError:
        return
    got.extend(parser.pending_fds())
    assert sorted(got) == sent, "fds lost or duplicated by the frame parser"
    offset = 0
    for m in messages:
        request, flags, size = p.HEADER.unpack_from(stream, offset)
        assert (m.request, m.flags, len(m.payload)) == (request, flags, size)
        assert m.payload == stream[offset + p.HEADER_SIZE : offset + p.HEADER_SIZE + size]
        offset += p.HEADER_SIZE + size
        for decode in _DECODERS:
            with contextlib.suppress(p.ProtocolError):
                decode(m)


# -- descriptor-chain walker ---------------------------------------------------------
VQ_SIZE = 16
VQ_GPA = 0x10_0000
VQ_MEM = 64 * 1024


class _Ring:
    """A 64 KiB memfd mapped both as the driver's memory and the device's."""

    def __init__(self) -> None:
        self.dmem = drv.GuestMemory(VQ_MEM, gpa_base=VQ_GPA)
        self.mem = GuestMemory()
        region = MemoryRegion(VQ_GPA, self.dmem.size, self.dmem.user_addr, 0)
        self.mem.add(map_region(region, self.dmem.fd))
        self.desc = VQ_GPA
        self.avail = VQ_GPA + 16 * VQ_SIZE
        self.used = VQ_GPA + 4096

    def queue(self, event_idx: bool) -> SplitQueue:
        u = self.dmem.gpa_to_user
        addr = VringAddr(0, 0, u(self.desc), u(self.used), u(self.avail), 0)
        return SplitQueue(self.mem, VQ_SIZE, addr, event_idx=event_idx, base=0)

    def close(self) -> None:
        self.mem.clear()
        self.dmem.close()


_ring: _Ring | None = None


def _shared_ring() -> _Ring:
    global _ring
    if _ring is None:
        _ring = _Ring()
    return _ring


def _fill_ring(data: bytes) -> tuple[_Ring, bool]:
    """Descriptor table, avail ring and indirect tables straight from the input;
    returns the ring and whether EVENT_IDX is on."""
    r = _shared_ring()
    b = Bytes(data)
    mode = b.int(1)
    r.dmem.fill(VQ_GPA, VQ_MEM, 0)
    for i in range(VQ_SIZE):
        raw_addr = b.int(4)
        addr = (
            VQ_GPA + raw_addr % (VQ_MEM + 64) - 32
            if raw_addr & 0x8000_0000 == 0
            else raw_addr << 32
        )
        length = b.int(2) if mode & 1 else b.int(4)
        flags = b.int(1) & 7
        nxt = b.int(1) % (VQ_SIZE + 2)
        r.dmem.write(r.desc + 16 * i, drv.DESC.pack(addr % (1 << 64), length, flags, nxt))
    # The rest becomes memory that indirect descriptors may point into.
    blob = b.rest()[: VQ_MEM - 8192]
    r.dmem.write(VQ_GPA + 8192, blob)
    heads = blob[:VQ_SIZE] or b"\0"
    for slot, h in enumerate(heads):
        r.dmem.write(r.avail + 4 + 2 * slot, struct.pack("<H", h % (VQ_SIZE + 1)))
    r.dmem.write(r.avail + 2, struct.pack("<H", len(heads) if mode & 2 else mode << 4))
    return r, bool(mode & 4)


def virtqueue(data: bytes) -> None:
    """The pure walker (``SplitQueue``) on a ring made of the input.

    Addresses are biased into (and just around) the 64 KiB of guest memory so
    that indirect tables, loops and tables-inside-tables are reachable.
    Rules: only ChainError / QueueError; every view lies in guest memory; a
    chain never has more bytes than the memory has; at most ``VQ_SIZE`` pops.
    """
    r, event_idx = _fill_ring(data)
    q = r.queue(event_idx=event_idx)
    base = r.mem.regions[0].view
    for _ in range(VQ_SIZE + 1):
        try:
            chain = q.pop()
        except ChainError:
            continue
        except QueueError:
            return
        if chain is None:
            return
        total = 0
        for v in [*chain.readable, *chain.writable]:
            assert v.obj is base.obj, "a view outside guest memory"
            total += len(v)
        assert total <= VQ_MEM * (VQ_SIZE + 4096 // 16), "chain longer than possible"
        q.add_used(chain.head, 0)


def _outcome(pop: Callable[[], Chain | None], base: memoryview) -> object:
    try:
        chain = pop()
    except ChainError as e:
        return ("chain", e.head, e.reason)
    except QueueError as e:
        return ("queue", str(e))
    if chain is None:
        return None
    for v in [*chain.readable, *chain.writable]:
        assert v.obj is base.obj, "a view outside guest memory"
    return (
        chain.head,
        b"".join(bytes(v) for v in chain.readable),
        b"".join(bytes(v) for v in chain.writable),
        sum(n for _, n in chain.writable_gpas),
    )


def virtqueue_compiled(data: bytes) -> None:
    """The compiled walker (virtio/_cworker.pyx) against the pure one, on a ring
    made of the input as ``virtqueue`` makes it.

    Rules: the compiled walker gives the same chains (bytes readable and
    writable, bytes to log), the same errors and the same indices; every view
    it makes lies in guest memory.  Without the compiled core: the pure
    target.
    """
    from virtiofsd_py.virtio import workers

    if workers.CompiledQueueWorker is None:
        virtqueue(data)
        return
    from virtiofsd_py.virtio._cworker import Walker

    r, event_idx = _fill_ring(data)
    pure = r.queue(event_idx=event_idx)
    compiled = Walker(r.queue(event_idx=event_idx))
    base = r.mem.regions[0].view
    for _ in range(VQ_SIZE + 1):
        a, b = _outcome(pure.pop, base), _outcome(compiled.pop, base)
        assert a == b, f"pure {a!r} != compiled {b!r}"
        assert pure.last_avail_idx == compiled.last_avail_idx
        if a is None or a[0] == "queue":  # type: ignore[index]
            return


# -- vhost-user back-end state machine ------------------------------------------------
_FD_REQUESTS = {
    p.MessageType.SET_MEM_TABLE: "mem",
    p.MessageType.ADD_MEM_REG: "mem",
    p.MessageType.REM_MEM_REG: "mem",
    p.MessageType.SET_VRING_KICK: "event",
    p.MessageType.SET_VRING_CALL: "event",
    p.MessageType.SET_VRING_ERR: "event",
    p.MessageType.SET_LOG_FD: "event",
    p.MessageType.SET_LOG_BASE: "mem",
    p.MessageType.SET_BACKEND_REQ_FD: "event",
    p.MessageType.SET_DEVICE_STATE_FD: "pipe",
}
_REQUESTS = sorted(int(r) for r in p.MessageType)
BACKEND_MEM = 1 << 20


class _NullState:
    """A device-state provider with a small fixed state."""

    def save(self) -> bytes:
        return b"state" * 10

    def load(self, data: bytes) -> None:
        if data != b"state" * 10:
            raise ValueError("not our state")

    def log_all_changed(self, enabled: bool) -> None:
        pass


def _payload(b: Bytes, request: int, memfd_user: int) -> bytes:
    """Mostly well-formed payloads for ``request`` (so handlers get past decoding)."""
    kind = b.int(1)
    if kind & 0xC0 == 0xC0:
        return b.take(b.int(1) % 64)
    if request in (p.MessageType.SET_MEM_TABLE,):
        n = b.int(1) % 3
        regions = [
            p.MEM_REGION.pack(
                b.int(1) << 20, (b.int(1) % 3) << 19 or 4096, memfd_user + (b.int(1) << 12), 0
            )
            for _ in range(n)
        ]
        return struct.pack("<II", n, 0) + b"".join(regions)
    if request in (p.MessageType.ADD_MEM_REG, p.MessageType.REM_MEM_REG):
        size = (b.int(1) % 3) << 19 or 4096
        return struct.pack("<Q", 0) + p.MEM_REGION.pack(b.int(1) << 20, size, memfd_user, 0)
    if request in (p.MessageType.SET_VRING_ADDR,):
        return p.VRING_ADDR.pack(
            b.int(1) % 4, b.int(1) & 1, *(memfd_user + b.int(2) * 16 for _ in range(3)), b.int(2)
        )
    if request in (p.MessageType.SET_LOG_BASE,):
        return struct.pack("<QQ", b.int(3), b.int(2))
    if request in (p.MessageType.SET_DEVICE_STATE_FD,):
        return struct.pack("<II", b.int(1) % 3, b.int(1) % 2)
    if request in (p.MessageType.GET_CONFIG, p.MessageType.SET_CONFIG):
        return struct.pack("<III", b.int(1), b.int(1), 0) + b.take(b.int(1) % 32)
    if request in (
        p.MessageType.SET_VRING_NUM,
        p.MessageType.SET_VRING_BASE,
        p.MessageType.GET_VRING_BASE,
    ):
        return p.VRING_STATE.pack(b.int(1) % 4, 1 << (b.int(1) % 12) if kind & 1 else b.int(2))
    if request in (
        p.MessageType.SET_VRING_KICK,
        p.MessageType.SET_VRING_CALL,
        p.MessageType.SET_VRING_ERR,
        p.MessageType.SET_VRING_ENABLE,
    ):
        return p.U64.pack((b.int(1) % 4) | (b.int(1) & 1) << 8)
    return p.U64.pack(b.int(8))


def _fds(kind: str, mem_fd: int) -> list[int]:
    if kind == "mem":
        return [os.dup(mem_fd)]
    if kind == "event":
        return [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)]
    r, w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
    os.close(r)
    return [w]


async def _run_backend(data: bytes) -> None:
    loop = asyncio.get_running_loop()
    runner = QueueRunner(loop, lambda readable, writable: 0)
    backend = VhostUserBackend(runner, BackendConfig(max_queues=3, tag="fuzz"), state=_NullState())
    mem = drv.GuestMemory(BACKEND_MEM, gpa_base=0)
    transfers = StateTransfers()
    b = Bytes(data)
    try:
        while len(b):
            request = _REQUESTS[b.int(1) % len(_REQUESTS)]
            flags = p.VERSION | (p.FLAG_NEED_REPLY if b.int(1) & 1 else 0)
            payload = _payload(b, request, mem.user_addr)
            kind = _FD_REQUESTS.get(p.MessageType(request))
            extra = b.int(1)
            fds = _fds(kind, mem.fd) if kind and not extra & 0x80 else []
            if extra & 0x40:
                fds += _fds("event", mem.fd)  # an fd nobody asked for
            msg = p.Message(request, flags, payload, fds)
            reply = await asyncio.wait_for(backend.handle(msg), 5)
            if reply is not None and reply.transfer is not None:
                transfers.start(reply.transfer)  # as the connection does, once replied
            assert all(fd < 0 or fd not in fds for fd in msg.fds), "fd kept in the message"
            if reply is not None:
                r_req, r_flags, r_size = p.HEADER.unpack_from(reply.data)
                assert r_req == request and r_flags & p.FLAG_REPLY
                assert len(reply.data) == p.HEADER_SIZE + r_size
                for fd in reply.fds:
                    os.close(fd)
    finally:
        await asyncio.wait_for(transfers.cancel(), 5)
        await asyncio.wait_for(backend.close(), 5)
        runner.close()
        mem.close()


def vhost_backend(data: bytes) -> None:
    """A sequence of vhost-user messages (with fds) through the back-end.

    Rules: ``handle`` never raises nor hangs (5 s per message); replies are
    well-framed; after ``close`` every fd the back-end got is closed.
    """
    before = fd_count()
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(_run_backend(data))
    finally:
        loop.close()
    after = fd_count()
    assert after == before, f"fd leak: {before} -> {after}"


# -- FUSE dispatcher over the real passthrough backend -----------------------------------
_NAMES = (b"f", b"d", b"l", b"..", b".", b"a/b", b"a\0b", b"", b"x" * 300, b"f2", b"canary")


class _Share:
    """A share with a canary file beside it that must never change."""

    def __init__(self) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="vfsd-fuzz-"))
        self.root = self.base / "share"
        self.canary = self.base / "canary"
        self.canary_data = b"outside the share\n"

    def reset(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
        self.root.mkdir()
        self.canary.write_bytes(self.canary_data)
        os.chmod(self.canary, 0o644)
        (self.root / "f").write_bytes(b"file data" * 100)
        (self.root / "d").mkdir()
        (self.root / "d" / "f").write_bytes(b"inner")
        os.symlink("../canary", self.root / "l")
        os.symlink(str(self.canary), self.root / "abs")
        os.mkfifo(self.root / "fifo")

    def check(self) -> None:
        assert self.canary.read_bytes() == self.canary_data, "file outside the share changed"
        st = self.canary.stat()
        assert st.st_mode & 0o7777 == 0o644 and st.st_nlink == 1
        outside = sorted(x.name for x in self.base.iterdir())
        assert outside == ["canary", "share"], f"new files outside the share: {outside}"


_share: _Share | None = None


def _shared_share() -> _Share:
    global _share
    if _share is None:
        _share = _Share()
    return _share


def _fuse_request(b: Bytes, unique: int, nodes: Sequence[int], fhs: Sequence[int]) -> bytes:
    opcode = b.int(1) % 56 if b.int(1) & 7 else b.int(4)
    nodeid = nodes[b.int(1) % len(nodes)] if nodes else 1
    shape = b.int(1)
    if shape & 3 == 0:
        args = b.take(b.int(1))
    else:
        fh = fhs[b.int(1) % len(fhs)] if fhs else b.int(8)
        nums = struct.pack("<QQIIII", fh, b.int(2), b.int(4), b.int(4), b.int(4), 0)
        name = _NAMES[b.int(1) % len(_NAMES)]
        args = nums[: 8 * (shape >> 4)] + name + b"\0" + b.take(shape & 0xC)
    length = abi.IN_HEADER.size + len(args)
    if shape & 0x80 and len(b):
        length = b.int(4)  # a lying len
    return abi.IN_HEADER.pack(length, opcode, unique, nodeid, 0, 0, 1, 0, 0) + args


def _split(data: bytes, points: Sequence[int]) -> list[bytearray]:
    out = []
    prev = 0
    for cut in sorted({c % (len(data) + 1) for c in points}):
        out.append(bytearray(data[prev:cut]))
        prev = cut
    out.append(bytearray(data[prev:]))
    return [x for x in out if x]


def fuse_passthrough(data: bytes) -> None:
    """A FUSE session (INIT, requests, DESTROY) on a real passthrough share.

    Requests mix valid structs, truncated ones, lying ``len``, unknown
    opcodes, names with '/' or NUL, huge counts.  Rules: ``handle`` never
    raises; every reply is well-formed (``len`` = bytes written, matching
    ``unique``, error in -4095..0); nothing outside the share is read,
    changed or created; after DESTROY the backend holds no more fds than
    before the session.
    """
    share = _shared_share()
    share.reset()
    before = fd_count()
    xmap = XattrMap(":map:security.:user.virtiofs.:")
    fs = PassthroughFS(PassthroughConfig(shared_dir=share.root, xattr=True, xattrmap=xmap))
    d = Dispatcher(fs, FuseConfig())
    try:
        init = abi.INIT_IN.pack(7, 41, 65536, 0xFFFF_FFFF, 0xFFFF_FFFF, *([0] * 11))
        _handle(d, abi.IN_HEADER.pack(40 + len(init), abi.FUSE_INIT, 2, 0, 0, 0, 1, 0, 0) + init)
        b = Bytes(data)
        nodes: list[int] = [1]
        fhs: list[int] = []
        unique = 4
        while len(b):
            req = _fuse_request(b, unique, nodes, fhs)
            wsize = b.int(2) % 5000
            rsplit = [b.int(1) for _ in range(b.int(1) % 3)]
            reply = _handle(d, req, _split(req, rsplit), wsize)
            if reply is not None and len(reply) >= abi.OUT_HEADER.size + 8:
                err = abi.OUT_HEADER.unpack_from(reply)[1]
                value = struct.unpack_from("<Q", reply, abi.OUT_HEADER.size)[0]
                if err == 0 and 1 < value < 1 << 20:
                    (nodes if len(nodes) < 8 else fhs).append(value)
            unique += 2
        _handle(d, abi.IN_HEADER.pack(40, abi.FUSE_DESTROY, unique, 0, 0, 0, 1, 0, 0))
    finally:
        fs.destroy()
        fs.close()
    share.check()
    after = fd_count()
    assert after <= before, f"fd leak: {before} -> {after}"


def _handle(
    d: Dispatcher, req: bytes, readable: list[bytearray] | None = None, wsize: int = 4096
) -> bytes | None:
    writable = [bytearray(wsize)]
    n = d.handle(readable if readable is not None else [bytearray(req)], writable)
    assert 0 <= n <= wsize, f"reply of {n} bytes in {wsize}"
    if n == 0:
        return None
    assert n >= abi.OUT_HEADER.size
    length, error, unique = abi.OUT_HEADER.unpack_from(writable[0])
    assert length == n, f"out header len {length} != {n}"
    assert unique == abi.IN_HEADER.unpack_from(req.ljust(40, b"\0"))[2]
    assert -4095 <= error <= 0
    assert error == 0 or n == abi.OUT_HEADER.size
    return bytes(writable[0][:n])


# -- the passthrough's fast operations against the dispatcher ------------------------
_FAST_OPS = (
    abi.FUSE_GETATTR, abi.FUSE_READ, abi.FUSE_WRITE, abi.FUSE_FLUSH, abi.FUSE_STATFS, 0
)  # fmt: skip


def _fast_request(b: Bytes, unique: int, nodes: Sequence[int], fhs: Sequence[int]) -> bytes:
    """A request of a fast opcode (mostly well-formed), its fields from the input."""
    sel = b.int(1)
    opcode = _FAST_OPS[(sel & 7) % 6] or b.int(1) % 64
    nodeid = nodes[b.int(1) % len(nodes)] if sel >> 5 != 7 else b.int(8)
    fh = fhs[b.int(1) % len(fhs)] if sel >> 5 != 6 else b.int(8)
    wide = b.int(1)
    offset = b.int(8) if wide & 1 else b.int(2)
    size = b.int(4) if wide & 2 else b.int(2)
    flags = b.int(4) if wide & 4 else 0
    if opcode == abi.FUSE_GETATTR:
        args = abi.GETATTR_IN.pack(flags & abi.FUSE_GETATTR_FH if wide & 8 else flags, 0, fh)
    elif opcode == abi.FUSE_FLUSH:
        args = abi.FLUSH_IN.pack(fh, 0, 0, offset)
    elif opcode == abi.FUSE_STATFS:
        args = b""
    else:
        data = b.take(b.int(2) % 9000) if opcode == abi.FUSE_WRITE else b""
        if opcode == abi.FUSE_WRITE and wide & 16 == 0:
            size = len(data)
        args = abi.READ_IN.pack(fh, offset, size, flags, 0, 0, 0) + data
    length = abi.IN_HEADER.size + len(args)
    mode = b.int(1)
    if mode < 10:
        length = b.int(2)  # a lying len
    extlen = 1 if 18 <= mode < 24 else 0
    req = abi.IN_HEADER.pack(length, opcode, unique, nodeid, 0, 0, 1, extlen, 0) + args
    if 10 <= mode < 18:
        req = req[: b.int(2) % (len(req) + 1)]  # truncated
    return req


def _settled(writable: Sequence[memoryview]) -> bytes:
    """The chain's bytes, with a STATFS reply's free counts (which any process
    writing to the same file system changes meanwhile) blanked out."""
    flat = bytearray(b"".join(writable))
    statfs_reply = abi.OUT_HEADER.size + abi.STATFS_OUT.size
    if len(flat) >= statfs_reply:
        length, error, _ = abi.OUT_HEADER.unpack_from(flat)
        if error == 0 and length == statfs_reply:
            flat[24:40] = bytes(16)  # bfree, bavail
            flat[48:56] = bytes(8)  # ffree
    return bytes(flat)


def _contents(paths: Sequence[Path]) -> list[bytes]:
    out = []
    for path in paths:
        fd = os.open(path, os.O_RDONLY | os.O_NOATIME)
        try:
            out.append(os.pread(fd, 1 << 20, 0))
        finally:
            os.close(fd)
    return out


def fast_ops(data: bytes) -> None:
    """Random requests of the fast opcodes through both twins of the passthrough's
    fast operations (the compiled one when it is built) and through the dispatcher.

    Rules: a twin's answer is what the dispatcher answers, byte for byte (used
    length, every writable byte, the file's contents after); a declined
    request changed nothing; nothing outside the share changes; no fd leaks.
    """
    share = _shared_share()
    share.reset()
    before = fd_count()
    fs = PassthroughFS(PassthroughConfig(shared_dir=share.root))
    twins: list[fastops.FastOperations] = [fastops.PureFastOps(fs)]
    if fastops.FastOps is not fastops.PureFastOps:
        twins.append(fastops.for_passthrough(fs))

    def session(state: object) -> None:
        for t in twins:
            t.session_changed(state)  # type: ignore[arg-type]

    d = Dispatcher(fs, FuseConfig(), on_session=session)
    files = [share.root / "f", share.root / "d" / "f"]
    try:
        init = abi.INIT_IN.pack(7, 41, 65536, 0xFFFF_FFFF, 0xFFFF_FFFF, *([0] * 11))
        _handle(d, abi.IN_HEADER.pack(40 + len(init), abi.FUSE_INIT, 2, 0, 0, 0, 1, 0, 0) + init)
        ctx = Context(os.getuid(), os.getgid(), 1)
        f = fs.lookup(ctx, 1, b"f").nodeid
        sub = fs.lookup(ctx, 1, b"d").nodeid
        inner = fs.lookup(ctx, sub, b"f").nodeid
        fifo = fs.lookup(ctx, 1, b"fifo").nodeid
        nodes = [1, f, sub, inner, fifo, 999]
        fhs = [
            fs.open(ctx, f, os.O_RDWR).fh,
            fs.open(ctx, inner, os.O_RDONLY).fh,
            fs.open(ctx, f, os.O_WRONLY | os.O_APPEND).fh,
            fs.opendir(ctx, sub, os.O_RDONLY).fh,
            77,
        ]
        b = Bytes(data)
        unique = 4
        while len(b):
            req = _fast_request(b, unique, nodes, fhs)
            rsplit = [b.int(2) for _ in range(b.int(1) % 4)]
            layout = b.int(1)
            if layout & 3:  # as Linux lays out a reply: the out header, then the rest
                wsizes = [16, 4096 + 128]
            else:
                wsizes = [b.int(2) % 6000 for _ in range(1 + layout % 3)]
            for twin in twins:
                old = _contents(files)
                w_fast = [memoryview(bytearray(b"\xa5" * n)) for n in wsizes]
                n = twin.handle([memoryview(x) for x in _split(req, rsplit)], w_fast)
                if n == fastops.DECLINED:
                    assert _contents(files) == old, "a declined request changed a file"
                    continue
                new = _contents(files)
                if new != old:
                    for path, content in zip(files, old, strict=True):
                        path.write_bytes(content)
                w_py = [memoryview(bytearray(b"\xa5" * n)) for n in wsizes]
                n_py = d.handle([memoryview(x) for x in _split(req, rsplit)], w_py)
                assert n == n_py, f"{type(twin).__module__}: used length {n} != {n_py}"
                assert _settled(w_fast) == _settled(w_py), "reply bytes"
                assert _contents(files) == new, "file contents differ"
            unique += 2
    finally:
        for t in twins:
            t.close()
        fs.destroy()
        fs.close()
    share.check()
    after = fd_count()
    assert after <= before, f"fd leak: {before} -> {after}"


TARGETS: dict[str, Target] = {
    "vhost_codec": vhost_codec,
    "virtqueue": virtqueue,
    "virtqueue_compiled": virtqueue_compiled,
    "vhost_backend": vhost_backend,
    "fuse_passthrough": fuse_passthrough,
    "fast_ops": fast_ops,
}


def cleanup() -> Iterator[None]:
    """Remove what the targets keep between inputs (for tests)."""
    global _ring, _share
    yield
    if _ring is not None:
        _ring.close()
        _ring = None
    if _share is not None:
        shutil.rmtree(_share.base, ignore_errors=True)
        _share = None
