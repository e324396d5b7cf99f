"""systemd integration: sd_notify datagrams, socket activation, the unit files.

systemd is not PID 1 in the test container, so the daemon is started the
way systemd starts it (listening socket at fd 3 with LISTEN_PID/LISTEN_FDS,
NOTIFY_SOCKET set) and the test plays the service manager's end of
NOTIFY_SOCKET.  The unit files are checked with ``systemd-analyze verify``
where it is installed.  Protocol: sd_notify(3), sd_listen_fds(3).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from virtiofsd_py.app import sdnotify
from virtiofsd_py.testing.daemon_proc import DaemonProcess, is_own_daemon
from virtiofsd_py.testing.frontend.fuse_client import FuseClient
from virtiofsd_py.testing.frontend.vhost_user import VhostUserFrontend

ROOT = Path(__file__).resolve().parents[2]
UNITS = ROOT / "contrib" / "systemd"


class NotifyReceiver:
    """The service manager's end: a datagram socket bound at a path or abstract name."""

    def __init__(self, tmp_path: Path, abstract: bool = False) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if abstract:
            name = f"virtiofsd-py-test-{uuid.uuid4().hex}"
            self.sock.bind("\0" + name)
            self.env = "@" + name
        else:
            path = str(tmp_path / "notify.sock")
            self.sock.bind(path)
            self.env = path

    def receive(self, timeout: float = 10.0) -> dict[str, str]:
        self.sock.settimeout(timeout)
        data = self.sock.recv(4096).decode()
        return dict(line.split("=", 1) for line in data.split("\n"))

    def wait_for(self, key: str, timeout: float = 10.0) -> dict[str, str]:
        """Messages until one has ``key``; that one."""
        while True:
            msg = self.receive(timeout)
            if key in msg:
                return msg

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notifier() -> Iterator[sdnotify.Notifier]:
    n = sdnotify.Notifier()
    yield n
    n.close()


@pytest.mark.parametrize("abstract", [False, True])
def test_notify_sends_one_datagram(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, abstract: bool, notifier: sdnotify.Notifier
) -> None:
    rx = NotifyReceiver(tmp_path, abstract)
    monkeypatch.setenv("NOTIFY_SOCKET", rx.env)
    try:
        assert notifier.ready("serving")
        assert rx.receive() == {"READY": "1", "STATUS": "serving"}
        assert notifier.stopping("bye")
        assert rx.receive() == {"STOPPING": "1", "STATUS": "bye"}
    finally:
        rx.close()


def test_prepared_connection_survives_the_path_going_away(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, notifier: sdnotify.Notifier
) -> None:
    rx = NotifyReceiver(tmp_path)
    monkeypatch.setenv("NOTIFY_SOCKET", rx.env)
    try:
        notifier.prepare()
        os.unlink(rx.env)  # as inside a sandbox: the path no longer resolves
        assert notifier.status("still here")
        assert rx.receive() == {"STATUS": "still here"}
    finally:
        rx.close()


def test_without_notify_socket_nothing_is_sent(
    monkeypatch: pytest.MonkeyPatch, notifier: sdnotify.Notifier
) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert not notifier.ready("x")


def test_a_vanished_manager_is_not_fatal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, notifier: sdnotify.Notifier
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody"))
    assert not notifier.status("x")


def test_bad_assignments_are_refused(notifier: sdnotify.Notifier) -> None:
    with pytest.raises(ValueError):
        notifier.notify("READY")
    with pytest.raises(ValueError):
        notifier.notify("STATUS=a\nREADY=1")


# -- the daemon under a (simulated) service manager --------------------------------
own = pytest.mark.skipif(not is_own_daemon(), reason="tests virtiofsd-py's own command line")


