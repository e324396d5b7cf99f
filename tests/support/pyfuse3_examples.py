"""pyfuse3's own example file systems, from its sdist, and host mounts of them.

The examples are never copied into this repository: scripts/setup-test-env.sh
downloads the sdist of the installed pyfuse3 into a cache directory and
unpacks it (``examples_dir`` does the same when it is missing, if pip can);
tests serve them unmodified with ``--backend FILE:FACTORY`` and mount them
on the host with their own ``main()`` (pyfuse3 through libfuse) to compare.
"""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

#: example file -> (factory, options for --backend-option / host argv before the mountpoint)
EXAMPLES = {
    "hello.py": "TestFs",
    "hello_asyncio.py": "TestFs",
    "tmpfs.py": "Operations",
    "passthroughfs.py": "Operations",
}


def cache_dir() -> Path:
    guest = Path(os.environ.get("VIRTIOFSD_PY_GUEST_DIR", "/var/tmp/virtiofsd-py-guest"))
    return Path(os.environ.get("VIRTIOFSD_PY_PYFUSE3_CACHE", guest / "pyfuse3-sdist"))


def examples_dir() -> Path:
    """The ``examples`` directory of the installed pyfuse3's sdist (or skip)."""
    try:
        version = importlib.metadata.version("pyfuse3")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("pyfuse3 is not installed")
    root = cache_dir()
    examples = root / f"pyfuse3-{version}" / "examples"
    if not examples.is_dir():
        root.mkdir(parents=True, exist_ok=True)
        sdist = root / f"pyfuse3-{version}.tar.gz"
        if not sdist.exists():
            got = subprocess.run(
                [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary",
                 ":all:", "-d", str(root), f"pyfuse3=={version}"],
                capture_output=True, timeout=300, check=False,
            )  # fmt: skip
            if got.returncode != 0 or not sdist.exists():
                pytest.skip(f"pyfuse3 {version} sdist not available: {got.stderr[-300:]!r}")
        with tarfile.open(sdist) as tar:
            members = [m for m in tar.getmembers() if "/examples/" in m.name and m.isfile()]
            tar.extractall(root, members=members, filter="data")
    missing = [name for name in EXAMPLES if not (examples / name).is_file()]
    if missing:
        pytest.skip(f"pyfuse3 sdist has no {missing}")
    return examples


def mounted(path: Path) -> bool:
    target = os.fsencode(path)
    with open("/proc/self/mountinfo", "rb") as f:
        return any(line.split()[4] == target for line in f)


class HostMount:
    """An example mounted on the host by pyfuse3 itself (its own ``main()``)."""

    def __init__(self, example: Path, mountpoint: Path, args: list[str], log: Path) -> None:
        mountpoint.mkdir(parents=True, exist_ok=True)
        self.mountpoint = mountpoint
        self.log = log
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, str(example), *args, str(mountpoint)],
                stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip
        deadline = time.monotonic() + 30
        while not mounted(mountpoint):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                pytest.fail(f"{example.name} did not mount: {log.read_text()[-2000:]}")
            time.sleep(0.05)

    def close(self) -> None:
        if mounted(self.mountpoint):
            subprocess.run(["fusermount3", "-u", "-z", str(self.mountpoint)], check=False)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
