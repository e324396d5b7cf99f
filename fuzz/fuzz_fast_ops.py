"""Coverage-guided fuzzing of fuzz.targets.fast_ops (see fuzz/harness.py for options)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fuzz.harness import main

if __name__ == "__main__":
    main("fast_ops")