@own
@pytest.mark.parametrize("abstract", [False, True])
def test_daemon_notifies_ready_status_and_stopping(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, abstract: bool
) -> None:
    rx = NotifyReceiver(tmp_path, abstract)
    monkeypatch.setenv("NOTIFY_SOCKET", rx.env)
    share = tmp_path / "share"
    share.mkdir()
    d = DaemonProcess(share, tmp_path / "run").start()
    try:
        ready = rx.wait_for("READY")
        assert ready["READY"] == "1"
        assert ready["STATUS"].startswith("waiting for a vhost-user front-end on ")
        fe = VhostUserFrontend.connect(d.socket_path)
        fe.connect_and_start(queues=2)
        FuseClient(fe).init()
        assert rx.wait_for("STATUS")["STATUS"] == "serving a vhost-user front-end"
        fe.close()
        assert rx.wait_for("STOPPING")["STOPPING"] == "1"
        assert d.wait(10) == 0, d.log()
    finally:
        d.kill()
        rx.close()


@own
def test_socket_activated_notify_service(tmp_path: Path) -> None:
    """What virtiofsd-py@.socket + @.service do: socket at fd 3, Type=notify."""
    rx = NotifyReceiver(tmp_path, abstract=True)
    share = tmp_path / "share"
    share.mkdir()
    (share / "hello").write_bytes(b"hi")
    path = str(tmp_path / "listen.sock")
    lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lsock.bind(path)
    lsock.listen(1)
    fd = fcntl.fcntl(lsock.fileno(), fcntl.F_DUPFD_CLOEXEC, 10)
    lsock.close()
    wrapper = (
        "import os, sys; os.dup2(int(sys.argv[1]), 3); os.close(int(sys.argv[1]));"
        "os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS='1', LISTEN_FDNAMES='vfsd');"
        "os.execv(sys.executable, [sys.executable, '-m', 'virtiofsd_py', *sys.argv[2:]])"
    )
    # As the unit's RuntimeDirectory= sets it (rejected migration states go there).
    env = dict(
        os.environ, NOTIFY_SOCKET=rx.env, PYTHONPATH=str(ROOT), RUNTIME_DIRECTORY=str(tmp_path)
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", wrapper, str(fd), "--shared-dir", str(share), "--cache", "auto"],
        pass_fds=(fd,),
        env=env,
        stderr=open(tmp_path / "daemon.log", "w"),  # noqa: SIM115
    )
    os.close(fd)
    try:
        assert rx.wait_for("READY")["STATUS"] == "waiting for a vhost-user front-end on fd 3"
        fe = VhostUserFrontend.connect(path)
        fe.connect_and_start(queues=2)
        fuse = FuseClient(fe)
        fuse.init()
        assert fuse.lookup(1, "hello").size == 2
        fe.close()
        assert rx.wait_for("STOPPING")["STOPPING"] == "1"
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        rx.close()
        print((tmp_path / "daemon.log").read_text())


# -- the unit files ----------------------------------------------------------------
def unit_text(name: str) -> str:
    return (UNITS / name).read_text()


def test_service_unit_is_type_notify_and_hardened() -> None:
    service = unit_text("virtiofsd-py@.service")
    assert "Type=notify" in service.splitlines()
    # The sandboxed child notifies, not the main (supervising) process.
    assert "NotifyAccess=all" in service.splitlines()
    for hardening in ("NoNewPrivileges=yes", "ProtectSystem=", "CapabilityBoundingSet="):
        assert hardening in service
    socket_unit = unit_text("virtiofsd-py@.socket")
    assert "ListenStream=" in socket_unit and "Accept=no" in socket_unit


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    # verify wants the ExecStart binary to exist: point it at a stand-in.
    exe = tmp_path / "virtiofsd-py"
    exe.write_text("#!/bin/sh\nexit 0\n")
    exe.chmod(0o755)
    for name in ("virtiofsd-py@.service", "virtiofsd-py@.socket"):
        text = unit_text(name).replace("/usr/local/bin/virtiofsd-py", str(exe))
        (tmp_path / name).write_text(text)
    for inst in ("virtiofsd-py@share.service", "virtiofsd-py@share.socket"):
        os.symlink(tmp_path / inst.replace("share", ""), tmp_path / inst)
    res = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", *(str(tmp_path / i) for i in (
            "virtiofsd-py@share.socket", "virtiofsd-py@share.service"))],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    problems = [
        line
        for line in (res.stdout + res.stderr).splitlines()
        if "virtiofsd-py" in line and "Failed to" not in line.split(":", 1)[0]
    ]
    assert res.returncode == 0 and not problems, res.stdout + res.stderr
