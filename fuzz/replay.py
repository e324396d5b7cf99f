"""Run a fuzz target over a corpus and fresh random inputs, without atheris.

``python3 fuzz/replay.py TARGET [CORPUS_DIR ...] [--random N] [--seconds T] [--seed S]``

For runs where coverage guidance is not available, such as the compiled
core built with ``VIRTIOFSD_PY_SANITIZE=1`` and the sanitizer runtime
preloaded (docs/security.md, "Fuzzing"): every corpus file once, then ``N``
random inputs of random length.  Prints how many inputs ran; a broken
invariant raises, a memory error aborts under the sanitizer.
"""

from __future__ import annotations

import argparse
import logging
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fuzz import targets


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("target", choices=sorted(targets.TARGETS))
    ap.add_argument("corpus", nargs="*", type=Path)
    ap.add_argument("--random", type=int, default=0, help="random inputs after the corpus")
    ap.add_argument("--max-len", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--seconds", type=float, help="stop the random inputs after this long")
    args = ap.parse_args()
    logging.disable(logging.CRITICAL)
    target = targets.TARGETS[args.target]
    t0 = time.monotonic()
    ran = 0
    try:
        for d in args.corpus:
            for f in sorted(d.iterdir()) if d.is_dir() else [d]:
                target(f.read_bytes())
                ran += 1
        rnd = random.Random(args.seed)
        stop = t0 + args.seconds if args.seconds else float("inf")
        for _ in range(args.random):
            if time.monotonic() > stop:
                break
            target(rnd.randbytes(rnd.randrange(args.max_len)))
            ran += 1
    finally:
        for _ in targets.cleanup():
            pass
    print(f"{args.target}: {ran} inputs in {time.monotonic() - t0:.0f} s, no failure")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
