"""The command lines libvirt generates, run for real up to a working FUSE session.

libvirt (src/qemu/qemu_virtiofs.c, qemuVirtioFSBuildCommandLine) opens and
listens on the vhost-user socket itself and passes it with ``--fd=N``.
When the binary's ``--print-capabilities`` lists ``separate-options`` it
uses the Rust virtiofsd's options; otherwise the legacy C daemon's
``-o source=PATH,cache=...,xattr,...`` with commas in PATH doubled
(virQEMUBuildBufferEscapeComma) and ``-d`` for debug.  It discovers the
binary through a vhost-user JSON descriptor (QEMU docs/interop/vhost-user.json).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from virtiofsd_py.fuse import abi
from virtiofsd_py.testing.daemon_proc import is_own_daemon
from virtiofsd_py.testing.frontend.fuse_client import DEFAULT_INIT_FLAGS, FuseClient
from virtiofsd_py.testing.frontend.vhost_user import VhostUserFrontend

pytestmark = pytest.mark.skipif(not is_own_daemon(), reason="tests virtiofsd-py's command line")
ROOT = Path(__file__).resolve().parents[2]
DESCRIPTOR = ROOT / "contrib" / "50-virtiofsd-py.json"
#: QEMU vhost-user.json, VHostUserBackendCapabilitiesFs.
FS_FEATURES = {"migrate-precopy", "separate-options"}
DEPRECATED_O = "deprecated option format '-o'"


def libvirt_separate(fd: int, share: str, **kw: str) -> list[str]:
    """What libvirt builds when the daemon has ``separate-options``."""
    argv = [f"--fd={fd}", "--shared-dir", share]
    if "cache" in kw:
        argv += ["--cache", kw["cache"]]
    if "sandbox" in kw:
        argv += ["--sandbox", kw["sandbox"]]
    if kw.get("xattr") == "on":
        argv.append("--xattr")
    argv += ["--thread-pool-size=16", "--rlimit-nofile=4096"]
    if kw.get("debug"):
        argv += ["--log-level", "debug"]
    return argv


def libvirt_legacy(fd: int, share: str, *items: str, debug: bool = False) -> list[str]:
    """What libvirt builds for a daemon without ``separate-options``."""
    opts = "source=" + share.replace(",", ",,") + "".join("," + i for i in items)
    argv = [f"--fd={fd}", "-o", opts, "--thread-pool-size=0"]
    return [*argv, "-d"] if debug else argv


def run_session(tmp_path: Path, build: object) -> tuple[dict[str, int], str]:
    """Start the daemon as libvirt does; INIT, LOOKUP, READ; its INIT reply and log."""
    share = tmp_path / "a share, with commas"
    share.mkdir()
    (share / "file").write_bytes(b"from the host\n")
    path = str(tmp_path / "fs0-fs.sock")
    lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lsock.bind(path)
    lsock.listen(1)
    fd = fcntl.fcntl(lsock.fileno(), fcntl.F_DUPFD_CLOEXEC, 20)
    lsock.close()
    argv = build(fd, str(share))  # type: ignore[operator]
    log_path = tmp_path / "virtiofsd.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "virtiofsd_py", *argv],
            pass_fds=(fd,),
            stdout=log,
            stderr=log,
            cwd=ROOT,
            env=dict(os.environ, RUNTIME_DIRECTORY=str(tmp_path)),
        )
    os.close(fd)
    try:
        fe = VhostUserFrontend.connect(path)
        fe.connect_and_start(queues=2)
        fuse = FuseClient(fe)
        init = fuse.init(flags=DEFAULT_INIT_FLAGS | abi.FUSE_POSIX_ACL)
        entry = fuse.lookup(abi.FUSE_ROOT_ID, "file")
        fh = fuse.open(entry.nodeid).fh
        assert fuse.read(entry.nodeid, fh, 0, 4096) == b"from the host\n"
        fe.close()
        assert proc.wait(10) == 0, log_path.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    return dict(init), log_path.read_text()


def init_flags(init: dict[str, int]) -> int:
    return abi.join_init_flags(init["flags"], init["flags2"])


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"cache": "never", "xattr": "on", "debug": "1"},
        {"cache": "always", "sandbox": "namespace"},
    ],
)
def test_separate_options_command_line(tmp_path: Path, kw: dict[str, str]) -> None:
    _, log = run_session(tmp_path, lambda fd, share: libvirt_separate(fd, share, **kw))
    assert DEPRECATED_O not in log
    assert ("FUSE LOOKUP unique=" in log) == bool(kw.get("debug"))


@pytest.mark.parametrize(
    ("items", "locks"),
    [
        ((), abi.FUSE_POSIX_LOCKS | abi.FUSE_FLOCK_LOCKS),
        (
            ("cache=none", "xattr", "flock", "posix_lock"),
            abi.FUSE_POSIX_LOCKS | abi.FUSE_FLOCK_LOCKS,
        ),
        (("cache=always", "no_xattr", "no_flock", "no_posix_lock"), 0),
        (("cache=auto", "sandbox=namespace", "no_flock"), abi.FUSE_POSIX_LOCKS),
    ],
)
def test_legacy_o_command_line(tmp_path: Path, items: tuple[str, ...], locks: int) -> None:
    init, log = run_session(
        tmp_path, lambda fd, share: libvirt_legacy(fd, share, *items, debug=True)
    )
    assert DEPRECATED_O in log
    assert "deprecated flag '-d'" in log
    assert "FUSE LOOKUP unique=" in log  # -d is debug
    assert init_flags(init) & (abi.FUSE_POSIX_LOCKS | abi.FUSE_FLOCK_LOCKS) == locks


def test_other_options_libvirt_may_pass(tmp_path: Path) -> None:
    init, _ = run_session(
        tmp_path,
        lambda fd, share: [
            f"--fd={fd}", f"--shared-dir={share}", "--announce-submounts", "--posix-acl",
            "--inode-file-handles=prefer", "--migration-mode=find-paths",
            "--migration-on-error=guest-error", "--sandbox=none", "--seccomp=none",
        ],
    )  # fmt: skip
    assert init_flags(init) & abi.FUSE_POSIX_ACL


def test_unknown_legacy_option_is_refused(tmp_path: Path) -> None:
    res = subprocess.run(
        [sys.executable, "-m", "virtiofsd_py", "--socket-path", str(tmp_path / "s"),
         "-o", f"source={tmp_path},timeout=5"],
        capture_output=True, text=True, timeout=20, cwd=ROOT,
    )  # fmt: skip
    assert res.returncode == 2
    assert "-o timeout=5" in res.stderr


def test_print_capabilities_matches_what_libvirt_parses() -> None:
    res = subprocess.run(
        [sys.executable, "-m", "virtiofsd_py", "--print-capabilities"],
        capture_output=True, text=True, timeout=20, cwd=ROOT,
    )  # fmt: skip
    caps = json.loads(res.stdout)
    assert caps["type"] == "fs"
    assert set(caps["features"]) <= FS_FEATURES
    assert "separate-options" in caps["features"]


def test_vhost_user_descriptor() -> None:
    """contrib/50-virtiofsd-py.json as vhost-user.json's VhostUserBackend defines it."""
    desc = json.loads(DESCRIPTOR.read_text())
    assert set(desc) <= {"description", "type", "binary", "tags"}
    assert isinstance(desc["description"], str) and desc["description"]
    assert desc["type"] == "fs"
    assert os.path.isabs(desc["binary"])
    assert desc["binary"].endswith("/virtiofsd-py")


