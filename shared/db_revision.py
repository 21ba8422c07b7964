"""`python -m shared.db_revision SERVICE "message"`: autogenerate a migration for one
service against a scratch SQLite database at its current head."""

import asyncio
import sys
import tempfile
from pathlib import Path

from alembic import command
from alembic.config import Config

from shared.db import create_engine, migrate


async def _revise(service: str, message: str) -> None:
    migrations = Path("services") / service / "migrations"
    with tempfile.TemporaryDirectory() as scratch:
        url = f"sqlite+aiosqlite:///{scratch}/revision.db"
        engine = create_engine(url)
        await migrate(engine, migrations)

        def revise(connection: object) -> None:
            config = Config()
            config.set_main_option("script_location", str(migrations))
            config.attributes["connection"] = connection
            command.revision(config, message=message, autogenerate=True)

        async with engine.begin() as connection:
            await connection.run_sync(revise)
        await engine.dispose()


if __name__ == "__main__":
    asyncio.run(_revise(sys.argv[1], sys.argv[2]))
