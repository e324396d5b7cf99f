"""Load test in a real guest: parallel workers hammer the share, then fsck-style checks.

The default suite runs it for ``VIRTIOFSD_PY_SOAK_SECONDS`` (default 15)
seconds; the long version is the same test with a longer time::

    VIRTIOFSD_PY_SOAK_SECONDS=600 python3 -m pytest tests/guest/test_soak.py -rs

Four guest processes (python3 in the programs image, forked) each create,
write, append, read back and verify, truncate, rename, hard- and symlink,
unlink, mkdir and rmdir in their own directory and in a shared one, while a
fifth walks the whole tree reading everything.  Afterwards: no worker saw
an error; the guest's view (stat of every node, md5 of every file) equals
the host's; and once the guest drops its caches (FORGETs) the daemon holds
no more fds than before and its RSS has not run away.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from escape_ops import SECCOMP
from rw_support import GUEST_STAT_FMT, MNT, daemon_and_guest, guest_view, host_view

from virtiofsd_py.testing.daemon_proc import DaemonProcess
from virtiofsd_py.testing.qemu.guest import Guest

pytestmark = pytest.mark.guest
SECONDS = float(os.environ.get("VIRTIOFSD_PY_SOAK_SECONDS", "15"))
WORKERS = 4
#: fds the daemon may hold beyond its idle count after FORGETs (root, cached nodes).
FD_SLACK = 16
RSS_SLACK = 64 << 20

WORKLOAD = r"""
import hashlib, os, random, sys, time
deadline = time.time() + float(sys.argv[1])
root = sys.argv[2]
n = int(sys.argv[3])

def worker(i):
    rnd = random.Random(i)
    mine = os.path.join(root, f"w{i}")
    shared = os.path.join(root, "shared")
    os.makedirs(mine, exist_ok=True)
    files = {}
    ops = 0
    while time.time() < deadline:
        op = rnd.randrange(10)
        name = os.path.join(mine, f"f{rnd.randrange(200)}")
        if op <= 2:
            data = rnd.randbytes(rnd.choice((0, 1, 100, 4096, 5000, 70000)))
            with open(name, "wb") as f:
                f.write(data)
            files[name] = data
        elif op == 3 and files:
            name = rnd.choice(list(files))
            extra = rnd.randbytes(rnd.randrange(1, 3000))
            with open(name, "ab") as f:
                f.write(extra)
            files[name] += extra
        elif op == 4 and files:
            name = rnd.choice(list(files))
            with open(name, "rb") as f:
                got = f.read()
            if got != files[name]:
                print(f"worker {i}: {name} has wrong content", flush=True)
                return 1
        elif op == 5 and files:
            name = rnd.choice(list(files))
            size = rnd.randrange(len(files[name]) + 10)
            os.truncate(name, size)
            files[name] = files[name][:size].ljust(size, b"\0")
        elif op == 6 and files:
            old = rnd.choice(list(files))
            new = os.path.join(mine, f"f{rnd.randrange(200)}")
            os.rename(old, new)
            files[new] = files.pop(old)
        elif op == 7 and files:
            name = rnd.choice(list(files))
            os.unlink(name)
            del files[name]
        elif op == 8:
            d = os.path.join(shared, f"d{rnd.randrange(20)}")
            try:
                os.mkdir(d)
                with open(os.path.join(d, f"by{i}"), "w") as f:
                    f.write(str(ops))
                os.symlink(f"by{i}", os.path.join(d, f"ln{i}"))
                if files:
                    os.link(rnd.choice(list(files)), os.path.join(d, f"hl{i}"))
            except (FileExistsError, FileNotFoundError):
                pass  # another worker removed the directory in between
        else:
            d = os.path.join(shared, f"d{rnd.randrange(20)}")
            try:
                for e in os.listdir(d):
                    os.unlink(os.path.join(d, e))
                os.rmdir(d)
            except (FileNotFoundError, OSError):
                pass  # others race on the shared directories: that is the point
        ops += 1
    print(f"worker {i}: {ops} ops", flush=True)
    return 0

