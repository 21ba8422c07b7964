#!/bin/sh
# Writes the secret files docker-compose.yml reads (deploy/compose/secrets/, git-ignored):
# the JWT signing key, a NATS password per user, a PostgreSQL password per service role and
# the superuser's, and the key of the console's session cookies. An existing file is kept, so running it again changes nothing.
# The folder is 0700 (no other host user can read it); the files are 0444 because compose
# bind-mounts them as they are and the containers read them as non-root users.
set -eu
dir="$(cd "$(dirname "$0")" && pwd)/secrets"
umask 077
mkdir -p "$dir"
chmod 0700 "$dir"
random() { od -An -N"$1" -tx1 /dev/urandom | tr -d ' \n'; }
for name in jwt_secret \
    nats_intake_password nats_scheduling_password nats_notifications_password nats_ops_password \
    nats_console_password console_session_secret \
    nats_intake_restricted_password nats_notifications_restricted_password \
    postgres_superuser_password postgres_intake_password postgres_scheduling_password \
    postgres_notifications_password; do
    if [ ! -s "$dir/$name" ]; then
        random 32 > "$dir/$name.tmp"
        mv "$dir/$name.tmp" "$dir/$name"
        echo "wrote $dir/$name"
    fi
    chmod 0444 "$dir/$name"
done
