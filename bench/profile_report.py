"""Summaries of a daemon profile: hottest functions and the split by layer.

Input is py-spy's raw format (``record --format raw``: one collapsed stack
per line, root first, ``frame;frame;... COUNT``, each frame
``function (path:line)``) or a cProfile stats file. Layers are named after
the package directories (vhost, virtio, fuse, fs, ...), plus ``asyncio``
for the event loop and ``other``. A sample's *self* layer is the layer of
its innermost frame: time in a C call (os.preadv, eventfd writes) is
charged to the Python line that made it, so "fs" self time is mostly the
backend's syscalls.
"""

from __future__ import annotations

import pstats
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

_FRAME = re.compile(r"^(?P<func>.*) \((?P<path>[^()]*?)(?::(?P<line>\d+))?\)$")

LAYERS = (
    ("virtiofsd_py/vhost/", "vhost"),
    ("virtiofsd_py/virtio/", "virtio"),
    ("virtiofsd_py/fuse/", "fuse"),
    ("virtiofsd_py/fs/", "fs"),
    ("virtiofsd_py/migration/", "migration"),
    ("virtiofsd_py/", "daemon"),
    ("asyncio/", "asyncio"),
    ("uvloop", "asyncio"),
    ("selectors.py", "asyncio"),
    ("threading.py", "threads"),
    ("concurrent/", "threads"),
)


def layer_of(path: str) -> str:
    for marker, name in LAYERS:
        if marker in path:
            return name
    return "other"


#: Stages of a request, for the cost breakdown. A sample belongs to the first
#: rule that matches: ``any`` rules look at every frame of the stack, ``inner``
#: rules only at the innermost Python frame (the metrics wrapper and the kick
#: handler enclose everything else, so only their own time counts).
STAGES = (
    ("any", "func", "Vring.notify", "notify: call eventfd write"),
    ("any", "func", "SplitQueue.pop", "vring pop: avail + chain walk"),
    ("any", "func", "SplitQueue.add_used", "vring push: used elem + publish"),
    ("any", "func", "SplitQueue.publish", "vring push: used elem + publish"),
    ("any", "func", "SplitQueue.enable_notification", "vring push: used elem + publish"),
    ("any", "path", "virtiofsd_py/fs/", "backend: fs/ incl. syscalls"),
    ("inner", "path", "virtiofsd_py/app/metrics.py", "metrics counters"),
    ("any", "path", "virtiofsd_py/fuse/", "fuse: parse, dispatch, encode"),
    ("inner", "func", "QueueRunner._on_kick", "kick: eventfd read"),
    ("inner", "path", "virtiofsd_py/", "queue runner, other daemon code"),
)
LOOP_STAGE = "event loop (uvloop/asyncio)"


def stage_of(frames: list[tuple[str, str, str]]) -> str:
    """The stage of one sample, from its frames (root first)."""
    py = [f for f in frames if f[1].endswith(".py")]
    inner = py[-1:] if py else []
    for scope, kind, key, name in STAGES:
        for func, path, _line in frames if scope == "any" else inner:
            if (kind == "func" and func == key) or (kind == "path" and key in path):
                return name
    return LOOP_STAGE


@dataclass
class Profile:
    """Sample counts: by function (self and inclusive), by leaf line, by layer, by stage."""

    total: int
    self_by_func: Counter[str]
    incl_by_func: Counter[str]
    self_by_line: Counter[str]
    self_by_layer: Counter[str]
    by_stage: Counter[str] = field(default_factory=Counter)
    syscalls: Counter[str] = field(default_factory=Counter)
    #: What the counts are: py-spy samples, or µs of cProfile tottime.
    unit: str = "busy samples"

    def stages(self, cpu: tuple[float, float] | None = None) -> str:
        """User-space cost by stage; with ``cpu`` = (total, user) µs per request, in µs.

        Samples whose leaf is a libc function (a syscall: eventfd write,
        preadv, fstatat, ...) are left out of the stages: py-spy misses much of
        the time spent inside the kernel, so kernel time is reported from
        /proc instead (total - user), with the syscalls py-spy saw.
        """
        n = sum(self.by_stage.values())
        if not n:
            return ""
        total_us, user_us = cpu if cpu else (None, None)
        head = "user-space cost by stage"
        if user_us is not None:
            head += f" (of {user_us:.1f} us user CPU/req, /proc)"
        lines = [head + ":"]
        for name, c in self.by_stage.most_common():
            share = c / n
            us = f"  {share * user_us:6.1f} us" if user_us is not None else ""
            lines.append(f"  {100 * share:5.1f} %{us}  {name}")
        seen = ", ".join(
            f"{k} {100 * v / self.total:.0f}%" for k, v in self.syscalls.most_common(6)
        )
        if total_us is not None and user_us is not None:
            lines.append(f"  kernel time: {total_us - user_us:.1f} us/req (/proc)")
        lines.append(f"  libc leaves (mostly syscalls) in samples: {seen or 'none'}")
        return "\n".join(lines) + "\n"

    def top(self, n: int = 15) -> str:
        """A text report: layers, then the top functions by self time."""
        if not self.total:
            return "(no samples)\n"
        idle = self.self_by_layer.get("(idle)", 0)
        lines = [f"{self.unit}: {self.total} (idle, left out: {idle})", "self time by layer:"]
        for name, c in self.self_by_layer.most_common():
            if name != "(idle)":
                lines.append(f"  {name:12s} {100 * c / self.total:5.1f} %")
        lines.append(f"top {n} functions by self time (self %, inclusive %):")
        for func, c in self.self_by_func.most_common(n):
            incl = self.incl_by_func[func]
            lines.append(f"  {100 * c / self.total:5.1f} {100 * incl / self.total:5.1f}  {func}")
        lines.append(f"top {n} lines by self time:")
        for where, c in self.self_by_line.most_common(n):
            lines.append(f"  {100 * c / self.total:5.1f}  {where}")
        return "\n".join(lines) + "\n"


