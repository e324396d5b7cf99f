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
from dataclasses import dataclass
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


@dataclass
class Profile:
    """Sample counts: by function (self and inclusive), by leaf line, by layer."""

    total: int
    self_by_func: Counter[str]
    incl_by_func: Counter[str]
    self_by_line: Counter[str]
    self_by_layer: Counter[str]

    def top(self, n: int = 15) -> str:
        """A text report: layers, then the top functions by self time."""
        if not self.total:
            return "(no samples)\n"
        lines = [f"samples: {self.total}", "self time by layer:"]
        for name, c in self.self_by_layer.most_common():
            lines.append(f"  {name:10s} {100 * c / self.total:5.1f} %")
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


def parse_pyspy_raw(text: str) -> Profile:
    self_func: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    self_line: Counter[str] = Counter()
    self_layer: Counter[str] = Counter()
    total = 0
    for raw in text.splitlines():
        stack, _, count = raw.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [f for f in stack.split(";") if f]
        seen: set[str] = set()
        leaf_func, leaf_path, leaf_line = "?", "?", ""
        for frame in frames:
            m = _FRAME.match(frame.strip())
            func, path, line = (
                (m["func"], m["path"], m["line"] or "") if m else (frame, "?", "")
            )
            name = f"{func} ({_short(path)})"
            if name not in seen:
                incl[name] += n
                seen.add(name)
            leaf_func, leaf_path, leaf_line = name, path, line
        self_func[leaf_func] += n
        self_line[f"{_short(leaf_path)}:{leaf_line} {leaf_func.split(' (')[0]}"] += n
        self_layer[layer_of(leaf_path)] += n
    return Profile(total, self_func, incl, self_line, self_layer)


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
    return Profile(total, self_func, incl, Counter(), self_layer)
