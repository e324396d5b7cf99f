"""Metadata benchmark run by python3 inside the guest: create, stat, readdir, unlink.

Usage: python3 meta.py DIR COUNT. Prints ``PHASE SECONDS`` lines (the guest's
python3 is Debian's python3-minimal: no json module).
The guest's dentry and inode caches are dropped before stat and readdir so
that those phases reach the file system (for virtio-fs: LOOKUP/GETATTR and
READDIRPLUS requests to the daemon).
"""

import os
import sys
import time


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def main() -> None:
    root, count = sys.argv[1], int(sys.argv[2])
    d = os.path.join(root, "meta")
    os.mkdir(d)
    names = [os.path.join(d, f"f{i:06d}") for i in range(count)]
    data = b"x" * 100
    out = {}
    t = time.monotonic()
    for n in names:
        fd = os.open(n, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.write(fd, data)
        os.close(fd)
    out["create"] = time.monotonic() - t
    drop_caches()
    t = time.monotonic()
    for n in names:
        os.stat(n)
    out["stat"] = time.monotonic() - t
    drop_caches()
    t = time.monotonic()
    seen = sum(1 for _ in os.scandir(d))
    out["readdir"] = time.monotonic() - t
    assert seen == count, (seen, count)
    t = time.monotonic()
    for n in names:
        os.unlink(n)
    out["unlink"] = time.monotonic() - t
    os.rmdir(d)
    for phase, seconds in out.items():
        print(phase, seconds)


main()
