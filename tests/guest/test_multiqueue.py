"""Two request queues in a real guest: each served on its own thread, both used.

Linux (since 6.11) spreads virtio-fs requests over the request queues by
CPU; the guest has two CPUs and ``num-request-queues=2``.  One writer and
reader per CPU works on its own files at the same time; every byte must come
back, and with the compiled core the daemon's two queue threads (named
``vfsd-queue-1`` and ``vfsd-queue-2``) must both have done work (the pure
core serves every queue on the event loop: see app/daemon.py).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from virtiofsd_py.testing.daemon_proc import DaemonProcess, is_own_daemon
from virtiofsd_py.testing.qemu.guest import Guest
from virtiofsd_py.virtio.workers import CompiledQueueWorker

pytestmark = [pytest.mark.guest, pytest.mark.ours_only]

TAG = "share"
FILES = 40
SIZE = 64 * 1024


@pytest.fixture(scope="module")
def guest2(virtiofs_daemon: DaemonProcess) -> Iterator[Guest]:
    g = Guest.boot(
        vhost_sockets={TAG: str(virtiofs_daemon.socket_path)}, num_request_queues=2, smp=2
    )
    yield g
    g.shutdown()


def thread_ticks(pid: int) -> dict[str, int]:
    """utime + stime of each thread of ``pid``, by thread name."""
    out: dict[str, int] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
        except OSError:
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        out[name] = out.get(name, 0) + int(fields[11]) + int(fields[12])
    return out


def test_two_request_queues_serve_parallel_io(
    guest2: Guest, virtiofs_daemon: DaemonProcess, guest_shared_dir: Path
) -> None:
    assert is_own_daemon()
    g = guest2
    g.run(f"mount -t virtiofs {TAG} /mnt").check()
    before = thread_ticks(virtiofs_daemon.pid)
    # One job per CPU: write FILES files, then read them back and checksum.
    job = (
        f"cpu=$1; mkdir -p /mnt/c$cpu; i=0; while [ $i -lt {FILES} ]; do"
        f" dd if=/dev/urandom of=/mnt/c$cpu/f$i bs={SIZE} count=1 2>/dev/null; i=$((i+1)); done;"
        " for r in 1 2 3; do cat /mnt/c$cpu/f* > /dev/null; done;"
        " md5sum /mnt/c$cpu/f* > /tmp/sums$cpu"
    )
    g.run(f"cat > /tmp/job.sh <<'EOF'\n{job}\nEOF").check()
    pin = "taskset -c" if g.run("command -v taskset").rc == 0 else "env CPU="
    g.run(
        f"{pin} 0 sh /tmp/job.sh 0 & {pin} 1 sh /tmp/job.sh 1 & wait; cat /tmp/sums0 /tmp/sums1",
        timeout=240,
    ).check()
    sums = g.run("cat /tmp/sums0 /tmp/sums1").check().out.splitlines()
    assert len(sums) == 2 * FILES
    for line in sums:
        digest, path = line.split()
        host = guest_shared_dir / path.removeprefix("/mnt/")
        assert hashlib.md5(host.read_bytes()).hexdigest() == digest, path
    g.run("umount /mnt").check()
    if CompiledQueueWorker is None:
        return  # the daemon runs the same core as this process: no queue threads
    after = thread_ticks(virtiofs_daemon.pid)
    busy = {
        name: after.get(name, 0) - before.get(name, 0) for name in ("vfsd-queue-1", "vfsd-queue-2")
    }
    assert set(busy) <= set(after), after
    print(f"queue threads' CPU ticks during the I/O: {busy}")
    assert all(ticks > 0 for ticks in busy.values()), busy
