"""The guest's fd budget: refusal past the limit, no leak, and the daemon's own fds."""

from __future__ import annotations

import errno
import os
import resource
import threading
from pathlib import Path

import pytest

from virtiofsd_py.fdbudget import DEFAULT_RESERVE, FdBudget


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
