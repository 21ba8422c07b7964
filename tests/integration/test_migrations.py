"""Each service's Alembic migrations build exactly the schema its store declares, on
SQLite and PostgreSQL, and applying them twice is harmless (they run on every start)."""

import importlib

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from shared.db import create_engine, migrate


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
