"""Unguided mutation of a corpus through one target: for builds without coverage feedback.

Under the ASan build (docs/testing.md, "The compiled core") atheris gets no
coverage, so this replays every corpus input and then mutates random ones
(bit flips, inserted, deleted and spliced bytes) for a while::

    python3 fuzz/mutate.py virtqueue_compiled CORPUS_DIR SECONDS

A broken rule raises and ends the run with the input printed (hex).
"""

from __future__ import annotations

import logging
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fuzz import targets


def mutate(rng: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        op = rng.randrange(4)
        if op == 0 and b:
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        elif op == 1:
            b.insert(rng.randrange(len(b) + 1), rng.randrange(256))
        elif op == 2 and b:
            del b[rng.randrange(len(b))]
        else:
            i = rng.randrange(len(b) + 1)
            b[i:i] = rng.randbytes(rng.randint(1, 16))
    return bytes(b)


def main(argv: list[str]) -> int:
    name, corpus_dir, seconds = argv[0], Path(argv[1]), float(argv[2])
    target = targets.TARGETS[name]
    logging.disable(logging.CRITICAL)
    corpus = [p.read_bytes() for p in sorted(corpus_dir.iterdir()) if p.is_file()] or [b""]
    rng = random.Random(1)
    runs = 0
    t0 = time.monotonic()
    data = b""
    try:
        for data in corpus:
            target(data)
            runs += 1
        while time.monotonic() - t0 < seconds:
            data = mutate(rng, rng.choice(corpus))
            target(data)
            runs += 1
    except BaseException:
        print(f"failed after {runs} inputs on {data.hex()}", file=sys.stderr)
        raise
    print(f"{name}: {runs} inputs in {time.monotonic() - t0:.0f} s ({len(corpus)} in the corpus)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
