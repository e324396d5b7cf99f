"""In-guest benchmarks: fio, metadata and a real workload on virtio-fs and on the upper bounds.

One QEMU guest (the test harness's, ``virtiofsd_py.testing.qemu.guest``, with
the benchmark image of ``guestimage.py``) carries every target at once, so
all of them see the same guest, the same moment and the same host:

- ``py``: virtio-fs served by virtiofsd-py (``--cache auto``), compiled core;
- ``pyp``: the same with the pure-Python core, when the compiled one is built;
- ``rs``: virtio-fs served by the Rust virtiofsd (same options), if installed;
- ``blk``: ext4 on a virtio-blk disk backed by a host file in the same host
  directory as the shares (QEMU ``cache=writeback``: the host page cache,
  like the daemons' ``--cache auto``);
- ``tmpfs``: a tmpfs in the guest, the ceiling of what a guest file system
  can do.

With ``queues`` > 1 every virtio-fs device gets that many request queues
(``num-request-queues``) and the Rust virtiofsd, which serves one, is left
out; the ``-2jobs`` rows then spread two fio jobs over them.

Each row runs on each target in turn. Around each row on a virtio-fs target
the serving daemon's CPU time (process tree) and peak RSS are sampled. The
guest's caches are dropped before every read-side measurement.
"""

from __future__ import annotations

import json
import os
import select
import shlex
import shutil
import signal
import subprocess
import tarfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench import procstat
from bench.daemons import OURS, OURS_PURE, REF, DaemonSpec
from bench.guestimage import load_bench_initramfs, load_modules_cmd
from virtiofsd_py.testing.daemon_proc import DaemonProcess
from virtiofsd_py.testing.qemu.guest import Guest

SCRIPTS = Path(__file__).resolve().parent / "guest_scripts"
MNT = "/mnt"
SRC_TAR = "/tmp/src.tar"
TARGETS = ("py", "pyp", "rs", "blk", "tmpfs")
TARGET_DAEMON = {"py": OURS, "pyp": OURS_PURE, "rs": REF}


@dataclass(frozen=True)
class Params:
    """Sizes and durations: ``quick()`` for a smoke run, ``full()`` by default."""

    fio_size_mib: int
    fio_seconds: int
    meta_files: int
    tree_files: int

    @classmethod
    def full(cls) -> Params:
        return cls(fio_size_mib=128, fio_seconds=5, meta_files=10_000, tree_files=1500)

    @classmethod
    def quick(cls) -> Params:
        return cls(fio_size_mib=16, fio_seconds=1, meta_files=500, tree_files=200)


@dataclass(frozen=True)
class FioJob:
    name: str
    rw: str
    bs: str
    engine: str
    iodepth: int
    direct: bool
    #: fio processes at once (``--numjobs``, reported as one group).
    numjobs: int = 1

    @property
    def metric(self) -> str:
        return "MB/s" if self.bs == "1M" else "IOPS"


FIO_JOBS = (
    FioJob("seqread-1m-buffered", "read", "1M", "psync", 1, False),
    FioJob("seqread-1m-direct", "read", "1M", "psync", 1, True),
    FioJob("seqwrite-1m-buffered", "write", "1M", "psync", 1, False),
    FioJob("seqwrite-1m-direct", "write", "1M", "psync", 1, True),
    FioJob("randread-4k-qd1", "randread", "4k", "psync", 1, True),
    FioJob("randread-4k-qd16", "randread", "4k", "libaio", 16, True),
    FioJob("randwrite-4k-qd1", "randwrite", "4k", "psync", 1, True),
    FioJob("randwrite-4k-qd16", "randwrite", "4k", "libaio", 16, True),
    FioJob("randread-4k-qd16-2jobs", "randread", "4k", "libaio", 16, True, numjobs=2),
    FioJob("randwrite-4k-qd16-2jobs", "randwrite", "4k", "libaio", 16, True, numjobs=2),
)
META_ROWS = ("meta-create", "meta-stat", "meta-readdir", "meta-unlink")
REAL_ROWS = ("real-untar", "real-git-status", "real-find-stat")
ROWS = tuple(j.name for j in FIO_JOBS) + META_ROWS + REAL_ROWS


@dataclass
class Cell:
    """One row on one target: the value and the serving daemon's CPU and peak RSS."""

    value: float
    unit: str
    higher_better: bool = True
    cpu_s: float | None = None
    peak_rss_kib: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _drop(guest: Guest) -> None:
    guest.run("sync; echo 3 > /proc/sys/vm/drop_caches").check()


