#!/usr/bin/env bash
# Entrypoint of a streaming replica in the postgres image: on first start, wait for the primary
# and clone it with `pg_basebackup -R` (which writes standby.signal and primary_conninfo); then
# run postgres as a hot standby. An existing data directory is reused as is.
#
# Environment: PRIMARY_HOST, PRIMARY_PORT (5432), REPLICATION_USER, REPLICATION_PASSWORD,
# PGDATA (the image's default), PRIMARY_WAIT_SECONDS (120).
set -euo pipefail

: "${PGDATA:=/var/lib/postgresql/data}"
: "${PRIMARY_HOST:?PRIMARY_HOST is not set}"
: "${PRIMARY_PORT:=5432}"
: "${REPLICATION_USER:?REPLICATION_USER is not set}"
: "${REPLICATION_PASSWORD:?REPLICATION_PASSWORD is not set}"
: "${PRIMARY_WAIT_SECONDS:=120}"

# The container starts as root: prepare the data directory, then continue as postgres.
if [ "$(id -u)" = 0 ]; then
  mkdir -p "$PGDATA"
  chown postgres:postgres "$PGDATA"
  chmod 700 "$PGDATA"
  exec gosu postgres bash "$0" "$@"
fi

if [ ! -s "$PGDATA/PG_VERSION" ]; then
  echo "replica: waiting for ${PRIMARY_HOST}:${PRIMARY_PORT} (at most ${PRIMARY_WAIT_SECONDS}s)"
  deadline=$((SECONDS + PRIMARY_WAIT_SECONDS))
  until pg_isready -q -h "$PRIMARY_HOST" -p "$PRIMARY_PORT" -U "$REPLICATION_USER" -d postgres -t 2; do
    if [ "$SECONDS" -ge "$deadline" ]; then
      echo "replica: primary ${PRIMARY_HOST}:${PRIMARY_PORT} not ready after ${PRIMARY_WAIT_SECONDS}s" >&2
      exit 1
    fi
    sleep 1
  done

  # Leftovers of an interrupted clone would make pg_basebackup refuse the directory.
  mkdir -p "$PGDATA"
  find "$PGDATA" -mindepth 1 -delete
  echo "replica: cloning ${PRIMARY_HOST}:${PRIMARY_PORT} into $PGDATA"
  # PGPASSWORD is read by libpq; -R records the connection (password included) in
  # postgresql.auto.conf so the standby can stream after restarts.
  PGPASSWORD="$REPLICATION_PASSWORD" pg_basebackup \
    -h "$PRIMARY_HOST" -p "$PRIMARY_PORT" -U "$REPLICATION_USER" --no-password \
    -D "$PGDATA" -R -X stream -c fast
  chmod 700 "$PGDATA"
fi

exec postgres \
  -c listen_addresses='*' \
  -c hot_standby=on \
  -c hot_standby_feedback=on \
  "$@"
