"""Per-request cost of the passthrough's fast operations against the dispatcher.

``python3 -m bench.fastops [--count N] [--repeat R] [workloads...]``

One ``PassthroughFS`` on a temporary directory, one session (INIT), one
open file; each workload's request is laid out once as Linux's virtio-fs
driver lays it out (in header, arguments and data in buffers of their own;
out header, then the reply body or 4 KiB of data) and answered N times by:

- ``dispatcher``: ``Dispatcher.handle``, the Python path;
- ``pure``: the pure-Python twin's ``handle`` (what the pure worker calls);
- ``compiled``: the compiled twin's ``handle`` from Python buffers (one
  Python call per request: what a Python runner pays);
- ``compiled-C``: the compiled twin's C function N times in one call (what
  a compiled worker pays per request: no Python at all).

Prints microseconds per request (best of R runs, CPU time of this thread, so
that other load on the host moves it less; still, compare ratios).  No
queue, ring or eventfd work is included: ``bench.hotpath --fast`` times the
daemon's runner with them.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable, Sequence

from virtiofsd_py import fastops
from virtiofsd_py.fs.passthrough.filesystem import PassthroughConfig, PassthroughFS
from virtiofsd_py.fuse import abi
from virtiofsd_py.fuse.dispatcher import Dispatcher

WORKLOADS = ("getattr", "read4k", "write4k", "flush")
KIB4 = 4096
Bufs = list[memoryview]


def in_header(opcode: int, unique: int, nodeid: int, args_len: int) -> bytes:
    return abi.IN_HEADER.pack(40 + args_len, opcode, unique, nodeid, 0, 0, 1, 0, 0)


def chains(nodeid: int, fh: int) -> dict[str, tuple[Bufs, Bufs]]:
    """Each workload's (readable, writable) buffers."""

    def mv(*parts: bytes | int) -> Bufs:
        return [memoryview(bytearray(p)) for p in parts]

    getattr_in = abi.GETATTR_IN.pack(0, 0, 0)
    read_in = abi.READ_IN.pack(fh, 0, KIB4, 0, 0, 0, 0)
    write_in = abi.WRITE_IN.pack(fh, 0, KIB4, 0, 0, 0, 0)
    flush_in = abi.FLUSH_IN.pack(fh, 0, 0, 0)
    return {
        "getattr": (
            mv(in_header(abi.FUSE_GETATTR, 2, nodeid, len(getattr_in)), getattr_in),
            mv(16, abi.ATTR_OUT.size),
        ),
        "read4k": (
            mv(in_header(abi.FUSE_READ, 4, nodeid, len(read_in)), read_in),
            mv(16, KIB4),
        ),
        "write4k": (
            mv(
                in_header(abi.FUSE_WRITE, 6, nodeid, len(write_in) + KIB4),
                write_in,
                b"w" * KIB4,
            ),
            mv(16, abi.WRITE_OUT.size),
        ),
        "flush": (
            mv(in_header(abi.FUSE_FLUSH, 8, nodeid, len(flush_in)), flush_in),
            mv(16),
        ),
    }


BATCH = 1000


def handlers(
    d: Dispatcher,
    pure: fastops.FastOperations,
    comp: fastops.FastOperations | None,
    rd: Bufs,
    wr: Bufs,
) -> list[tuple[Callable[[], object], int]]:
    """(call, requests per call) of each column."""
    paths: list[tuple[Callable[[], object], int]] = [
        (lambda: d.handle(rd, wr), 1),
        (lambda: pure.handle(rd, wr), 1),
    ]
    if comp is not None:
        assert comp.handle(rd, wr) > 0, "declined"
        repeat = comp._repeat  # type: ignore[attr-defined]
        paths += [(lambda: comp.handle(rd, wr), 1), (lambda: repeat(rd, wr, BATCH), BATCH)]
    return paths


def per_request(call: Callable[[], object], count: int, repeat: int, batch: int = 1) -> float:
    """Best-of-``repeat`` microseconds per request of ``count`` calls of ``call``."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.thread_time()
        for _ in range(count // batch):
            call()
        best = min(best, (time.thread_time() - t0) / count)
    return best * 1e6


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python3 -m bench.fastops", description=__doc__)
    ap.add_argument("--count", type=int, default=100_000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument(
        "--path",
        choices=("dispatcher", "pure", "compiled", "compiled-C"),
        help="time only this column (for callgrind: run with N and 2N, divide the"
        " difference of the instruction counts by N)",
    )
    ap.add_argument("workloads", nargs="*", default=list(WORKLOADS))
    args = ap.parse_args(argv)
    compiled = fastops.FastOps is not fastops.PureFastOps
    with tempfile.TemporaryDirectory(prefix="fastops-bench-") as share:
        with open(os.path.join(share, "data.bin"), "wb") as f:
            f.write(os.urandom(1 << 20))
        fs = PassthroughFS(PassthroughConfig(shared_dir=share))
        pure = fastops.PureFastOps(fs)
        comp = fastops.for_passthrough(fs) if compiled else None

        def session(state: object) -> None:
            pure.session_changed(state)  # type: ignore[arg-type]
            if comp is not None:
                comp.session_changed(state)  # type: ignore[arg-type]

        d = Dispatcher(fs, on_session=session)
        flags = 0xFFFF_FFFF & ~abi.FUSE_INIT_RESERVED
        init = abi.INIT_IN.pack(7, 38, 1 << 17, flags, 0, *(0,) * 11)
        d.handle(
            [memoryview(in_header(abi.FUSE_INIT, 1, 1, len(init)) + init)],
            [memoryview(bytearray(256))],
        )
        w = [memoryview(bytearray(256))]
        look = b"data.bin\0"
        d.handle([memoryview(in_header(abi.FUSE_LOOKUP, 2, 1, len(look)) + look)], w)
        nodeid = abi.ENTRY_OUT.unpack_from(w[0], 16)[0]
        open_in = abi.OPEN_IN.pack(os.O_RDWR, 0)
        d.handle([memoryview(in_header(abi.FUSE_OPEN, 3, nodeid, len(open_in)) + open_in)], w)
        fh = abi.OPEN_OUT.unpack_from(w[0], 16)[0]
        cols = ["dispatcher", "pure", *(["compiled", "compiled-C"] if comp else [])]
        wanted = [c == args.path or args.path is None for c in cols]
        cols = [c for c, w in zip(cols, wanted, strict=True) if w]
        print(f"{'workload':10}" + "".join(f"{c:>12}" for c in cols) + "   (us/request)")
        for name in args.workloads:
            rd, wr = chains(nodeid, fh)[name]
            assert pure.handle(rd, wr) > 0, f"{name}: declined"
            paths = [p for p, w in zip(handlers(d, pure, comp, rd, wr), wanted, strict=True) if w]
            row = [per_request(call, args.count, args.repeat, batch) for call, batch in paths]
            print(f"{name:10}" + "".join(f"{v:12.2f}" for v in row))
        if comp is not None:
            comp.close()
        fs.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