def _timed(guest: Guest, cmd: str, timeout: float) -> float:
    """Seconds a guest shell command takes (timed in the guest)."""
    timer = (
        "import subprocess,sys,time; t=time.monotonic();"
        "r=subprocess.run(sys.argv[1],shell=True);"
        "print(time.monotonic()-t); sys.exit(r.returncode)"
    )
    res = guest.run(f"python3 -c {shlex.quote(timer)} {shlex.quote(cmd)}", timeout=timeout)
    res.check()
    return float(res.out.strip().splitlines()[-1])


def fio_cmd(job: FioJob, path: str, p: Params) -> str:
    args = [
        "fio", "--output-format=json", f"--name={job.name}", f"--filename={path}",
        f"--size={p.fio_size_mib}M", f"--rw={job.rw}", f"--bs={job.bs}",
        f"--ioengine={job.engine}", f"--iodepth={job.iodepth}", f"--direct={int(job.direct)}",
        f"--runtime={p.fio_seconds}", "--time_based", "--invalidate=1", "--randrepeat=1",
    ]  # fmt: skip
    if job.numjobs > 1:
        args += [f"--numjobs={job.numjobs}", "--group_reporting"]
    if "write" in job.rw:
        args.append("--end_fsync=1")
    return " ".join(args)


def parse_fio(text: str, job: FioJob) -> Cell:
    """Bandwidth (MB/s, 10^6) or IOPS of the job's direction, from fio's JSON."""
    data = json.loads(text[text.index("{") :])
    j = data["jobs"][0]
    if j.get("error"):
        raise RuntimeError(f"fio {job.name}: error {j['error']}")
    side = j["write" if "write" in job.rw else "read"]
    value = side["bw_bytes"] / 1e6 if job.metric == "MB/s" else side["iops"]
    lat = side.get("clat_ns", {}).get("mean")
    return Cell(value, job.metric, extra={"clat_mean_us": lat / 1000 if lat else None})


class Rig:
    """Daemons, the disk image, the guest with everything mounted."""

    def __init__(self, specs: list[DaemonSpec], workdir: Path, p: Params, queues: int = 1) -> None:
        self.p = p
        self.queues = queues
        self.workdir = workdir
        self.daemons: dict[str, DaemonProcess] = {}
        self.guest: Guest | None = None
        self.targets: list[str] = []
        by_name = {s.name: s for s in specs}
        for tgt, dname in TARGET_DAEMON.items():
            if dname == REF and queues > 1:
                continue  # the Rust virtiofsd serves one request queue
            if dname in by_name:
                share = workdir / f"share-{tgt}"
                share.mkdir()
                self.daemons[tgt] = DaemonProcess(
                    share, workdir / f"daemon-{tgt}", template=by_name[dname].template
                )
        self.disk = workdir / "disk.img"
        self._watcher: threading.Thread | None = None
        self._stop_r = self._stop_w = -1
        #: Targets whose daemon exited while the guest ran.
        self.dead: list[str] = []

    def start(self, log: Callable[[str], None]) -> None:
        for d in self.daemons.values():
            d.start(timeout=30)
        with open(self.disk, "wb") as f:
            f.truncate(4 << 30)
        subprocess.run(["mkfs.ext4", "-q", "-F", str(self.disk)], check=True)
        make_source_tar(self.workdir / "src.tar", self.p.tree_files)
        extra = [
            "-initrd", str(load_bench_initramfs()),
            "-drive", f"file={self.disk},if=virtio,format=raw,cache=writeback,aio=threads",
        ]  # fmt: skip
        sockets = {tgt: str(d.socket_path) for tgt, d in self.daemons.items()}
        log(f"  booting the guest (targets: {', '.join([*sockets, 'blk', 'tmpfs'])})")
        self.guest = g = Guest.boot(
            vhost_sockets=sockets, mem_mib=2048, extra_args=extra, num_request_queues=self.queues
        )
        self.watch()
        g.run(load_modules_cmd()).check()
        for tgt in sockets:
            g.run(f"mkdir -p {MNT}/{tgt} && mount -t virtiofs {tgt} {MNT}/{tgt}").check()
        # devtmpfs adds the node once the disk is probed, after insmod returns.
        g.run("for i in $(seq 200); do [ -b /dev/vda ] && break; sleep 0.05; done").check()
        g.run(f"mkdir -p {MNT}/blk && mount -t ext4 /dev/vda {MNT}/blk").check()
        g.run(f"mkdir -p {MNT}/tmpfs && mount -t tmpfs -o size=1200m tmpfs {MNT}/tmpfs").check()
        self.targets = [*sockets, "blk", "tmpfs"]
        # The source tree reaches the guest once, through the first share (or the disk).
        first = next(iter(self.daemons.values()), None)
        if first is not None:
            shutil.copy(self.workdir / "src.tar", first.shared_dir / "src.tar")
            g.run(f"cp {MNT}/{self.targets[0]}/src.tar {SRC_TAR}").check()
            (first.shared_dir / "src.tar").unlink()
        else:
            raise RuntimeError("no daemon to benchmark")
        g.run(f"cat > /tmp/meta.py <<'EOF'\n{(SCRIPTS / 'meta.py').read_text()}EOF").check()

    def watch(self) -> None:
        """If a daemon dies, kill QEMU: the guest would otherwise hang on its mount.

        Guest.run waits on QEMU's pidfd, so the benchmark then fails at once
        with a GuestError instead of waiting for its timeout.
        """
        fds = {os.pidfd_open(d.pid): tgt for tgt, d in self.daemons.items()}
        self._stop_r, self._stop_w = os.pipe()

        def run() -> None:
            try:
                ready, _, _ = select.select([*fds, self._stop_r], [], [])
                dead = [fds[fd] for fd in ready if fd in fds]
                if dead and self.guest is not None and self.guest.proc.poll() is None:
                    self.dead = dead
                    self.guest.proc.send_signal(signal.SIGKILL)
            finally:
                for fd in fds:
                    os.close(fd)

        self._watcher = threading.Thread(target=run, name="daemon-watch", daemon=True)
        self._watcher.start()

    def usage(self, tgt: str) -> procstat.Usage | None:
        d = self.daemons.get(tgt)
        return procstat.sample(d.pid) if d is not None else None

    def stop(self) -> dict[str, int]:
        """Guest off, then every daemon must exit by itself; exit statuses."""
        if self._watcher is not None:
            os.write(self._stop_w, b"x")
            self._watcher.join()
            os.close(self._stop_r)
            os.close(self._stop_w)
        if self.guest is not None:
            self.guest.shutdown()
        return {tgt: d.stop(timeout=10) for tgt, d in self.daemons.items() if d.proc is not None}