def _short(path: str) -> str:
    i = path.find("virtiofsd_py/")
    if i >= 0:
        return path[i:]
    return path.rsplit("/", 2)[-1] if "/" in path else path


#: Native leaf frames that mean "waiting for work", not CPU.
IDLE = ("epoll_wait", "epoll_pwait", "epoll_pwait2", "poll", "select", "pthread_cond_wait")


def _is_native(path: str) -> bool:
    """A C frame (py-spy --native): anything not from a .py file or generated code."""
    return not path.endswith(".py") and path != "<string>"


def parse_pyspy_raw(text: str) -> Profile:
    """Summarise ``py-spy record --format raw [--native]`` output.

    With ``--native`` a sample whose leaf is a native frame is charged to
    the layer of its innermost Python frame, marked ``(C)``: for ``fs`` that
    is the backend's syscalls, for ``virtio`` the eventfd reads and writes.
    Samples waiting in epoll are idle and left out of the total.
    """
    self_func: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    self_line: Counter[str] = Counter()
    self_layer: Counter[str] = Counter()
    stage: Counter[str] = Counter()
    syscalls: Counter[str] = Counter()
    total = 0
    for raw in text.splitlines():
        stack, _, count = raw.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        parsed = []
        for frame in (f for f in stack.split(";") if f):
            m = _FRAME.match(frame.strip())
            parsed.append((m["func"], m["path"], m["line"] or "") if m else (frame, "?", ""))
        if not parsed or parsed[-1][0] in IDLE:
            self_layer["(idle)"] += n
            continue
        total += n
        seen: set[str] = set()
        for func, path, _line in parsed:
            name = f"{func} ({_short(path)})"
            if name not in seen:
                incl[name] += n
                seen.add(name)
        func, path, line = parsed[-1]
        leaf = f"{func} ({_short(path)})"
        self_func[leaf] += n
        self_line[f"{_short(path)}:{line} {func}"] += n
        # Generated code (dataclass __init__, "<string>") counts for its caller.
        py = [p for _f, p, _ln in parsed if p.endswith(".py")]
        layer = layer_of(py[-1]) if py else "other"
        if _is_native(path) and layer != "asyncio":
            layer += " (C)"
        self_layer[layer] += n
        if path.startswith("libc.so"):
            syscalls[func] += n
        else:
            stage[stage_of(parsed)] += n
    return Profile(total, self_func, incl, self_line, self_layer, stage, syscalls)


def parse_cprofile(path: Path) -> Profile:
    """The same summary from cProfile stats (tottime in µs as the 'samples')."""
    stats = pstats.Stats(str(path))
    self_func: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    self_layer: Counter[str] = Counter()
    raw: dict[tuple[str, int, str], tuple[int, int, float, float, object]]
    raw = stats.stats  # type: ignore[attr-defined]
    for (file, line, func), (_cc, _nc, tt, ct, _callers) in raw.items():
        name = f"{func} ({_short(file)}:{line})"
        self_func[name] += int(tt * 1e6)
        incl[name] += int(ct * 1e6)
        self_layer[layer_of(file)] += int(tt * 1e6)
    total = sum(self_func.values())
    # cProfile cannot tell waiting in epoll from work: it is in the loop's share.
    unit = "cProfile us (loop idle time included)"
    return Profile(total, self_func, incl, Counter(), self_layer, unit=unit)
