"""Switch-over time of a live migration seen from QEMU, with a guest holding many inodes.

A real guest (``virtiofsd_py.testing.qemu.migration.MigrationPair``: two QEMUs,
each with its own daemon on the same host directory) mounts the share and
is migrated: first while it holds only the root, then (``--repeat`` times,
the median reported) after ``find`` has looked up every file of an N-file
tree (the daemon's inode table then holds N + N/100 nodes, which the device
state carries). The source's ``query-migrate`` reports ``downtime`` (guest
stopped until running on the destination: the device state is saved and
loaded inside it) and ``total-time``; the difference between the two
migrations is what the inodes cost. Each daemon runs once with each
``--migration-on-error`` value (``ON_ERROR``).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.daemons import DaemonSpec
from bench.migstate import PER_DIR, make_tree
from virtiofsd_py.testing.qemu.migration import MigrationPair

TAG = "share"


#: ``--migration-on-error`` values measured (both daemons take the option):
#: with guest-error ours finds the nodes after the switch-over
#: (fs/passthrough/migration/deferred.py).
ON_ERROR = ("abort", "guest-error")


@dataclass
class SwitchResult:
    daemon: str
    on_error: str
    inodes: int
    downtime_ms: int
    total_ms: int
    downtime_empty_ms: int
    total_empty_ms: int
    #: Every migration with the inodes held (``downtime_ms`` is their median).
    downtimes_ms: list[int]

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def measure(
    spec: DaemonSpec, on_error: str, files: int, workdir: Path, repeat: int = 1
) -> SwitchResult:
    share = workdir / f"share-{spec.name}-{on_error}"
    share.mkdir()
    make_tree(share, files)
    pair = MigrationPair(
        share,
        workdir / f"pair-{spec.name}-{on_error}",
        tag=TAG,
        daemon_template=f"{spec.template} --migration-on-error {on_error}",
    )
    try:
        pair.start()
        pair.guest.run(f"mount -t virtiofs {TAG} /mnt").check()
        empty = pair.migrate(timeout=600)
        n = pair.guest.run("find /mnt -type f | wc -l", timeout=1200).check().out.strip()
        if int(n) != files:
            raise RuntimeError(f"guest found {n} files, expected {files}")
        fulls = [pair.migrate(timeout=600) for _ in range(max(1, repeat))]
        # The lookups are still held: the guest's dentries keep the inodes referenced.
        pair.guest.run("ls /mnt >/dev/null").check()
    finally:
        pair.close()
        shutil.rmtree(share, ignore_errors=True)
    problems = pair.problems()
    if problems:
        raise RuntimeError(f"{spec.name}: " + "; ".join(problems))
    mid = sorted(fulls, key=lambda r: r.downtime_ms)[len(fulls) // 2]
    return SwitchResult(
        spec.name,
        on_error,
        files + files // PER_DIR,
        mid.downtime_ms,
        mid.total_time_ms,
        empty.downtime_ms,
        empty.total_time_ms,
        [r.downtime_ms for r in fulls],
    )


def run_switch(
    specs: list[DaemonSpec],
    files: int,
    workdir: Path,
    *,
    repeat: int = 1,
    log: Callable[[str], None] = print,
) -> list[SwitchResult | str]:
    """One result per daemon, or a string saying why it could not be measured."""
    out: list[SwitchResult | str] = []
    for on_error in ON_ERROR:
        for spec in specs:
            try:
                r = measure(spec, on_error, files, workdir, repeat)
            except Exception as e:  # a daemon that cannot migrate is a result, not a crash
                msg = f"{spec.name} ({on_error}): migration failed: {str(e).splitlines()[0][:300]}"
                log(f"  {msg}")
                out.append(msg)
                continue
            log(
                f"  switch-over {spec.name} --migration-on-error {on_error}, {r.inodes} inodes:"
                f" downtime {r.downtime_ms} ms (median of {r.downtimes_ms})"
            )
            out.append(r)
    return out


def switch_table(results: list[SwitchResult]) -> tuple[list[str], list[list[object]]]:
    headers = [
        "daemon",
        "on error",
        "inodes",
        "downtime ms",
        "runs",
        "total ms",
        "empty: downtime",
        "empty: total",
    ]
    rows: list[list[object]] = [
        [
            r.daemon,
            r.on_error,
            r.inodes,
            r.downtime_ms,
            "/".join(map(str, r.downtimes_ms)),
            r.total_ms,
            r.downtime_empty_ms,
            r.total_empty_ms,
        ]
        for r in results
    ]
    return headers, rows
