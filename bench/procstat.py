"""CPU time and peak memory of a daemon process and its descendants, from /proc.

CPU is utime + stime of every thread (``/proc/PID/stat`` fields 14-15, in
clock ticks) plus what already-reaped children left in cutime/cstime (fields
16-17); peak memory is ``VmHWM`` from ``/proc/PID/status`` (proc(5)). A
descendant that exits between two samples takes its CPU with it unless its
parent waited for it, so the sums are lower bounds for short-lived children.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

_TICK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Usage:
    """CPU seconds (user, system) and the largest VmHWM (KiB) over a process tree."""

    user: float
    system: float
    peak_rss_kib: int

    @property
    def cpu(self) -> float:
        return self.user + self.system

    def __sub__(self, other: Usage) -> Usage:
        """CPU used between two samples; the later sample's peak."""
        return Usage(self.user - other.user, self.system - other.system, self.peak_rss_kib)


def _stat_fields(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat") as f:
        text = f.read()
    # comm (field 2) may hold spaces and parentheses: split after the last ')'.
    return text[text.rindex(")") + 2 :].split()


def descendants(pid: int) -> list[int]:
    """``pid`` and all its live descendants (from /proc/PID/task/TID/children)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        with contextlib.suppress(OSError):
            for tid in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{tid}/children") as f:
                    todo += [int(c) for c in f.read().split()]
    return out


def peak_rss_kib(pid: int) -> int:
    """VmHWM of one process in KiB (0 if it is gone)."""
    with contextlib.suppress(OSError), open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def sample(pid: int) -> Usage:
    """The tree's CPU so far and its largest peak RSS (the root's, or a child's if larger)."""
    user = system = 0
    peak = 0
    for p in descendants(pid):
        with contextlib.suppress(OSError):
            # Fields after comm start at field 3: utime is field 14 -> index 11.
            f = _stat_fields(p)
            user += int(f[11]) + int(f[13])
            system += int(f[12]) + int(f[14])
            peak = max(peak, peak_rss_kib(p))
    return Usage(user / _TICK, system / _TICK, peak)
