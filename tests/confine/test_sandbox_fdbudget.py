"""The guest's fd budget: refusal past the limit, no leak, and the daemon's own fds."""

from __future__ import annotations

import errno
import os
import resource
import threading
from pathlib import Path

import pytest

from virtiofsd_py.host.fdbudget import DEFAULT_RESERVE, FdBudget


def test_refuses_past_the_limit_with_enfile(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"x")
    budget = FdBudget(3)
    fds = [budget.open(str(tmp_path / "f"), os.O_RDONLY) for _ in range(3)]
    with pytest.raises(OSError) as e:
        budget.open(str(tmp_path / "f"), os.O_RDONLY)
    assert e.value.errno == errno.ENFILE
    # The daemon itself can still open files: only the guest's share is capped.
    own = os.open(str(tmp_path / "f"), os.O_RDONLY)
    os.close(own)
    budget.close(fds.pop())
    fds.append(budget.open(str(tmp_path / "f"), os.O_RDONLY))
    for fd in fds:
        budget.close(fd)
    assert budget.used == 0


def test_failed_open_gives_the_slot_back(tmp_path: Path) -> None:
    budget = FdBudget(1)
    with pytest.raises(FileNotFoundError):
        budget.open(str(tmp_path / "missing"), os.O_RDONLY)
    assert budget.used == 0


def test_give_back_more_than_taken_is_a_bug() -> None:
    budget = FdBudget(2)
    budget.take()
    with pytest.raises(ValueError):
        budget.give_back(2)


def test_threads_never_exceed_the_limit() -> None:
    budget = FdBudget(50)
    refused = 0
    lock = threading.Lock()

    def worker() -> None:
        nonlocal refused
        for _ in range(100):
            try:
                budget.take()
            except OSError:
                with lock:
                    refused += 1

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert budget.used == 50
    assert refused == 400 - 50


def test_from_rlimit_keeps_a_reserve() -> None:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    budget = FdBudget.from_rlimit()
    assert budget.limit == max(soft - DEFAULT_RESERVE, soft // 4, 1)
    assert budget.limit < soft


# -- the fd table grown at once (reserve_fd_table) --------------------------------------
def _run_child(code: str) -> list[str]:
    """Run ``code`` in a fresh interpreter (its own fd table); its stdout lines."""
    import subprocess
    import sys

    prelude = (
        "import os, resource\n"
        "hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]\n"
        "from virtiofsd_py.host.fdbudget import reserve_fd_table\n"
        "def fdsize():\n"
        "    for line in open('/proc/self/status'):\n"
        "        if line.startswith('FDSize:'):\n"
        "            return int(line.split()[1])\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", prelude + code], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


def test_reserve_grows_the_table_once_to_the_size_asked() -> None:
    n = min(10000, resource.getrlimit(resource.RLIMIT_NOFILE)[1] // 2)
    before, after, opened = _run_child(
        "resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))\n"
        "before = fdsize()\n"
        f"reserve_fd_table({n})\n"
        "after = fdsize()\n"
        f"fds = [os.open('/', os.O_PATH) for _ in range({n // 2})]\n"
        "print(before, after, fdsize() == after)\n"
    )
    assert int(before) < n <= int(after)
    assert opened == "True"  # no further grow while the fds fit


def test_reserve_keeps_open_fds_and_the_rlimit() -> None:
    if resource.getrlimit(resource.RLIMIT_NOFILE)[1] < 512:
        pytest.skip("RLIMIT_NOFILE hard limit below 512")
    (same,) = _run_child(
        "resource.setrlimit(resource.RLIMIT_NOFILE, (512, hard))\n"
        "fd = os.open('/', os.O_PATH)\n"
        "high = os.dup2(fd, 299)\n"
        "st = os.fstat(high)\n"
        "reserve_fd_table(300)\n"  # slot 299 is in use: it must stay that file
        "reserve_fd_table(100000)\n"  # past the limit: up to the limit, no error
        "print(os.fstat(299).st_ino == st.st_ino and fdsize() == 512)\n"
    )
    assert same == "True"
