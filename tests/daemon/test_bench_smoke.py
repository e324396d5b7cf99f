"""The benchmark tool still runs: one short microbenchmark against our daemon.

No timing is asserted: the check is that ``python3 -m bench micro`` drives
real requests through the daemon and prints its table with a row per
workload, so the bench code does not rot as the daemon changes.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# bench/ is not part of the installed package: import it from the checkout.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bench import __main__ as bench_main
from bench import hotpath


def test_micro_prints_a_table(capsys: pytest.CaptureFixture[str]) -> None:
    status = bench_main.main(
        ["micro", "--daemons", "virtiofsd-py", "--count", "8", "--qd", "1,4", "--no-json"]
    )
    assert status == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].startswith("== microbenchmark")
    header = lines[1].split()
    assert header[:3] == ["workload", "qd", "daemon"]
    rows = [line.split() for line in lines[3:] if line.strip()]
    for workload in ("getattr", "lookup", "read4k", "read1m", "write4k"):
        mine = [r for r in rows if r[0] == workload and r[2] == "virtiofsd-py"]
        assert sorted(r[1] for r in mine) == ["1", "4"], out
        for r in mine:
            assert float(r[3]) > 0, out  # requests per second: some completed


def test_micro_reports_both_cores_side_by_side(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["micro", "--core", "both", "--daemons", "virtiofsd-py,virtiofsd-py-pure"]
    status = bench_main.main([*argv, "--only", "getattr", "--count", "4", "--qd", "1", "--no-json"])
    assert status == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines()[3:] if line.strip()]
    assert sorted(r[2] for r in rows if r[0] == "getattr") == ["virtiofsd-py", "virtiofsd-py-pure"]


@pytest.mark.parametrize("scatter", [[], ["--scatter"]])
def test_hotpath_prints_a_row_per_workload(
    capsys: pytest.CaptureFixture[str], scatter: list[str]
) -> None:
    assert hotpath.main(["--seconds", "0.01", "--repeat", "1", *scatter]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[1:]]
    assert [r[0] for r in rows] == list(hotpath.WORKLOADS)
    assert all(float(r[2]) > 0 for r in rows)


def test_pyfuse3_adapter_bench_prints_a_row_per_target_and_request(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from mount_rig import mount_unavailable
    from pyfuse3_examples import examples_dir

    if mount_unavailable() is not None:
        pytest.skip(f"host FUSE mounts: {mount_unavailable()}")
    example = examples_dir() / "tmpfs.py"
    from bench import pyfuse3_adapter

    status = pyfuse3_adapter.main(["--seconds", "0.1", "--example", str(example)])
    assert status == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[2:]]
    assert {(r[0], r[1]) for r in rows} == {
        (t, q) for t in ("pyfuse3", "mount", "vhost-user") for q in ("getattr", "read4k")
    }
    assert all(float(r[2]) > 0 for r in rows)
