"""Each service's Alembic migrations build exactly the schema its store declares, on
SQLite and PostgreSQL, and applying them twice is harmless (they run on every start)."""

import asyncio
import importlib

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from iopnet.testing import eventually
from shared.db import create_engine, migrate
from tests.conftest import fresh_postgres_database


@pytest.mark.parametrize("service", ["intake", "scheduling", "notifications"])
async def test_migrations_match_models(service: str, database_url: str) -> None:
    store = importlib.import_module(f"services.{service}.store")
    engine = create_engine(database_url)
    try:
        await migrate(engine, store.MIGRATIONS)
        await migrate(engine, store.MIGRATIONS)
        async with engine.connect() as connection:
            diff = await connection.run_sync(
                lambda sync: compare_metadata(MigrationContext.configure(sync), store.metadata)
            )
    finally:
        await engine.dispose()
    assert diff == [], f"{service}: models and migrations differ: {diff}"


@pytest.mark.postgres
async def test_replicas_starting_together_on_postgresql_migrate_once() -> None:
    """Two replicas of a service start at once on a fresh database: one migrates, the
    other waits for it (an advisory lock) and finds nothing to do; neither fails on a
    table the other just created. (Only PostgreSQL: a service on SQLite runs one replica.)"""
    async with fresh_postgres_database() as url:
        await _migrate_together(url)


async def _migrate_together(database_url: str) -> None:
    store = importlib.import_module("services.intake.store")
    engines = [create_engine(database_url), create_engine(database_url)]
    try:
        await asyncio.gather(*(migrate(engine, store.MIGRATIONS) for engine in engines))
        async with engines[0].connect() as connection:
            diff = await connection.run_sync(
                lambda sync: compare_metadata(MigrationContext.configure(sync), store.metadata)
            )
    finally:
        for engine in engines:
            await engine.dispose()
    assert diff == []


@pytest.mark.postgres
async def test_a_service_given_a_plain_postgresql_url_starts_on_asyncpg(nats_server, tmp_path) -> None:
    """IOPNET_INTAKE_DATABASE_URL as most tools print it (postgresql://, no driver): intake
    migrates its database through asyncpg and is ready, instead of failing for want of
    psycopg2."""
    from services.intake.app import create_app
    from tests.conftest import make_settings, running

    async with fresh_postgres_database() as url:
        plain = url.replace("postgresql+asyncpg://", "postgresql://", 1)
        settings = make_settings(nats_server.url, tmp_path, intake_database_url=plain)
        assert settings.database_url("intake") == url
        async with running(create_app(settings)) as intake:

            async def ready() -> bool:
                return (await intake.get("/readyz")).status_code == 200

            await eventually(ready, timeout=30, what="intake ready on the plain URL")
        engine = create_engine(url)
        try:
            async with engine.connect() as connection:
                diff = await connection.run_sync(
                    lambda sync: compare_metadata(
                        MigrationContext.configure(sync), importlib.import_module("services.intake.store").metadata
                    )
                )
        finally:
            await engine.dispose()
        assert diff == []
