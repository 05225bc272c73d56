"""Where benchmark tables go: appended to benchmarks/RESULTS.md (each script's --append/--append-results)."""
from __future__ import annotations

import os

RESULTS_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")


def append_results(text: str) -> None:
    """Append `text` (a markdown section) to RESULTS.md, ending it with a newline."""
    with open(RESULTS_PATH, "a") as f:
        f.write(text if text.endswith("\n") else text + "\n")
