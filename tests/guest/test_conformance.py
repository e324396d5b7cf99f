"""Read-write conformance in a real guest: every operation, checked against the host.

One daemon (``--cache auto --xattr``) and one guest (the programs image, with
``vfsprobe``) serve the whole module; the share is mounted read-write at /mnt.
Most checks are *scenarios* (``rw_support.Scenarios``): the same script runs
in the guest and on the host, and outputs, resulting trees and the guest's
view of its tree must agree. The rest check what a scenario cannot: exact
times, uid 1000's files, big files with checksums, locks seen from the host.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import random
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from rw_support import MNT, Scenarios, daemon_and_guest, make_host_tools, ours_only, shq

from virtiofsd_py.testing.qemu.guest import Guest

pytestmark = pytest.mark.guest


@pytest.fixture(scope="module")
def guest_shared_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("rwshare")
    os.chmod(root, 0o755)
    return root


@pytest.fixture(scope="module")
def rw_guest(
    guest_support: None, guest_shared_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Guest]:
    """The guest with the share mounted read-write at /mnt."""
    with daemon_and_guest(guest_shared_dir, tmp_path_factory) as (_, g):
        yield g


@pytest.fixture(scope="module")
def host_tools(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_host_tools(tmp_path_factory)


@pytest.fixture(scope="module")
def sc(rw_guest: Guest, guest_shared_dir: Path, host_tools: Path) -> Scenarios:
    return Scenarios(rw_guest, guest_shared_dir, host_tools)


# -- scenarios: same script in the guest and on the host ---------------------


def test_create_open_flags(sc: Scenarios) -> None:
    res = sc.run(
        "create",
        """
        vfsprobe open f creat,excl,wronly 0640
        vfsprobe open f creat,excl,wronly 0640
        vfsprobe open missing rdonly
        vfsprobe write f wronly 0 hello
        vfsprobe write f wronly,append -1 ' world'
        vfsprobe write f rdwr,append 0 '!'
        cat f; echo
        cp f g; vfsprobe open g wronly,trunc; stat -c '%s' g
        vfsprobe write g wronly,creat,trunc 3 xyz; od -c g
        vfsprobe open . wronly
        vfsprobe open f rdonly,directory
        mkdir d; vfsprobe open d/x creat,excl,rdwr 0600
        ln -s nowhere dangling; vfsprobe open dangling creat,excl,wronly
        ln -s f lnk; vfsprobe open lnk rdonly,nofollow; vfsprobe open lnk rdonly
        vfsprobe open d/x creat,wronly 0777; stat -c '%a' d/x
        """,
    )
    # pwrite leaves the offset alone; with O_APPEND it appends all the same (pwrite(2) BUGS).
    assert res.guest_out.startswith("ok\nEEXIST\nENOENT\n5 0\n6 11\n1 0\nhello world!\nok\n0\n")


def test_write_and_read_back(sc: Scenarios) -> None:
    res = sc.run(
        "rw",
        """
        printf 'abc' > f; printf 'defg' >> f; cat f; echo
        dd if=/dev/zero of=f bs=4096 seek=3 count=1 conv=notrunc 2>/dev/null
        printf X | dd of=f bs=1 seek=5000 conv=notrunc 2>/dev/null
        stat -c '%s' f; sha256sum f
        dd if=f bs=1 skip=4999 count=3 2>/dev/null | od -An -c
        for i in 1 2 3; do seq 1 5000 >> g; done; sha256sum g; wc -l < g
        """,
    )
    assert res.guest_out.startswith("abcdefg\n16384\n")


def test_mknod(sc: Scenarios) -> None:
    sc.run(
        "mknod",
        """
        mkfifo p; mknod -m 0600 c c 1 3; mknod -m 0640 b b 7 0
        vfsprobe mknod s sock 0644; vfsprobe bindsock s2; vfsprobe mknod p2 fifo 0604
        vfsprobe mknod p fifo 0600
        stat -c '%n %F %a %t:%T' p c b s s2 p2
        """,
    )


def test_mkdir_rmdir(sc: Scenarios) -> None:
    sc.run(
        "dirs",
        """
        mkdir -m 750 a; mkdir -p a/b/c a/b/c2 a/e; stat -c '%n %a %h' a a/b
        rmdir a/b; rmdir a/b/c; rmdir a/nonexistent; stat -c '%h' a/b
        mkdir a/e; touch a/file; rmdir a/file; rm -r a/b; ls a
        """,
    )


def test_symlink_readlink(sc: Scenarios) -> None:
    sc.run(
        "symlinks",
        """
        echo data > f; ln -s f rel; ln -s /abs/target abs; ln -s ../up/and/../over up
        mkdir d; ln -s ../f d/back; ln -s d dirlink
        readlink rel abs up d/back; cat rel d/back dirlink/back; ls dirlink/
        ln -s f rel; stat -c '%s %F' rel abs up
        """,
    )


def test_hard_links(sc: Scenarios) -> None:
    sc.run(
        "links",
        """
        echo x > f; ln f h; ln f h2; stat -c '%h' f h h2
        ln f h; mkdir d; ln d d2; ln f d/h3; stat -c '%h' f
        rm h; unlink h2; stat -c '%h' f d/h3; echo y >> d/h3; cat f
        """,
    )


def test_unlink(sc: Scenarios) -> None:
    sc.run(
        "unlink",
        """
        echo x > f; rm f; rm f; ls
        vfsprobe unlinked tmp 'still here'; ls
        mkdir d; unlink d
        """,
    )


def test_rename(sc: Scenarios) -> None:
    sc.run(
        "rename",
        """
        echo 1 > a; echo 2 > b; mv a b; cat b; ls
        mkdir d1 d2; echo 3 > d1/x; mv d1/x d2/y; mv d2 d1/d2; find . | sort
        vfsprobe rename2 b c noreplace
        echo 4 > e; vfsprobe rename2 c e noreplace
        vfsprobe rename2 c e exchange; cat c e
        vfsprobe rename2 c nonexistent exchange
        mkdir x y; touch y/z; vfsprobe rename2 x y none; vfsprobe rename2 x c none
        vfsprobe rename2 c x none; vfsprobe rename2 d1 d1/d2/sub none
        vfsprobe rename2 x d1 exchange; find . | sort
        """,
    )


def test_chmod_chown(sc: Scenarios) -> None:
    sc.run(
        "perm",
        """
        touch f g h; mkdir d d2
        chmod 4751 f; chmod 2755 d; chmod 1777 d2; chmod 0 h
        stat -c '%n %a %u %g' f d d2 h
        chown 1234:5678 g; chown 1000 h; chgrp 100 d; stat -c '%n %a %u %g' g h d
        chmod 6755 g; chown 4321 g; stat -c '%n %a %u' g
        ln -s g sl; chown -h 77:88 sl; stat -c '%n %u %g' sl g
        """,
    )


def test_truncate(sc: Scenarios) -> None:
    sc.run(
        "truncate",
        """
        seq 1 3000 > f; truncate -s 100000 f; stat -c '%s' f; sha256sum f
        vfsprobe ftruncate f 4000; stat -c '%s' f; sha256sum f
        truncate -s 0 f; stat -c '%s' f; truncate -s 5 new; od -c new
        vfsprobe ftruncate missing 0
        """,
    )


def test_fsync_fdatasync_syncfs(sc: Scenarios) -> None:
    res = sc.run(
        "sync",
        """
        echo data > f
        vfsprobe sync fsync f; vfsprobe sync fdatasync f; vfsprobe sync syncfs f
        vfsprobe sync fsync .; sync; sync f
        """,
    )
    assert res.guest_out.split() == ["ok"] * 4


def test_fallocate_and_holes(sc: Scenarios) -> None:
    res = sc.run(
        "fallocate",
        """
        yes abcdefgh | head -c 1048576 > f
        vfsprobe fallocate f punch 65536 131072; stat -c '%s %b' f; sha256sum f
        vfsprobe seek f data 0; vfsprobe seek f hole 0; vfsprobe seek f data 70000
        vfsprobe seek f hole 300000; vfsprobe seek f data 2000000
        vfsprobe fallocate g alloc 0 1048576; stat -c '%s %b' g; sha256sum g
        vfsprobe fallocate g keep 1048576 1048576; stat -c '%s %b' g
        fallocate -l 200000 h; stat -c '%s' h
        truncate -s 8388608 sparse
        printf x | dd of=sparse bs=1 seek=4194304 conv=notrunc 2>/dev/null
        vfsprobe seek sparse data 0; vfsprobe seek sparse hole 4194304; stat -c '%s %b' sparse
        vfsprobe fallocate f zerokeep 0 4096; sha256sum f
        """,
    )
    assert "\n65536\n" in res.guest_out  # the first hole starts where the punch did


def test_copy_file_range(sc: Scenarios) -> None:
    res = sc.run(
        "copyrange",
        """
        yes 0123456789 | head -c 300000 > a
        vfsprobe copyrange a b 0 0 300000; cmp a b && echo same
        vfsprobe copyrange a c 1000 5000 20000; stat -c '%s' c; sha256sum c
        vfsprobe copyrange a c 299990 0 100; vfsprobe copyrange missing c 0 0 1
        """,
    )
    assert res.guest_out.startswith("300000\nsame\n20000\n25000\n")


def test_xattrs(sc: Scenarios) -> None:
    res = sc.run(
        "xattr",
        """
        touch f; mkdir d
        vfsprobe xattr set f user.a 1; vfsprobe xattr set f user.b two; vfsprobe xattr get f user.a
        vfsprobe xattr list f | sort
        vfsprobe xattr set f user.a 9 create; vfsprobe xattr set f user.c 9 replace
        vfsprobe xattr set f user.a 3 replace; vfsprobe xattr get f user.a
        vfsprobe xattr remove f user.b; vfsprobe xattr get f user.b; vfsprobe xattr remove f user.b
        vfsprobe xattr set d user.dir yes; vfsprobe xattr list d
        vfsprobe xattr get f user.missing
        """,
    )
    assert res.guest_out.startswith("ok\nok\n1\nuser.a\nuser.b\nEEXIST\nENODATA\nok\n3\n")
    assert os.getxattr(res.guest_dir / "f", "user.a") == b"3"
    assert os.listxattr(res.guest_dir / "d") == ["user.dir"]


def test_setfattr_getfattr_programs(sc: Scenarios) -> None:
    if sc.guest.run("command -v setfattr").rc != 0:
        pytest.skip("attr tools not in the guest image")
    sc.guest.run(f"cd {MNT} && touch attrs && setfattr -n user.tool -v works attrs").check()
    out = sc.guest.run(f"getfattr -n user.tool --only-values {MNT}/attrs").check().out
    assert out == "works"
    assert os.getxattr(sc.shared / "attrs", "user.tool") == b"works"


def test_locks_between_guest_processes(sc: Scenarios) -> None:
    """POSIX, OFD and flock locks conflict between two guest processes."""
    res = sc.guest.run(
        f"cd {MNT} && mkdir locks && cd locks && echo x > f && rm -f /tmp/rel && "
        "{ vfsprobe lock f w setlk 0 0 /tmp/rel > /tmp/l1 & } && "
        "{ vfsprobe flock f ex nb /tmp/rel > /tmp/l2 & } && "
        "while [ ! -s /tmp/l1 ] || [ ! -s /tmp/l2 ]; do sleep 0.01; done && "
        "vfsprobe lock f w setlk 0 0; vfsprobe lock f r getlk 10 1 | cut -d' ' -f1-3; "
        "vfsprobe lock f w ofd_setlk 0 0; vfsprobe flock f ex nb; vfsprobe flock f sh nb; "
        "touch /tmp/rel; wait; "
        "vfsprobe lock f w setlk 0 0; vfsprobe flock f ex nb",
        timeout=60,
    ).check()
    # EWOULDBLOCK is EAGAIN on Linux.
    assert res.out.split("\n") == [
        "EAGAIN",
        "w 0 0",
        "EAGAIN",
        "EAGAIN",
        "EAGAIN",
        "locked",
        "locked",
        "",
    ]


def test_statfs(sc: Scenarios) -> None:
    out = sc.guest.run(f"vfsprobe statfs {MNT}").check().out.split()
    fields = dict(f.split("=") for f in out)
    vfs = os.statvfs(sc.shared)
    assert int(fields["blocks"]) == vfs.f_blocks
    assert int(fields["bsize"]) == vfs.f_bsize
    assert int(fields["namelen"]) == vfs.f_namemax
    assert int(fields["files"]) == vfs.f_files
    assert fields["type"] == "0x65735546"  # FUSE_SUPER_MAGIC


# -- checks a scenario cannot express ----------------------------------------


def _host_probe(tools: Path, *args: str) -> str:
    return subprocess.run(
        [str(tools / "vfsprobe"), *args], capture_output=True, text=True, check=False
    ).stdout


def test_utimes_exact_now_and_omit(sc: Scenarios) -> None:
    d = sc.shared / "times"
    d.mkdir()
    g = f"{MNT}/times"
    sc.guest.run(
        f"cd {g} && touch a b c d e && vfsprobe utimens a 1000000000.5 1500000000.123456789 && "
        "vfsprobe utimens b 1000000000.000000001 omit && "
        "touch -d '2001-02-03 04:05:06' c && ln -s a l && "
        "vfsprobe utimens l 1111 2222 nofollow"
    ).check()
    a = os.stat(d / "a")
    assert (a.st_atime_ns, a.st_mtime_ns) == (1_000_000_000_500_000_000, 1_500_000_000_123_456_789)
    assert os.stat(d / "b").st_atime_ns == 1_000_000_000_000_000_001
    assert os.stat(d / "c").st_mtime_ns == 981_173_106 * 10**9
    lnk = os.lstat(d / "l")
    assert (lnk.st_atime_ns, lnk.st_mtime_ns) == (1111 * 10**9, 2222 * 10**9)
    # UTIME_OMIT keeps a time exactly; UTIME_NOW moves it to the present.
    os.utime(d / "d", ns=(5 * 10**9, 6 * 10**9))
    os.utime(d / "e", ns=(5 * 10**9, 6 * 10**9))
    sc.guest.run(
        f"cd {g} && sleep 1.1 && vfsprobe utimens d omit now && vfsprobe utimens e now omit"
    ).check()
    st_d, st_e = os.stat(d / "d"), os.stat(d / "e")
    assert st_d.st_atime_ns == 5 * 10**9
    assert st_d.st_mtime_ns > 6 * 10**9
    assert st_e.st_mtime_ns == 6 * 10**9
    assert st_e.st_atime_ns > 5 * 10**9


def test_times_follow_writes(sc: Scenarios) -> None:
    d = sc.shared / "mtimes"
    d.mkdir()
    (d / "f").write_bytes(b"x")
    os.utime(d / "f", ns=(10**9, 10**9))
    sc.guest.run(f"echo more >> {MNT}/mtimes/f").check()
    assert os.stat(d / "f").st_mtime_ns > 10**9
    assert (d / "f").read_bytes() == b"xmore\n"


def test_files_of_uid_1000_belong_to_uid_1000(sc: Scenarios) -> None:
    d = sc.shared / "user"
    d.mkdir()
    os.chmod(d, 0o1777)
    (d / "rootfile").write_bytes(b"root's\n")
    os.chmod(d / "rootfile", 0o644)
    res = sc.guest.run(
        f"cd {MNT}/user && su user -c '"
        "echo mine > f && mkdir sub && ln -s f sl && mkfifo p && ln f hard && "
        "mkdir sub/deeper && echo deep > sub/deeper/f && chmod 600 f && "
        "echo 1; echo no >> rootfile; echo 2; chown 0 f; echo 3; rm rootfile; "
        "echo 4; touch -d 2001-01-01 rootfile; id -u' 2>&1"
    )
    for rel in ("f", "sub", "sl", "p", "hard", "sub/deeper", "sub/deeper/f"):
        st = os.lstat(d / rel)
        assert (st.st_uid, st.st_gid) == (1000, 1000), rel
    assert os.stat(d / "f").st_mode & 0o777 == 0o600
    assert (d / "rootfile").read_bytes() == b"root's\n"
    lines = res.out.splitlines()
    assert lines[-1] == "1000"
    assert "Permission denied" in lines[lines.index("1") + 1]
    assert "Operation not permitted" in lines[lines.index("2") + 1]
    assert "Operation not permitted" in lines[lines.index("3") + 1]  # sticky directory
    assert "Operation not permitted" in lines[lines.index("4") + 1]


def test_setgid_directory_inheritance(sc: Scenarios) -> None:
    d = sc.shared / "sgid"
    d.mkdir()
    os.chown(d, 0, 4242)
    os.chmod(d, 0o2777)
    sc.guest.run(f"cd {MNT}/sgid && touch f && mkdir sub && su user -c 'touch g'").check()
    assert os.stat(d / "f").st_gid == 4242
    assert os.stat(d / "g")[4:6] == (1000, 4242)
    sub = os.stat(d / "sub")
    assert sub.st_gid == 4242 and sub.st_mode & 0o2000


def test_big_file_checksums(sc: Scenarios) -> None:
    size_mib = 32
    out = sc.guest.run(
        # Big writes (bs=1M): a pipe would write 4 KiB at a time, which under TCG
        # costs one slow request round trip each.
        f"dd if=/dev/urandom of=/tmp/big bs=1M count={size_mib} 2>/dev/null; sha256sum /tmp/big;"
        f" dd if=/tmp/big of={MNT}/big bs=1M 2>/dev/null; rm /tmp/big;"
        f" echo 3 > /proc/sys/vm/drop_caches; sha256sum {MNT}/big",
        timeout=300,
    ).check()
    written, reread = out.out.split()[0::2]
    host = hashlib.sha256((sc.shared / "big").read_bytes()).hexdigest()
    assert written == reread == host
    assert os.stat(sc.shared / "big").st_size == size_mib << 20
    data = random.Random(7).randbytes(24 << 20)
    (sc.shared / "hostbig").write_bytes(data)
    got = sc.guest.run(
        f"sha256sum {MNT}/hostbig;"
        f" dd if={MNT}/hostbig bs=1M skip=5 count=3 2>/dev/null | sha256sum",
        timeout=300,
    ).check()
    assert got.out.split()[0::2] == [
        hashlib.sha256(data).hexdigest(),
        hashlib.sha256(data[5 << 20 : 8 << 20]).hexdigest(),
    ]


def test_sparse_file_stays_sparse(sc: Scenarios) -> None:
    sc.guest.run(
        f"truncate -s 64M {MNT}/sparse && "
        f"printf data | dd of={MNT}/sparse bs=1 seek=33554432 conv=notrunc 2>/dev/null"
    ).check()
    st = os.stat(sc.shared / "sparse")
    assert st.st_size == 64 << 20
    assert st.st_blocks * 512 < 1 << 20
    with open(sc.shared / "sparse", "rb") as f:
        assert os.lseek(f.fileno(), 0, os.SEEK_DATA) == 32 << 20
        f.seek(32 << 20)
        assert f.read(4) == b"data"
    out = sc.guest.run(f"vfsprobe seek {MNT}/sparse data 0; stat -c %b {MNT}/sparse").check()
    assert out.out.split() == [str(32 << 20), str(st.st_blocks)]


def test_many_small_files(sc: Scenarios) -> None:
    n = 1000
    sc.guest.run(
        f"mkdir {MNT}/many && cd {MNT}/many && i=0; while [ $i -lt {n} ]; do "
        'echo "file $i" > f$i; i=$((i+1)); done',
        timeout=300,
    ).check()
    names = os.listdir(sc.shared / "many")
    assert len(names) == n
    for i in random.Random(1).sample(range(n), 50):
        assert (sc.shared / "many" / f"f{i}").read_text() == f"file {i}\n"
    out = sc.guest.run(f"ls {MNT}/many | wc -l; cat {MNT}/many/f7*; rm -r {MNT}/many")
    expected = [f"file {i}" for i in range(n) if str(i).startswith("7")]
    assert out.check().out.splitlines() == [str(n), *sorted(expected, key=lambda s: s[5:])]
    assert not (sc.shared / "many").exists()


def test_deep_tree(sc: Scenarios) -> None:
    depth = 60
    rel = "/".join(f"level{i:02d}" for i in range(depth))
    sc.guest.run(f"cd {MNT} && mkdir -p deep/{rel} && echo leaf > deep/{rel}/leaf").check()
    assert (sc.shared / "deep" / rel / "leaf").read_text() == "leaf\n"
    out = sc.guest.run(f"find {MNT}/deep | wc -l; cat {MNT}/deep/{rel}/leaf; rm -r {MNT}/deep")
    assert out.check().out.split() == [str(depth + 2), "leaf"]
    assert not (sc.shared / "deep").exists()


UNICODE_NAMES = [
    "ünïcödé",
    "名前のファイル",
    "emoji-😀🚀",
    "combining-e\u0301",
    "רווח עברית",
    "x" * 255,
    "é" * 127,  # 254 bytes
]


def test_unicode_names(sc: Scenarios) -> None:
    d = sc.shared / "names"
    cmds = [f"mkdir {MNT}/names && cd {MNT}/names"]
    cmds += [f"echo {shq(n)} > {shq(n)}" for n in UNICODE_NAMES]
    cmds += [f"mkdir {shq('dir-' + UNICODE_NAMES[1])}"]
    cmds += [f"touch {shq('y' * 256)} 2>/dev/null || echo toolong"]
    cmds += [f"mv {shq(UNICODE_NAMES[0])} {shq('renamed-' + UNICODE_NAMES[2])}"]
    out = sc.guest.run("; ".join(cmds)).check()
    assert out.out == "toolong\n"
    expected = {*UNICODE_NAMES[1:], "dir-" + UNICODE_NAMES[1], "renamed-" + UNICODE_NAMES[2]}
    assert set(os.listdir(d)) == expected
    assert (d / ("renamed-" + UNICODE_NAMES[2])).read_text() == UNICODE_NAMES[0] + "\n"
    # (busybox ls prints "?" for bytes it deems unprintable: use the shell's glob)
    listing = sc.guest.run(f"cd {MNT}/names && printf '%s\\n' *").check().out.splitlines()
    assert set(listing) == expected


# -- what only our daemon does ----------------------------------------------


@ours_only("O_TMPFILE gets ENOSYS from the Rust virtiofsd")
def test_o_tmpfile(sc: Scenarios) -> None:
    sc.run(
        "tmpfile",
        """
        vfsprobe tmpfile . 'anonymous data'; ls
        vfsprobe tmpfile . 'linked in' named; cat named; stat -c '%a %h' named
        """,
    )


@ours_only("STATX gets ENOSYS from the Rust virtiofsd: no btime in the guest")
def test_statx_btime(sc: Scenarios, host_tools: Path) -> None:
    (sc.shared / "statx").write_bytes(b"12345")
    guest = dict(
        f.split("=") for f in sc.guest.run(f"vfsprobe statx {MNT}/statx").check().out.split()
    )
    host = dict(
        f.split("=") for f in _host_probe(host_tools, "statx", str(sc.shared / "statx")).split()
    )
    for key in ("mode", "nlink", "uid", "gid", "size", "blocks", "mtime"):
        assert guest[key] == host[key], key
    assert int(guest["mask"], 16) & 0x800, "STATX_BTIME not in the guest's mask"
    assert guest["btime"] == host["btime"]


@ours_only("the Rust virtiofsd does not pass FS_IOC_GETFLAGS through")
def test_ioctl_getflags(sc: Scenarios, host_tools: Path) -> None:
    (sc.shared / "flags").write_bytes(b"x")
    guest = sc.guest.run(f"vfsprobe getflags {MNT}/flags").out.strip()
    assert guest == _host_probe(host_tools, "getflags", str(sc.shared / "flags")).strip()


@contextlib.contextmanager
def _guest_holds(guest: Guest, cmd: str) -> Iterator[None]:
    """Run a vfsprobe lock command in the guest's background until the block ends."""
    guest.run(
        f"rm -f /tmp/hold.rel /tmp/hold.out; {{ {cmd} /tmp/hold.rel > /tmp/hold.out & }}; "
        "echo $! > /tmp/hold.pid; "
        "while [ ! -s /tmp/hold.out ]; do sleep 0.01; done; cat /tmp/hold.out"
    ).check()
    try:
        yield
    finally:
        guest.run(
            "touch /tmp/hold.rel; while kill -0 $(cat /tmp/hold.pid) 2>/dev/null; do "
            "sleep 0.01; done"
        ).check()


