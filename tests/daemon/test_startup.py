"""Every way start-up can fail ends the same way: exit status 1, one log line
naming the cause, no traceback, nothing left behind (app/startup.py)."""

from __future__ import annotations

import fcntl
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from virtiofsd_py.testing.daemon_proc import is_own_daemon

pytestmark = pytest.mark.skipif(not is_own_daemon(), reason="tests virtiofsd-py's own start-up")
ROOT = Path(__file__).resolve().parents[2]


def start(*args: str, pass_fds: tuple[int, ...] = ()) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "virtiofsd_py", *args],
        capture_output=True, text=True, timeout=30, cwd=ROOT, pass_fds=pass_fds,
    )  # fmt: skip


def assert_fails_with(res: subprocess.CompletedProcess[str], *needles: str) -> None:
    """Status 1, exactly one ERROR line holding every needle, only log lines, no traceback."""
    out = res.stdout + res.stderr
    assert res.returncode == 1, out
    assert "Traceback" not in out, out
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert all(line.startswith("[") for line in lines), out  # log records only
    errors = [line for line in lines if " ERROR " in line]
    assert len(errors) == 1, out
    for needle in needles:
        assert needle in errors[0], out


@pytest.fixture
def share(tmp_path: Path) -> Path:
    d = tmp_path / "share"
    d.mkdir()
    return d


def serve_args(share: Path, sock: Path | str, *extra: str) -> list[str]:
    return ["--shared-dir", str(share), "--socket-path", str(sock), "--sandbox", "none", *extra]


def left_behind(d: Path, *keep: Path) -> list[str]:
    """What start-up left in ``d`` besides ``keep``."""
    return sorted(p.name for p in d.iterdir() if p not in keep)


# -- the socket -------------------------------------------------------------------


def test_socket_in_a_missing_directory(tmp_path: Path, share: Path) -> None:
    sock = tmp_path / "nonexistent" / "x.sock"
    res = start(*serve_args(share, sock))
    assert_fails_with(res, str(sock), "pid file", "No such file or directory")


def test_socket_in_proc(share: Path) -> None:
    res = start(*serve_args(share, "/proc/x.sock"))
    assert_fails_with(res, "/proc/x.sock", "pid file")


def test_socket_path_too_long(tmp_path: Path, share: Path) -> None:
    sock = tmp_path / ("s" * 120)
    res = start(*serve_args(share, sock))
    assert_fails_with(res, "cannot bind", "too long")
    assert left_behind(tmp_path, share) == []


def test_socket_path_is_a_regular_file(tmp_path: Path, share: Path) -> None:
    sock = tmp_path / "x.sock"
    sock.write_text("not a socket")
    res = start(*serve_args(share, sock))
    assert_fails_with(res, str(sock), "exists and is not a socket")
    assert left_behind(tmp_path, share) == ["x.sock"]
    assert sock.read_text() == "not a socket"


def test_unknown_socket_group(tmp_path: Path, share: Path) -> None:
    res = start(*serve_args(share, tmp_path / "x.sock", "--socket-group", "no-such-group-x"))
    assert_fails_with(res, "--socket-group no-such-group-x", "no such group")
    assert left_behind(tmp_path, share) == []


