"""A real guest on a daemon in its default confinement (namespace sandbox, seccomp kill).

One boot; the guest does a little of everything (create, write, read,
rename, links, modes, owners, truncate, a big file, xattrs where the guest
has the tool, locks, unlink) and the host checks the result, then the
daemon must exit cleanly: a system call missing from the seccomp
allow-list would have killed it with SIGSYS.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from virtiofsd_py.testing.daemon_proc import DaemonProcess, is_own_daemon
from virtiofsd_py.testing.guest import Guest

pytestmark = [pytest.mark.guest, pytest.mark.ours_only]

TAG = "share"
TRACEBACK = "Traceback (most recent call last)"
HOST_DATA = os.urandom(3 * 1024 * 1024 + 7)


@pytest.fixture(scope="module")
def share(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("sandboxed-share")
    (root / "from-host.bin").write_bytes(HOST_DATA)
    (root / "dir").mkdir()
    (root / "dir" / "note").write_text("host note\n")
    return root


@pytest.fixture(scope="module")
def daemon(
    guest_support: None, share: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[DaemonProcess]:
    if not is_own_daemon() or os.geteuid() != 0:
        pytest.skip("our daemon's namespace sandbox, as root")
    d = DaemonProcess(
        share,
        tmp_path_factory.mktemp("sandboxed-daemon"),
        extra_args=["--sandbox", "namespace", "--seccomp", "kill", "--cache", "auto"],
    ).start(timeout=30)
    yield d
    status = d.stop(timeout=10.0)
    log = d.log()
    print(f"--- daemon log (exit status {status}) ---\n{log[-20000:]}")
    assert status == 0, f"daemon exit status {status} (-31 would be a seccomp kill)"
    assert TRACEBACK not in log


@pytest.fixture(scope="module")
def guest(daemon: DaemonProcess) -> Iterator[Guest]:
    g = Guest.boot(vhost_sockets={TAG: str(daemon.socket_path)})
    try:
        g.run(f"mount -t virtiofs {TAG} /mnt").check()
        yield g
        g.run("umount /mnt").check()
    finally:
        g.shutdown()


def sandboxed_child(daemon: DaemonProcess) -> int:
    (child,) = Path(f"/proc/{daemon.pid}/task/{daemon.pid}/children").read_text().split()
    return int(child)


def test_daemon_is_confined(guest: Guest, daemon: DaemonProcess) -> None:
    child = sandboxed_child(daemon)
    assert os.readlink(f"/proc/{child}/ns/mnt") != os.readlink("/proc/self/ns/mnt")
    status = Path(f"/proc/{child}/status").read_text()
    assert "\nSeccomp:\t2\n" in status
    assert sorted(os.listdir(f"/proc/{child}/root")) == ["proc", "shared"]


def test_guest_reads_host_data(guest: Guest) -> None:
    out = guest.run("sha256sum /mnt/from-host.bin; cat /mnt/dir/note").check().out
    assert out.split()[0] == hashlib.sha256(HOST_DATA).hexdigest()
    assert "host note" in out


def test_guest_changes_reach_the_host(guest: Guest, share: Path) -> None:
    script = " && ".join(
        [
            "cd /mnt",
            "mkdir -p g/sub",
            "echo guest-data > g/a.txt",
            "dd if=/dev/zero of=g/big bs=1M count=8 2>/dev/null",
            "truncate -s 5 g/big 2>/dev/null || dd if=/dev/null of=g/big bs=1 seek=5",
            "mv g/a.txt g/sub/b.txt",
            "ln -s sub/b.txt g/link",
            "ln g/sub/b.txt g/hard",
            "chmod 0640 g/sub/b.txt",
            "chown 1234:2345 g/hard",
            "mknod g/fifo p",
            "touch g/gone && rm g/gone",
            "(flock -x g/sub/b.txt true 2>/dev/null || true)",
            "sync",
        ]
    )
    guest.run(script).check()
    g = share / "g"
    assert (g / "sub" / "b.txt").read_text() == "guest-data\n"
    assert os.readlink(g / "link") == "sub/b.txt"
    st = os.stat(g / "sub" / "b.txt")
    assert st.st_nlink == 2 and st.st_mode & 0o777 == 0o640
    assert (st.st_uid, st.st_gid) == (1234, 2345)
    assert os.path.getsize(g / "big") == 5
    assert not (g / "gone").exists()
    assert (g / "fifo").is_fifo()


def test_guest_cannot_see_outside(guest: Guest, share: Path) -> None:
    (share.parent / "outside-secret").write_text("secret")
    os.symlink(str(share.parent / "outside-secret"), share / "out-link")
    r = guest.run("cat /mnt/out-link")
    assert r.rc != 0 and "secret" not in r.out