@ours_only("the Rust virtiofsd keeps locks guest-local")
def test_posix_lock_in_guest_blocks_host(sc: Scenarios) -> None:
    path = sc.shared / "plock"
    path.write_bytes(b"lock me\n")
    with _guest_holds(sc.guest, f"vfsprobe lock {MNT}/plock w setlk 0 0"):
        fd = os.open(path, os.O_RDWR)
        try:
            with pytest.raises(OSError) as info:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            assert info.value.errno in (errno.EAGAIN, errno.EACCES)
        finally:
            os.close(fd)
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released with the guest process
    finally:
        os.close(fd)


@ours_only("the Rust virtiofsd keeps locks guest-local")
def test_host_posix_lock_blocks_guest(sc: Scenarios) -> None:
    path = sc.shared / "hlock"
    path.write_bytes(b"host locks\n")
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX)
        out = sc.guest.run(
            f"vfsprobe lock {MNT}/hlock w setlk 0 0; vfsprobe lock {MNT}/hlock r getlk 0 0"
        ).out.split()
        assert out[0] == "EAGAIN"
        assert out[1] == "w"
        # A waiting lock (F_SETLKW) in the guest gets it once the host lets go.
        sc.guest.run(
            f"rm -f /tmp/w.out; {{ vfsprobe lock {MNT}/hlock w setlkw 0 0 > /tmp/w.out & }}"
        ).check()
    finally:
        os.close(fd)
    res = sc.guest.run(
        "i=0; while [ ! -s /tmp/w.out ] && [ $i -lt 1000 ]; do sleep 0.01; i=$((i+1)); done; "
        "cat /tmp/w.out"
    ).check()
    assert res.out == "locked\n"


@ours_only("the Rust virtiofsd keeps flock locks guest-local")
def test_flock_in_guest_blocks_host(sc: Scenarios) -> None:
    path = sc.shared / "flock"
    path.write_bytes(b"")
    with _guest_holds(sc.guest, f"vfsprobe flock {MNT}/flock ex nb"):
        fd = os.open(path, os.O_RDONLY)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert sc.guest.run(f"vfsprobe flock {MNT}/flock sh nb").out == "EAGAIN\n"
    finally:
        os.close(fd)
