"""The daemon started by an unprivileged user: ``--sandbox namespace`` in a user
namespace of its own (``--uid-map``/``--gid-map`` through newuidmap/newgidmap),
and ``--sandbox chroot`` refused.

The tests run as root and drop to ``nobody`` for the daemon (setpriv).  When
the interpreter lives under a directory ``nobody`` cannot enter (pyenv in
``/root``), the daemon starts in a private mount namespace where that one
directory is replaced by a tmpfs holding only a bind of the interpreter's
prefix -- scaffolding of the test, made before the uid is dropped, that the
daemon's own namespaces then inherit.  If this machine does not allow
unprivileged user namespaces, the tests skip and say which setting forbids
them.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemon_support import (
    SMALL,
    HostTree,
    finish_daemon,
    make_host_tree,
    require_own_daemon_as_root,
    session,
)
from escape_ops import create
from unprivileged import REPO, USER, as_user, userns_unavailable

from virtiofsd_py.confine.sandbox import CHROOT_NEEDS_ROOT
from virtiofsd_py.fuse import abi
from virtiofsd_py.testing.daemon_proc import DaemonError, DaemonProcess

pytestmark = pytest.mark.ours_only

ROOT = abi.FUSE_ROOT_ID


@pytest.fixture(autouse=True)
def _preconditions() -> None:
    require_own_daemon_as_root("the tests drop from root to nobody")
    if shutil.which("setpriv") is None:
        pytest.skip("needs setpriv (util-linux)")


@pytest.fixture
def base() -> Iterator[Path]:
    """A directory ``nobody`` owns (pytest's tmp_path is root's, mode 0700)."""
    d = Path(tempfile.mkdtemp(prefix="sb-unpriv-"))
    os.chown(d, USER, USER)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def daemon_command(*extra: str) -> str:
    argv = as_user([sys.executable, "-m", "virtiofsd_py"])
    words = " ".join(shlex.quote(w) for w in argv)
    return (
        f"{words} --socket-path {{socket}} --shared-dir {{shared_dir}} --log-level debug "
        f"--tag testfs {' '.join(shlex.quote(e) for e in extra)}"
    )


def owned_tree(base: Path) -> HostTree:
    tree = make_host_tree(base)
    for dirpath, dirnames, filenames in os.walk(base):
        for name in (*dirnames, *filenames):
            os.lchown(os.path.join(dirpath, name), USER, USER)
    return tree


def start_unprivileged(tree: HostTree, run: Path, *extra: str) -> DaemonProcess:
    run.mkdir()
    os.chown(run, USER, USER)
    d = DaemonProcess(tree.root, run, template=daemon_command("--sandbox", "namespace", *extra))
    try:
        d.start(timeout=20)
    except DaemonError as e:
        if "cannot create namespaces" in str(e):
            pytest.skip(f"the unprivileged daemon cannot sandbox itself here: {e}")
        raise
    deadline = time.monotonic() + 20
    while "waiting for a vhost-user front-end" not in d.log():
        assert d.alive() and time.monotonic() < deadline, d.log()
        time.sleep(0.01)
    return d


def sandboxed_child(d: DaemonProcess) -> int:
    (child,) = Path(f"/proc/{d.pid}/task/{d.pid}/children").read_text().split()
    return int(child)


def id_map(pid: int, which: str) -> list[list[int]]:
    text = Path(f"/proc/{pid}/{which}").read_text()
    return [[int(n) for n in line.split()] for line in text.splitlines()]


def serve_and_create(d: DaemonProcess, tree: HostTree) -> None:
    fe, c = session(d)
    try:
        entry = c.lookup(ROOT, b"small.txt")
        assert c.read(entry.nodeid, c.open(entry.nodeid).fh, 0, 4096) == SMALL
        create(c, ROOT, b"made-by-guest", 0o640)
    finally:
        fe.close()
    st = os.stat(tree.path("made-by-guest"))
    assert (st.st_uid, st.st_gid) == (USER, USER)  # an unprivileged daemon owns what it makes


@pytest.fixture
def userns() -> None:
    why = userns_unavailable()
    if why is not None:
        print(why)
        pytest.skip(why)


def test_chroot_as_non_root_is_refused(base: Path) -> None:
    r = subprocess.run(
        as_user(
            [
                sys.executable,
                "-m",
                "virtiofsd_py",
                "--sandbox",
                "chroot",
                "--shared-dir",
                str(base),
                "--socket-path",
                str(base / "s.sock"),
            ]
        ),
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert r.returncode == 2, r.stderr
    assert CHROOT_NEEDS_ROOT in r.stderr
    assert not (base / "s.sock").exists()


@pytest.mark.usefixtures("userns")
def test_unprivileged_namespace_sandbox_serves(base: Path) -> None:
    tree = owned_tree(base)
    d = start_unprivileged(tree, base / "run")
    try:
        child = sandboxed_child(d)
        for kind in ("user", "pid", "mnt", "net"):
            assert os.readlink(f"/proc/{child}/ns/{kind}") != os.readlink(f"/proc/self/ns/{kind}")
        assert id_map(child, "uid_map") == [[USER, USER, 1]]  # our own id, 1:1
        assert sorted(os.listdir(f"/proc/{child}/root")) == ["proc", "shared"]
        serve_and_create(d, tree)
    finally:
        finish_daemon(d)


@pytest.mark.usefixtures("userns")
def test_unprivileged_with_id_maps_through_newuidmap(base: Path) -> None:
    if shutil.which("newuidmap") is None or shutil.which("newgidmap") is None:
        pytest.skip("--uid-map/--gid-map need newuidmap/newgidmap (package uidmap)")
    tree = owned_tree(base)
    # Our own id mapped to 0 is what newuidmap allows without /etc/subuid.
    d = start_unprivileged(
        tree, base / "run", "--uid-map", f":0:{USER}:1:", "--gid-map", f":0:{USER}:1:"
    )
    try:
        child = sandboxed_child(d)
        assert id_map(child, "uid_map") == [[0, USER, 1]]
        assert id_map(child, "gid_map") == [[0, USER, 1]]
        status = Path(f"/proc/{child}/status").read_text()
        assert f"Uid:\t{USER}\t{USER}\t{USER}\t{USER}" in status  # root inside, nobody outside
        serve_and_create(d, tree)
    finally:
        finish_daemon(d)


@pytest.mark.usefixtures("userns")
def test_a_range_not_granted_in_subuid_is_refused(base: Path) -> None:
    if shutil.which("newuidmap") is None:
        pytest.skip("needs newuidmap (package uidmap)")
    tree = owned_tree(base)
    run = base / "run"
    run.mkdir()
    os.chown(run, USER, USER)
    d = DaemonProcess(
        tree.root,
        run,
        template=daemon_command("--sandbox", "namespace", "--uid-map", ":0:100000:65536:"),
    )
    try:
        with contextlib.suppress(DaemonError):  # the socket exists before the sandbox fails
            d.start(timeout=20)
        assert d.wait(20) not in (0, None), d.log()
        assert "newuidmap/newgidmap failed to set up --uid-map/--gid-map" in d.log()
    finally:
        d.kill()
