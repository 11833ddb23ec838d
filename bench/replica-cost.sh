#!/usr/bin/env bash
# What each relay replica costs Postgres (docs/scaling.md). For 1, 2 and 4 relays on one
# database: first IDLE_SECONDS with no writes, then the same load for every count (ROOMS x
# PER_ROOM subscribers dealt out to the relays in turn, RATE single-row updates per second from
# two writers, SECONDS_PER_RUN seconds). Per phase it prints the relays' connections, their
# statements (pg_stat_statements calls, the writers' UPDATEs left out) and Postgres CPU
# (every server process, exited backends included), per second when idle and per change under
# load. Nothing is left behind.
#
#     bash bench/replica-cost.sh
#     RELAYS="1 2" RATE=100 SECONDS_PER_RUN=10 bash bench/replica-cost.sh
set -euo pipefail
cd "$(dirname "$0")/.."
RELAYS=${RELAYS:-1 2 4}
RATE=${RATE:-200}
SECONDS_PER_RUN=${SECONDS_PER_RUN:-20}
IDLE_SECONDS=${IDLE_SECONDS:-10}
ROOMS=${ROOMS:-10}
PER_ROOM=${PER_ROOM:-20}

cargo build --release -q --bin pgrelay
cargo bench --bench loadgen --no-run -q 2>/dev/null
LOADGEN=$(ls -t target/release/deps/loadgen-* | grep -v '\.d$' | head -n 1)
PG_OPTIONS='-c shared_preload_libraries=pg_stat_statements -c max_connections=200' . bench/cluster.sh
PSQL=(psql -X -q -At -h 127.0.0.1 -p "$PORT" -U postgres)
"${PSQL[@]}" -c "CREATE DATABASE bench"
"${PSQL[@]}" -d bench -c "CREATE EXTENSION pg_stat_statements"
export DATABASE_URL="postgres://postgres@127.0.0.1:$PORT/bench"
export PGRELAY_JWT_SECRET=pgrelay-dev-secret-not-for-production
target/release/pgrelay migrate >/dev/null
"$LOADGEN" setup --db "$DATABASE_URL" >/dev/null
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# CPU ticks of the whole server: the postmaster, its live children, and (cutime/cstime) the
# children it has reaped.
pg_ticks() {
    local master total=0 pid
    master=$(head -n 1 "$DIR/data/postmaster.pid")
    total=$(awk '{print $14+$15+$16+$17}' "/proc/$master/stat")
    for pid in $(ps -o pid= --ppid "$master"); do
        total=$((total + $(awk '{print $14+$15}' "/proc/$pid/stat" 2>/dev/null || echo 0)))
    done
    echo "$total"
}
TICK=$(getconf CLK_TCK)
relay_statements() {
    "${PSQL[@]}" -d bench -c "SELECT coalesce(sum(calls), 0) FROM pg_stat_statements
        WHERE query NOT LIKE 'UPDATE tasks%' AND query NOT LIKE '%pg_stat_statements%'
          AND query NOT LIKE '%pg_stat_activity%'"
}
relay_connections() {
    "${PSQL[@]}" -d bench -c "SELECT count(*) FROM pg_stat_activity
        WHERE datname = 'bench' AND pid <> pg_backend_pid() AND application_name <> 'psql'"
}

PIDS=()
for k in $RELAYS; do
    ADDRS=()
    for i in $(seq "$k"); do
        port=$(free_port)
        RUST_LOG=warn target/release/pgrelay serve --bind "127.0.0.1:$port" 2>>"$DIR/relay.log" &
        PIDS+=($!)
        ADDRS+=("127.0.0.1:$port")
    done
    for a in "${ADDRS[@]}"; do
        until target/release/pgrelay health --ready --bind "$a" 2>/dev/null; do sleep 0.1; done
    done
    sleep 2
    # Idle: what k relays cost with nothing happening.
    "${PSQL[@]}" -d bench -c "SELECT pg_stat_statements_reset()" >/dev/null
    t0=$(pg_ticks)
    sleep "$IDLE_SECONDS"
    t1=$(pg_ticks)
    idle_statements=$(relay_statements)
    idle_connections=$(relay_connections)
    # Under load (the loadgen's own connections are counted apart: its two writers).
    "${PSQL[@]}" -d bench -c "SELECT pg_stat_statements_reset()" >/dev/null
    t2=$(pg_ticks)
    relays=$(IFS=,; echo "${ADDRS[*]}")
    "$LOADGEN" fanout --db "$DATABASE_URL" --relay "$relays" --rooms "$ROOMS" \
        --clients-per-room "$PER_ROOM" --writers 2 --rate "$RATE" --seconds "$SECONDS_PER_RUN" \
        >"$DIR/result.json" &
    gen=$!
    sleep $((SECONDS_PER_RUN / 2 + 2))
    busy_connections=$(( $(relay_connections) - 2 ))
    wait "$gen"
    t3=$(pg_ticks)
    busy_statements=$(relay_statements)
    python3 - "$k" "$DIR/result.json" "$TICK" "$IDLE_SECONDS" "$t0" "$t1" "$t2" "$t3" \
        "$idle_statements" "$busy_statements" "$idle_connections" "$busy_connections" <<'PY'
import json, sys
k, path, tick, idle_s = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
t0, t1, t2, t3 = (int(x) for x in sys.argv[5:9])
idle_st, busy_st, idle_conn, busy_conn = (int(x) for x in sys.argv[9:13])
r = json.load(open(path))
changes = r["changes"]
print(json.dumps({
    "relays": k,
    "idle": {"connections": idle_conn, "statements_per_s": round(idle_st / idle_s, 1),
             "pg_cpu_ms_per_s": round((t1 - t0) * 1000 / tick / idle_s, 1)},
    "load": {"changes": changes, "changes_per_s": round(r["changes_per_s"], 1),
             "deliveries": r["deliveries"], "missing": r["missing_at_end"], "leaked": r["leaked"],
             "connections": busy_conn,
             "relay_statements_per_change": round(busy_st / changes, 2),
             "pg_cpu_ms_per_change": round((t3 - t2) * 1000 / tick / changes, 3),
             "latency_ms": r["latency_ms"]},
}))
PY
    # Where the relays' statements go (the top five by calls).
    "${PSQL[@]}" -d bench -F ' | ' -c "SELECT calls, round(total_exec_time::numeric, 1) AS ms,
            left(regexp_replace(query, '\s+', ' ', 'g'), 90)
        FROM pg_stat_statements
        WHERE query NOT LIKE 'UPDATE tasks%' AND query NOT LIKE '%pg_stat_%'
        ORDER BY calls DESC LIMIT 5" | sed "s/^/  relays=$k: /"
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait "${PIDS[@]}" 2>/dev/null || true
    PIDS=()
done
