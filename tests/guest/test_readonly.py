"""Read-only slice in a real guest: what the guest sees must be what the host has.

The host builds a tree with awkward content (sizes around page boundaries,
a sparse file, symlinks, hard links, a deep tree, a big directory, odd and
non-UTF-8 names, unusual modes and owners, exact nanosecond mtimes); the
guest mounts it read-only and reports listings, stat fields, hashes and link
targets in a few batched commands, compared here against the host's view.
"""

from __future__ import annotations

import hashlib
import os
import random
import stat
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest

from virtiofsd_py.testing.qemu.guest import Guest

pytestmark = pytest.mark.guest

MNT = b"/mnt"
GUEST_TAG = "share"  # what conftest.py names the device
BIG_SIZE = 8 * 1024 * 1024 + 12345
DEEP_LEVELS = 20
MANY_ENTRIES = 300
ODD_NAMES = [
    b"with space",
    b"tab\tname",
    b"new\nline",
    "ünïcödé-名前".encode(),
    b"latin1-\xe9\xff",
    b"-leading-dash",
    b"*star?[x]",
    b"quote'\"$(echo no)`",
]


def shq(arg: bytes) -> bytes:
    """Quote bytes for the guest's sh."""
    return b"'" + arg.replace(b"'", b"'\\''") + b"'"


def build_tree(root: Path) -> None:
    """Populate ``root`` with the test tree."""
    rng = random.Random(1234)
    r = os.fsencode(root)

    def put(rel: bytes, data: bytes, mode: int = 0o644) -> None:
        path = os.path.join(r, rel)
        with open(path, "wb") as f:
            f.write(data)
        os.chmod(path, mode)

    put(b"small.txt", b"hello, guest\n")
    put(b"empty", b"")
    put(b"big.bin", rng.randbytes(BIG_SIZE))
    for size in (1, 4095, 4096, 4097, 65535, 65536, 65537, 1024 * 1024 + 1):
        put(b"size-%d" % size, rng.randbytes(size))
    with open(os.path.join(r, b"sparse"), "wb") as f:
        f.write(rng.randbytes(65536))
        f.seek(4 * 1024 * 1024)
        f.write(rng.randbytes(65536))
    os.link(os.path.join(r, b"small.txt"), os.path.join(r, b"small.hardlink"))
    os.symlink(b"small.txt", os.path.join(r, b"link-relative"))
    os.symlink(b"/etc/hostname", os.path.join(r, b"link-absolute"))
    os.symlink(b"does/not/exist", os.path.join(r, b"link-dangling"))
    os.symlink(b"deep", os.path.join(r, b"link-dir"))
    deep = os.path.join(r, *[b"d%02d" % i for i in range(DEEP_LEVELS)])
    os.makedirs(deep)
    os.rename(os.path.join(r, b"d00"), os.path.join(r, b"deep"))
    put(os.path.join(b"deep", *[b"d%02d" % i for i in range(1, DEEP_LEVELS)], b"leaf"), b"leaf\n")
    os.mkdir(os.path.join(r, b"many"))
    for i in range(MANY_ENTRIES):
        put(b"many/entry-%04d-%s" % (i, b"x" * (i % 50)), b"%d\n" % i)
    os.mkdir(os.path.join(r, b"names"))
    for name in ODD_NAMES:
        put(b"names/" + name, name + b"\n")
    os.mkdir(os.path.join(r, b"modes"))
    for mode in (0o000, 0o400, 0o444, 0o600, 0o640, 0o755, 0o700, 0o4755, 0o2755):
        put(b"modes/file-%04o" % mode, b"mode %o\n" % mode, mode)
    for mode in (0o1777, 0o2775, 0o700):
        os.mkdir(os.path.join(r, b"modes/dir-%04o" % mode))
        os.chmod(os.path.join(r, b"modes/dir-%04o" % mode), mode)
    put(b"owned", b"owned by someone else\n")
    os.chown(os.path.join(r, b"owned"), 1234, 5678)
    os.mkfifo(os.path.join(r, b"fifo"))
    # Exact times, set last and deepest first so that no later change moves them.
    paths = sorted(walk(root), key=lambda p: -p.count(b"/"))
    for i, rel in enumerate(paths):
        t = 1_600_000_000_123_456_789 + i * 1_000_000_007
        os.utime(os.path.join(r, rel), ns=(t, t), follow_symlinks=False)


def walk(root: Path) -> list[bytes]:
    """Every path under ``root``, relative and as bytes, like ``find .`` sans ``.``."""
    r = os.fsencode(root)
    out: list[bytes] = []
    for dirpath, dirnames, filenames in os.walk(r):
        rel = os.path.relpath(dirpath, r)
        for name in dirnames + filenames:
            out.append(name if rel == b"." else os.path.join(rel, name))
    return out


