-- One login role per service, owning its own database and nothing else; no service is a
-- superuser or can connect to another's database. Run by deploy/compose/postgres-init.sh
-- (psql variables :'<service>_password' from secret files), or by hand on a server of
-- your own: psql --set intake_password=… --set scheduling_password=… --set notifications_password=… -f deploy/postgres-init.sql
\set ON_ERROR_STOP on

CREATE ROLE intake LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION PASSWORD :'intake_password';
CREATE ROLE scheduling LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION PASSWORD :'scheduling_password';
CREATE ROLE notifications LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION PASSWORD :'notifications_password';

CREATE DATABASE intake OWNER intake;
CREATE DATABASE scheduling OWNER scheduling;
CREATE DATABASE notifications OWNER notifications;

-- By default every role may connect to every database: only the owner may here.
REVOKE ALL ON DATABASE intake FROM PUBLIC;
REVOKE ALL ON DATABASE scheduling FROM PUBLIC;
REVOKE ALL ON DATABASE notifications FROM PUBLIC;

-- The schema the migrations create tables in belongs to the service (PostgreSQL 15+
-- gives `public` to pg_database_owner already; said here for older servers too).
\connect intake
ALTER SCHEMA public OWNER TO intake;
REVOKE ALL ON SCHEMA public FROM PUBLIC;
\connect scheduling
ALTER SCHEMA public OWNER TO scheduling;
REVOKE ALL ON SCHEMA public FROM PUBLIC;
\connect notifications
ALTER SCHEMA public OWNER TO notifications;
REVOKE ALL ON SCHEMA public FROM PUBLIC;
