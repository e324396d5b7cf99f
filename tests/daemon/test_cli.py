"""The daemon process as an operator meets it: options, sockets, lifecycle."""

from __future__ import annotations

import fcntl
import grp
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from virtiofsd_py.testing.daemon_proc import DaemonProcess, is_own_daemon
from virtiofsd_py.testing.frontend.vhost_user import VhostUserFrontend

pytestmark = pytest.mark.skipif(not is_own_daemon(), reason="tests virtiofsd-py's own command line")
ROOT = Path(__file__).resolve().parents[2]


def run_cli(*args: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "virtiofsd_py", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


def test_print_capabilities() -> None:
    res = run_cli("--print-capabilities")
    assert res.returncode == 0
    caps = json.loads(res.stdout)
    assert caps["type"] == "fs"
    assert isinstance(caps["features"], list)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--uid-map", ":0:1000:1:", "--sandbox", "none"], "--uid-map/--gid-map apply"),
        (["--xattrmap", ":nope:all:::"], "xattrmap rule 1"),
        (["--modcaps", "+no_such_cap"], "--modcaps"),
        (["--seccomp", "sometimes"], "invalid choice"),
        (["--cache", "sometimes"], "invalid choice"),
    ],
)
def test_unbuilt_or_bad_options_are_refused(tmp_path: Path, args: list[str], needle: str) -> None:
    res = run_cli("--shared-dir", str(tmp_path), "--socket-path", str(tmp_path / "s"), *args)
    assert res.returncode == 2
    assert needle in res.stderr
    assert not (tmp_path / "s").exists()


def test_required_options(tmp_path: Path) -> None:
    res = run_cli("--socket-path", str(tmp_path / "s"))
    assert res.returncode == 2 and "--shared-dir is required" in res.stderr
    res = run_cli("--shared-dir", str(tmp_path))
    assert res.returncode == 2 and "--socket-path" in res.stderr


def test_missing_shared_dir_is_a_clear_startup_error(tmp_path: Path) -> None:
    res = run_cli("--shared-dir", str(tmp_path / "nope"), "--socket-path", str(tmp_path / "s"))
    assert res.returncode == 1
    assert "nope" in res.stderr
    assert "No such file" in res.stderr or "not a directory" in res.stderr
    assert not (tmp_path / "s").exists()


def daemon(tmp_path: Path, *extra: str) -> DaemonProcess:
    share = tmp_path / "share"
    share.mkdir(exist_ok=True)
    return DaemonProcess(share, tmp_path / "run", extra_args=list(extra)).start()


def test_exits_cleanly_when_the_front_end_disconnects(tmp_path: Path) -> None:
    d = daemon(tmp_path)
    fe = VhostUserFrontend.connect(d.socket_path)
    assert fe.get_features() & (1 << 32)
    fe.close()
    assert d.wait(10) == 0, d.log()
    assert not d.socket_path.exists()
    assert not Path(f"{d.socket_path}.pid").exists()


def test_sigterm_before_connection(tmp_path: Path) -> None:
    d = daemon(tmp_path)
    assert d.terminate(10) == 0, d.log()
    assert not d.socket_path.exists()


def test_sigterm_while_serving(tmp_path: Path) -> None:
    d = daemon(tmp_path)
    fe = VhostUserFrontend.connect(d.socket_path)
    fe.get_features()
    try:
        assert d.terminate(10) == 0, d.log()
        assert fe.wait_closed(5)
    finally:
        fe.close()


def test_second_daemon_on_the_same_socket_is_refused(tmp_path: Path) -> None:
    d = daemon(tmp_path)
    try:
        res = run_cli("--shared-dir", str(tmp_path / "share"), "--socket-path", str(d.socket_path))
        assert res.returncode == 1
        assert "another daemon" in res.stderr
        fe = VhostUserFrontend.connect(d.socket_path)  # the first one still serves
        assert fe.get_queue_num() >= 2
        fe.close()
        assert d.wait(10) == 0
    finally:
        d.kill()


def test_stale_socket_is_replaced(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(run / "vhost.sock"))
    stale.close()  # a socket file nobody listens on, as a crashed daemon leaves
    d = daemon(tmp_path)
    try:
        fe = VhostUserFrontend.connect(d.socket_path)
        fe.get_features()
        fe.close()
    finally:
        d.kill()


def test_socket_group(tmp_path: Path) -> None:
    group = next((g for g in ("nogroup", "daemon", "users") if _group_exists(g)), None)
    if group is None:
        pytest.skip("no spare group on this machine")
    d = daemon(tmp_path, "--socket-group", group)
    try:
        st = os.stat(d.socket_path)
        assert st.st_gid == grp.getgrnam(group).gr_gid
        assert stat.S_IMODE(st.st_mode) == 0o660
    finally:
        d.kill()


def _group_exists(name: str) -> bool:
    try:
        grp.getgrnam(name)
    except KeyError:
        return False
    return True


def _serve_on_inherited_socket(tmp_path: Path, systemd: bool) -> None:
    share = tmp_path / "share"
    share.mkdir()
    path = str(tmp_path / "listen.sock")
    lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lsock.bind(path)
    lsock.listen(1)
    fd = fcntl.fcntl(lsock.fileno(), fcntl.F_DUPFD_CLOEXEC, 10)
    lsock.close()
    if systemd:
        # Exactly what systemd does: the socket at fd 3, LISTEN_PID = the daemon.
        wrapper = (
            "import os, sys; os.dup2(int(sys.argv[1]), 3); os.close(int(sys.argv[1]));"
            "os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS='1');"
            "os.execv(sys.executable, [sys.executable, '-m', 'virtiofsd_py', *sys.argv[2:]])"
        )
        cmd = [sys.executable, "-c", wrapper, str(fd), "--shared-dir", str(share)]
    else:
        cmd = [sys.executable, "-m", "virtiofsd_py", "--shared-dir", str(share), "--fd", str(fd)]
    proc = subprocess.Popen(cmd, pass_fds=(fd,), cwd=ROOT, stderr=subprocess.PIPE, text=True)
    os.close(fd)
    try:
        fe = VhostUserFrontend.connect(path)
        assert fe.get_features() & (1 << 32)
        fe.close()
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        assert proc.stderr is not None
        err = proc.stderr.read()
    assert "front-end connected" in err


def test_listening_fd(tmp_path: Path) -> None:
    _serve_on_inherited_socket(tmp_path, systemd=False)


def test_systemd_socket_activation(tmp_path: Path) -> None:
    _serve_on_inherited_socket(tmp_path, systemd=True)


def test_fd_that_is_not_a_listening_socket(tmp_path: Path) -> None:
    r, w = os.pipe()
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "virtiofsd_py", "--shared-dir", str(tmp_path), "--fd", str(r)],
            pass_fds=(r,),
            capture_output=True,
            text=True,
            timeout=20,
            cwd=ROOT,
        )
    finally:
        os.close(r)
        os.close(w)
    assert proc.returncode == 1
    assert "not a listening unix socket" in proc.stderr or "--fd" in proc.stderr


def test_sigterm_is_prompt(tmp_path: Path) -> None:
    d = daemon(tmp_path)
    t0 = time.monotonic()
    os.kill(d.pid, signal.SIGTERM)
    assert d.wait(10) == 0
    assert time.monotonic() - t0 < 10
