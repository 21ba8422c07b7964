"""Issue 8, part 3: on the local default (SQLite under the data dir) no other local user
can read the databases. A service started under the usual umask 022 keeps its data dir
0700 and every file in it 0600, and repairs what an older version left readable."""

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from iopnet.natsd import NatsServer
from services.intake.app import create_app
from tests.conftest import ExternalNats, auth, make_settings, running

Broker = NatsServer | ExternalNats


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def loose_umask() -> Iterator[None]:
    """The umask `make run` used to inherit; the test process's own umask is restored
    afterwards (a service sets the private one for its whole process)."""
    previous = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(previous)


def _files(data: Path) -> list[Path]:
    return [data / name for name in ("intake.db", "intake.db-wal", "intake.db-shm")]


async def _run_and_write(nats_server: Broker, tmp_path: Path) -> Path:
    settings = make_settings(nats_server.url, tmp_path)
    assert settings.database_url("intake").endswith(f"{settings.data_dir}/intake.db"), "the local default"
    app = create_app(settings)
    async with running(app) as client:
        response = await client.post(
            "/sites",
            json={"site_id": "columbus-east", "name": "Columbus East", "timezone": "America/New_York"},
            headers=auth("network_admin"),
        )
        assert response.status_code in (201, 409)
        # Checked while the service runs: SQLite's -wal and -shm exist only then.
        data = settings.data_dir
        assert mode(data) == 0o700
        for path in _files(data):
            assert path.exists(), path.name
            assert mode(path) == 0o600, path.name
    return data


async def test_a_fresh_start_keeps_the_data_private(nats_server: Broker, tmp_path: Path, loose_umask: None) -> None:
    assert not (tmp_path / "data").exists()
    await _run_and_write(nats_server, tmp_path)


async def test_a_start_repairs_what_an_older_version_left_readable(
    nats_server: Broker, tmp_path: Path, loose_umask: None
) -> None:
    data = await _run_and_write(nats_server, tmp_path)
    # As the issue found them: any local user could read names, phones and check-ins.
    os.chmod(data, 0o755)
    for path in data.iterdir():
        os.chmod(path, 0o644)
    (data / "leftover.log").write_text("x")
    os.umask(0o022)
    await _run_and_write(nats_server, tmp_path)
    assert mode(data / "leftover.log") == 0o600
    assert all(mode(path) & 0o077 == 0 for path in data.iterdir())
