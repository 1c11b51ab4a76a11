"""Run the fault corpus and print its figures: `python -m tests.faults.report`
(from the repository root). Exit status: pytest's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path


def main() -> int:
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "summary.json"
        rc = subprocess.call([sys.executable, "-m", "pytest", "-q", "tests/faults", *sys.argv[1:]],
                             env={**os.environ, "ZOO_FAULTS_SUMMARY": str(out)})
        if not out.exists():
            print("no summary: the corpus did not run to the end", file=sys.stderr)
            return rc or 1
        figures = json.loads(out.read_text())["figures"]
    print(", ".join(f"{k}: {v}" for k, v in figures.items()))
    return rc


if __name__ == "__main__":
    sys.exit(main())
