"""The scripted operations of the pyfuse3 differential test (tests/guest/test_pyfuse3_examples.py).

Run by python3 in the guest on the virtio-fs mount and on the host on
pyfuse3's own libfuse mount of the same example; prints one line per
operation (its result or its errno name, nothing that differs between two
mounts of the same file system: no inode numbers, no times).  Standalone:
only the standard library.

    python3 pyfuse3_ops.py ROOT ro|rw
"""

import errno
import hashlib
import os
import stat
import sys

root, mode = sys.argv[1], sys.argv[2]


def show(label, fn):
    try:
        result = fn()
    except OSError as e:
        result = "ERR " + errno.errorcode.get(e.errno, str(e.errno))
    print(label, result)


def st(p):
    s = os.lstat(p)
    size = 0 if stat.S_ISDIR(s.st_mode) else s.st_size
    return stat.filemode(s.st_mode), size, s.st_nlink, s.st_uid, s.st_gid


def p(*parts):
    return os.path.join(root, *parts)


def read(path, off=0, n=1 << 20):
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, n, off)
    finally:
        os.close(fd)


def write(path, data, off=0, flags=os.O_WRONLY | os.O_CREAT):
    fd = os.open(path, flags, 0o644)
    try:
        return os.pwrite(fd, data, off)
    finally:
        os.close(fd)


def digest(data):
    return hashlib.sha256(data).hexdigest()[:16], len(data)


def tree():
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        if dirpath == p("many"):
            continue  # summarised by "readdir many"
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            full = os.path.join(dirpath, name)
            out.append((os.path.relpath(full, root), st(full)))
    return out


def statfs():
    v = os.statvfs(root)
    return v.f_bsize, v.f_frsize, v.f_namemax


show("listdir", lambda: sorted(os.listdir(root)))
for name in sorted(os.listdir(root)):
    show(f"stat {name}", lambda name=name: st(p(name)))
    if stat.S_ISREG(os.lstat(p(name)).st_mode):
        show(f"read {name}", lambda name=name: read(p(name)))
        show(f"read {name} @3", lambda name=name: read(p(name), 3, 5))
show("statfs", statfs)
show("getxattr root", lambda: os.getxattr(root, "user.none"))
show("open-write-existing", lambda: [write(p(n), b"x") for n in sorted(os.listdir(root))[:1]])
show(
    "create", lambda: write(p("new-file"), b"created\n", flags=os.O_WRONLY | os.O_CREAT | os.O_EXCL)
)
show("mkdir", lambda: os.mkdir(p("dir"), 0o750))
if mode == "rw":
    data = bytes(range(256)) * 300
    show("write big", lambda: write(p("dir", "big"), data))
    show("read big", lambda: digest(read(p("dir", "big"))))
    show("pwrite middle", lambda: write(p("dir", "big"), b"MIDDLE", 40000, flags=os.O_WRONLY))
    show("read middle", lambda: read(p("dir", "big"), 39998, 10))
    show("append", lambda: write(p("new-file"), b"more\n", flags=os.O_WRONLY | os.O_APPEND))
    show("read new-file", lambda: read(p("new-file")))
    show("truncate", lambda: os.truncate(p("dir", "big"), 1000))
    show("stat big", lambda: st(p("dir", "big")))
    show("chmod", lambda: os.chmod(p("dir", "big"), 0o600))
    show("stat big", lambda: st(p("dir", "big")))
    show("rename", lambda: os.rename(p("dir", "big"), p("dir", "renamed")))
    show("stat old", lambda: st(p("dir", "big")))
    show("rename over", lambda: os.rename(p("new-file"), p("dir", "renamed")))
    show("read renamed", lambda: read(p("dir", "renamed")))
    show("symlink", lambda: os.symlink("renamed", p("dir", "link")))
    show("readlink", lambda: os.readlink(p("dir", "link")))
    show("read via link", lambda: read(p("dir", "link")))
    show("link", lambda: os.link(p("dir", "renamed"), p("hard")))
    show("stat hard", lambda: st(p("hard")))
    show("rmdir non-empty", lambda: os.rmdir(p("dir")))
    show("mkdir many", lambda: os.mkdir(p("many")))
    # Names of one length: tmpfs.py ignores readdir_reply's False and goes on, and
    # libfuse then takes a shorter entry after a refused longer one (the longer
    # one is lost); the adapter refuses every entry after the first refused one.
    for i in range(2000):
        fd = os.open(p("many", f"entry-{i:04d}-{'x' * 20}"), os.O_CREAT | os.O_WRONLY, 0o644)
        os.close(fd)
    names = sorted(os.listdir(p("many")))
    show("readdir many", lambda: (len(names), digest("\n".join(names).encode())))
    show("scandir types", lambda: sorted({e.is_file() for e in os.scandir(p("many"))}))
    for i in range(0, 2000, 3):
        os.unlink(p("many", f"entry-{i:04d}-{'x' * 20}"))
    names = sorted(os.listdir(p("many")))
    show("readdir after unlink", lambda: (len(names), digest("\n".join(names).encode())))
    show("unlink missing", lambda: os.unlink(p("many", "nope")))
    show("setxattr", lambda: os.setxattr(p("hard"), "user.key", b"value"))
    show(
        "setxattr create existing",
        lambda: os.setxattr(p("hard"), "user.key", b"v2", os.XATTR_CREATE),
    )
    show(
        "setxattr replace missing",
        lambda: os.setxattr(p("hard"), "user.nokey", b"v", os.XATTR_REPLACE),
    )
    show("getxattr", lambda: os.getxattr(p("hard"), "user.key"))
    show("listxattr", lambda: sorted(os.listxattr(p("hard"))))
    show("removexattr", lambda: os.removexattr(p("hard"), "user.key"))
    show("getxattr removed", lambda: os.getxattr(p("hard"), "user.key"))
    show("unlink", lambda: os.unlink(p("hard")))
    show("utime", lambda: os.utime(p("dir", "renamed"), ns=(10**18, 2 * 10**18)))
    show("mtime", lambda: os.lstat(p("dir", "renamed")).st_mtime_ns)
show("tree", tree)
