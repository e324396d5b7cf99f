"""pyfuse3's example file systems through ``virtiofsd-py mount --backend FILE:FACTORY``.

The host mount mode serves the unmodified examples (hello_asyncio.py,
tmpfs.py, passthroughfs.py from pyfuse3's sdist) through the async bridge;
the scripted operations of the guest differential test
(tests/guest/pyfuse3_ops.py) give the same output on that mount as on the
example mounted by pyfuse3 itself through libfuse.
"""

from __future__ import annotations

import difflib
import subprocess
import sys
from pathlib import Path

import pytest
from mount_rig import TRACEBACK, MountProcess, needs_mount
from pyfuse3_examples import EXAMPLES, HostMount, examples_dir

pytestmark = needs_mount

OPS = Path(__file__).resolve().parents[1] / "guest" / "pyfuse3_ops.py"
CASES = {"hello_asyncio.py": "ro", "tmpfs.py": "rw", "passthroughfs.py": "rw"}


def ops_output(root: Path, mode: str) -> list[str]:
    res = subprocess.run(
        [sys.executable, str(OPS), str(root), mode],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    return res.stdout.splitlines()


@pytest.mark.parametrize("example", list(CASES))
def test_mount_mode_matches_pyfuse3s_own_mount(example: str, tmp_path: Path) -> None:
    examples = examples_dir()
    mode = CASES[example]
    src_ours, src_theirs = tmp_path / "src-o", tmp_path / "src-t"  # paths of one length
    src_ours.mkdir()
    src_theirs.mkdir()
    spec = f"{examples / example}:{EXAMPLES[example]}"
    args = ["--backend", spec, "--log-level", "info"]
    if example == "passthroughfs.py":
        args += ["--backend-option", f"source={src_ours}"]
    ours_mnt = tmp_path / "ours"
    ours_mnt.mkdir()
    m = MountProcess([*args, str(ours_mnt)], ours_mnt)
    m.wait_serving()
    try:
        ours = ops_output(ours_mnt, mode)
    finally:
        status, err = m.stop()
    assert status == 0, err
    assert TRACEBACK not in err, err
    host_args = [str(src_theirs)] if example == "passthroughfs.py" else []
    theirs_mount = HostMount(examples / example, tmp_path / "theirs", host_args, tmp_path / "log")
    try:
        theirs = ops_output(theirs_mount.mountpoint, mode)
    finally:
        theirs_mount.close()
    diff = "\n".join(difflib.unified_diff(theirs, ours, "pyfuse3 mount", "ours", lineterm=""))
    assert ours == theirs, f"{example}: differs\n{diff[:6000]}"
