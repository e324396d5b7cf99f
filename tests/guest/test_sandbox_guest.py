"""A real guest on daemons in each sandbox (namespace, the default; chroot), seccomp kill.

One boot with two virtio-fs devices, one per sandbox mode, each on a share
of its own; on each the guest does a little of everything (create, write, read,
rename, links, modes, owners, truncate, a big file, xattrs where the guest
has the tool, locks, unlink) and the host checks the result, then each
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
from virtiofsd_py.testing.qemu.guest import Guest

pytestmark = [pytest.mark.guest, pytest.mark.ours_only]

#: Sandbox mode -> virtio-fs tag (the guest mounts it on /mnt/<tag>).
TAGS = {"namespace": "share", "chroot": "chrootfs"}
MODES = list(TAGS)
TRACEBACK = "Traceback (most recent call last)"
HOST_DATA = os.urandom(3 * 1024 * 1024 + 7)


@pytest.fixture(scope="module")
def shares(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = {}
    for mode in MODES:
        root = tmp_path_factory.mktemp(f"sandboxed-share-{mode}")
        (root / "from-host.bin").write_bytes(HOST_DATA)
        (root / "dir").mkdir()
        (root / "dir" / "note").write_text("host note\n")
        out[mode] = root
    return out


@pytest.fixture(scope="module")
def daemons(
    guest_support: None, shares: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, DaemonProcess]]:
    if not is_own_daemon() or os.geteuid() != 0:
        pytest.skip("our daemon's namespace and chroot sandboxes, as root")
    started: dict[str, DaemonProcess] = {}
    try:
        for mode in MODES:
            started[mode] = DaemonProcess(
                shares[mode],
                tmp_path_factory.mktemp(f"sandboxed-daemon-{mode}"),
                extra_args=["--sandbox", mode, "--seccomp", "kill", "--cache", "auto"],
            ).start(timeout=30)
        yield started
    finally:
        failures = []
        for mode, d in started.items():
            status = d.stop(timeout=10.0)
            log = d.log()
            print(f"--- {mode} daemon log (exit status {status}) ---\n{log[-20000:]}")
            if status != 0 or TRACEBACK in log:
                failures.append(f"{mode}: exit status {status} (-31 would be a seccomp kill)")
        assert not failures, failures


@pytest.fixture(scope="module")
def guest(daemons: dict[str, DaemonProcess]) -> Iterator[Guest]:
    g = Guest.boot(vhost_sockets={TAGS[m]: str(d.socket_path) for m, d in daemons.items()})
    try:
        for tag in TAGS.values():
            g.run(f"mkdir -p /mnt/{tag} && mount -t virtiofs {tag} /mnt/{tag}").check()
        yield g
        for tag in TAGS.values():
            g.run(f"umount /mnt/{tag}").check()
    finally:
        g.shutdown()


def serving_pid(daemon: DaemonProcess, mode: str) -> int:
    if mode == "chroot":
        return daemon.pid
    (child,) = Path(f"/proc/{daemon.pid}/task/{daemon.pid}/children").read_text().split()
    return int(child)


@pytest.fixture(params=MODES)
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def mnt(mode: str) -> str:
    return f"/mnt/{TAGS[mode]}"


@pytest.fixture
def share(shares: dict[str, Path], mode: str) -> Path:
    return shares[mode]


def test_daemons_are_confined(guest: Guest, daemons: dict[str, DaemonProcess]) -> None:
    child = serving_pid(daemons["namespace"], "namespace")
    assert os.readlink(f"/proc/{child}/ns/mnt") != os.readlink("/proc/self/ns/mnt")
    assert sorted(os.listdir(f"/proc/{child}/root")) == ["proc", "shared"]
    chrooted = daemons["chroot"].pid
    assert os.readlink(f"/proc/{chrooted}/root") == str(daemons["chroot"].shared_dir)
    for pid in (child, chrooted):
        assert "\nSeccomp:\t2\n" in Path(f"/proc/{pid}/status").read_text()


def test_guest_reads_host_data(guest: Guest, mnt: str) -> None:
    out = guest.run(f"sha256sum {mnt}/from-host.bin; cat {mnt}/dir/note").check().out
    assert out.split()[0] == hashlib.sha256(HOST_DATA).hexdigest()
    assert "host note" in out


def test_guest_changes_reach_the_host(guest: Guest, share: Path, mnt: str) -> None:
    script = " && ".join(
        [
            f"cd {mnt}",
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


def test_guest_cannot_see_outside(guest: Guest, share: Path, mnt: str) -> None:
    (share.parent / "outside-secret").write_text("secret")
    os.symlink(str(share.parent / "outside-secret"), share / "out-link")
    r = guest.run(f"cat {mnt}/out-link")
    assert r.rc != 0 and "secret" not in r.out