# -- the -o translation itself -----------------------------------------------------
def test_split_items_unescapes_doubled_commas() -> None:
    from virtiofsd_py.app.legacy_options import split_items

    assert split_items("source=/a,,b,,,cache=none,xattr") == [
        "source=/a,b,",
        "cache=none",
        "xattr",
    ]
    assert split_items("") == []


@pytest.mark.parametrize(
    ("argv", "field", "value"),
    [
        (["-o", "source=/s"], "shared_dir", "/s"),
        (["-o", "source=/s,cache=none"], "cache", "never"),
        (["-o", "source=/s,cache=metadata"], "cache", "metadata"),
        (["-o", "source=/s,log_level=err"], "log_level", "error"),
        (["-o", "source=/s,loglevel=warn"], "log_level", "warn"),
        (["-o", "source=/s,debug"], "log_level", "debug"),
        (["-o", "source=/s,no_readdirplus"], "readdirplus", False),
        (["-o", "source=/s,writeback,killpriv_v2"], "killpriv_v2", True),
        (["-o", "source=/s,posix_acl"], "xattr", True),  # implied, as with --posix-acl
        (["-o", "source=/s", "-o", "xattr"], "xattr", True),
        (["--xattr", "-o", "source=/s,no_xattr"], "xattr", False),  # -o wins, as in Rust
        (["-o", "source=/s", "--inode-file-handles=fallback"], "inode_file_handles", "prefer"),
    ],
)
def test_legacy_items_map_to_options(argv: list[str], field: str, value: object) -> None:
    from virtiofsd_py.app.options import parse_args

    opts = parse_args([*argv, "--socket-path", "/tmp/x.sock", "--sandbox", "none"])
    assert getattr(opts, field) == value
    assert opts.deprecations


@pytest.mark.parametrize("item", ["timeout=1", "norace", "cache=sometimes", "allow_root"])
def test_legacy_items_we_cannot_honour_are_refused(item: str) -> None:
    from virtiofsd_py.app.options import OptionError, parse_args

    with pytest.raises(OptionError, match="-o"):
        parse_args(["-o", f"source=/s,{item}", "--socket-path", "/tmp/x.sock"])
