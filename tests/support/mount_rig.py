"""The host mount under test (``virtiofsd-py mount``) and the guest conformance
scenarios read out of tests/guest/test_conformance.py, for the host-mount suites
(tests/daemon/test_mount.py, tests/confine/test_sandbox_mount.py) and the
memory-backend guest suite.
"""

from __future__ import annotations

import ast
import contextlib
import os
import select
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

GUEST_TESTS = Path(__file__).resolve().parents[1] / "guest"

TRACEBACK = "Traceback (most recent call last)"


def mount_unavailable() -> str | None:
    """Why host mounts cannot be tested here, or None."""
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse on this machine"
    if os.geteuid() != 0:
        return "mounting with mount(2) needs root"
    if "fuse" not in Path("/proc/filesystems").read_text():
        return "the kernel has no fuse file system"
    return None


needs_mount = pytest.mark.skipif(
    mount_unavailable() is not None, reason=f"host FUSE mounts: {mount_unavailable()}"
)


def is_mounted(path: Path) -> bool:
    target = os.fsencode(path.resolve())
    with open("/proc/self/mountinfo", "rb") as f:
        return any(line.split()[4] == target for line in f)


class MountProcess:
    """``python3 -m virtiofsd_py mount ARGS...`` until stopped; checks a clean exit."""

    def __init__(self, args: list[str], mountpoint: Path) -> None:
        self.mountpoint = mountpoint
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "virtiofsd_py", "mount", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )

    def wait_serving(self, timeout: float = 30.0) -> None:
        """Wait for the "serving" line the daemon prints once the kernel's INIT is answered."""
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else b""
        if b"serving" not in line:
            self.proc.kill()
            _, err = self.proc.communicate(timeout=10)
            pytest.fail(f"mount did not come up: {line!r}\n{err.decode(errors='replace')}")

    def stop(self, timeout: float = 15.0) -> tuple[int, str]:
        """SIGTERM, then its exit status and stderr."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            _, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate(timeout=10)
        return self.proc.returncode, err.decode(errors="replace")


@contextlib.contextmanager
def mounted(args: list[str], mountpoint: Path) -> Iterator[MountProcess]:
    mountpoint.mkdir(exist_ok=True)
    mp = MountProcess(args, mountpoint)
    try:
        mp.wait_serving()
        assert is_mounted(mountpoint)
        yield mp
    finally:
        status, err = mp.stop()
        if is_mounted(mountpoint):
            subprocess.run(["umount", "-l", str(mountpoint)], check=False)
        print(f"--- mount daemon log (exit {status}) ---\n{err[-20000:]}")
    assert status == 0, f"exit status {status}\n{err[-5000:]}"
    assert TRACEBACK not in err
    assert not is_mounted(mountpoint)


@dataclass(frozen=True)
class Scenario:
    test: str
    name: str
    script: str


def conformance_scenarios() -> list[Scenario]:
    """Every ``sc.run(NAME, SCRIPT)`` of the guest conformance suite, read from its source."""
    source = (GUEST_TESTS / "test_conformance.py").read_text()
    found = []
    for fn in ast.parse(source).body:
        if not isinstance(fn, ast.FunctionDef):
            continue
        for node in ast.walk(fn):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "run"
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "sc"
                and len(node.args) == 2
                and all(isinstance(a, ast.Constant) and isinstance(a.value, str) for a in node.args)
            ):
                name, script = (a.value for a in node.args if isinstance(a, ast.Constant))
                found.append(Scenario(fn.name, name, script))
    return found


SCENARIOS = conformance_scenarios()


#: Scenarios whose results legitimately differ between a memory backend and a disk.
MEMORY_DIFFERS = {
    "fallocate": "st_blocks and SEEK_HOLE: the in-memory backend stores no holes",
}
