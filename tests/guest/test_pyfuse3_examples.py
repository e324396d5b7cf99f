"""pyfuse3's own example file systems, unmodified, served to a real guest.

hello.py, hello_asyncio.py, tmpfs.py and passthroughfs.py from pyfuse3's
sdist (tests/support/pyfuse3_examples.py) are each served by a daemon with
``--backend FILE:FACTORY`` (passthroughfs with ``--backend-option
source=DIR``); one guest mounts all four.  The same scripted operations
(pyfuse3_ops.py: read, write, create, mkdir, rename, unlink, readdir of
2,000 entries, xattrs, statfs...) run in the guest on each mount and on the
host on the same example mounted by pyfuse3 itself through libfuse; the
outputs must agree line by line.
"""

from __future__ import annotations

import difflib
import shlex
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from pyfuse3_examples import EXAMPLES, HostMount, examples_dir
from rw_support import stop_daemon

from virtiofsd_py.testing.daemon_proc import DaemonProcess, is_own_daemon
from virtiofsd_py.testing.qemu.guest import Guest
from virtiofsd_py.testing.qemu.progimage import ProgramsUnavailable, load_programs_initramfs

pytestmark = [
    pytest.mark.guest,
    pytest.mark.skipif(not is_own_daemon(), reason="--backend MODULE:FACTORY is virtiofsd-py's"),
]

OPS = Path(__file__).with_name("pyfuse3_ops.py")
#: example -> (guest tag, mode for pyfuse3_ops.py)
SERVED = {
    "hello.py": ("hello", "ro"),
    "hello_asyncio.py": ("helloa", "ro"),
    "tmpfs.py": ("tmpfs", "rw"),
    "passthroughfs.py": ("pass", "rw"),
}


@dataclass
class Served:
    guest: Guest
    examples: Path
    work: Path
    #: passthroughfs sources: src-g (served to the guest) and src-h (host mount),
    #: paths of one length (its statfs f_namemax depends on it).
    sources: Path


def daemon_for(example: Path, work: Path, sources: Path) -> DaemonProcess:
    factory = EXAMPLES[example.name]
    opts = ""
    if example.name == "passthroughfs.py":
        src = sources / "src-g"
        src.mkdir()
        opts = f" --backend-option source={shlex.quote(str(src))}"
    template = (
        f"{shlex.quote(sys.executable)} -m virtiofsd_py --socket-path {{socket}} --log-level info"
        f" --backend {shlex.quote(str(example))}:{factory}{opts}"
    )
    return DaemonProcess(work, work, template=template).start(timeout=30)


@pytest.fixture(scope="module")
def served(guest_support: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    examples = examples_dir()
    sources = tmp_path_factory.mktemp("ptsrc")
    daemons: dict[str, DaemonProcess] = {}
    try:
        for name, (tag, _) in SERVED.items():
            daemons[tag] = daemon_for(examples / name, tmp_path_factory.mktemp(tag), sources)
        try:
            initrd = load_programs_initramfs()  # the programs image has python3
        except ProgramsUnavailable as e:
            pytest.skip(f"guest programs image unavailable: {e}")
        g = Guest.boot(
            vhost_sockets={tag: str(d.socket_path) for tag, d in daemons.items()},
            extra_args=["-initrd", str(initrd)],
        )
    except BaseException:
        for d in daemons.values():
            d.kill()
        raise
    try:
        if g.run("command -v python3").rc != 0:
            pytest.skip("python3 is not in the guest image")
        for tag in daemons:
            g.run(f"mkdir -p /mnt/{tag} && mount -t virtiofs {tag} /mnt/{tag}").check()
        g.run(f"cat > /tmp/ops.py <<'EOF'\n{OPS.read_text()}\nEOF").check()
        yield Served(g, examples, tmp_path_factory.mktemp("host"), sources)
    finally:
        g.shutdown()
        for d in daemons.values():
            stop_daemon(d)


def host_output(served: Served, example: str, mode: str) -> str:
    work = served.work / example
    work.mkdir()
    args: list[str] = []
    if example == "passthroughfs.py":
        src = served.sources / "src-h"
        src.mkdir()
        args = [str(src)]
    m = HostMount(served.examples / example, work / "mnt", args, work / "pyfuse3.log")
    try:
        res = subprocess.run(
            [sys.executable, str(OPS), str(m.mountpoint), mode],
            capture_output=True, text=True, timeout=600, check=False,
        )  # fmt: skip
    finally:
        m.close()
    assert res.returncode == 0, res.stderr
    return res.stdout


@pytest.mark.parametrize("example", list(SERVED))
def test_example_behaves_as_on_a_libfuse_mount(served: Served, example: str) -> None:
    tag, mode = SERVED[example]
    guest = served.guest.run(f"python3 /tmp/ops.py /mnt/{tag} {mode} 2>&1", timeout=600)
    assert guest.rc == 0, guest.out
    host = host_output(served, example, mode)
    g_lines, h_lines = guest.out.splitlines(), host.splitlines()
    diff = "\n".join(
        difflib.unified_diff(h_lines, g_lines, "libfuse host mount", "guest", lineterm="")
    )
    assert g_lines == h_lines, f"{example}: guest and libfuse mount differ\n{diff[:6000]}"
    assert len(g_lines) > (40 if mode == "rw" else 8)