def make_source_tar(out: Path, files: int) -> None:
    """A git work tree of ``files`` Python stdlib sources (with .git), as a tar."""
    if out.exists():
        return
    stdlib = Path(shutil.__file__).parent
    tree = out.with_suffix(".d") / "src"
    n = 0
    for src in sorted(stdlib.rglob("*.py")):
        rel = src.relative_to(stdlib)
        if rel.parts[0] in ("site-packages", "dist-packages", "test") or n >= files:
            continue
        dst = tree / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
        n += 1
    git = ["git", "-c", "user.name=bench", "-c", "user.email=bench@localhost"]
    subprocess.run([*git, "init", "-q"], cwd=tree, check=True)
    subprocess.run([*git, "add", "-A"], cwd=tree, check=True)
    subprocess.run([*git, "commit", "-q", "-m", "tree"], cwd=tree, check=True)
    with tarfile.open(out, "w") as tf:
        tf.add(tree, arcname="src")
    shutil.rmtree(tree.parent)


def _run_row(rig: Rig, row: str, tgt: str) -> Cell | dict[str, Cell]:
    g = rig.guest
    assert g is not None
    p = rig.p
    base = f"{MNT}/{tgt}/bench"
    g.run(f"rm -rf {base} && mkdir -p {base}").check()
    try:
        job = next((j for j in FIO_JOBS if j.name == row), None)
        if job is not None:
            path = f"{base}/fio.dat"
            # Lay the file out first, then drop caches so reads come from the target.
            g.run(f"dd if=/dev/zero of={path} bs=1M count={p.fio_size_mib} 2>/dev/null").check()
            _drop(g)
            res = g.run(fio_cmd(job, path, p), timeout=p.fio_seconds * 10 + 300).check()
            return parse_fio(res.out, job)
        if row == "meta":
            res = g.run(f"python3 /tmp/meta.py {base} {p.meta_files}", timeout=1200).check()
            times = {k: float(v) for k, v in (ln.split() for ln in res.out.splitlines())}
            return {
                f"meta-{k}": Cell(p.meta_files / v, "ops/s", extra={"seconds": v})
                for k, v in times.items()
            }
        if row == "real":
            out: dict[str, Cell] = {}
            t = _timed(g, f"tar -xf {SRC_TAR} -C {base} && sync", 1200)
            out["real-untar"] = Cell(t, "s", higher_better=False)
            _drop(g)
            t = _timed(g, f"cd {base}/src && git status --porcelain >/dev/null", 1200)
            out["real-git-status"] = Cell(t, "s", higher_better=False)
            _drop(g)
            t = _timed(g, f"cd {base}/src && find . | xargs stat >/dev/null", 1200)
            out["real-find-stat"] = Cell(t, "s", higher_better=False)
            return out
        raise ValueError(f"unknown row {row!r}")
    finally:
        g.run(f"rm -rf {base}", timeout=1200)


