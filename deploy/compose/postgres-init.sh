#!/bin/sh
# Run once by the postgres image on an empty volume (/docker-entrypoint-initdb.d), as the
# superuser, whose password only the postgres container has. Gives each service a login
# role of its own, with its password from a compose secret file, owning its database
# only (deploy/postgres-init.sql).
set -eu
psql --no-psqlrc --set ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres \
    --set intake_password="$(cat /run/secrets/postgres_intake_password)" \
    --set scheduling_password="$(cat /run/secrets/postgres_scheduling_password)" \
    --set notifications_password="$(cat /run/secrets/postgres_notifications_password)" \
    --file /iopnet/postgres-init.sql
