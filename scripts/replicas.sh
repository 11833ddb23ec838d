#!/usr/bin/env bash
# The topology of docker-compose.yml on this machine, without Docker: a PostgreSQL cluster, N
# pgrelay replicas (default 2) and Debian's HAProxy in front of them with deploy/haproxy.cfg.
#
#   scripts/replicas.sh [N]        start everything; Ctrl-C (or SIGTERM) stops everything
#
# Like an orchestrator, the script starts a replica again whenever it exits, so restarting one
# is `kill -TERM $(cat $STATE/relay1.pid)`: it drains (PGRELAY_DRAIN_GRACE, 2s here), closes its
# clients with 1001, exits 0 and comes back; its clients resume on the other replica.
#
# Environment: PORT_BASE (18080: HAProxy there, the relays on the ports after it), PG_PORT
# (15432), STATE (/tmp/pgrelay-replicas: data, logs, pids), PGRELAY_BIN (target/debug/pgrelay,
# built if missing), PGRELAY_JWT_SECRET (dev-secret; mint tokens with `pgrelay token`).
# tests/replicas.rs runs the same topology, restarting each replica under live clients.
set -euo pipefail
cd "$(dirname "$0")/.."

N=${1:-2}
PORT_BASE=${PORT_BASE:-18080}
PG_PORT=${PG_PORT:-15432}
STATE=${STATE:-/tmp/pgrelay-replicas}
BIN=${PGRELAY_BIN:-target/debug/pgrelay}
export PGRELAY_JWT_SECRET=${PGRELAY_JWT_SECRET:-dev-secret}
export PGRELAY_DRAIN_GRACE=${PGRELAY_DRAIN_GRACE:-2s}

command -v haproxy >/dev/null || { echo "haproxy is not installed: apt-get install -y haproxy" >&2; exit 2; }
PG_BIN=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
[ -x "$PG_BIN/postgres" ] || { echo "no PostgreSQL server binaries (apt-get install postgresql)" >&2; exit 2; }
[ -x "$BIN" ] || cargo build --bin pgrelay
BIN=$(realpath "$BIN")

mkdir -p "$STATE"
# Postgres refuses to run as root: run it as `postgres` when we are root.
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
if [ "$(id -u)" = 0 ]; then chown postgres "$STATE"; fi
if [ ! -f "$STATE/data/PG_VERSION" ]; then
    as_pg "$PG_BIN/initdb" -A trust -U postgres --no-sync -D "$STATE/data" >/dev/null
fi
as_pg "$PG_BIN/pg_ctl" -D "$STATE/data" -l "$STATE/postgres.log" -w \
    -o "-p $PG_PORT -c listen_addresses=127.0.0.1 -c unix_socket_directories= -c max_connections=300" start >/dev/null
export DATABASE_URL="postgres://postgres@127.0.0.1:$PG_PORT/postgres"
"$BIN" migrate >/dev/null

pids=()
stopping=0
cleanup() {
    stopping=1
    for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    as_pg "$PG_BIN/pg_ctl" -D "$STATE/data" -m fast stop >/dev/null || true
}
trap cleanup EXIT
trap 'exit 0' INT TERM

# One replica, started again whenever it exits (until the script stops).
supervise() {
    local i=$1 addr=$2
    while [ "$stopping" = 0 ]; do
        "$BIN" serve --bind "$addr" >>"$STATE/relay$i.log" 2>&1 &
        echo $! >"$STATE/relay$i.pid"
        wait $! || true
        sleep 0.2
    done
}

servers=""
for i in $(seq 1 "$N"); do
    addr="127.0.0.1:$((PORT_BASE + i))"
    supervise "$i" "$addr" &
    pids+=($!)
    servers="$servers    server relay$i \"$addr\" check\n"
done
# deploy/haproxy.cfg names two servers; for another N, the same file with N server lines.
config="$STATE/haproxy.cfg"
grep -v '^    server relay' deploy/haproxy.cfg >"$config"
printf "%b" "$servers" >>"$config"
LB_BIND="127.0.0.1:$PORT_BASE" haproxy -db -f "$config" >>"$STATE/haproxy.log" 2>&1 &
pids+=($!)

for i in $(seq 1 "$N"); do
    until "$BIN" health --ready --bind "127.0.0.1:$((PORT_BASE + i))" 2>/dev/null; do sleep 0.2; done
done
echo "pgrelay: $N replicas behind HAProxy at ws://127.0.0.1:$PORT_BASE/ws (Postgres: $DATABASE_URL)"
echo "  a token: $("$BIN" token --sub u1)"
echo "  restart a replica: kill -TERM \$(cat $STATE/relay1.pid)    logs: $STATE/*.log"
wait
