"""Daemon options that change what the guest sees, each shown in a real guest.

One daemon + one guest per option set (a class, with a class-scoped
fixture), so that each configuration boots once and all its checks share it.
The option names are the Rust virtiofsd's; with ``VIRTIOFSD_PY_TEST_DAEMON``
the same checks run against another daemon.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from rw_support import MNT, daemon_and_guest, tree

from virtiofsd_py.testing.daemon_proc import is_own_daemon
from virtiofsd_py.testing.qemu.guest import Guest

pytestmark = pytest.mark.guest


@dataclass(frozen=True)
class Config:
    shared: Path
    guest: Guest


def _config(
    extra: Sequence[str],
    *,
    xattr: bool = True,
    setup: Callable[[Path], None] | None = None,
    cleanup: Callable[[Path], None] | None = None,
) -> Callable[..., Iterator[Config]]:
    """A class-scoped fixture: a daemon with ``extra`` args and a guest on a fresh share."""

    @pytest.fixture(scope="class")
    def fixture(guest_support: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Config]:
        shared = tmp_path_factory.mktemp("optshare")
        os.chmod(shared, 0o755)
        if setup is not None:
            setup(shared)
        try:
            with daemon_and_guest(shared, tmp_path_factory, extra, xattr=xattr) as (_, g):
                yield Config(shared, g)
        finally:
            if cleanup is not None:
                cleanup(shared)

    return fixture


def _basic_tree(root: Path) -> None:
    (root / "f").write_bytes(b"content\n")
    (root / "d").mkdir()
    (root / "d" / "inside").write_bytes(b"inside\n")
    os.symlink("f", root / "sl")
    os.setxattr(root / "f", "user.host", b"set on the host")


# -- --readonly ---------------------------------------------------------------

readonly = _config(["--readonly"], setup=_basic_tree)

#: Every kind of change; each must fail with EROFS.
CHANGES = [
    "vfsprobe open new creat,wronly",
    "vfsprobe open f wronly",
    "vfsprobe open f rdwr,trunc",
    "vfsprobe mknod fifo fifo 0644",
    "vfsprobe rename2 f g none",
    "vfsprobe xattr set f user.x 1",
    "vfsprobe xattr remove f user.host",
    "vfsprobe utimens f 1 1",
    "vfsprobe ftruncate f 0",
]
BUSYBOX_CHANGES = [
    "mkdir x",
    "rmdir d",
    "rm f",
    "ln -s f s2",
    "ln f hard",
    "chmod 600 f",
    "chown 1:1 f",
    "truncate -s 0 f",
    "touch f",
]


class TestReadonly:
    def test_every_change_is_erofs(self, readonly: Config) -> None:
        before = tree(readonly.shared)
        times = {p: os.lstat(readonly.shared / os.fsdecode(p)).st_mtime_ns for p in before}
        script = (
            f"cd {MNT} && "
            + "; ".join(CHANGES)
            + "; "
            + "; ".join(
                f"{c} 2>&1 | grep -q 'Read-only file system' && echo EROFS || echo 'FAIL {c}'"
                for c in BUSYBOX_CHANGES
            )
        )
        out = readonly.guest.run(script).out.splitlines()
        assert out == ["EROFS"] * (len(CHANGES) + len(BUSYBOX_CHANGES))
        # O_TMPFILE: the Rust daemon has no TMPFILE at all (ENOSYS -> EOPNOTSUPP).
        tmpfile = readonly.guest.run(f"vfsprobe tmpfile {MNT}/d x").out.strip()
        assert tmpfile in (("EROFS",) if is_own_daemon() else ("EROFS", "EOPNOTSUPP"))
        assert tree(readonly.shared) == before
        assert times == {p: os.lstat(readonly.shared / os.fsdecode(p)).st_mtime_ns for p in before}

    def test_reads_still_work(self, readonly: Config) -> None:
        out = readonly.guest.run(
            f"cat {MNT}/f {MNT}/sl {MNT}/d/inside; vfsprobe xattr get {MNT}/f user.host"
        ).check()
        assert out.out == "content\ncontent\ninside\nset on the host\n"


# -- --xattr off ----------------------------------------------------------------

no_xattr = _config([], xattr=False, setup=_basic_tree)


class TestNoXattr:
    def test_xattrs_are_not_supported(self, no_xattr: Config) -> None:
        out = no_xattr.guest.run(
            f"cd {MNT} && vfsprobe xattr set f user.a 1; vfsprobe xattr get f user.host; "
            "vfsprobe xattr list f"
        ).out.split()
        assert out == ["EOPNOTSUPP"] * 3
        assert os.listxattr(no_xattr.shared / "f") == ["user.host"]


# -- --cache never / always -----------------------------------------------------

cache_never = _config(["--cache", "never"], setup=_basic_tree)
cache_always = _config(["--cache", "always"], setup=_basic_tree)


def _host_rewrites_f(cfg: Config) -> str:
    """The guest reads f, the host rewrites it, the guest reads it again at once."""
    assert cfg.guest.run(f"cat {MNT}/f").check().out == "content\n"
    (cfg.shared / "f").write_bytes(b"rewritten by the host\n")
    (cfg.shared / "newfile").write_bytes(b"new\n")
    return cfg.guest.run(f"cat {MNT}/f; cat {MNT}/newfile").out


class TestCacheNever:
    def test_host_changes_are_seen_at_once(self, cache_never: Config) -> None:
        assert _host_rewrites_f(cache_never) == "rewritten by the host\nnew\n"


class TestCacheAlways:
    def test_guest_keeps_its_cached_view(self, cache_always: Config) -> None:
        # Attributes and data stay cached (long timeouts, kept page cache), even
        # past the one second that --cache auto would allow.
        out = _host_rewrites_f(cache_always)
        assert out.startswith("content\n")
        assert cache_always.guest.run(f"sleep 1.2; cat {MNT}/f").out == "content\n"


# -- --announce-submounts -------------------------------------------------------


def _mount_submount(root: Path) -> None:
    (root / "sub").mkdir()
    (root / "top").write_bytes(b"top\n")
    res = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "vfs-sub", str(root / "sub")],
        capture_output=True,
        text=True,
        check=False,
    )
    if res.returncode != 0:
        pytest.skip(f"cannot mount a host submount: {res.stderr.strip()}")
    (root / "sub" / "inner").write_bytes(b"inner\n")


def _umount_submount(root: Path) -> None:
    with contextlib.suppress(OSError):
        subprocess.run(["umount", str(root / "sub")], capture_output=True, check=False)


announce = _config(["--announce-submounts"], setup=_mount_submount, cleanup=_umount_submount)


class TestAnnounceSubmounts:
    def test_submount_has_its_own_st_dev(self, announce: Config) -> None:
        out = announce.guest.run(
            # The trailing slash makes stat(2) cross into (and so mount) the submount.
            f"cat {MNT}/sub/inner; stat -c %d {MNT} {MNT}/top {MNT}/sub/ {MNT}/sub/inner; "
            "grep -c ' /mnt/sub ' /proc/mounts"
        ).check()
        inner, top_dev, top_file_dev, sub_dev, inner_dev, mounts = out.out.split()
        assert top_dev == top_file_dev
        assert sub_dev == inner_dev
        assert sub_dev != top_dev
        assert inner == "inner"
        assert mounts == "1"  # the guest auto-mounted the submount


# -- --writeback ----------------------------------------------------------------

writeback = _config(["--writeback"])


class TestWriteback:
    def test_writes_reach_the_host_after_sync(self, writeback: Config) -> None:
        writeback.guest.run(
            f"cd {MNT} && echo data > f && echo more >> f && vfsprobe write f wronly 1 XY && "
            "vfsprobe write g wronly,creat,append -1 appended && "
            "dd if=/dev/zero of=big bs=1M count=4 2>/dev/null && "
            "vfsprobe write big wronly 4194304 tail && sync"
        ).check()
        assert (writeback.shared / "f").read_bytes() == b"dXYa\nmore\n"
        assert (writeback.shared / "g").read_bytes() == b"appended"
        big = writeback.shared / "big"
        assert big.stat().st_size == (4 << 20) + 4
        with open(big, "rb") as f:
            f.seek(4 << 20)
            assert f.read() == b"tail"
        out = writeback.guest.run(f"stat -c %s {MNT}/big; cat {MNT}/f").check().out
        assert out == f"{(4 << 20) + 4}\ndXYa\nmore\n"


# -- --killpriv-v2 --------------------------------------------------------------


def _setuid_files(root: Path) -> None:
    for name in ("by-user", "chowned", "truncated"):
        (root / name).write_bytes(b"#!/bin/sh\n")
    os.chown(root / "by-user", 1000, 1000)
    os.chown(root / "truncated", 1000, 1000)
    for name in ("by-user", "chowned", "truncated"):
        os.chmod(root / name, 0o6755)


killpriv = _config(["--killpriv-v2"], setup=_setuid_files)


class TestKillprivV2:
    def test_setuid_and_setgid_are_cleared(self, killpriv: Config) -> None:
        killpriv.guest.run(
            f"cd {MNT} && su user -c 'echo more >> by-user && truncate -s 1 truncated' && "
            "chown 1000 chowned"
        ).check()
        for name in ("by-user", "truncated", "chowned"):
            assert os.stat(killpriv.shared / name).st_mode & 0o7777 == 0o755, name
        assert (killpriv.shared / "by-user").read_bytes() == b"#!/bin/sh\nmore\n"


# -- --translate-uid / --translate-gid -------------------------------------------


def _host_owned(root: Path) -> None:
    os.chmod(root, 0o777)
    (root / "host-2000").write_bytes(b"x")
    os.chown(root / "host-2000", 2000, 2000)


translate = _config(
    ["--translate-uid", "map:1000:2000:1", "--translate-gid", "map:1000:2000:1"],
    setup=_host_owned,
)


class TestTranslateIds:
    def test_guest_1000_is_host_2000(self, translate: Config) -> None:
        out = translate.guest.run(
            f"cd {MNT} && su user -c 'echo mine > guest-file' && stat -c '%u %g' host-2000 "
            "guest-file"
        ).check()
        st = os.stat(translate.shared / "guest-file")
        assert (st.st_uid, st.st_gid) == (2000, 2000)
        assert out.out.split() == ["1000", "1000", "1000", "1000"]


# -- --no-readdirplus -------------------------------------------------------------


def _listing_tree(root: Path) -> None:
    for i in range(150):
        (root / f"entry{i:03d}").write_bytes(b"x" * i)
    (root / "subdir").mkdir()


no_readdirplus = _config(["--no-readdirplus"], setup=_listing_tree)


class TestNoReaddirplus:
    def test_listing_and_stat_still_right(self, no_readdirplus: Config) -> None:
        out = no_readdirplus.guest.run(
            f"cd {MNT} && ls -A | wc -l && for f in *; do stat -c '%n %s %F' \"$f\"; done"
        ).check()
        lines = out.out.splitlines()
        assert lines[0] == "151"
        kinds = ["regular empty file"] + ["regular file"] * 149
        assert lines[1:-1] == [f"entry{i:03d} {i} {kinds[i]}" for i in range(150)]
        assert lines[-1].startswith("subdir ") and lines[-1].endswith(" directory")