def reader():
    walks = 0
    while time.time() < deadline:
        for dirpath, dirs, names in os.walk(root):
            for nm in names:
                try:
                    with open(os.path.join(dirpath, nm), "rb") as f:
                        hashlib.md5(f.read())
                except (FileNotFoundError, IsADirectoryError, OSError):
                    pass
        walks += 1
    print(f"reader: {walks} walks", flush=True)
    return 0

os.makedirs(os.path.join(root, "shared"), exist_ok=True)
pids = []
for i in range(n + 1):
    pid = os.fork()
    if pid == 0:
        try:
            code = worker(i) if i < n else reader()
        except BaseException as e:
            print(f"process {i}: {type(e).__name__}: {e}", flush=True)
            code = 1
        os._exit(code)
    pids.append(pid)
bad = 0
for pid in pids:
    _, status = os.waitpid(pid, 0)
    bad += status != 0
print("FAILED" if bad else "ALL OK", flush=True)
"""


def daemon_usage(d: DaemonProcess) -> tuple[int, int]:
    with open(f"/proc/{d.pid}/status") as f:
        rss = next(int(x.split()[1]) * 1024 for x in f if x.startswith("VmRSS:"))
    return d.fd_count(), rss


@pytest.fixture(scope="module")
def dg(
    guest_support: None, guest_shared_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[DaemonProcess, Guest]]:
    extra = [*SECCOMP, "--thread-pool-size", "4"]
    with daemon_and_guest(guest_shared_dir, tmp_path_factory, extra) as pair:
        yield pair


def test_soak(dg: tuple[DaemonProcess, Guest], guest_shared_dir: Path) -> None:
    d, g = dg
    if g.run("command -v python3").rc != 0:
        pytest.skip("no python3 in the guest image")
    (guest_shared_dir / "soak.py").write_text(WORKLOAD)
    (guest_shared_dir / "soak").mkdir()
    g.run(f"ls -R {MNT} > /dev/null; sync; echo 3 > /proc/sys/vm/drop_caches").check()
    fds0, rss0 = daemon_usage(d)

    started = time.monotonic()
    res = g.run(f"python3 {MNT}/soak.py {SECONDS} {MNT}/soak {WORKERS} 2>&1", timeout=SECONDS + 300)
    print(res.out)
    if "ALL OK" not in res.out:
        notable = [ln for ln in d.log().splitlines() if " WARNING " in ln or " ERROR " in ln]
        print("daemon warnings and errors:\n" + "\n".join(notable[-200:]))
        # A broken virtqueue ("not a head", "out of range") or a bad inode shows here.
        print("guest kernel log:\n" + g.run("dmesg | tail -n 60").out)
    assert "ALL OK" in res.out, res.out
    assert time.monotonic() - started >= SECONDS

    # fsck-style: metadata of every node, then the content of every file.
    listing = g.run(
        f"cd {MNT}/soak && find . -mindepth 1 -exec stat -c '{GUEST_STAT_FMT}' {{}} +"
    ).check()
    assert guest_view(listing.out) == host_view(guest_shared_dir / "soak")
    sums = g.run(f"cd {MNT}/soak && find . -type f -exec md5sum {{}} +").check().out
    guest_sums = {
        line.split(None, 1)[1].removeprefix("./"): line.split(None, 1)[0]
        for line in sums.splitlines()
    }
    host_root = guest_shared_dir / "soak"
    host_sums = {
        str(p.relative_to(host_root)): hashlib.md5(p.read_bytes()).hexdigest()
        for p in host_root.rglob("*")
        if p.is_file() and not p.is_symlink()
    }
    assert guest_sums == host_sums

    # Leaks: once the guest forgets its dentries the daemon is back where it was.
    g.run(f"sync; echo 3 > /proc/sys/vm/drop_caches; ls {MNT} > /dev/null").check()
    fds1, rss1 = daemon_usage(d)
    assert fds1 <= fds0 + FD_SLACK, f"daemon fds {fds0} -> {fds1}:\n" + "\n".join(
        d.fd_targets()[-40:]
    )
    assert rss1 - rss0 < RSS_SLACK, f"daemon RSS grew {(rss1 - rss0) >> 20} MiB"
    log = d.log()
    assert " ERROR " not in log, log[-5000:]
