"""``make demo``: assemble the seed streams and print each result record."""

from __future__ import annotations

import sys
from pathlib import Path

from worker.cli import main

SEEDS = Path(__file__).resolve().parent.parent / "fixtures" / "seeds"

if __name__ == "__main__":
    sys.exit(main(["assemble", *sorted(str(path) for path in SEEDS.glob("*.jsonl"))]))
