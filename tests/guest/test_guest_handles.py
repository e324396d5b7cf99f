"""``--inode-file-handles=mandatory`` in a real guest: more inodes than the daemon has fds.

One boot: the daemon runs with RLIMIT_NOFILE 1500 (its guest fd budget is
then 476: with fds, lookups would fail with ENFILE after that many nodes),
the guest walks and reads 3000 files and keeps them in its dentry cache.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from rw_support import MNT, daemon_and_guest

from virtiofsd_py.testing.daemon_proc import DaemonProcess, is_own_daemon
from virtiofsd_py.testing.qemu.guest import Guest

pytestmark = [
    pytest.mark.guest,
    pytest.mark.skipif(not is_own_daemon(), reason="checks our daemon's own fds"),
]

DIRS, PER_DIR = 30, 100
FILES = DIRS * PER_DIR
NOFILE = 1500


@pytest.fixture(scope="module")
def handles(
    guest_support: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Path, DaemonProcess, Guest]]:
    shared = tmp_path_factory.mktemp("handles")
    os.chmod(shared, 0o755)
    for d in range(DIRS):
        sub = shared / "many" / f"d{d:02d}"
        sub.mkdir(parents=True)
        for i in range(PER_DIR):
            (sub / f"f{i:03d}").write_bytes(b"x\n")
    extra = ["--inode-file-handles=mandatory", f"--rlimit-nofile={NOFILE}"]
    with daemon_and_guest(shared, tmp_path_factory, extra) as (daemon, guest):
        yield shared, daemon, guest


def test_guest_holds_more_inodes_than_the_daemon_has_fds(
    handles: tuple[Path, DaemonProcess, Guest],
) -> None:
    shared, daemon, guest = handles
    out = guest.run(
        f"find {MNT}/many -type f | wc -l; cat $(find {MNT}/many -type f) | wc -c"
    ).check()
    assert out.out.split() == [str(FILES), str(2 * FILES)]
    assert len(os.listdir(f"/proc/{daemon.pid}/fd")) < NOFILE - 1024
    # A directory renamed on the host: the guest's next lookups find it.
    os.rename(shared / "many" / "d00", shared / "many" / "moved")
    out = guest.run(f"cat {MNT}/many/moved/f000 && stat -c %s {MNT}/many/d01/f001").check()
    assert out.out.split() == ["x", "2"]
