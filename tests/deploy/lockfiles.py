"""Reading the pip-compile locks in requirements/."""

import re
from itertools import pairwise
from pathlib import Path

from packaging.utils import canonicalize_name

_ENTRY = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+?)(?:\s*;[^\\\n]*)?\s*\\?$", re.M)


def pins(path: Path) -> dict[str, str]:
    """{canonical name: version} of a lock."""
    return {canonicalize_name(name): version for name, version in _ENTRY.findall(path.read_text())}


def entries(path: Path) -> dict[str, str]:
    """{canonical name: its whole entry (pin, hashes, `# via` lines)}."""
    text = path.read_text()
    starts = [m.start() for m in _ENTRY.finditer(text)] + [len(text)]
    out = {}
    for begin, end in pairwise(starts):
        block = text[begin:end]
        match = _ENTRY.match(block)
        assert match is not None
        out[canonicalize_name(match.group(1))] = block
    return out


def via(entry: str) -> set[str]:
    """Who needs a locked package, from pip-compile's annotations."""
    names = set()
    for line in entry.splitlines():
        line = line.strip()
        if not line.startswith("#"):
            continue
        words = line.lstrip("#").strip().removeprefix("via").strip()
        if words and not words.startswith("-"):
            names.add(canonicalize_name(words.split(" ")[0]))
    return names
