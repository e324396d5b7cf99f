"""The daemon with ``--inode-file-handles``: served through the test front-end."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemon_support import HostTree, finish_daemon

from virtiofsd_py.fuse import abi
from virtiofsd_py.testing.daemon_proc import DaemonError, DaemonProcess, is_own_daemon
from virtiofsd_py.testing.frontend.fuse_client import FuseClient
from virtiofsd_py.testing.frontend.vhost_user import VhostUserFrontend

pytestmark = pytest.mark.skipif(not is_own_daemon(), reason="checks our daemon's own fds")


def daemon_fds(d: DaemonProcess) -> int:
    return len(os.listdir(f"/proc/{d.pid}/fd"))


@pytest.fixture
def mandatory(host_tree: HostTree, tmp_path: Path) -> Iterator[DaemonProcess]:
    d = DaemonProcess(
        host_tree.root, tmp_path / "run", extra_args=["--inode-file-handles=mandatory"]
    ).start()
    try:
        yield d
    finally:
        finish_daemon(d)


def test_mandatory_serves_without_an_fd_per_inode(
    mandatory: DaemonProcess, host_tree: HostTree
) -> None:
    fe = VhostUserFrontend.connect(mandatory.socket_path)
    try:
        fe.connect_and_start(queues=2, queue_size=1024)
        client = FuseClient(fe)
        client.init()
        host_tree.check_serving(fe)
        many = client.lookup(abi.FUSE_ROOT_ID, "many").nodeid
        before = daemon_fds(mandatory)
        names = sorted(os.listdir(host_tree.path("many")))
        ids = {client.lookup(many, n).nodeid for n in names}
        assert len(ids) == host_tree.many
        # 300 inodes looked up, not one fd more held for them.
        assert daemon_fds(mandatory) == before
        link = client.lookup(abi.FUSE_ROOT_ID, "link").nodeid
        assert client.readlink(link) == b"small.txt"
        fh = client.open(client.lookup(abi.FUSE_ROOT_ID, "big.bin").nodeid).fh
        assert fh > 0
    finally:
        fe.close()


def test_mandatory_refuses_to_start_without_cap_dac_read_search(
    host_tree: HostTree, tmp_path: Path
) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (capabilities)")
    d = DaemonProcess(
        host_tree.root,
        tmp_path / "run",
        extra_args=["--inode-file-handles=mandatory", "--modcaps=-dac_read_search"],
    )
    with contextlib.suppress(DaemonError):  # exiting before listening is fine too
        d.start()
    status = d.wait(10.0)
    assert status not in (None, 0)
    assert "CAP_DAC_READ_SEARCH" in d.log()
    assert "Traceback" not in d.log()
