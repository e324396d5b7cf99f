"""docs/filesystem-api.md's "Async backends" example runs as written.

The first Python block of that section is written to a file and served
with the command line the section gives (its files answer after ``delay``
seconds each; that requests overlap is test_async_backends.py's to show).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from daemon_support import finish_daemon, session

from virtiofsd_py.fuse import abi
from virtiofsd_py.testing.daemon_proc import DaemonProcess

DOC = Path(__file__).resolve().parents[2] / "docs" / "filesystem-api.md"


def example_code() -> str:
    text = DOC.read_text()
    section = text[text.index("## Async backends") :]
    m = re.search(r"```python\n(.*?)```", section, re.S)
    assert m is not None
    return m.group(1)


def test_slowfs_example_serves(tmp_path: Path) -> None:
    (tmp_path / "slowfs.py").write_text(example_code())
    template = (
        f"{sys.executable} -m virtiofsd_py --socket-path {{socket}} --log-level info"
        f" --backend {tmp_path / 'slowfs.py'}:SlowFS"
        " --backend-option count=100 --backend-option delay=0.05"
    )
    d = DaemonProcess(tmp_path, tmp_path, template=template).start()
    fe, c = session(d)
    try:
        nodes = [c.lookup(abi.FUSE_ROOT_ID, f"f{i}").nodeid for i in range(8)]
        pend = [
            c.submit(abi.FUSE_GETATTR, n, abi.GETATTR_IN.pack(0, 0, 0), abi.ATTR_OUT.size)
            for n in nodes
        ]
        c.wait(pend, timeout=30)
        assert all(c.reply(p).error == 0 for p in pend)
        fh = c.open(nodes[3]).fh
        assert c.read(nodes[3], fh, 0, 100) == b"file3\n"
    finally:
        fe.close()
    finish_daemon(d)
