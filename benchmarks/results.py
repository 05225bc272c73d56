"""Where benchmark tables go: appended to benchmarks/RESULTS.md (each script's --append/--append-results)."""
from __future__ import annotations

import datetime
import os

RESULTS_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")


def append_results(text: str) -> None:
    """Append `text` (a markdown section) to RESULTS.md, ending it with a newline."""
    with open(RESULTS_PATH, "a") as f:
        f.write(text if text.endswith("\n") else text + "\n")


def report(title: str, header: str, lines: list[str], append: bool) -> None:
    """Print a benchmark's header line and table; with `append`, also add them to RESULTS.md as a
    section "## <title>, <today's date>"."""
    table = "\n".join(lines)
    print(header)
    print(table)
    if append:
        append_results(f"\n## {title}, {datetime.date.today()}\n\n{header}\n\n{table}\n")
