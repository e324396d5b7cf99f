"""Shared main of the atheris harnesses: instrument the package, run one target.

Each ``fuzz/fuzz_<target>.py`` calls :func:`main` with its target's name.
libFuzzer options go on the command line, e.g.::

    python3 fuzz/fuzz_vhost_codec.py -atheris_runs=100000
    python3 fuzz/fuzz_fuse_passthrough.py -max_total_time=600 fuzz/corpus/fuse_passthrough

A crash or a broken invariant (AssertionError) stops the run with the input
saved as ``crash-<sha1>`` in the current directory; replay it by passing the
file instead of a corpus directory.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import atheris  # type: ignore[import-untyped]

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

with atheris.instrument_imports(include=["virtiofsd_py"]):
    from fuzz import targets


def main(name: str) -> None:
    # Bad input is logged by design; a fuzzer would spend its time printing.
    logging.disable(logging.CRITICAL)
    target = targets.TARGETS[name]
    atheris.Setup(sys.argv, target)
    atheris.Fuzz()
