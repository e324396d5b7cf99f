"""Cost of the per-request metrics (``Metrics.instrument``) on the hot path.

``python3 -m bench.metrics_overhead [N]`` runs the FUSE dispatcher over the
passthrough backend in-process (no rings, no threads: the cheapest request
path there is, so the relative cost is the worst case) and times GETATTR
and a 4 KiB READ plain, counted (always on) and counted+timed (with
``--metrics``), alternating rounds to even out frequency drift; prints the
best ns/request of each and the overhead in %.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence

from virtiofsd_py.app.metrics import Metrics
from virtiofsd_py.fs.passthrough.filesystem import PassthroughConfig, PassthroughFS
from virtiofsd_py.fuse import abi
from virtiofsd_py.fuse.dispatcher import OUR_MAX_MINOR, Dispatcher

Handle = Callable[[Sequence[memoryview], Sequence[memoryview]], int]


def _req(opcode: int, nodeid: int, args: bytes) -> list[memoryview]:
    hdr = abi.IN_HEADER.pack(40 + len(args), opcode, 2, nodeid, 0, 0, 1, 0, 0)
    return [memoryview(hdr + args)]


def _time(handle: Handle, req: list[memoryview], out: list[memoryview], n: int) -> float:
    t0 = time.perf_counter_ns()
    for _ in range(n):
        handle(req, out)
    return (time.perf_counter_ns() - t0) / n


def main(argv: list[str]) -> int:
    n = int(argv[0]) if argv else 50_000
    with tempfile.TemporaryDirectory() as share:
        with open(os.path.join(share, "f"), "wb") as f:
            f.write(os.urandom(8192))
        fs = PassthroughFS(PassthroughConfig(shared_dir=share))
        d = Dispatcher(fs)
        out = [memoryview(bytearray(16)), memoryview(bytearray(8192))]
        init = abi.INIT_IN.pack(7, OUR_MAX_MINOR, 65536, 0, 0, *([0] * 11))
        d.handle(_req(abi.FUSE_INIT, 0, init), out)
        d.handle(_req(abi.FUSE_LOOKUP, abi.FUSE_ROOT_ID, b"f\0"), out)
        nodeid = abi.ENTRY_OUT.unpack_from(out[1])[0]
        d.handle(_req(abi.FUSE_OPEN, nodeid, abi.OPEN_IN.pack(os.O_RDONLY, 0)), out)
        fh = abi.OPEN_OUT.unpack_from(out[1])[0]
        variants = {
            "counted": Metrics().instrument(d.handle, timed=False),
            "timed": Metrics().instrument(d.handle),
        }
        cases = {
            "GETATTR": _req(abi.FUSE_GETATTR, abi.FUSE_ROOT_ID, abi.GETATTR_IN.pack(0, 0, 0)),
            "READ 4K": _req(abi.FUSE_READ, nodeid, abi.READ_IN.pack(fh, 0, 4096, 0, 0, 0, 0)),
        }
        for name, req in cases.items():
            runs: dict[str, list[float]] = {"plain": [], **{v: [] for v in variants}}
            for _ in range(5):
                runs["plain"].append(_time(d.handle, req, out, n // 5))
                for v, handle in variants.items():
                    runs[v].append(_time(handle, req, out, n // 5))
            p = min(runs["plain"])
            line = f"{name:8} plain {p:7.0f} ns"
            for v in variants:
                i = min(runs[v])
                line += f"  {v} {i:7.0f} ns ({100 * (i - p) / p:+5.1f}%)"
            print(line)
        fs.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
