from alembic import context

from services.notifications.store import metadata
from shared.db import run_migrations

run_migrations(context, metadata)
