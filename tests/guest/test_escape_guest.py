"""Escape attempts from inside a real guest, with canaries outside the share.

One daemon (``--xattr --xattrmap :map::user.virtiofs.:``) and one guest
with the programs image serve the module.  Beside the share lies a
directory of canaries watched by inotify: after every check nothing may
have opened, read, changed or created anything there, and no guest output
may carry the secret.  The front-end versions of these checks, with the
exact FUSE requests, are in tests/test_escape.py and tests/test_cve.py;
here the guest kernel and real programs make the requests, and the guest
kernel's own permission checks (default_permissions) are part of the test.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from escape_ops import SECCOMP, SECRET, Outside, Swapper, watched_outside
from rw_support import MNT, daemon_and_guest

from virtiofsd_py.testing.daemon_proc import DaemonProcess
from virtiofsd_py.testing.qemu.guest import Guest

pytestmark = pytest.mark.guest
XATTRMAP = ":map::user.virtiofs.:"


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("escape")


@pytest.fixture(scope="module")
def outside(base: Path) -> Iterator[Outside]:
    with watched_outside(base / "outside") as o:
        yield o


@pytest.fixture(scope="module")
def guest_shared_dir(base: Path, outside: Outside) -> Path:
    s = base / "share"
    s.mkdir()
    os.chmod(s, 0o755)
    (s / "rootfile").write_bytes(b"root's\n")
    os.chmod(s / "rootfile", 0o755)
    pub = s / "pub"
    pub.mkdir()
    os.chmod(pub, 0o1777)
    (pub / "ufile").write_bytes(b"user's\n")
    os.chown(pub / "ufile", 1000, 1000)
    os.symlink(str(outside.dir / "secret"), s / "abs_link")
    os.symlink("../outside/secret", s / "rel_link")
    os.symlink(str(outside.dir), s / "abs_dir")
    return s


@pytest.fixture(scope="module")
def dg(
    guest_support: None, guest_shared_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[DaemonProcess, Guest]]:
    extra = [*SECCOMP, "--xattrmap", XATTRMAP]
    with daemon_and_guest(guest_shared_dir, tmp_path_factory, extra) as pair:
        yield pair


@pytest.fixture
def g(dg: tuple[DaemonProcess, Guest], outside: Outside) -> Iterator[Guest]:
    outside.watch.events()
    yield dg[1]
    outside.check()


def run(g: Guest, script: str, timeout: float = 120) -> str:
    out = g.run(f"{{ {script} ; }} 2>&1", timeout=timeout).out
    assert SECRET.strip().decode() not in out, f"the guest read a canary:\n{out}"
    return out


def test_symlinks_and_dotdot_resolve_in_the_guest(g: Guest) -> None:
    out = run(
        g,
        f"cd {MNT}; cat abs_link; cat rel_link; ls abs_dir/ ; cat ../outside/secret;"
        " vfsprobe open abs_link rdonly,nofollow; vfsprobe open rel_link rdonly;"
        " ls -a .. > /dev/null; cat /mnt/../../outside/secret; echo done",
    )
    assert out.rstrip().endswith("done")
    assert "ELOOP" in out


def test_rename_race_from_the_guest(g: Guest, guest_shared_dir: Path) -> None:
    """A host thread swaps ``swap`` between a directory and a link out; the guest works on."""
    swapper = Swapper(guest_shared_dir, guest_shared_dir.parent / "outside")
    swapper.start()
    try:
        run(
            g,
            "i=0; while [ $i -lt 300 ]; do i=$((i+1));"
            f" cat {MNT}/swap/secret; echo data > {MNT}/swap/n$i; mkdir {MNT}/swap/d$i;"
            f" ls {MNT}/swap > /dev/null; cat {MNT}/swap/n$i; done > /dev/null; echo ok",
            timeout=300,
        )
    finally:
        swapper.stop.set()
        swapper.join(5)
    assert swapper.swaps > 0


def test_unprivileged_guest_user(g: Guest, guest_shared_dir: Path) -> None:
    """The guest kernel refuses, and nothing on the host changes."""
    out = run(
        g,
        f"cd {MNT}; for c in 'chmod u+s rootfile' 'chown user rootfile' 'chmod 4755 rootfile'"
        " 'setfattr -n trusted.x -v 1 pub/ufile'"
        " 'setfattr -n security.capability -v 0x01000002000000000000000000000000000000ff pub/ufile'"
        " 'touch newfile' 'mknod pub/null c 1 3'; do"
        ' su user -c "$c" >/dev/null 2>&1 && echo "ALLOWED: $c"; done;'
        " su user -c 'touch pub/mine && chmod 6755 pub/mine && ln pub/mine pub/mine2'; echo end",
    )
    assert "ALLOWED" not in out, out
    st = (guest_shared_dir / "rootfile").stat()
    assert (st.st_uid, st.st_mode & 0o7777) == (0, 0o755)
    mine = (guest_shared_dir / "pub" / "mine").stat()
    assert (mine.st_uid, mine.st_gid) == (1000, 1000)
    assert mine.st_nlink == 2
    assert not (guest_shared_dir / "newfile").exists()
    assert not (guest_shared_dir / "pub" / "null").exists()
    names = os.listxattr(guest_shared_dir / "pub" / "ufile")
    assert not [n for n in names if "trusted" in n or "capability" in n], names


def test_cve_2021_20263_capability_cleared_on_write_in_the_guest(
    g: Guest, guest_shared_dir: Path
) -> None:
    """security.capability, stored as user.virtiofs.security.capability, goes on write."""
    host = guest_shared_dir / "capfile"
    cap = "0x0100000200200000000000000000000000000000"  # v2, CAP_NET_BIND_SERVICE... permitted
    out = run(
        g,
        f"cd {MNT}; echo '#!/bin/sh' > capfile; chmod 755 capfile;"
        f" setfattr -n security.capability -v {cap} capfile && echo SET;"
        " getfattr -n security.capability -e hex capfile",
    )
    if "SET" not in out:
        pytest.skip(f"the guest could not set security.capability: {out}")
    assert "user.virtiofs.security.capability" in os.listxattr(host)
    run(g, f"echo 'echo patched' >> {MNT}/capfile")
    assert "user.virtiofs.security.capability" not in os.listxattr(host)
    out = run(g, f"getfattr -n security.capability {MNT}/capfile; echo rc=$?")
    assert "security.capability=" not in out


def test_special_files_made_in_the_guest_stay_unopened_on_the_host(
    g: Guest, dg: tuple[DaemonProcess, Guest], guest_shared_dir: Path
) -> None:
    run(
        g,
        f"cd {MNT}; mkfifo fifo; mknod nulldev c 1 3; echo hi > nulldev; cat nulldev;"
        " (echo via-fifo > fifo &) ; cat fifo; vfsprobe open fifo rdonly,nonblock",
    )
    assert stat.S_ISFIFO((guest_shared_dir / "fifo").lstat().st_mode)
    assert stat.S_ISCHR((guest_shared_dir / "nulldev").lstat().st_mode)
    pid = dg[0].pid
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{name}")
            with open(f"/proc/{pid}/fdinfo/{name}") as f:
                flags = int(next(x for x in f if x.startswith("flags:")).split()[1], 8)
        except (OSError, StopIteration):
            continue
        if target.endswith(("/fifo", "/nulldev")):
            assert flags & os.O_PATH, f"the daemon opened {target} for I/O"
