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

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from mount_rig import (
    MEMORY_DIFFERS,
    SCENARIOS,
    TRACEBACK,
    MountProcess,
    Scenario,
    mount_unavailable,
    mounted,
    needs_mount,
)
from rw_support import GUEST_STAT_FMT, guest_view, host_view, make_host_tools, tree

from virtiofsd_py.app.options import OptionError, parse_args

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