def sha256_file(path: bytes) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def guest_path(rel: bytes) -> bytes:
    return MNT + b"/" + rel


@pytest.fixture(scope="module")
def guest_shared_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("rotree")
    build_tree(root)
    return root


@pytest.fixture(scope="module")
def ro_guest(guest: Guest) -> Iterator[Guest]:
    """The guest with the share mounted read-only at /mnt."""
    guest.run(f"mount -t virtiofs -o ro {GUEST_TAG} /mnt").check()
    yield guest


def test_mount_is_virtiofs_read_only(ro_guest: Guest) -> None:
    mounts = ro_guest.run("cat /proc/mounts").check().out.splitlines()
    entry = [m.split() for m in mounts if m.split()[1] == "/mnt"]
    assert entry, mounts
    assert entry[0][0] == GUEST_TAG
    assert entry[0][2] == "virtiofs"
    assert "ro" in entry[0][3].split(",")


def test_listing_matches_host(ro_guest: Guest, guest_shared_dir: Path) -> None:
    out = ro_guest.run(b"cd /mnt && find . -print0").check().stdout
    guest_paths = {p.removeprefix(b"./") for p in out.split(b"\0") if p and p != b"."}
    assert guest_paths == set(walk(guest_shared_dir))


def test_big_directory_listing(ro_guest: Guest, guest_shared_dir: Path) -> None:
    names = ro_guest.run("ls -1A /mnt/many").check().out.splitlines()
    assert sorted(names) == sorted(os.listdir(guest_shared_dir / "many"))
    assert len(names) == MANY_ENTRIES


def _parse_busybox_time(text: str) -> int:
    """ns since the epoch from busybox ``%y`` (``2020-09-13 12:26:40.123456789 +0000``)."""
    date, clock, zone = text.split(" ")
    whole, _, frac = clock.partition(".")
    dt = datetime.strptime(f"{date} {whole} {zone}", "%Y-%m-%d %H:%M:%S %z")
    return int(dt.timestamp()) * 1_000_000_000 + int(frac.ljust(9, "0"))


def test_stat_of_everything_matches_host(ro_guest: Guest, guest_shared_dir: Path) -> None:
    paths = sorted(walk(guest_shared_dir))
    fmt = b"%f|%s|%h|%u|%g|%b|%i|%Z|%y"
    cmd = b"stat -c '" + fmt + b"' -- " + b" ".join(shq(guest_path(p)) for p in paths)
    lines = ro_guest.run(cmd).check().out.splitlines()
    assert len(lines) == len(paths)
    host_root = os.fsencode(guest_shared_dir)
    guest_ino: dict[str, set[bytes]] = {}
    host_ino: dict[int, set[bytes]] = {}
    for rel, line in zip(paths, lines, strict=True):
        st = os.lstat(os.path.join(host_root, rel))
        mode_hex, size, nlink, uid, gid, blocks, ino, ctime, mtime = line.split("|")
        got = (int(mode_hex, 16), int(size), int(nlink), int(uid), int(gid))
        assert got == (st.st_mode, st.st_size, st.st_nlink, st.st_uid, st.st_gid), rel
        assert _parse_busybox_time(mtime) == st.st_mtime_ns, rel
        assert int(ctime) == int(st.st_ctime), rel
        if stat.S_ISREG(st.st_mode):
            assert int(blocks) == st.st_blocks, rel
        guest_ino.setdefault(ino, set()).add(rel)
        host_ino.setdefault(st.st_ino, set()).add(rel)
    # Two names share an inode in the guest exactly when they do on the host.
    assert sorted(map(sorted, guest_ino.values())) == sorted(map(sorted, host_ino.values()))


def test_sparse_file_keeps_its_hole(ro_guest: Guest, guest_shared_dir: Path) -> None:
    st = os.stat(guest_shared_dir / "sparse")
    assert st.st_blocks * 512 < st.st_size  # the host file system made a hole
    out = (
        ro_guest.run(
            "stat -c '%s %b' /mnt/sparse && dd if=/mnt/sparse bs=65536 skip=8 "
            "count=1 2>/dev/null | sha256sum"
        )
        .check()
        .out.split()
    )
    assert (int(out[0]), int(out[1])) == (st.st_size, st.st_blocks)
    assert out[2] == hashlib.sha256(b"\0" * 65536).hexdigest()


def test_content_of_every_regular_file(ro_guest: Guest, guest_shared_dir: Path) -> None:
    host_root = os.fsencode(guest_shared_dir)
    files = sorted(
        p
        for p in walk(guest_shared_dir)
        if os.path.isfile(os.path.join(host_root, p))
        and not os.path.islink(os.path.join(host_root, p))
    )
    cmd = (
        b"for f in "
        + b" ".join(shq(guest_path(p)) for p in files)
        + (b'; do sha256sum < "$f" || echo FAIL; done')
    )
    hashes = [line.split()[0] for line in ro_guest.run(cmd).check().out.splitlines()]
    expected = [sha256_file(os.path.join(host_root, p)) for p in files]
    assert dict(zip(files, hashes, strict=True)) == dict(zip(files, expected, strict=True))


