"""Shared by the read-write guest suites: daemon and guest with programs, differential runs.

A *scenario* is one shell script run twice on the same host file system:
in the guest under the virtio-fs mount, and on the host with the same tools
(busybox applets and the static ``vfsprobe``). Its output must be the same,
the two trees it leaves must be the same, and the guest's view of its tree
must be what the host has. That is "compare with what the same syscalls do
on the host" without writing down every expected value by hand.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from virtiofsd_py.testing.daemon_proc import DaemonProcess, daemon_command_template, is_own_daemon
from virtiofsd_py.testing.qemu.guest import Guest
from virtiofsd_py.testing.qemu.image import cache_dir
from virtiofsd_py.testing.qemu.initramfs import find_busybox
from virtiofsd_py.testing.qemu.progimage import (
    ProgramsUnavailable,
    build_vfsprobe,
    load_programs_initramfs,
)

GUEST_TAG = "share"
MNT = "/mnt"
TRACEBACK = "Traceback (most recent call last)"


def ours_only(reason: str) -> pytest.MarkDecorator:
    """xfail against another daemon, with the reason shown in the report."""
    return pytest.mark.xfail(
        not is_own_daemon(), reason=f"not done by the reference daemon: {reason}", strict=False
    )


def start_daemon(
    shared_dir: Path, workdir: Path, extra: Sequence[str] = (), *, xattr: bool = True
) -> DaemonProcess:
    """The daemon under test on ``shared_dir``, with ``--cache auto`` unless ``extra`` says."""
    template = daemon_command_template()
    words = template.split()
    if not xattr:
        template = " ".join(w for w in words if w != "--xattr")
    args = list(extra)
    if "--cache" not in args and "--cache" not in words:
        args += ["--cache", "auto"]
    if xattr and "--xattr" not in words:
        args.append("--xattr")
    return DaemonProcess(shared_dir, workdir, template=template, extra_args=args).start(timeout=30)


def stop_daemon(daemon: DaemonProcess) -> None:
    """Stop the daemon after the guest left; it must exit 0 with no traceback."""
    status = daemon.stop(timeout=5.0)
    log = daemon.log()
    print(f"--- daemon log (exit status {status}) ---\n{log[-20000:]}")
    assert status == 0, f"daemon exit status {status}"
    assert TRACEBACK not in log, "daemon log has a Python traceback"


def boot_programs_guest(daemon: DaemonProcess, mount_opts: str = "") -> Guest:
    """A guest with the programs image and the share mounted at /mnt."""
    try:
        initrd = load_programs_initramfs()
    except ProgramsUnavailable as e:
        pytest.skip(f"guest programs image unavailable: {e}")
    g = Guest.boot(
        vhost_sockets={GUEST_TAG: str(daemon.socket_path)}, extra_args=["-initrd", str(initrd)]
    )
    try:
        opts = f"-o {mount_opts} " if mount_opts else ""
        g.run(f"mount -t virtiofs {opts}{GUEST_TAG} {MNT}").check()
    except BaseException:
        g.shutdown()
        raise
    return g


def make_host_tools(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bin directory with the guest's tools for host runs: busybox applets + vfsprobe."""
    busybox = find_busybox()
    if busybox is None:
        pytest.skip("no static busybox")
    d = tmp_path_factory.mktemp("hostbin")
    try:
        probe = build_vfsprobe(cache_dir())
    except ProgramsUnavailable as e:
        pytest.skip(str(e))
    os.symlink(probe, d / "vfsprobe")
    applets = subprocess.run([busybox, "--list"], capture_output=True, text=True, check=True)
    for name in applets.stdout.split():
        os.symlink(busybox, d / name)
    return d


def shq(arg: str | bytes) -> str:
    """Quote for sh."""
    text = arg.decode("utf-8", "surrogateescape") if isinstance(arg, bytes) else arg
    return "'" + text.replace("'", "'\\''") + "'"


@dataclass(frozen=True)
class Node:
    """What a path is, minus what legitimately differs between two runs (inode, times)."""

    kind: str
    mode: int
    size: int
    nlink: int
    uid: int
    gid: int
    rdev: int
    blocks: int
    content: str


def node_of(path: bytes, blocks: bool) -> Node:
    st = os.lstat(path)
    mode = st.st_mode
    content = ""
    if stat.S_ISREG(mode):
        with open(path, "rb") as f:
            content = hashlib.file_digest(f, "sha256").hexdigest()
    elif stat.S_ISLNK(mode):
        content = os.fsdecode(os.readlink(path))
    kind = {
        stat.S_IFREG: "reg",
        stat.S_IFDIR: "dir",
        stat.S_IFLNK: "lnk",
        stat.S_IFIFO: "fifo",
        stat.S_IFSOCK: "sock",
        stat.S_IFCHR: "chr",
        stat.S_IFBLK: "blk",
    }[stat.S_IFMT(mode)]
    return Node(
        kind=kind,
        mode=stat.S_IMODE(mode),
        size=st.st_size if kind != "dir" else 0,
        nlink=st.st_nlink,
        uid=st.st_uid,
        gid=st.st_gid,
        rdev=st.st_rdev,
        blocks=st.st_blocks if blocks and kind == "reg" else 0,
        content=content,
    )


