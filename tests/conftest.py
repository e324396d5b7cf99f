"""Shared fixtures: a host tree to share, a daemon process, a front-end, a FUSE session.

The daemon is ours unless ``VIRTIOFSD_PY_TEST_DAEMON`` names another one
(a command template with ``{socket}`` and ``{shared_dir}``), e.g. the Rust
virtiofsd for a differential run::

    VIRTIOFSD_PY_TEST_DAEMON='virtiofsd --sandbox none --seccomp none --xattr \
        --shared-dir {shared_dir} --socket-path {socket}' pytest tests/test_daemon_*.py

Tests marked ``ours_only`` check this project's extensions and are skipped
against another daemon.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from daemon_support import HostTree, finish_daemon, make_host_tree

from virtiofsd_py.fs.passthrough.filesystem import PassthroughConfig, PassthroughFS
from virtiofsd_py.testing.daemon_proc import DaemonProcess, is_own_daemon
from virtiofsd_py.testing.frontend.fuse_client import FuseClient
from virtiofsd_py.testing.frontend.vhost_user import VhostUserFrontend


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "ours_only: checks an extension of our daemon; skipped against another one"
    )
    config.addinivalue_line(
        "markers",
        "fd_per_node(reason): checks the O_PATH fd each node holds; skipped with"
        " --inode-file-handles=prefer",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if is_own_daemon():
        return
    skip = pytest.mark.skip(reason="specific to virtiofsd-py (VIRTIOFSD_PY_TEST_DAEMON is set)")
    for item in items:
        if "ours_only" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(params=["never", "prefer"])
def inode_file_handles(request: pytest.FixtureRequest) -> str:
    """``--inode-file-handles`` of the PassthroughFS a test makes with ``make_fs``.

    Every test that makes one runs once with each value: "prefer" keeps nodes
    as kernel file handles instead of O_PATH fds.  A test marked
    ``fd_per_node(reason)`` is about those fds and is skipped with "prefer".
    """
    mode: str = request.param
    mark = request.node.get_closest_marker("fd_per_node")
    if mode == "prefer" and mark is not None:
        pytest.skip(f"--inode-file-handles=prefer: {mark.args[0]}")
    return mode


@pytest.fixture
def make_fs(inode_file_handles: str) -> Callable[..., PassthroughFS]:
    """The one construction point of the passthrough suites: ``make_fs(share, **fields)``
    is ``PassthroughFS(PassthroughConfig(share, **fields))`` with this run's
    ``inode_file_handles``."""

    def make(share: Path, **fields: Any) -> PassthroughFS:
        fs = PassthroughFS(
            PassthroughConfig(shared_dir=share, inode_file_handles=inode_file_handles, **fields)
        )
        # "prefer" falls back to fds where the host makes no handles: that run
        # would repeat the "never" one.
        assert inode_file_handles == "never" or fs.file_handles.enabled
        return fs

    return make


@pytest.fixture
def host_tree(tmp_path: Path) -> HostTree:
    return make_host_tree(tmp_path)


@pytest.fixture
def daemon(host_tree: HostTree, tmp_path: Path) -> Iterator[DaemonProcess]:
    """A running daemon serving ``host_tree``; after the test it must exit cleanly."""
    d = DaemonProcess(host_tree.root, tmp_path / "run").start()
    try:
        yield d
    finally:
        finish_daemon(d)


@pytest.fixture
def frontend(daemon: DaemonProcess) -> Iterator[VhostUserFrontend]:
    """A connected (not yet started) front-end; closed after the test."""
    fe = VhostUserFrontend.connect(daemon.socket_path)
    try:
        yield fe
    finally:
        fe.close()


@pytest.fixture
def fuse(frontend: VhostUserFrontend) -> FuseClient:
    """A started device (hiprio + 1 request queue, indirect + event idx) after FUSE_INIT."""
    frontend.connect_and_start(queues=2, queue_size=1024)
    client = FuseClient(frontend)
    client.init()
    return client


@dataclass
class Session:
    """A daemon, its front-end and FUSE session, shared by the tests of one module."""

    tree: HostTree
    daemon: DaemonProcess
    fe: VhostUserFrontend
    fuse: FuseClient


@pytest.fixture(scope="module")
def session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Session]:
    """One daemon for many read-only tests (fast); checked when the module is done."""
    base = tmp_path_factory.mktemp("session")
    tree = make_host_tree(base)
    d = DaemonProcess(tree.root, base / "run").start()
    fe = VhostUserFrontend.connect(d.socket_path)
    try:
        fe.connect_and_start(queues=2, queue_size=1024)
        client = FuseClient(fe)
        client.init()
        yield Session(tree, d, fe, client)
    finally:
        fe.close()
        finish_daemon(d)
