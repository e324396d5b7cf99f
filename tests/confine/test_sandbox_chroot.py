"""``--sandbox chroot`` seen from outside: root, working directory, namespaces, files.

What it serves is checked with the namespace mode's checks in
``test_sandbox_modes.py``; here what only chroot does: the process itself
(no fork, no namespace) has the share as its root and its own fd directory
as its working directory, and the socket and pid files it removes at the end
are the host's, never a file of the same path inside the share.
"""

from __future__ import annotations

import os
import shlex
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemon_support import HostTree, finish_daemon, make_host_tree, require_own_daemon_as_root

from virtiofsd_py.testing.daemon_proc import DaemonProcess

pytestmark = pytest.mark.ours_only


@pytest.fixture(autouse=True)
def _root_and_ours() -> None:
    require_own_daemon_as_root("--sandbox chroot needs root")


def entered(d: DaemonProcess) -> DaemonProcess:
    """``d`` once it serves (the socket exists before the chroot)."""
    deadline = time.monotonic() + 10
    while "waiting for a vhost-user front-end" not in d.log():
        assert d.alive() and time.monotonic() < deadline, d.log()
        time.sleep(0.01)
    return d


@pytest.fixture
def tree(tmp_path: Path) -> HostTree:
    return make_host_tree(tmp_path)


@pytest.fixture
def chrooted(tree: HostTree, tmp_path: Path) -> Iterator[DaemonProcess]:
    d = DaemonProcess(tree.root, tmp_path / "run", extra_args=["--sandbox", "chroot"]).start()
    try:
        yield entered(d)
    finally:
        if d.alive():
            d.terminate(timeout=10)  # SIGTERM at once: nothing would end the session
        finish_daemon(d)


def test_root_is_the_share_and_cwd_the_fd_directory(
    chrooted: DaemonProcess, tree: HostTree
) -> None:
    pid = chrooted.pid
    assert os.readlink(f"/proc/{pid}/root") == str(tree.root)
    assert os.readlink(f"/proc/{pid}/cwd") == f"/proc/{pid}/fd"
    assert sorted(os.listdir(f"/proc/{pid}/root")) == sorted(os.listdir(tree.root))


def test_no_namespaces_and_no_child(chrooted: DaemonProcess) -> None:
    pid = chrooted.pid
    for kind in ("pid", "mnt", "net", "user"):
        assert os.readlink(f"/proc/{pid}/ns/{kind}") == os.readlink(f"/proc/self/ns/{kind}")
    assert Path(f"/proc/{pid}/task/{pid}/children").read_text().split() == []


def test_files_of_the_socket_path_inside_the_share_are_left_alone(
    tree: HostTree, tmp_path: Path
) -> None:
    """The pid and socket files are removed by fd; their absolute paths would name
    files in the share once chroot'ed."""
    run = tmp_path / "run"
    decoys = [tree.root / str(run / n).lstrip("/") for n in ("vhost.sock", "vhost.sock.pid")]
    for decoy in decoys:
        decoy.parent.mkdir(parents=True, exist_ok=True)
        decoy.write_bytes(b"a file of the guest's\n")
    d = DaemonProcess(tree.root, run, extra_args=["--sandbox", "chroot"]).start()
    entered(d)
    assert d.terminate(timeout=10) == 0, d.log()
    assert not (run / "vhost.sock").exists()
    assert not (run / "vhost.sock.pid").exists()
    assert [x.read_bytes() for x in decoys] == [b"a file of the guest's\n"] * 2


def test_without_a_host_directory_the_root_is_an_empty_removed_one(tmp_path: Path) -> None:
    command = f"{shlex.quote(sys.executable)} -m virtiofsd_py --socket-path {{socket}}"
    d = DaemonProcess(
        tmp_path / "unused",
        tmp_path / "run",
        template=command,
        extra_args=["--log-level", "debug", "--sandbox", "chroot", "--backend", "memory"],
    ).start()
    try:
        entered(d)
        root = os.readlink(f"/proc/{d.pid}/root")
        assert "virtiofsd-py-root-" in root and root.endswith(" (deleted)")
        assert os.listdir(f"/proc/{d.pid}/root") == []
    finally:
        d.terminate(timeout=10)
        finish_daemon(d)
