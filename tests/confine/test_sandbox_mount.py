"""``virtiofsd-py mount`` under the seccomp filter (host mount mode has no sandbox).

Every thread of the mount process must carry the filter, and a whole
session -- file operations, then the unmount at SIGTERM (umount2 as root;
the fusermount3 helper started before the filter otherwise) -- must end
with status 0: a call missing from the allow-list would be a SIGSYS kill.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from mount_rig import TRACEBACK, MountProcess, is_mounted, mount_unavailable
from unprivileged import USER, as_user

pytestmark = pytest.mark.ours_only


def seccomp_modes(pid: int) -> list[str]:
    """The Seccomp: field of every thread of ``pid``."""
    out = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        status = Path(f"/proc/{pid}/task/{tid}/status").read_text()
        out += [line.split()[1] for line in status.splitlines() if line.startswith("Seccomp:")]
    return out


def stop_cleanly(mp: MountProcess, mountpoint: Path) -> None:
    status, err = mp.stop()
    if is_mounted(mountpoint):
        subprocess.run(["umount", "-l", str(mountpoint)], check=False)
        pytest.fail(f"still mounted after the daemon ended:\n{err}")
    assert status == 0, f"exit status {status} (-31: a seccomp kill)\n{err[-5000:]}"
    assert TRACEBACK not in err


@pytest.mark.skipif(mount_unavailable() is not None, reason=f"{mount_unavailable()}")
def test_root_mount_runs_under_seccomp(tmp_path: Path) -> None:
    share, mnt = tmp_path / "share", tmp_path / "mnt"
    share.mkdir()
    mnt.mkdir()
    mp = MountProcess([str(share), str(mnt), "--seccomp", "kill", "--xattr"], mnt)
    try:
        mp.wait_serving()
        modes = seccomp_modes(mp.proc.pid)
        assert len(modes) > 1 and set(modes) == {"2"}, modes  # reader threads included
        (mnt / "d").mkdir()
        (mnt / "d" / "f").write_bytes(b"x" * 70000)
        os.link(mnt / "d" / "f", mnt / "hard")
        os.symlink("d/f", mnt / "ln")
        os.setxattr(mnt / "d" / "f", b"user.k", b"v")
        os.rename(mnt / "hard", mnt / "hard2")
        assert (share / "hard2").read_bytes() == b"x" * 70000
        assert os.getxattr(share / "d" / "f", b"user.k") == b"v"
        os.unlink(mnt / "ln")
    finally:
        stop_cleanly(mp, mnt)


@pytest.fixture
def nobody_dirs() -> Iterator[tuple[Path, Path]]:
    base = Path(tempfile.mkdtemp(prefix="sb-mount-"))
    share, mnt = base / "share", base / "mnt"
    for d in (base, share, mnt):
        d.mkdir(exist_ok=True)
        os.chown(d, USER, USER)
    try:
        yield share, mnt
    finally:
        if is_mounted(mnt):
            subprocess.run(["umount", "-l", str(mnt)], check=False)
        shutil.rmtree(base, ignore_errors=True)


class NobodyMount(MountProcess):
    """The mount daemon run as ``nobody`` (in a private mount namespace when the
    interpreter or /dev/fuse needs one to be reachable: the mount is then
    visible there only)."""

    def __init__(self, share: Path, mountpoint: Path) -> None:
        self.mountpoint = mountpoint
        command = [sys.executable, "-m", "virtiofsd_py", "mount", str(share), str(mountpoint)]
        argv = as_user(command, fuse=True)
        self.proc = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
        )


def test_unprivileged_mount_unmounts_through_the_helper(
    nobody_dirs: tuple[Path, Path],
) -> None:
    if os.geteuid() != 0 or shutil.which("fusermount3") is None or not os.path.exists("/dev/fuse"):
        pytest.skip("needs root (to drop to nobody), fusermount3 and /dev/fuse")
    share, mnt = nobody_dirs
    mp = NobodyMount(share, mnt)
    try:
        mp.wait_serving()
        pid = mp.proc.pid
        assert set(seccomp_modes(pid)) == {"2"}
        mountinfo = Path(f"/proc/{pid}/mountinfo").read_text()
        assert f" {mnt} " in mountinfo and "fuse.virtiofsd-py" in mountinfo
        # The fusermount3 helper waits, started before the filter.
        (helper,) = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        assert Path(f"/proc/{helper}/status").read_text().count("Seccomp:\t0") == 1
    finally:
        status, err = mp.stop()
    assert status == 0, f"exit status {status} (-31: a seccomp kill)\n{err[-5000:]}"
    assert TRACEBACK not in err