def test_large_file_reads(ro_guest: Guest, guest_shared_dir: Path) -> None:
    data = (guest_shared_dir / "big.bin").read_bytes()
    out = (
        ro_guest.run(
            "cat /mnt/big.bin | sha256sum;"
            " dd if=/mnt/big.bin bs=1M 2>/dev/null | sha256sum;"
            " dd if=/mnt/big.bin bs=4096 skip=123 count=77 2>/dev/null | sha256sum;"
            " dd if=/mnt/big.bin bs=1 skip=8388600 2>/dev/null | sha256sum",
            timeout=120,
        )
        .check()
        .out.split()
    )
    assert out[0::2] == [
        hashlib.sha256(data).hexdigest(),
        hashlib.sha256(data).hexdigest(),
        hashlib.sha256(data[123 * 4096 : 200 * 4096]).hexdigest(),
        hashlib.sha256(data[8388600:]).hexdigest(),
    ]


def test_symlink_targets(ro_guest: Guest, guest_shared_dir: Path) -> None:
    host_root = os.fsencode(guest_shared_dir)
    links = sorted(p for p in walk(guest_shared_dir) if os.path.islink(os.path.join(host_root, p)))
    cmd = (
        b"for f in "
        + b" ".join(shq(guest_path(p)) for p in links)
        + (
            b'; do printf \'%s\\0\' "$(readlink -- "$f")"; done; cat /mnt/link-relative;'
            b" ls /mnt/link-dir/ ; test -e /mnt/link-dangling || echo dangling"
        )
    )
    out = ro_guest.run(cmd).check().stdout
    *targets, rest = out.split(b"\0")
    assert dict(zip(links, targets, strict=True)) == {
        p: os.readlink(os.path.join(host_root, p)) for p in links
    }
    assert rest == b"hello, guest\nd01\ndangling\n"


def test_deep_tree(ro_guest: Guest) -> None:
    path = "/mnt/deep/" + "/".join(f"d{i:02d}" for i in range(1, DEEP_LEVELS)) + "/leaf"
    assert ro_guest.run(f"cat {path}").check().out == "leaf\n"


def test_odd_names(ro_guest: Guest) -> None:
    cmd = b"; ".join(b"cat -- " + shq(b"/mnt/names/" + n) for n in ODD_NAMES)
    assert ro_guest.run(cmd).check().stdout == b"".join(n + b"\n" for n in ODD_NAMES)


def test_statfs(ro_guest: Guest, guest_shared_dir: Path) -> None:
    vfs = os.statvfs(guest_shared_dir)
    out = ro_guest.run("stat -f -c '%b %S %l' /mnt").check().out.split()
    assert (int(out[0]), int(out[1])) == (vfs.f_blocks, vfs.f_frsize)
    assert int(out[2]) == vfs.f_namemax


def test_writes_are_refused(ro_guest: Guest, guest_shared_dir: Path) -> None:
    res = ro_guest.run("touch /mnt/new-file || exit 7; echo written")
    assert res.rc == 7, res
    assert "Read-only" in res.err
    assert not (guest_shared_dir / "new-file").exists()


def test_host_change_is_seen(ro_guest: Guest, guest_shared_dir: Path) -> None:
    """cache=auto: after the host rewrites a file, the guest sees the new content."""
    target = guest_shared_dir / "changing.txt"
    target.write_bytes(b"old\n")
    assert ro_guest.run("cat /mnt/changing.txt").check().out == "old\n"
    target.write_bytes(b"new content, longer\n")
    # Wait (bounded) for the attribute/entry timeout to expire in the guest.
    res = ro_guest.run(
        "i=0; while [ $i -lt 200 ]; do"
        ' [ "$(cat /mnt/changing.txt)" = "new content, longer" ] && exit 0;'
        " i=$((i+1)); sleep 0.05; done; cat /mnt/changing.txt; exit 1"
    )
    assert res.rc == 0, f"guest still sees {res.out!r}"


def test_second_mount_and_umount(ro_guest: Guest) -> None:
    out = ro_guest.run(
        f"mkdir -p /mnt2 && mount -t virtiofs -o ro {GUEST_TAG} /mnt2 && cat /mnt2/small.txt"
        " && umount /mnt2 && grep -c ' /mnt2 ' /proc/mounts; ls /mnt2 | wc -l"
    ).out
    assert out.split() == ["hello,", "guest", "0", "0"]
    assert ro_guest.run("cat /mnt/small.txt").check().out == "hello, guest\n"
