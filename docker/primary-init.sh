#!/usr/bin/env bash
# First-run initialisation of the primary, run by the postgres image's entrypoint from
# /docker-entrypoint-initdb.d (against its temporary, socket-only server). Creates the replication
# role, the application role and database, and lets the replication role stream over the network.
#
# The image sources this file when it is not executable, so it must not change shell options
# (no `set -u`): errors are caught by psql's ON_ERROR_STOP and the explicit checks below.

: "${REPLICATION_USER:?REPLICATION_USER is not set}"
: "${REPLICATION_PASSWORD:?REPLICATION_PASSWORD is not set}"
: "${APP_USER:?APP_USER is not set}"
: "${APP_PASSWORD:?APP_PASSWORD is not set}"
: "${APP_DB:?APP_DB is not set}"

# psql's :'var' and :"var" interpolation quotes the values, so passwords need no escaping here.
psql -v ON_ERROR_STOP=1 --username "${POSTGRES_USER:-postgres}" --dbname postgres \
  -v repl_user="$REPLICATION_USER" -v repl_password="$REPLICATION_PASSWORD" \
  -v app_user="$APP_USER" -v app_password="$APP_PASSWORD" -v app_db="$APP_DB" <<'SQL' || exit 1
CREATE ROLE :"repl_user" WITH REPLICATION LOGIN PASSWORD :'repl_password';
CREATE ROLE :"app_user" WITH LOGIN PASSWORD :'app_password';
CREATE DATABASE :"app_db" OWNER :"app_user";
SQL

# The image's own pg_hba line (`host all all all scram-sha-256`) does not cover replication
# connections; replicas connect from other containers on the compose network.
printf 'host replication %s all scram-sha-256\n' "$REPLICATION_USER" >>"$PGDATA/pg_hba.conf" || exit 1
