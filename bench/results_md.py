"""Writes one machine's section of `bench/RESULTS.md` between a script's markers, keeping the rest.

Each benchmark script owns the block between `<!-- NAME:start -->` and `<!-- NAME:end -->`; inside
it, one section per machine sits between `<!-- NAME:device KEY -->` and
`<!-- NAME:device-end KEY -->`. Rerunning a script on a machine replaces that machine's section only.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import utils  # noqa: E402


def write_section(path: Path, owner: str, key: str, section: str, intro: str) -> None:
    """Puts `section` as machine `key`'s part of `owner`'s block in `path`, atomically.

    Everything outside the block and the other machines' sections are kept; the file, the block
    (opened by `intro`) and the section are created when missing.
    """
    start, stop = f"<!-- {owner}:start -->", f"<!-- {owner}:end -->"
    begin, end = f"<!-- {owner}:device {key} -->", f"<!-- {owner}:device-end {key} -->"
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    block = f"{begin}\n{section}{end}\n\n"
    if start in text and stop in text.split(start, 1)[1]:
        head, rest = text.split(start, 1)
        inner, tail = rest.split(stop, 1)
    else:
        head, inner, tail = text.rstrip("\n") + "\n\n", "", "\n"
    if begin in inner and end in inner.split(begin, 1)[1]:
        before, after = inner.split(begin, 1)
        inner = before + block + after.split(end, 1)[1].lstrip("\n")
    else:
        inner = (inner if inner.strip() else intro) + block
    inner = inner if inner.endswith("\n") else inner + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    utils.write_text_atomic(path, head + start + inner + stop + tail)
