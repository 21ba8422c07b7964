from alembic import context

from services.intake.store import metadata
from shared.db import run_migrations

run_migrations(context, metadata)
