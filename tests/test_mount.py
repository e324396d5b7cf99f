"""Host mount mode (``virtiofsd-py mount``): the real daemon process behind the host's FUSE.

The guest conformance scenarios (tests/guest/test_conformance.py) run here
too, read straight out of that file: each script runs once under the host
mount and once on a plain host directory with the same tools (busybox and
``vfsprobe``), and outputs, resulting trees and the mount's view of its tree
must agree.  For the passthrough the mount's tree is also the one it left on
the host; for the in-memory backend the mount's view is compared with the
plain directory's.

Needs /dev/fuse and root (mount(2)); skipped with the reason otherwise.
"""

from __future__ import annotations

import ast
import contextlib
import os
import select
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from virtiofsd_py.options import OptionError, parse_args

GUEST_TESTS = Path(__file__).parent / "guest"
sys.path.insert(0, str(GUEST_TESTS))
from rw_support import GUEST_STAT_FMT, guest_view, host_view, make_host_tools, tree  # noqa: E402

TRACEBACK = "Traceback (most recent call last)"


def mount_unavailable() -> str | None:
    """Why host mounts cannot be tested here, or None."""
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse on this machine"
    if os.geteuid() != 0:
        return "mounting with mount(2) needs root"
    if "fuse" not in Path("/proc/filesystems").read_text():
        return "the kernel has no fuse file system"
    return None


needs_mount = pytest.mark.skipif(
    mount_unavailable() is not None, reason=f"host FUSE mounts: {mount_unavailable()}"
)


def is_mounted(path: Path) -> bool:
    target = os.fsencode(path.resolve())
    with open("/proc/self/mountinfo", "rb") as f:
        return any(line.split()[4] == target for line in f)


