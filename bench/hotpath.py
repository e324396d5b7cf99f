"""In-process timing of the daemon's per-request Python path, without wake-ups.

``python3 -m bench.hotpath [--seconds S | --count N] [--qd N] [--scatter] [--profile]``

Builds the daemon's own objects (``GuestMemory``, ``SplitQueue``, ``Vring``,
``QueueRunner``, counted ``Dispatcher``, ``PassthroughFS`` on a temporary
directory) in this process, lays out request chains once as Linux's
virtio-fs driver does (in header, arguments, out header and reply in
descriptors of their own, data in 4 KiB pages, all in an indirect table),
and then times ``QueueRunner.process`` on batches of ``qd`` re-published
chains: what the daemon spends from "kick read" to "call written" (the
epoll wake-up and the kick-eventfd read are not included; use vhostbench
for end-to-end daemon CPU).  The time is wall clock of this thread, so it
still follows the host's load: for before/after comparisons run it under
callgrind (docs/benchmarks.md).  Every batch must complete or the run
stops.  ``--scatter`` leaves a page-sized gap after each data page (nothing
to merge); by default the pages of one request are adjacent, as a guest
with free memory often lays them out.  The metadata workloads
(``readdirplus readdir create unlink``, named explicitly) print µs per
directory entry for READDIR*; run them with ``TMPDIR=/dev/shm`` so that the
share's file system does not add disk noise.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import mmap
import os
import pstats
import random
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

from virtiofsd_py import fastops
from virtiofsd_py.app.metrics import Metrics
from virtiofsd_py.fs.api import Context
from virtiofsd_py.fs.passthrough.filesystem import PassthroughConfig, PassthroughFS
from virtiofsd_py.fuse import abi
from virtiofsd_py.fuse.dispatcher import Dispatcher
from virtiofsd_py.vhost.rings import Vring
from virtiofsd_py.virtio.memory import GuestMemory, map_region
from virtiofsd_py.virtio.runner import QueueRunner
from virtiofsd_py.virtio.types import MemoryRegion, VringAddr
from virtiofsd_py.virtio.virtqueue import (
    DESC,
    U16,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    SplitQueue,
)

PAGE = 4096
QSIZE = 256
MEM = 256 << 20
GPA_BASE = 0x1_0000_0000
UVA_BASE = 0x7F00_0000_0000
DATA_FILE = "data.bin"
DATA_SIZE = 32 << 20
WORKLOADS = ("getattr", "lookup", "read4k", "read1m", "write4k")
#: Metadata workloads (not in the default set): READDIRPLUS of a directory of
#: ``DIR_FILES`` files (one 4 KiB page per reply, as Linux asks; the entries'
#: lookups are FORGOTten between batches, outside the timing), CREATE of new
#: names and UNLINK of existing ones (files re-made / handles released
#: between batches, outside the timing).
META_WORKLOADS = ("readdirplus", "readdir", "create", "unlink")
DIR_NAME = "dir"
DIR_FILES = 1000


class Guest:
    """Driver side, just enough to re-publish prepared chains: a bump allocator."""

    def __init__(self, scatter: bool) -> None:
        self.fd = os.memfd_create("hotpath", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, MEM)
        self.view = memoryview(mmap.mmap(self.fd, MEM))
        self.next = PAGE
        self.scatter = scatter
        self.desc = self.alloc(16 * QSIZE)
        self.avail = self.alloc(6 + 2 * QSIZE)
        self.used = self.alloc(6 + 8 * QSIZE)
        self.avail_idx = 0
        self.free = list(range(QSIZE))

    def alloc(self, n: int, align: int = 64) -> int:
        off = -(-self.next // align) * align
        self.next = off + n
        return off

    def pages(self, n: int) -> list[int]:
        """``n`` data pages: adjacent, or (``--scatter``) each followed by a gap."""
        step = 2 * PAGE if self.scatter else PAGE
        start = self.alloc(n * step, PAGE)
        return [start + i * step for i in range(n)]

    def chain(self, readable: list[bytes], writable: list[int]) -> int:
        """An indirect chain: one descriptor per readable part and per writable size."""
        descs: list[tuple[int, int, int]] = []
        for part in readable:
            off = self.alloc(len(part))
            self.view[off : off + len(part)] = part
            descs.append((off, len(part), 0))
        for size in writable:
            off = self.pages(1)[0] if size == PAGE else self.alloc(size)
            descs.append((off, size, VIRTQ_DESC_F_WRITE))
        return self._table(descs)

    def data_chain(self, readable: list[bytes], out: int, pages: int, write: bool) -> int:
        """READ (reply pages writable) or WRITE (data pages readable) of ``pages`` pages."""
        descs: list[tuple[int, int, int]] = []
        for part in readable:
            off = self.alloc(len(part))
            self.view[off : off + len(part)] = part
            descs.append((off, len(part), 0))
        data = [(p, PAGE, 0 if write else VIRTQ_DESC_F_WRITE) for p in self.pages(pages)]
        if write:  # out header, then fuse_write_out
            descs += data
            descs += [(self.alloc(n), n, VIRTQ_DESC_F_WRITE) for n in (16, out)]
        else:
            descs.append((self.alloc(16), 16, VIRTQ_DESC_F_WRITE))
            descs += data
        return self._table(descs)

    def _table(self, descs: list[tuple[int, int, int]]) -> int:
        table = self.alloc(16 * len(descs), 16)
        for i, (off, n, flags) in enumerate(descs):
            last = i == len(descs) - 1
            DESC.pack_into(
                self.view, table + 16 * i, GPA_BASE + off, n,
                flags | (0 if last else VIRTQ_DESC_F_NEXT), 0 if last else i + 1,
            )  # fmt: skip
        head = self.free.pop(0)
        DESC.pack_into(
            self.view, self.desc + 16 * head, GPA_BASE + table, 16 * len(descs),
            VIRTQ_DESC_F_INDIRECT, 0,
        )  # fmt: skip
        return head

    def publish(self, heads: list[int]) -> None:
        for h in heads:
            U16.pack_into(self.view, self.avail + 4 + 2 * (self.avail_idx % QSIZE), h)
            self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        U16.pack_into(self.view, self.avail + 2, self.avail_idx)
        # used_event = what we consumed: ask for a call on the next completion.
        U16.pack_into(self.view, self.avail + 4 + 2 * QSIZE, self.avail_idx)

    def used_idx(self) -> int:
        return int(U16.unpack_from(self.view, self.used + 2)[0])


def in_header(opcode: int, nodeid: int, args_len: int, data_len: int = 0) -> bytes:
    """``fuse_in_header`` (re-published chains reuse their unique ids: fine here)."""
    total = abi.IN_HEADER.size + args_len + data_len
    return abi.IN_HEADER.pack(total, opcode, 2 * (opcode + 1), nodeid, 0, 0, 0, 0, 0)


@dataclass
class Setup:
    guest: Guest
    runner: QueueRunner
    ring: Vring
    dispatcher: Dispatcher
    #: Run after every timed batch, untimed: undoes what the batch did.
    reset: Callable[[], None] = lambda: None
    #: Units per request the time is divided by (directory entries for READDIR*).
    per_request: int = 1


def setup(share: str, scatter: bool, fast: str = "off") -> Setup:
    guest = Guest(scatter)
    memory = GuestMemory()
    memory.replace([map_region(MemoryRegion(GPA_BASE, MEM, UVA_BASE, 0), guest.fd)])
    addr = VringAddr(1, 0, UVA_BASE + guest.desc, UVA_BASE + guest.used, UVA_BASE + guest.avail, 0)
    q = SplitQueue(memory, QSIZE, addr, event_idx=True, base=0)
    ring = Vring(1, QSIZE, addr, started=True, enabled=True, queue=q)
    ring.call_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    fs = PassthroughFS(PassthroughConfig(shared_dir=share))
    ops = None
    if fast == "pure":
        ops = fastops.PureFastOps(fs)
    elif fast == "compiled":
        if fastops.FastOps is fastops.PureFastOps:
            raise SystemExit("the compiled fast operations are not built (or PUREPYTHON is set)")
        ops = fastops.for_passthrough(fs)
    dispatcher = Dispatcher(fs, on_session=ops.session_changed if ops is not None else None)
    handle = dispatcher.handle if ops is None else fastops.first(ops, dispatcher.handle)
    handler = Metrics().instrument(handle, timed=False)
    runner = QueueRunner(asyncio.new_event_loop(), handler)
    return Setup(guest, runner, ring, dispatcher)


def run_one(s: Setup, heads: list[int]) -> None:
    before = s.guest.used_idx()
    s.guest.publish(heads)
    s.runner.process(s.ring)
    if (s.guest.used_idx() - before) & 0xFFFF != len(heads):
        raise RuntimeError("not every request completed")


def prepare(s: Setup, workload: str, qd: int) -> list[int]:
    """``qd`` chains of ``workload``, laid out once and re-published."""
    g = s.guest
    root = abi.FUSE_ROOT_ID
    heads = []
    name = DATA_FILE.encode() + b"\0"
    if workload in META_WORKLOADS:
        return prepare_meta(s, workload, qd)
    s.reset = lambda: None
    s.per_request = 1
    if workload in ("read4k", "read1m", "write4k"):
        ctx = Context(0, 0, 0)
        nodeid = s.dispatcher.fs.lookup(ctx, root, DATA_FILE.encode()).nodeid
        fh = s.dispatcher.fs.open(ctx, nodeid, os.O_RDWR).fh
    for _ in range(qd):
        if workload == "getattr":
            args = abi.GETATTR_IN.pack(0, 0, 0)
            heads.append(g.chain([in_header(abi.FUSE_GETATTR, root, len(args)), args], [16, 104]))
        elif workload == "lookup":
            heads.append(g.chain([in_header(abi.FUSE_LOOKUP, root, len(name)), name], [16, 128]))
        elif workload in ("read4k", "read1m"):
            n = 1 if workload == "read4k" else 256
            off = random.randrange(DATA_SIZE // (n * PAGE)) * n * PAGE
            args = abi.READ_IN.pack(fh, off, n * PAGE, 0, 0, 0, 0)
            heads.append(
                g.data_chain([in_header(abi.FUSE_READ, nodeid, len(args)), args], 16, n, False)
            )
        elif workload == "write4k":
            off = random.randrange(DATA_SIZE // PAGE) * PAGE
            args = abi.WRITE_IN.pack(fh, off, PAGE, 0, 0, 0, 0)
            hdr = in_header(abi.FUSE_WRITE, nodeid, len(args), PAGE)
            heads.append(g.data_chain([hdr, args], abi.WRITE_OUT.size, 1, True))
    return heads


def _forget_all(s: Setup, dirid: int) -> None:
    """Give back every lookup of the nodes below ``dirid`` (untimed)."""
    fs = s.dispatcher.fs
    assert isinstance(fs, PassthroughFS)
    fs.batch_forget([(n.nodeid, n.lookups) for n in fs.inodes if n.parent == dirid])


def prepare_meta(s: Setup, workload: str, qd: int) -> list[int]:
    """``qd`` chains of a metadata workload (see ``META_WORKLOADS``)."""
    g = s.guest
    fs = s.dispatcher.fs
    assert isinstance(fs, PassthroughFS)
    ctx = Context(0, 0, 0)
    root = abi.FUSE_ROOT_ID
    dirid = fs.lookup(ctx, root, DIR_NAME.encode()).nodeid
    share = fs.config.shared_dir
    heads = []
    if workload in ("readdirplus", "readdir"):
        plus = workload == "readdirplus"
        fh = fs.opendir(ctx, dirid, os.O_RDONLY).fh
        op = abi.FUSE_READDIRPLUS if plus else abi.FUSE_READDIR
        # Each request starts at another page's worth of entries.
        cookies = [0]
        for de in fs.readdir(ctx, dirid, fh, 0, False):
            cookies.append(de.offset)
        per = PAGE // (abi.direntplus_size(7) if plus else abi.dirent_size(7))
        for i in range(qd):
            args = abi.READ_IN.pack(fh, cookies[(i * per) % DIR_FILES], PAGE, 0, 0, 0, 0)
            heads.append(g.chain([in_header(op, dirid, len(args)), args], [16, PAGE]))
        s.per_request = per
        s.reset = (lambda: _forget_all(s, dirid)) if plus else (lambda: None)
        return heads
    names = [f"n{i:06d}".encode() for i in range(qd)]
    for n in names:
        z = n + b"\0"
        if workload == "create":
            args = abi.CREATE_IN.pack(os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o100644, 0, 0) + z
            heads.append(g.chain([in_header(abi.FUSE_CREATE, dirid, len(args)), args], [16, 144]))
        else:
            heads.append(g.chain([in_header(abi.FUSE_UNLINK, dirid, len(z)), z], [16]))

    def reset() -> None:
        if workload == "create":
            for h in list(fs.handles):
                if h.nodeid != dirid:
                    fs.release(ctx, h.nodeid, h.fh, 0)
            _forget_all(s, dirid)
            for n in names:
                os.unlink(os.path.join(share, DIR_NAME, n.decode()))
        else:
            for n in names:
                open(os.path.join(share, DIR_NAME, n.decode()), "wb").close()

    if workload == "unlink":
        reset()
    s.reset = reset
    s.per_request = 1
    return heads


def measure(
    s: Setup, heads: list[int], seconds: float, batches: int | None = None
) -> tuple[float, int]:
    """µs per request (per entry for READDIR*) of ``process`` over ``seconds``
    (or exactly ``batches`` batches: a fixed amount of work, for callgrind).

    Wall clock, this thread only; ``s.reset`` runs untimed after each batch.
    """
    n = 0
    spent = 0.0
    end = time.perf_counter() + seconds
    clock = time.perf_counter
    while clock() < end if batches is None else n < batches * len(heads) * s.per_request:
        before = s.guest.used_idx()
        s.guest.publish(heads)
        t0 = clock()
        s.runner.process(s.ring)
        spent += clock() - t0
        if (s.guest.used_idx() - before) & 0xFFFF != len(heads):
            raise RuntimeError("not every request completed")
        n += len(heads) * s.per_request
        s.reset()
    return 1e6 * spent / n, n


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python3 -m bench.hotpath", description=__doc__.split("\n")[0]
    )
    ap.add_argument("--seconds", type=float, default=1.0)
    ap.add_argument("--qd", type=int, default=1)
    ap.add_argument("--scatter", action="store_true")
    ap.add_argument("--repeat", type=int, default=3, help="best of N runs")
    ap.add_argument(
        "--count",
        type=int,
        help="exactly N batches per run (and N to warm up) instead of --seconds: under"
        " callgrind, runs with N and 2N differ by the cost of N batches",
    )
    ap.add_argument("--profile", action="store_true", help="cProfile one run per workload")
    ap.add_argument(
        "--fast",
        choices=("off", "pure", "compiled"),
        default="off",
        help="offer each request to the passthrough's fast operations first (fastops/)",
    )
    ap.add_argument("workloads", nargs="*", default=list(WORKLOADS))
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="hotpath-") as share:
        with open(os.path.join(share, DATA_FILE), "wb") as f:
            f.write(random.Random(1).randbytes(1 << 20) * (DATA_SIZE >> 20))
        os.mkdir(os.path.join(share, DIR_NAME))
        for i in range(DIR_FILES):
            with open(os.path.join(share, DIR_NAME, f"f{i:06d}"), "wb") as f:
                f.write(b"x" * 100)
        s = setup(share, args.scatter, args.fast)
        flags = 0xFFFF_FFFF & ~abi.FUSE_INIT_RESERVED
        init = abi.INIT_IN.pack(7, 38, 1 << 17, flags, 0, *(0,) * 11)
        run_one(s, [s.guest.chain([in_header(abi.FUSE_INIT, 0, len(init)), init], [16, 256])])
        print(f"{'workload':11} {'qd':>3} {'us/req':>8}  (READDIR*: us per entry)")
        for w in args.workloads:
            heads = prepare(s, w, args.qd)
            measure(s, heads, 0.1, args.count)
            best = min(measure(s, heads, args.seconds, args.count)[0] for _ in range(args.repeat))
            print(f"{w:11} {args.qd:3d} {best:8.2f}")
            if args.profile:
                prof = cProfile.Profile()
                prof.enable()
                measure(s, heads, args.seconds)
                prof.disable()
                pstats.Stats(prof).sort_stats("tottime").print_stats(14)
            s.guest.free.extend(heads)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
