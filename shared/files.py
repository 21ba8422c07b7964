"""Private files at rest (issue 8, part 3): the data dir holds the SQLite databases
(names, birth dates, contact details, check-in text, webhook secrets), the JWT secret
and the embedded broker's store, so no other local user may read any of it.

Two measures: the process umask makes whatever it creates from now on private
(SQLite gives its -wal/-shm files the mode of the database file), and a walk at start
repairs what an older version, another tool or a looser umask left readable."""

import logging
import os
import stat
from pathlib import Path

log = logging.getLogger("iopnet.files")

PRIVATE_UMASK = 0o077
# Group and other bits: any of them set on something in the data dir is too open.
_OPEN_BITS = 0o077
# A warning names at most this many files; the count says how many there were.
_NAMED_IN_WARNING = 10


def use_private_umask() -> int:
    """Files and directories this process (and any child it starts afterwards, such as
    nats-server) creates are owner-only. Returns the previous umask."""
    return os.umask(PRIVATE_UMASK)


def secure_data_dir(path: Path, *, set_umask: bool = True) -> list[str]:
    """Set the private umask (unless told not to), then take group and other
    permissions off `path` and everything under it. Returns what was fixed, as paths
    relative to `path` ("." for the directory itself), and logs a warning naming them.

    A missing `path` is left alone (it is created later, under the private umask).
    Symlinks are not followed: one could point outside the data dir. A file that
    vanishes during the walk (the broker rotates its blocks) is skipped; one that cannot
    be changed (another owner) is logged and left."""
    if set_umask:
        use_private_umask()
    if not path.is_dir():
        return []
    fixed: list[str] = []
    failed: list[str] = []
    for root, dirs, files in os.walk(path):
        base = Path(root)
        if base == path:
            _fix(base, ".", fixed, failed)
        for name in [*dirs, *files]:
            entry = base / name
            _fix(entry, str(entry.relative_to(path)), fixed, failed)
    if fixed:
        log.warning(
            "data files were readable by other users; made private",
            extra={"count": len(fixed), "file": ", ".join(fixed[:_NAMED_IN_WARNING])},
        )
    if failed:
        log.warning(
            "data files readable by other users could not be made private",
            extra={"count": len(failed), "file": ", ".join(failed[:_NAMED_IN_WARNING])},
        )
    return fixed


def secure_file(path: Path) -> bool:
    """Take group and other permissions off one file (e.g. a SQLite database kept
    outside the data dir). True if its mode was changed."""
    fixed: list[str] = []
    _fix(path, str(path), fixed, [])
    return bool(fixed)


def _fix(entry: Path, label: str, fixed: list[str], failed: list[str]) -> None:
    try:
        info = entry.lstat()
    except FileNotFoundError:
        return
    if stat.S_ISLNK(info.st_mode) or not (stat.S_ISDIR(info.st_mode) or stat.S_ISREG(info.st_mode)):
        return
    mode = stat.S_IMODE(info.st_mode)
    if not mode & _OPEN_BITS:
        return
    try:
        os.chmod(entry, mode & ~_OPEN_BITS)
    except FileNotFoundError:
        return
    except PermissionError:
        failed.append(label)
        return
    fixed.append(label)
