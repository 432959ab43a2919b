"""bench/RESULTS.md: each benchmark's table between its own markers, replaced in place.

The benchmark scripts run as ``python bench/<name>.py``, so this directory is on their path:
``from results import write_section``.
"""

from __future__ import annotations

import re
from pathlib import Path

from input_pipeline import atomic

RESULTS = Path(__file__).with_name("RESULTS.md")


def markers(name: str) -> tuple[str, str]:
    """The HTML comments around section ``name``."""
    return f"<!-- {name}:start -->", f"<!-- {name}:end -->"


def write_section(name: str, table: str, path: Path = RESULTS) -> None:
    """Puts ``table`` between the markers of section ``name`` in ``path``, replacing what was
    there (or appending the section); the file is replaced atomically, so an interrupted
    write leaves the old one."""
    start, end = markers(name)
    block = f"{start}\n{table}\n{end}"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text)
    else:
        text = text.rstrip() + f"\n\n{block}\n"
    atomic.write_text(path, text)
    print(f"wrote {path}")
