"""In-process timing of the daemon's per-request Python path, without wake-ups.

``python3 -m bench.hotpath [--seconds S] [--qd N] [--scatter] [--profile]``

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
with free memory often lays them out.
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
from dataclasses import dataclass

from virtiofsd_py.fs.base import Context
from virtiofsd_py.fs.passthrough import PassthroughConfig, PassthroughFS
from virtiofsd_py.fuse import abi
from virtiofsd_py.fuse.dispatcher import Dispatcher
from virtiofsd_py.metrics import Metrics
from virtiofsd_py.vhost.protocol import MemoryRegion, VringAddr
from virtiofsd_py.virtio.memory import GuestMemory, map_region
from virtiofsd_py.virtio.queue_runner import QueueRunner
from virtiofsd_py.virtio.virtqueue import (
    DESC,
    U16,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    SplitQueue,
)
from virtiofsd_py.virtio.vring import Vring

PAGE = 4096
QSIZE = 256
MEM = 256 << 20
GPA_BASE = 0x1_0000_0000
UVA_BASE = 0x7F00_0000_0000
DATA_FILE = "data.bin"
DATA_SIZE = 32 << 20
WORKLOADS = ("getattr", "lookup", "read4k", "read1m", "write4k")


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


def setup(share: str, scatter: bool) -> Setup:
    guest = Guest(scatter)
    memory = GuestMemory()
    memory.replace([map_region(MemoryRegion(GPA_BASE, MEM, UVA_BASE, 0), guest.fd)])
    addr = VringAddr(1, 0, UVA_BASE + guest.desc, UVA_BASE + guest.used, UVA_BASE + guest.avail, 0)
    q = SplitQueue(memory, QSIZE, addr, event_idx=True, base=0)
    ring = Vring(1, QSIZE, addr, started=True, enabled=True, queue=q)
    ring.call_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    dispatcher = Dispatcher(PassthroughFS(PassthroughConfig(shared_dir=share)))
    handler = Metrics().instrument(dispatcher.handle, timed=False)
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


def measure(s: Setup, heads: list[int], seconds: float) -> tuple[float, int]:
    """µs per request of ``process`` over ``seconds`` (wall clock, this thread only)."""
    n = 0
    spent = 0.0
    end = time.perf_counter() + seconds
    clock = time.perf_counter
    while clock() < end:
        before = s.guest.used_idx()
        s.guest.publish(heads)
        t0 = clock()
        s.runner.process(s.ring)
        spent += clock() - t0
        if (s.guest.used_idx() - before) & 0xFFFF != len(heads):
            raise RuntimeError("not every request completed")
        n += len(heads)
    return 1e6 * spent / n, n


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python3 -m bench.hotpath", description=__doc__.split("\n")[0]
    )
    ap.add_argument("--seconds", type=float, default=1.0)
    ap.add_argument("--qd", type=int, default=1)
    ap.add_argument("--scatter", action="store_true")
    ap.add_argument("--repeat", type=int, default=3, help="best of N runs")
    ap.add_argument("--profile", action="store_true", help="cProfile one run per workload")
    ap.add_argument("workloads", nargs="*", default=list(WORKLOADS))
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="hotpath-") as share:
        with open(os.path.join(share, DATA_FILE), "wb") as f:
            f.write(random.Random(1).randbytes(1 << 20) * (DATA_SIZE >> 20))
        s = setup(share, args.scatter)
        flags = 0xFFFF_FFFF & ~abi.FUSE_INIT_RESERVED
        init = abi.INIT_IN.pack(7, 38, 1 << 17, flags, 0, *(0,) * 11)
        run_one(s, [s.guest.chain([in_header(abi.FUSE_INIT, 0, len(init)), init], [16, 256])])
        print(f"{'workload':10} {'qd':>3} {'us/req':>8}")
        for w in args.workloads:
            heads = prepare(s, w, args.qd)
            measure(s, heads, 0.1)
            best = min(measure(s, heads, args.seconds)[0] for _ in range(args.repeat))
            print(f"{w:10} {args.qd:3d} {best:8.2f}")
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
