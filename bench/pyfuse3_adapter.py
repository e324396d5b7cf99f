"""What the pyfuse3 adapter costs: GETATTR and 4 KiB READ requests/s.

``python3 -m bench.pyfuse3_adapter [--seconds S] [--example PATH]`` serves
pyfuse3's tmpfs example (from its sdist, as the tests get it) three ways
and drives the same two requests at each, one at a time, for S seconds:

- ``pyfuse3``: the example mounted on the host by pyfuse3 itself (its own
  ``main()``: libfuse, trio);
- ``mount``: ``virtiofsd-py mount --backend tmpfs.py:Operations`` (the
  adapter and the async bridge, on /dev/fuse);
- ``vhost-user``: the daemon with the same backend, requests put straight
  on its virtqueue by the test front-end (the path a guest's requests take,
  without a guest).

On the host mounts GETATTR is ``statx(AT_STATX_FORCE_SYNC)`` (the kernel
asks the file system every time, whatever it cached) and READ is a 4 KiB
``pread`` of an O_DIRECT file (no page cache).  Needs root and /dev/fuse.
Prints one line per (target, request): requests/s and us/request.
"""

from __future__ import annotations

import argparse
import ctypes
import mmap
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "support"))

from pyfuse3_examples import HostMount, cache_dir  # noqa: E402

from virtiofsd_py.fuse import abi  # noqa: E402
from virtiofsd_py.testing.daemon_proc import DaemonProcess  # noqa: E402
from virtiofsd_py.testing.frontend.fuse_client import FuseClient  # noqa: E402
from virtiofsd_py.testing.frontend.vhost_user import VhostUserFrontend  # noqa: E402

AT_FDCWD = -100
AT_STATX_FORCE_SYNC = 0x2000
STATX_BASIC_STATS = 0x7FF
#: Small: tmpfs.py reads a file's whole blob from sqlite in every getattr and read.
FILE_SIZE = 16 << 10

_libc = ctypes.CDLL(None, use_errno=True)
_statx_buf = ctypes.create_string_buffer(256)


def statx_sync(path: bytes) -> None:
    if _libc.statx(AT_FDCWD, path, AT_STATX_FORCE_SYNC, STATX_BASIC_STATS, _statx_buf) != 0:
        raise OSError(ctypes.get_errno(), "statx")


def rate(fn: Callable[[], None], seconds: float) -> tuple[float, float]:
    """(requests/s, us/request) of calling ``fn`` back to back for ``seconds``."""
    for _ in range(200):  # warm up
        fn()
    n, start = 0, time.perf_counter()
    deadline = start + seconds
    while True:
        for _ in range(100):
            fn()
        n += 100
        now = time.perf_counter()
        if now >= deadline:
            break
    per = (now - start) / n
    return 1 / per, per * 1e6


def host_mount_rates(mnt: Path, seconds: float) -> dict[str, tuple[float, float]]:
    f = mnt / "bench.dat"
    f.write_bytes(os.urandom(FILE_SIZE))
    path = os.fsencode(f)
    out = {"getattr": rate(lambda: statx_sync(path), seconds)}
    buf = mmap.mmap(-1, 4096)  # page-aligned, as O_DIRECT wants
    fd = os.open(f, os.O_RDONLY | os.O_DIRECT)
    try:
        out["read4k"] = rate(lambda: _pread_exact(fd, buf), seconds)
    finally:
        os.close(fd)
    return out


def _pread_exact(fd: int, buf: mmap.mmap) -> None:
    if os.preadv(fd, [buf], 8192) != 4096:
        raise RuntimeError("short read")


def vhost_user_rates(example: Path, work: Path, seconds: float) -> dict[str, tuple[float, float]]:
    template = (
        f"{sys.executable} -m virtiofsd_py --socket-path {{socket}} --log-level error"
        f" --backend {example}:Operations"
    )
    d = DaemonProcess(work, work, template=template).start(timeout=30)
    fe = VhostUserFrontend.connect(d.socket_path)
    try:
        fe.connect_and_start(queues=2, queue_size=256)
        c = FuseClient(fe)
        c.init()
        args = abi.CREATE_IN.pack(os.O_RDWR, 0o100644, 0, 0) + b"bench.dat\0"
        data = c.call(
            abi.FUSE_CREATE, abi.FUSE_ROOT_ID, args, [abi.ENTRY_OUT.size, abi.OPEN_OUT.size]
        )
        nodeid = abi.ENTRY_OUT.unpack_from(data)[0]
        fh = abi.OPEN_OUT.unpack_from(data, abi.ENTRY_OUT.size)[0]
        c.write(nodeid, fh, 0, os.urandom(FILE_SIZE))
        return {
            "getattr": rate(lambda: c.getattr(nodeid), seconds),
            "read4k": rate(lambda: _read_exact(c, nodeid, fh), seconds),
        }
    finally:
        fe.close()
        d.stop()


def _read_exact(c: FuseClient, nodeid: int, fh: int) -> None:
    if len(c.read(nodeid, fh, 8192, 4096)) != 4096:
        raise RuntimeError("short read")


def find_example(given: str | None) -> Path:
    if given:
        return Path(given).resolve()
    found = sorted(cache_dir().glob("pyfuse3-*/examples/tmpfs.py"))
    if not found:
        sys.exit("no pyfuse3 sdist examples: run scripts/setup-test-env.sh or pass --example")
    return found[-1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m bench.pyfuse3_adapter", description=__doc__)
    p.add_argument("--seconds", type=float, default=3.0, help="per measurement (default 3)")
    p.add_argument("--example", help="pyfuse3's tmpfs.py (default: from the sdist cache)")
    args = p.parse_args(argv)
    example = find_example(args.example)
    results: dict[str, dict[str, tuple[float, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="vfsd-bench-pf3-") as tmp:
        work = Path(tmp)
        theirs = HostMount(example, work / "pyfuse3", [], work / "pyfuse3.log")
        try:
            results["pyfuse3"] = host_mount_rates(theirs.mountpoint, args.seconds)
        finally:
            theirs.close()
        mnt = work / "ours"
        mnt.mkdir()
        ours = subprocess.Popen(
            [sys.executable, "-m", "virtiofsd_py", "mount", "--backend", f"{example}:Operations",
             "--log-level", "error", str(mnt)],
            stdout=subprocess.PIPE, cwd=ROOT,
        )  # fmt: skip
        try:
            assert ours.stdout is not None
            line = ours.stdout.readline()
            if b"serving" not in line:
                sys.exit(f"virtiofsd-py mount did not come up: {line!r}")
            results["mount"] = host_mount_rates(mnt, args.seconds)
        finally:
            ours.terminate()
            ours.wait(30)
        results["vhost-user"] = vhost_user_rates(example, work, args.seconds)
    print(f"== pyfuse3 adapter: {example} (one request at a time, {args.seconds:g} s each)")
    print(f"{'target':12} {'request':8} {'req/s':>9} {'us/req':>8}")
    for target, rows in results.items():
        for req, (per_s, us) in rows.items():
            print(f"{target:12} {req:8} {per_s:9.0f} {us:8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
