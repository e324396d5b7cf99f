"""The in-memory backend (``--backend memory``) mounted by a real guest.

One daemon serving fs/memory.py and one guest for the module.  The guest
conformance scenarios (read from test_conformance.py, as the host-mount
tests do) run twice inside the guest: on the virtio-fs mount and on the
guest's own RAM file system.  Outputs, what ``stat`` shows of the resulting
trees and the files' contents must agree: the memory backend behaves like a
local file system, seen from a real kernel.
"""

from __future__ import annotations

import shlex
import sys
from collections.abc import Iterator

import pytest
from mount_rig import MEMORY_DIFFERS, SCENARIOS, Scenario
from rw_support import GUEST_STAT_FMT, boot_programs_guest, guest_view, stop_daemon

from virtiofsd_py.testing.daemon_proc import DaemonProcess, is_own_daemon
from virtiofsd_py.testing.qemu.guest import Guest

pytestmark = [
    pytest.mark.guest,
    pytest.mark.skipif(not is_own_daemon(), reason="--backend memory is virtiofsd-py's own"),
]

MEMORY_DAEMON = (
    f"{shlex.quote(sys.executable)} -m virtiofsd_py --socket-path {{socket}}"
    " --backend memory --sandbox none --log-level debug --xattr --cache auto --tag testfs"
)
LOCAL = "/tmp/local"


@pytest.fixture(scope="module")
def mem_guest(guest_support: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Guest]:
    work = tmp_path_factory.mktemp("memdaemon")
    daemon = DaemonProcess(work / "unused", work, template=MEMORY_DAEMON).start(timeout=30)
    try:
        g = boot_programs_guest(daemon)
    except BaseException:
        daemon.kill()
        raise
    try:
        yield g
    finally:
        g.shutdown()
        stop_daemon(daemon)


def test_mount_is_the_memory_backend(mem_guest: Guest) -> None:
    out = mem_guest.run(
        "stat -f -c '%b %S' /mnt; ls -a /mnt; echo hi > /mnt/x; cat /mnt/x; rm /mnt/x; "
        f"mkdir -p {LOCAL}"
    ).check()
    blocks, bsize, *rest = out.out.split()
    assert int(blocks) * int(bsize) == 1 << 30  # MemoryConfig's default capacity
    assert rest == [".", "..", "hi"]


def _listing(g: Guest, d: str) -> tuple[dict[bytes, tuple[int, ...]], str]:
    res = g.run(
        f"cd {d} && find . -mindepth 1 -exec stat -c '{GUEST_STAT_FMT}' {{}} + && echo '#SUMS' && "
        "find . -type f -exec sha256sum {} + | sort"
    ).check()
    listing, _, sums = res.out.partition("#SUMS\n")
    return guest_view(listing), sums


@pytest.mark.parametrize("sc", SCENARIOS, ids=[s.name for s in SCENARIOS])
def test_scenario_matches_a_local_fs(mem_guest: Guest, sc: Scenario) -> None:
    if sc.name in MEMORY_DIFFERS:
        pytest.skip(MEMORY_DIFFERS[sc.name])
    wrapped = f"umask 022; {{\n{sc.script}\n}} 2>&1"
    outs = {}
    for side in ("/mnt", LOCAL):
        d = f"{side}/{sc.name}"
        res = mem_guest.run(f"mkdir -p {d} && cd {d} && ( {wrapped} )", timeout=120)
        outs[side] = (res.out, *_listing(mem_guest, d))
    mem, local = outs["/mnt"], outs[LOCAL]
    assert mem[0] == local[0], f"output differs\n--- memory\n{mem[0]}\n--- local\n{local[0]}"
    assert mem[1] == local[1]
    assert mem[2] == local[2]