def run_guest(
    specs: list[DaemonSpec],
    workdir: Path,
    p: Params,
    rows: Sequence[str] = ROWS,
    *,
    repeat: int = 1,
    queues: int = 1,
    log: Callable[[str], None] = print,
) -> dict[str, dict[str, Cell]]:
    """Every selected row on every target; results[row][target].

    With ``repeat`` > 1 the whole sequence (every row on every target, in
    turn) runs that many times and each cell is the run with the median
    value; all values are kept in ``Cell.extra["runs"]``. Under TCG on a
    shared 2-core host single runs vary a lot.
    """
    groups: list[str] = [j.name for j in FIO_JOBS if j.name in rows]
    if any(r in rows for r in META_ROWS):
        groups.append("meta")
    if any(r in rows for r in REAL_ROWS):
        groups.append("real")
    runs: dict[str, dict[str, list[Cell]]] = {}
    rig = Rig(specs, workdir, p, queues)
    try:
        rig.start(log)
        for grp, tgt in [(g, t) for _ in range(repeat) for g in groups for t in rig.targets]:
            before = rig.usage(tgt)
            t0 = time.monotonic()
            cells = _run_row(rig, grp, tgt)
            after = rig.usage(tgt)
            named = cells if isinstance(cells, dict) else {grp: cells}
            for row, cell in named.items():
                if before is not None and after is not None:
                    cell.cpu_s = (after - before).cpu
                    cell.peak_rss_kib = after.peak_rss_kib
                if row in rows:
                    runs.setdefault(row, {}).setdefault(tgt, []).append(cell)
            log(f"  {grp} on {tgt}: {time.monotonic() - t0:.1f}s")
    except Exception as e:
        if rig.dead:
            raise RuntimeError(f"daemon of {', '.join(rig.dead)} died during the run") from e
        raise
    finally:
        statuses = rig.stop()
    bad = {t: s for t, s in statuses.items() if s != 0}
    if bad:
        logs = "\n".join(f"--- {t}\n{rig.daemons[t].log()[-5000:]}" for t in bad)
        raise RuntimeError(f"daemons exited badly: {bad}\n{logs}")
    return {row: {t: _median(cells) for t, cells in r.items()} for row, r in runs.items()}


def _median(cells: list[Cell]) -> Cell:
    """The cell with the median value (the lower middle one for an even count)."""
    ordered = sorted(cells, key=lambda c: c.value)
    mid = ordered[(len(ordered) - 1) // 2]
    if len(cells) > 1:
        mid.extra["runs"] = [c.value for c in cells]
    return mid


def guest_table(
    results: dict[str, dict[str, Cell]],
) -> tuple[list[str], list[list[object]]]:
    """Rows with values per target, speed ratios of py to each (> 1: py faster), usage."""
    from bench.report import ratio

    headers = [
        "row", "unit", "py", "pyp", "rs", "blk", "tmpfs", "py/rs", "pyp/rs", "py/blk",
        "py/tmpfs", "py cpu s", "pyp cpu s", "rs cpu s", "py MiB", "pyp MiB", "rs MiB",
    ]  # fmt: skip
    rows: list[list[object]] = []
    for name in ROWS:
        if name not in results:
            continue
        r = results[name]
        unit = next(iter(r.values())).unit

        def v(t: str, r: dict[str, Cell] = r) -> float | None:
            return r[t].value if t in r else None

        def u(t: str, attr: str, r: dict[str, Cell] = r) -> float | None:
            c = r.get(t)
            x = getattr(c, attr) if c is not None else None
            return None if x is None else (x / 1024 if attr == "peak_rss_kib" else x)

        def speed(t: str, r: dict[str, Cell] = r, ours: str = "py") -> float | None:
            """Our target's speed relative to target t: > 1 means ours is faster."""
            if ours not in r or t not in r:
                return None
            fast = r[ours].higher_better
            return ratio(v(ours), v(t)) if fast else ratio(v(t), v(ours))

        rows.append([
            name, unit, v("py"), v("pyp"), v("rs"), v("blk"), v("tmpfs"),
            speed("rs"), speed("rs", ours="pyp"), speed("blk"), speed("tmpfs"),
            u("py", "cpu_s"), u("pyp", "cpu_s"), u("rs", "cpu_s"),
            u("py", "peak_rss_kib"), u("pyp", "peak_rss_kib"), u("rs", "peak_rss_kib"),
        ])  # fmt: skip
    return headers, rows


def cells_json(results: dict[str, dict[str, Cell]]) -> dict[str, dict[str, Any]]:
    return {row: {t: asdict(c) for t, c in r.items()} for row, r in results.items()}