def test_pid_file_locked_by_another_daemon(tmp_path: Path, share: Path) -> None:
    sock = tmp_path / "x.sock"
    # What a running daemon holds (test_cli.py runs a real second daemon).
    fd = os.open(f"{sock}.pid", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        res = start(*serve_args(share, sock))
    finally:
        os.close(fd)
    assert_fails_with(res, f"{sock}.pid is locked", "another daemon")
    assert not sock.exists()


# -- an inherited socket (--fd) ----------------------------------------------------


def _high(fd: int) -> int:
    """``fd`` moved above the range the interpreter uses at start."""
    high = fcntl.fcntl(fd, fcntl.F_DUPFD, 50)
    os.close(fd)
    return high


def test_fd_closed(share: Path) -> None:
    fd = _high(os.open("/", os.O_RDONLY))
    os.close(fd)  # a number, and nothing behind it
    res = start("--shared-dir", str(share), "--fd", str(fd), "--sandbox", "none")
    assert_fails_with(res, f"--fd {fd}", "Bad file descriptor")


def test_fd_not_a_socket(share: Path) -> None:
    r, w = os.pipe()
    r = _high(r)
    try:
        res = start("--shared-dir", str(share), "--fd", str(r), "--sandbox", "none", pass_fds=(r,))
    finally:
        os.close(r)
        os.close(w)
    assert_fails_with(res, f"--fd {r}", "non-socket")


@pytest.fixture(params=["unix, not listening", "tcp, listening"])
def wrong_socket(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[int]:
    if request.param.startswith("unix"):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(str(tmp_path / "not-listening.sock"))
    else:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.bind(("127.0.0.1", 0))
        s.listen(1)
    fd = _high(s.detach())
    try:
        yield fd
    finally:
        os.close(fd)


def test_fd_not_a_listening_unix_socket(share: Path, wrong_socket: int) -> None:
    fd = wrong_socket
    res = start("--shared-dir", str(share), "--fd", str(fd), "--sandbox", "none", pass_fds=(fd,))
    assert_fails_with(res, f"--fd {fd} is not a listening unix socket")


# -- the share ----------------------------------------------------------------------


@pytest.mark.parametrize("sandbox", ["none", "namespace"])
def test_shared_dir_missing(tmp_path: Path, sandbox: str) -> None:
    missing = tmp_path / "nope"
    res = start(
        "--shared-dir", str(missing), "--socket-path", str(tmp_path / "x.sock"),
        "--sandbox", sandbox,
    )  # fmt: skip
    assert_fails_with(res, f"shared directory {missing}", "No such file or directory")
    assert left_behind(tmp_path) == []


def test_shared_dir_not_a_directory(tmp_path: Path) -> None:
    afile = tmp_path / "file"
    afile.write_text("x")
    res = start(*serve_args(afile, tmp_path / "x.sock"))
    assert_fails_with(res, f"shared directory {afile}", "Not a directory")
    assert left_behind(tmp_path, afile) == []


@pytest.mark.parametrize("sandbox", ["none", "namespace"])
def test_backend_cannot_be_built(tmp_path: Path, share: Path, sandbox: str) -> None:
    """A failure after confinement (in the sandboxed child, for namespace)."""
    if os.geteuid() != 0:
        pytest.skip("needs root (capabilities)")
    res = start(
        "--shared-dir", str(share), "--socket-path", str(tmp_path / "x.sock"),
        "--sandbox", sandbox, "--inode-file-handles=mandatory", "--modcaps=-dac_read_search",
    )  # fmt: skip
    assert_fails_with(res, "CAP_DAC_READ_SEARCH")
    assert left_behind(tmp_path, share) == []


# -- the process and the service --------------------------------------------------


def test_rlimit_nofile_out_of_reach(tmp_path: Path, share: Path) -> None:
    res = start(*serve_args(share, tmp_path / "x.sock", "--rlimit-nofile", str(1 << 40)))
    assert_fails_with(res, f"--rlimit-nofile {1 << 40}")


def test_metrics_port_in_use(tmp_path: Path, share: Path) -> None:
    taken = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    port = taken.getsockname()[1]
    try:
        res = start(*serve_args(share, tmp_path / "x.sock", "--metrics", f"127.0.0.1:{port}"))
    finally:
        taken.close()
    assert_fails_with(res, f"--metrics 127.0.0.1:{port}", "Address already in use")
    assert left_behind(tmp_path, share) == []


def test_metrics_socket_in_a_missing_directory(tmp_path: Path, share: Path) -> None:
    path = tmp_path / "nonexistent" / "metrics.sock"
    res = start(*serve_args(share, tmp_path / "x.sock", "--metrics", str(path)))
    assert_fails_with(res, f"--metrics unix:{path}", "No such file or directory")


def test_metrics_path_is_a_regular_file(tmp_path: Path, share: Path) -> None:
    path = tmp_path / "metrics"
    path.write_text("x")
    res = start(*serve_args(share, tmp_path / "x.sock", "--metrics", str(path)))
    assert_fails_with(res, f"--metrics unix:{path}", "exists and is not a socket")
    assert path.read_text() == "x"


# -- virtiofsd-py mount: the same sequence, the same ending ------------------------


def test_mount_shared_dir_missing(tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    res = start("mount", str(tmp_path / "nope"), str(mnt))
    assert_fails_with(res, f"shared directory {tmp_path / 'nope'}", "No such file or directory")


def test_mount_point_missing(tmp_path: Path) -> None:
    res = start("mount", "--backend", "memory", str(tmp_path / "nope"))
    assert_fails_with(res, f"mount point {tmp_path / 'nope'}", "No such file or directory")
