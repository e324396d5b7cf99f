"""Short fuzz runs of every target in fuzz/targets.py, part of the default suite.

Two engines over the same targets: hypothesis (always), and atheris
(coverage guided, each harness as its own process for a few thousand
inputs; skipped when atheris is not installed).  The long run is a
documented command (docs/security.md, "Fuzzing")::

    python3 fuzz/fuzz_fuse_passthrough.py -max_total_time=3600 fuzz/corpus/fuse_passthrough
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from fuzz import targets  # noqa: E402

#: Inputs per atheris harness in the default suite.
ATHERIS_RUNS = {"vhost_codec": 20000, "virtqueue": 3000, "virtqueue_compiled": 3000,
                "vhost_backend": 600, "fuse_passthrough": 800, "fast_ops": 1500}  # fmt: skip
HAS_ATHERIS = importlib.util.find_spec("atheris") is not None


@pytest.fixture(scope="module", autouse=True)
def _cleanup() -> Iterator[None]:
    yield from targets.cleanup()


FUZZ = settings(
    max_examples=300, deadline=None, suppress_health_check=list(HealthCheck), database=None
)


@FUZZ
@given(st.binary(max_size=400))
def test_hypothesis_vhost_codec(data: bytes) -> None:
    targets.vhost_codec(data)


@FUZZ
@given(st.binary(max_size=800))
def test_hypothesis_virtqueue(data: bytes) -> None:
    targets.virtqueue(data)


@FUZZ
@given(st.binary(max_size=800))
def test_hypothesis_virtqueue_compiled(data: bytes) -> None:
    targets.virtqueue_compiled(data)


@settings(FUZZ, max_examples=100)
@given(st.binary(max_size=300))
def test_hypothesis_vhost_backend(data: bytes) -> None:
    targets.vhost_backend(data)


@settings(FUZZ, max_examples=150)
@given(st.binary(max_size=600))
def test_hypothesis_fuse_passthrough(data: bytes) -> None:
    targets.fuse_passthrough(data)


@settings(FUZZ, max_examples=150)
@given(st.binary(max_size=600))
def test_hypothesis_fast_ops(data: bytes) -> None:
    targets.fast_ops(data)


def test_targets_check_their_rules() -> None:
    """The fuse target's outside check fires (the rules are not vacuous)."""
    targets.fuse_passthrough(b"")
    share = targets._shared_share()
    share.canary.write_bytes(b"changed")
    with pytest.raises(AssertionError, match="outside the share changed"):
        share.check()
    share.reset()
    (share.base / "stray").write_bytes(b"")
    with pytest.raises(AssertionError, match="new files outside"):
        share.check()
    (share.base / "stray").unlink()


@pytest.mark.skipif(not HAS_ATHERIS, reason="atheris is not installed (pip install atheris)")
@pytest.mark.parametrize("name", sorted(targets.TARGETS))
def test_atheris_harness(name: str, tmp_path: Path) -> None:
    runs = ATHERIS_RUNS[name]
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "fuzz" / f"fuzz_{name}.py"),
            f"-atheris_runs={runs}",
            "-rss_limit_mb=1024",
            "-timeout=20",
        ],
        cwd=tmp_path,
        capture_output=True,
        timeout=240,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    tail = proc.stderr.decode(errors="replace")[-3000:]
    assert proc.returncode == 0, f"fuzzing {name} failed:\n{tail}"
    assert f"Done {runs} " in tail or "Done " in tail, tail
    assert not list(tmp_path.glob("crash-*")), tail
