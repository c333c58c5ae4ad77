#!/bin/sh
# Patroni callback on both PostgreSQL nodes when a PgBouncer runs on each (README.md, "PgBouncer on each
# node"; patroni.yml: postgresql.callbacks). Patroni runs it as `pgbouncer-callback.sh ACTION ROLE SCOPE`
# after this node's PostgreSQL started (on_start) or changed role (on_role_change).
#
# PgBouncer announces to new clients the server parameters its pool saw first (in_hot_standby,
# default_transaction_read_only) until the pool is rebuilt, and keeps its clients' connections open while
# the server behind it restarts as a standby. KILL drops the pool and its clients: they reconnect, and
# the service's multi-host URL finds the primary at once. RESUME lets connections in again.
#
# The service copes without it (it asks each host itself and its transactions refuse a standby), but a
# demoted node's idle connections then move only at their next transaction.
#
# The admin user's password: a pgpass file of the OS user Patroni runs as (default below), one line
#   127.0.0.1:6432:pgbouncer:pgbouncer_admin:PASSWORD
set -eu
export PGPASSFILE="${PGBOUNCER_PGPASSFILE:-/var/lib/postgresql/.pgpass.pgbouncer}"
database="${CE_DATABASE:-cluster_engine}"
logger -t pgbouncer-callback "patroni ${1:-?}: role ${2:-?}; KILL + RESUME of PgBouncer's $database" 2>/dev/null || true
psql "host=${PGBOUNCER_HOST:-127.0.0.1} port=${PGBOUNCER_PORT:-6432} dbname=pgbouncer user=${PGBOUNCER_USER:-pgbouncer_admin} connect_timeout=5" \
  -X -q -v ON_ERROR_STOP=1 -c "KILL $database" -c "RESUME $database"
