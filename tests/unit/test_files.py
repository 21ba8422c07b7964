"""shared/files.py: the data dir and everything in it private to the service's user."""

import logging
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from shared.files import PRIVATE_UMASK, secure_data_dir, secure_file, use_private_umask


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


@pytest.fixture
def loose_umask() -> Iterator[None]:
    """The usual 022 during the test, and the test process's own umask back afterwards."""
    previous = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(previous)


@pytest.fixture
def loose_data_dir(tmp_path: Path, loose_umask: None) -> Path:
    """A data dir as an older version left it: 0755, databases 0644."""
    data = tmp_path / "data"
    (data / "nats" / "jetstream").mkdir(parents=True)
    for name in ("intake.db", "intake.db-wal", "intake.db-shm", "jwt.secret", "nats/jetstream/1.blk"):
        (data / name).write_bytes(b"x")
    os.chmod(data, 0o755)
    os.chmod(data / "nats", 0o750)
    os.chmod(data / "intake.db-shm", 0o666)
    return data


def test_loose_modes_are_made_private(loose_data_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    data = loose_data_dir
    assert mode(data) == 0o755
    assert mode(data / "intake.db") == 0o644
    with caplog.at_level(logging.WARNING, logger="iopnet.files"):
        fixed = secure_data_dir(data)
    assert sorted(fixed) == sorted(
        [".", "intake.db", "intake.db-wal", "intake.db-shm", "jwt.secret", "nats", "nats/jetstream",
         "nats/jetstream/1.blk"]
    )  # fmt: skip
    assert mode(data) == 0o700
    assert mode(data / "nats") == 0o700
    assert mode(data / "nats" / "jetstream") == 0o700
    for name in ("intake.db", "intake.db-wal", "intake.db-shm", "jwt.secret", "nats/jetstream/1.blk"):
        assert mode(data / name) == 0o600, name
    (warning,) = caplog.records
    assert warning.count == len(fixed)
    assert "intake.db" in warning.file
    assert secure_data_dir(data) == [], "nothing left to fix"


def test_private_modes_are_left_alone(tmp_path: Path, loose_umask: None) -> None:
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    (data / "intake.db").touch(mode=0o600)
    (data / "readonly").touch(mode=0o400)
    os.chmod(data / "readonly", 0o400)
    assert secure_data_dir(data) == []
    assert mode(data / "readonly") == 0o400, "owner bits are not widened"


def test_symlinks_are_not_followed(loose_data_dir: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside.txt"
    outside.write_text("not ours to change")
    os.chmod(outside, 0o644)
    (loose_data_dir / "link").symlink_to(outside)
    fixed = secure_data_dir(loose_data_dir)
    assert "link" not in fixed
    assert mode(outside) == 0o644


def test_a_missing_data_dir_is_not_created(tmp_path: Path, loose_umask: None) -> None:
    assert secure_data_dir(tmp_path / "absent") == []
    assert not (tmp_path / "absent").exists()


def test_the_umask_makes_new_files_private(tmp_path: Path, loose_umask: None) -> None:
    secure_data_dir(tmp_path / "absent")
    (tmp_path / "new-dir").mkdir()
    (tmp_path / "new-file").write_text("x")
    assert mode(tmp_path / "new-dir") == 0o700
    assert mode(tmp_path / "new-file") == 0o600


def test_the_umask_can_be_left_to_the_caller(tmp_path: Path, loose_umask: None) -> None:
    secure_data_dir(tmp_path, set_umask=False)
    (tmp_path / "new-file").write_text("x")
    assert mode(tmp_path / "new-file") == 0o644


def test_use_private_umask_returns_the_previous_one(loose_umask: None) -> None:
    assert use_private_umask() == 0o022
    assert use_private_umask() == PRIVATE_UMASK


def test_secure_file(tmp_path: Path, loose_umask: None) -> None:
    path = tmp_path / "elsewhere.db"
    path.write_text("x")
    assert secure_file(path)
    assert mode(path) == 0o600
    assert not secure_file(path)
    assert not secure_file(tmp_path / "absent.db")