class MountProcess:
    """``python3 -m virtiofsd_py mount ARGS...`` until stopped; checks a clean exit."""

    def __init__(self, args: list[str], mountpoint: Path) -> None:
        self.mountpoint = mountpoint
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "virtiofsd_py", "mount", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )

    def wait_serving(self, timeout: float = 30.0) -> None:
        """Wait for the "serving" line the daemon prints once the kernel's INIT is answered."""
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else b""
        if b"serving" not in line:
            self.proc.kill()
            _, err = self.proc.communicate(timeout=10)
            pytest.fail(f"mount did not come up: {line!r}\n{err.decode(errors='replace')}")

    def stop(self, timeout: float = 15.0) -> tuple[int, str]:
        """SIGTERM, then its exit status and stderr."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            _, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate(timeout=10)
        return self.proc.returncode, err.decode(errors="replace")


@contextlib.contextmanager
def mounted(args: list[str], mountpoint: Path) -> Iterator[MountProcess]:
    mountpoint.mkdir(exist_ok=True)
    mp = MountProcess(args, mountpoint)
    try:
        mp.wait_serving()
        assert is_mounted(mountpoint)
        yield mp
    finally:
        status, err = mp.stop()
        if is_mounted(mountpoint):
            subprocess.run(["umount", "-l", str(mountpoint)], check=False)
        print(f"--- mount daemon log (exit {status}) ---\n{err[-20000:]}")
    assert status == 0, f"exit status {status}\n{err[-5000:]}"
    assert TRACEBACK not in err
    assert not is_mounted(mountpoint)


# -- option parsing (no mount needed) --------------------------------------------


def test_mount_paths_and_backends() -> None:
    opts = parse_args(["/srv/share", "/mnt/x", "--cache", "never"], mount=True)
    assert (opts.shared_dir, opts.mountpoint, opts.backend) == (
        "/srv/share",
        "/mnt/x",
        "passthrough",
    )
    assert opts.cache == "never" and opts.socket_path is None and opts.fd is None
    assert opts.sandbox == "none"  # not applied to host mounts (see options.parse_args)
    opts = parse_args(["--backend", "memory", "/mnt/x"], mount=True)
    assert (opts.shared_dir, opts.mountpoint) == (None, "/mnt/x")
    assert not opts.posix_locks and not opts.flock_locks
    for bad in (
        ["/mnt/x"],
        ["/a", "/b", "/c"],
        ["--backend", "memory", "/a", "/b"],
        ["--backend", "memory", "--shared-dir", "/a", "/b"],
        ["/a", "/b", "--socket-path", "/tmp/s"],
        ["/a", "/b", "--sandbox", "namespace"],
    ):
        with pytest.raises(OptionError):
            parse_args(bad, mount=True)


def test_daemon_memory_backend_needs_no_shared_dir() -> None:
    opts = parse_args(["--backend", "memory", "--socket-path", "/tmp/x.sock"])
    assert opts.backend == "memory" and opts.shared_dir is None
    with pytest.raises(OptionError, match="shared-dir"):
        parse_args(["--backend", "memory", "--shared-dir", "/a", "--socket-path", "/tmp/x"])
    with pytest.raises(OptionError, match="shared-dir"):
        parse_args(["--socket-path", "/tmp/x.sock"])


def test_mount_cli_reports_usage_errors() -> None:
    res = subprocess.run(
        [sys.executable, "-m", "virtiofsd_py", "mount", "/only-one"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert res.returncode == 2 and "MOUNTPOINT" in res.stderr


# -- a real mount -----------------------------------------------------------------


@needs_mount
def test_passthrough_mount_serves_the_share(tmp_path: Path) -> None:
    share, mnt = tmp_path / "share", tmp_path / "mnt"
    share.mkdir()
    (share / "hello.txt").write_text("from the host\n")
    with mounted([str(share), str(mnt), "--xattr"], mnt):
        assert (mnt / "hello.txt").read_text() == "from the host\n"
        (mnt / "dir").mkdir()
        (mnt / "dir" / "new").write_bytes(b"x" * 100_000)
        assert (share / "dir" / "new").read_bytes() == b"x" * 100_000
        os.symlink("../hello.txt", mnt / "dir" / "ln")
        assert os.readlink(share / "dir" / "ln") == "../hello.txt"
        os.rename(mnt / "dir" / "new", mnt / "moved")
        assert sorted(os.listdir(share)) == ["dir", "hello.txt", "moved"]
        st_m, st_h = os.stat(mnt / "moved"), os.stat(share / "moved")
        assert (st_m.st_ino, st_m.st_size, st_m.st_mode) == (
            st_h.st_ino,
            st_h.st_size,
            st_h.st_mode,
        )
        # Confinement: a symlink pointing out is resolved by the host kernel
        # relative to the mount, never by the daemon relative to the host.
        os.symlink("/etc", share / "escape")
        assert os.readlink(mnt / "escape") == "/etc"
        assert os.statvfs(mnt).f_blocks == os.statvfs(share).f_blocks


@needs_mount
def test_umount_from_outside_ends_the_daemon(tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    mp = MountProcess(["--backend", "memory", str(mnt)], mnt)
    mp.wait_serving()
    (mnt / "f").write_text("data")
    subprocess.run(["umount", str(mnt)], check=True)
    status = mp.proc.wait(timeout=30)
    _, err = mp.proc.communicate(timeout=10)
    assert status == 0 and TRACEBACK not in err.decode(errors="replace")


@needs_mount
def test_memory_mount_keeps_files_and_reports_statfs(tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    with mounted(["--backend", "memory", "--xattr", str(mnt)], mnt):
        data = os.urandom(3 * 1024 * 1024 + 17)
        (mnt / "big").write_bytes(data)
        assert (mnt / "big").read_bytes() == data
        sv = os.statvfs(mnt)
        assert sv.f_bsize == 4096 and (sv.f_blocks - sv.f_bfree) * 4096 >= len(data)
        os.setxattr(mnt / "big", "user.k", b"v")
        assert os.getxattr(mnt / "big", "user.k") == b"v"
        names = {f"n{i:04d}" for i in range(600)}
        (mnt / "d").mkdir()
        for n in names:
            (mnt / "d" / n).touch()
        assert set(os.listdir(mnt / "d")) == names
        with open(mnt / "big", "rb") as f:  # an unlinked file stays readable while open
            os.unlink(mnt / "big")
            assert f.read(10) == data[:10]
        assert not (mnt / "big").exists()


# -- the guest conformance scenarios, on a host mount --------------------------------


@dataclass(frozen=True)
class Scenario:
    test: str
    name: str
    script: str


def conformance_scenarios() -> list[Scenario]:
    """Every ``sc.run(NAME, SCRIPT)`` of the guest conformance suite, read from its source."""
    source = (GUEST_TESTS / "test_conformance.py").read_text()
    found = []
    for fn in ast.parse(source).body:
        if not isinstance(fn, ast.FunctionDef):
            continue
        for node in ast.walk(fn):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "run"
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "sc"
                and len(node.args) == 2
                and all(isinstance(a, ast.Constant) and isinstance(a.value, str) for a in node.args)
            ):
                name, script = (a.value for a in node.args if isinstance(a, ast.Constant))
                found.append(Scenario(fn.name, name, script))
    return found


SCENARIOS = conformance_scenarios()


def test_scenarios_were_found() -> None:
    assert len(SCENARIOS) >= 10, [s.name for s in SCENARIOS]


def run_script(tools: Path, cwd: Path, script: str) -> str:
    wrapped = f"umask 022; {{\n{script}\n}} 2>&1"
    env = {"PATH": str(tools), "HOME": "/", "TZ": "UTC", "LC_ALL": "C"}
    res = subprocess.run(
        [str(tools / "sh"), "-c", f"( {wrapped} )"],
        cwd=cwd,
        env=env,
        capture_output=True,
        timeout=120,
        check=False,
    )
    return res.stdout.decode("utf-8", "surrogateescape")


def mount_view(tools: Path, d: Path) -> dict[bytes, tuple[int, int, int, int, int, int]]:
    """What ``stat`` sees under ``d``, as the guest suite parses it."""
    res = subprocess.run(
        [str(tools / "find"), ".", "-mindepth", "1", "-exec", str(tools / "stat"), "-c",
         GUEST_STAT_FMT, "{}", "+"],
        cwd=d,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )  # fmt: skip
    return guest_view(res.stdout)


@pytest.fixture(scope="module")
def host_tools(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_host_tools(tmp_path_factory)


@pytest.fixture(scope="module")
def passthrough_mount(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    """(share, mountpoint): the passthrough with ``--cache auto --xattr``, as the guest suite."""
    if mount_unavailable():
        pytest.skip(f"host FUSE mounts: {mount_unavailable()}")
    base = tmp_path_factory.mktemp("ptmount")
    share, mnt = base / "share", base / "mnt"
    share.mkdir()
    os.chmod(share, 0o755)
    with mounted([str(share), str(mnt), "--cache", "auto", "--xattr"], mnt):
        yield share, mnt


@pytest.fixture(scope="module")
def memory_mount(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    if mount_unavailable():
        pytest.skip(f"host FUSE mounts: {mount_unavailable()}")
    mnt = tmp_path_factory.mktemp("memmount") / "mnt"
    with mounted(["--backend", "memory", "--cache", "auto", "--xattr", str(mnt)], mnt):
        yield mnt


@pytest.mark.parametrize("sc", SCENARIOS, ids=[s.name for s in SCENARIOS])
def test_passthrough_scenario(
    sc: Scenario, passthrough_mount: tuple[Path, Path], host_tools: Path
) -> None:
    share, mnt = passthrough_mount
    (share / sc.name / "g").mkdir(parents=True)
    hdir = share / sc.name / "h"
    hdir.mkdir()
    gdir = mnt / sc.name / "g"
    mount_out = run_script(host_tools, gdir, sc.script)
    host_out = run_script(host_tools, hdir, sc.script)
    assert mount_out == host_out, f"output differs\n--- mount\n{mount_out}\n--- host\n{host_out}"
    assert tree(share / sc.name / "g") == tree(hdir)
    assert mount_view(host_tools, gdir) == host_view(share / sc.name / "g")


#: Scenarios whose results legitimately differ between a memory backend and a disk.
MEMORY_DIFFERS = {
    "fallocate": "st_blocks and SEEK_HOLE: the in-memory backend stores no holes",
}


@pytest.mark.parametrize("sc", SCENARIOS, ids=[s.name for s in SCENARIOS])
def test_memory_scenario(
    sc: Scenario, memory_mount: Path, host_tools: Path, tmp_path: Path
) -> None:
    if sc.name in MEMORY_DIFFERS:
        pytest.skip(MEMORY_DIFFERS[sc.name])
    mdir = memory_mount / sc.name
    mdir.mkdir()
    hdir = tmp_path / "h"
    hdir.mkdir()
    mount_out = run_script(host_tools, mdir, sc.script)
    host_out = run_script(host_tools, hdir, sc.script)
    assert mount_out == host_out, f"output differs\n--- memory\n{mount_out}\n--- host\n{host_out}"
    assert mount_view(host_tools, mdir) == mount_view(host_tools, hdir)
    assert tree(mdir, blocks=False) == tree(hdir, blocks=False)


def test_wait_helpers_fail_loudly(tmp_path: Path) -> None:
    """A daemon that cannot start makes ``wait_serving`` fail, not hang."""
    mp = MountProcess(["--backend", "memory", str(tmp_path / "missing")], tmp_path / "missing")
    with pytest.raises(pytest.fail.Exception, match="did not come up"):
        mp.wait_serving(timeout=60)
    assert mp.proc.returncode not in (None, 0)