def tree(root: Path, blocks: bool = True) -> dict[bytes, Node]:
    """Every path under ``root`` (relative, bytes) with its Node."""
    r = os.fsencode(root)
    out: dict[bytes, Node] = {}
    for dirpath, dirnames, filenames in os.walk(r):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            out[os.path.relpath(full, r)] = node_of(full, blocks)
    return out


GUEST_STAT_FMT = "%n|%f|%s|%h|%u|%g|%t|%T"


def guest_view(listing: str) -> dict[bytes, tuple[int, int, int, int, int, int]]:
    """Parse ``stat -c GUEST_STAT_FMT`` lines: path -> (mode, size, nlink, uid, gid, rdev)."""
    out = {}
    for line in listing.splitlines():
        name, mode, size, nlink, uid, gid, major, minor = line.rsplit("|", 7)
        st_mode = int(mode, 16)
        rdev = os.makedev(int(major, 16), int(minor, 16))
        dsize = 0 if stat.S_ISDIR(st_mode) else int(size)
        out[os.fsencode(name.removeprefix("./"))] = (
            st_mode,
            dsize,
            int(nlink),
            int(uid),
            int(gid),
            rdev,
        )
    return out


def host_view(root: Path) -> dict[bytes, tuple[int, int, int, int, int, int]]:
    r = os.fsencode(root)
    out = {}
    for rel in tree(root, blocks=False):
        st = os.lstat(os.path.join(r, rel))
        size = 0 if stat.S_ISDIR(st.st_mode) else st.st_size
        out[rel] = (st.st_mode, size, st.st_nlink, st.st_uid, st.st_gid, st.st_rdev)
    return out


@dataclass(frozen=True)
class ScenarioResult:
    guest_out: str
    host_out: str
    guest_dir: Path
    host_dir: Path


class Scenarios:
    """Runs scenarios in ``/mnt/NAME/g`` (guest) and ``SHARED/NAME/h`` (host)."""

    def __init__(self, guest: Guest, shared: Path, tools: Path) -> None:
        self.guest = guest
        self.shared = shared
        self.tools = tools

    def run(
        self, name: str, script: str, *, blocks: bool = True, timeout: float = 120
    ) -> ScenarioResult:
        """Run ``script`` on both sides and assert that they agree."""
        gdir, hdir = self.shared / name / "g", self.shared / name / "h"
        gdir.mkdir(parents=True)
        hdir.mkdir(parents=True)
        wrapped = f"umask 022; {{\n{script}\n}} 2>&1"
        res = self.guest.run(
            f"cd {MNT}/{name}/g && ( {wrapped} ); echo '#END'; "
            f"cd {MNT}/{name}/g && find . -mindepth 1 -exec stat -c '{GUEST_STAT_FMT}' {{}} +",
            timeout=timeout,
        ).check()
        guest_out, _, listing = res.out.partition("#END\n")
        env = {"PATH": str(self.tools), "HOME": "/", "TZ": "UTC", "LC_ALL": "C"}
        host = subprocess.run(
            [str(self.tools / "sh"), "-c", f"( {wrapped} )"],
            cwd=hdir,
            env=env,
            capture_output=True,
            timeout=timeout,
            check=False,
        )
        host_out = host.stdout.decode("utf-8", "surrogateescape")
        assert guest_out == host_out, (
            f"output differs\n--- guest\n{guest_out}\n--- host\n{host_out}"
        )
        assert tree(gdir, blocks) == tree(hdir, blocks)
        assert guest_view(listing) == host_view(gdir)
        return ScenarioResult(guest_out, host_out, gdir, hdir)


@contextlib.contextmanager
def daemon_and_guest(
    shared: Path,
    tmp_path_factory: pytest.TempPathFactory,
    extra: Sequence[str] = (),
    *,
    xattr: bool = True,
    mount_opts: str = "",
) -> Iterator[tuple[DaemonProcess, Guest]]:
    """A daemon and a programs guest with the share mounted; torn down with checks."""
    daemon = start_daemon(shared, tmp_path_factory.mktemp("daemon"), extra, xattr=xattr)
    try:
        g = boot_programs_guest(daemon, mount_opts)
    except BaseException:
        daemon.kill()
        raise
    try:
        yield daemon, g
    finally:
        g.shutdown()
        stop_daemon(daemon)
