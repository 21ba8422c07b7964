"""IOPNET_<SERVICE>_DATABASE_URL: the forms other tools print (postgresql://, postgres://,
sqlite:///) are read with the drivers the services use; another database or a synchronous
driver is refused when settings are read, with the forms accepted, not at the first
connection (shared/settings.py)."""

import subprocess
import sys

import pytest
from pydantic import ValidationError

from shared.settings import Settings, async_database_url


@pytest.mark.parametrize(
    ("given", "read_as"),
    [
        ("postgresql://intake@db:5432/intake", "postgresql+asyncpg://intake@db:5432/intake"),
        ("postgres://intake:pw@db/intake", "postgresql+asyncpg://intake:pw@db/intake"),
        ("PostgreSQL://intake@db/intake", "postgresql+asyncpg://intake@db/intake"),
        ("postgresql+asyncpg://intake@db/intake", "postgresql+asyncpg://intake@db/intake"),
        ("sqlite:////var/lib/iopnet/intake.db", "sqlite+aiosqlite:////var/lib/iopnet/intake.db"),
        ("sqlite+aiosqlite:///intake.db", "sqlite+aiosqlite:///intake.db"),
    ],
)
def test_a_database_url_is_read_with_the_async_driver(given: str, read_as: str) -> None:
    assert async_database_url(given) == read_as
    assert Settings(intake_database_url=given).database_url("intake") == read_as


@pytest.mark.parametrize(
    ("given", "said"),
    [
        ("postgresql+psycopg2://intake@db/intake", "the driver 'psycopg2' is not used: write postgresql+asyncpg://"),
        ("postgres+asyncpg://intake@db/intake", "write postgresql+asyncpg://"),
        ("sqlite+pysqlite:///intake.db", "write sqlite+aiosqlite://"),
        ("mysql://intake@db/intake", "the database 'mysql' is not supported: PostgreSQL or SQLite"),
        ("intake.db", "a database URL looks like postgresql+asyncpg://"),
    ],
)
def test_another_database_or_driver_is_refused_when_settings_are_read(given: str, said: str) -> None:
    with pytest.raises(ValidationError) as refused:
        Settings(scheduling_database_url=given)
    assert said in str(refused.value)
    assert "scheduling_database_url" in str(refused.value)


def test_unset_means_the_sqlite_file_in_the_data_dir(tmp_path) -> None:
    settings = Settings(data_dir=tmp_path)
    assert settings.database_url("notifications") == f"sqlite+aiosqlite:///{tmp_path / 'notifications.db'}"


def test_the_command_reports_a_refused_setting_in_one_line(tmp_path) -> None:
    env = {"IOPNET_DATA_DIR": str(tmp_path), "IOPNET_INTAKE_DATABASE_URL": "postgresql+psycopg2://intake@db/intake"}
    done = subprocess.run(
        [sys.executable, "-m", "iopnet.cli", "serve", "intake"], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2
    assert done.stderr.strip() == (
        "iopnet: invalid settings: IOPNET_INTAKE_DATABASE_URL: the driver 'psycopg2' is not used: "
        "write postgresql+asyncpg://… (or postgresql://…)"
    )
    assert not list(tmp_path.iterdir()), "nothing written before the settings were read"
