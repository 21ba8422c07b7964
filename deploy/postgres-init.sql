-- Run once by the postgres image on an empty volume (/docker-entrypoint-initdb.d).
-- One database per service: no service reads another's tables.
CREATE DATABASE intake;
CREATE DATABASE scheduling;
CREATE DATABASE notifications;
