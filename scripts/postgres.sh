#!/usr/bin/env bash
# Starts a throwaway PostgreSQL server for the cloud's tests and exports
# ROOST_TEST_POSTGRES. Source it (`. scripts/postgres.sh`): it installs
# postgresql with apt if it is missing, initdb's a cluster in a temp dir as
# user postgres, starts it on a free port (127.0.0.1 only, its socket in the
# temp dir, trust auth), waits for pg_isready, and sets an EXIT trap that
# stops it and removes the cluster, pass or fail. Run as root (as CI does),
# or as a user that can run commands as postgres with `su`.
#
# Also usable by hand: `bash scripts/postgres.sh start` prints the export
# line and leaves the server running; `bash scripts/postgres.sh stop DIR`
# stops it.

roost_pg_bin() {
  local d
  for d in /usr/lib/postgresql/*/bin; do
    [ -x "$d/initdb" ] && { echo "$d"; return 0; }
  done
  return 1
}

roost_pg_as_postgres() {
  if [ "$(id -un)" = postgres ]; then "$@"; else su postgres -s /bin/sh -c "$(printf '%q ' "$@")"; fi
}

roost_pg_start() {
  if ! roost_pg_bin >/dev/null; then
    printf '\n==> installing postgresql (apt)\n'
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
  fi
  local bin port dir
  bin="$(roost_pg_bin)"
  # A free port: ask the kernel for one.
  port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
  dir="$(mktemp -d /tmp/roost-pg.XXXXXX)"
  chown postgres: "$dir" 2>/dev/null || true
  chmod 700 "$dir"
  roost_pg_as_postgres "$bin/initdb" -D "$dir/data" -U postgres --auth=trust -E UTF8 >"$dir/initdb.log" 2>&1 ||
    { cat "$dir/initdb.log" >&2; return 1; }
  roost_pg_as_postgres "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 \
    -o "-p $port -k $dir -c listen_addresses=127.0.0.1 -c max_connections=300 -c fsync=off" start >/dev/null ||
    { cat "$dir/server.log" >&2; return 1; }
  local i
  for i in $(seq 60); do
    "$bin/pg_isready" -q -h 127.0.0.1 -p "$port" && break
    sleep 1
  done
  "$bin/pg_isready" -q -h 127.0.0.1 -p "$port" || { cat "$dir/server.log" >&2; return 1; }
  ROOST_PG_DIR="$dir"
  export ROOST_TEST_POSTGRES="postgres://postgres@127.0.0.1:$port/postgres"
  # The integration test restarts the server with this (pg_ctl refuses
  # root, so the script switches to postgres).
  printf '#!/bin/sh\nif [ "$(id -un)" = postgres ]; then exec %q -D %q -w -t 60 -m fast -l %q restart\nelse exec su postgres -s /bin/sh -c %q; fi\n' \
    "$bin/pg_ctl" "$dir/data" "$dir/server.log" "$bin/pg_ctl -D $dir/data -w -t 60 -m fast -l $dir/server.log restart" >"$dir/restart"
  chmod 755 "$dir/restart"
  export ROOST_TEST_POSTGRES_RESTART="$dir/restart"
}

roost_pg_stop() {
  local dir="${1:-${ROOST_PG_DIR:-}}"
  [ -n "$dir" ] && [ -d "$dir/data" ] || return 0
  roost_pg_as_postgres "$(roost_pg_bin)/pg_ctl" -D "$dir/data" -m fast -w stop >/dev/null 2>&1 || true
  rm -rf "$dir"
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  # Run as a script.
  set -euo pipefail
  case "${1:-}" in
    start)
      roost_pg_start
      echo "export ROOST_TEST_POSTGRES=$ROOST_TEST_POSTGRES"
      echo "export ROOST_TEST_POSTGRES_RESTART=$ROOST_TEST_POSTGRES_RESTART"
      echo "# stop it with: bash $0 stop $ROOST_PG_DIR"
      ;;
    stop) roost_pg_stop "${2:?the directory start printed}" ;;
    *) echo "usage: $0 start | stop DIR (or source it)" >&2; exit 2 ;;
  esac
else
  roost_pg_start
  trap 'roost_pg_stop' EXIT
fi
