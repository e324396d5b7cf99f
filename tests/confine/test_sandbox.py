"""--sandbox: option rules, and the namespace sandbox of a real daemon process.

The daemon tests elsewhere pass ``--sandbox none``; here the daemon runs in
its default namespace sandbox and we look at it from outside (its
namespaces, its root, its supervising parent) and through the test
front-end (it still serves the share, and only the share).  The checks
shared with ``--sandbox chroot`` are in ``test_sandbox_modes.py``, chroot's
own in ``test_sandbox_chroot.py``, the unprivileged daemon in
``test_sandbox_unprivileged.py``.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemon_support import SMALL, HostTree, finish_daemon, make_host_tree, session

from virtiofsd_py.app.options import OptionError, parse_args
from virtiofsd_py.confine.sandbox import IdMapping
from virtiofsd_py.fuse.abi import FUSE_ROOT_ID as ROOT
from virtiofsd_py.testing.daemon_proc import DaemonProcess, is_own_daemon

pytestmark = pytest.mark.ours_only

AS_ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not AS_ROOT, reason="the namespace sandbox tests run as root")


def args(*extra: str) -> list[str]:
    return ["--shared-dir", "/tmp", "--socket-path", "/tmp/x.sock", *extra]


# -- options ---------------------------------------------------------------------
def test_defaults_are_the_rust_ones() -> None:
    opts = parse_args(args())
    assert (opts.sandbox, opts.seccomp) == ("namespace", "kill")


@pytest.mark.parametrize(
    ("text", "mapping"),
    [(":0:1000:1:", IdMapping(0, 1000, 1)), ("/5/100000/65536/", IdMapping(5, 100000, 65536))],
)
def test_id_map_syntax(text: str, mapping: IdMapping) -> None:
    assert IdMapping.parse(text) == mapping


@pytest.mark.parametrize("text", ["", ":0:1000:", ":a:1:1:", ":0:1:0:", ":0:4294967295:2:"])
def test_id_map_syntax_errors(text: str) -> None:
    with pytest.raises(ValueError):
        IdMapping.parse(text)


@needs_root
def test_uid_map_as_root_is_refused() -> None:
    with pytest.raises(OptionError, match="--uid-map/--gid-map"):
        parse_args(args("--uid-map", ":0:1000:1:"))


@needs_root
def test_chroot_is_accepted_as_root() -> None:
    assert parse_args(args("--sandbox", "chroot")).sandbox == "chroot"


def test_refusal_reaches_the_operator(tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "virtiofsd_py", *args("--sandbox", "chroot", "--uid-map", "x")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 2
    assert "--uid-map" in r.stderr


# -- a sandboxed daemon ------------------------------------------------------------
def children(pid: int) -> list[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(p) for p in text.split()]


def ns(pid: int | str, kind: str) -> str:
    return os.readlink(f"/proc/{pid}/ns/{kind}")


def sandboxed(tree: HostTree, run: Path, *extra: str) -> DaemonProcess:
    return DaemonProcess(tree.root, run, extra_args=["--sandbox", "namespace", *extra]).start()


@pytest.fixture
def tree(tmp_path: Path) -> HostTree:
    return make_host_tree(tmp_path)


@pytest.fixture
def jailed(tree: HostTree, tmp_path: Path) -> Iterator[DaemonProcess]:
    if not is_own_daemon():
        pytest.skip("our sandbox only")
    if not AS_ROOT:
        pytest.skip("the namespace sandbox tests run as root")
    d = sandboxed(tree, tmp_path / "run")
    try:
        yield d
    finally:
        if d.alive():
            finish_daemon(d)
        else:
            d.kill()  # the test ended it; make sure nothing is left


def the_child(daemon: DaemonProcess, timeout: float = 10.0) -> int:
    """The sandboxed child, once it serves (the socket exists before the fork)."""
    deadline = time.monotonic() + timeout
    while "waiting for a vhost-user front-end" not in daemon.log():
        assert daemon.alive() and time.monotonic() < deadline, daemon.log()
        time.sleep(0.01)
    (child,) = children(daemon.pid)
    return child


def test_child_is_in_new_namespaces(jailed: DaemonProcess) -> None:
    child = the_child(jailed)
    for kind in ("pid", "mnt", "net"):
        assert ns(child, kind) != ns("self", kind), kind
    # The supervising parent stays in our mount namespace (it removes the socket).
    assert ns(jailed.pid, "mnt") == ns("self", "mnt")
    assert ns(child, "user") == ns("self", "user")  # root needs no user namespace


def test_child_root_holds_only_proc_and_the_share(jailed: DaemonProcess, tree: HostTree) -> None:
    child = the_child(jailed)
    root = Path(f"/proc/{child}/root")
    assert sorted(os.listdir(root)) == ["proc", "shared"]
    assert sorted(os.listdir(root / "shared")) == sorted(os.listdir(tree.root))
    # Its proc is a fresh one: the daemon is pid 1 and alone there.
    pids = [n for n in os.listdir(root / "proc") if n.isdigit()]
    assert pids == ["1"]
    with pytest.raises(OSError):
        (root / "new-file").write_bytes(b"x")  # the tmpfs root is read-only


def test_child_lost_capabilities(jailed: DaemonProcess) -> None:
    status = Path(f"/proc/{the_child(jailed)}/status").read_text()
    fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
    sys_admin = 1 << 21
    assert int(fields["CapEff"], 16) & sys_admin == 0
    assert int(fields["CapBnd"], 16) & sys_admin == 0
    assert int(fields["CapEff"], 16) & (1 << 2)  # DAC_READ_SEARCH for file handles
    assert fields["NoNewPrivs"].strip() == "1"
    assert fields["Seccomp"].strip() == "2"


def test_serves_the_share_from_inside(jailed: DaemonProcess, tree: HostTree) -> None:
    fe, fuse = session(jailed)
    try:
        entry = fuse.lookup(ROOT, b"small.txt")
        opened = fuse.open(entry.nodeid, os.O_RDONLY)
        assert fuse.read(entry.nodeid, opened.fh, 0, 4096) == SMALL
        # A symlink pointing outside the share is returned as text, never followed.
        link = fuse.lookup(ROOT, b"escape_abs")
        assert fuse.readlink(link.nodeid) == str(tree.outside).encode()
        # ".." of the root is the root, inside the sandbox as outside.
        assert fuse.lookup(ROOT, b"..").ino == os.lstat(tree.root).st_ino
    finally:
        fe.close()


def test_sigterm_reaches_the_child_and_files_are_removed(jailed: DaemonProcess) -> None:
    child = the_child(jailed)
    pidfile = Path(str(jailed.socket_path) + ".pid")
    assert pidfile.exists()
    assert jailed.terminate(timeout=10) == 0
    assert not os.path.exists(f"/proc/{child}")
    assert not jailed.socket_path.exists()
    assert not pidfile.exists()


def test_parent_exits_as_the_child_died(jailed: DaemonProcess) -> None:
    # (pid 1 of a namespace ignores SIGSYS sent from outside; a seccomp kill is
    # forced, as SIGKILL is.)
    os.kill(the_child(jailed), signal.SIGKILL)
    assert jailed.wait(timeout=10) == -signal.SIGKILL
    assert not jailed.socket_path.exists()


def test_child_dies_with_its_parent(jailed: DaemonProcess) -> None:
    child = the_child(jailed)
    pidfd = os.pidfd_open(child)
    try:
        os.kill(jailed.pid, signal.SIGKILL)  # the parent only, not the process group
        assert select.select([pidfd], [], [], 10)[0], "child outlived its parent"
    finally:
        os.close(pidfd)
