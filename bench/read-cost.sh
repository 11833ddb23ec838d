#!/usr/bin/env bash
# What the relay's outbox read costs per change.
#
# Starts a throwaway PostgreSQL, installs the library and the example schema, commits W4-like
# single-row UPDATEs of tasks (8 pgbench clients, one UPDATE per transaction) and times the relay's
# exact READ_BATCH statement (taken from src/capture/outbox.rs, prepared, generic plan after the
# first executions) over snapshot ranges of ~50 and 1,000 changes with EXPLAIN (ANALYZE, BUFFERS),
# with and without per-node timing. Prints the median of RUNS executions, in µs per change.
#     bash bench/read-cost.sh [runs, default 15]
set -euo pipefail
cd "$(dirname "$0")/.."

RUNS=${1:-15}
. bench/cluster.sh
psql_() { psql -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$PORT" -U postgres -d bench "$@"; }

psql -X -q -h 127.0.0.1 -p "$PORT" -U postgres -c "CREATE DATABASE bench"
psql_ -1 -f sql/pgrelay.sql >/dev/null 2>&1
psql_ -1 -f migrations/001_task_app.sql >/dev/null 2>&1
psql_ >/dev/null <<'SQL'
INSERT INTO users VALUES ('u1', 'alice'), ('u2', 'bob');
INSERT INTO projects (name, owner_id) SELECT 'p' || i, 'u1' FROM generate_series(1, 10) i;
INSERT INTO tasks (project_id, title, description, assignee_id, created_by)
SELECT 1 + i % 10, 'task ' || i, 'description of task ' || i, 'u2', 'u1' FROM generate_series(1, 1000) i;
SQL
cat > "$DIR/update.sql" <<'SQL'
\set id random(1, 1000)
\set p random(1, 100000)
UPDATE tasks SET priority = :p WHERE id = :id;
SQL
snap() { psql_ -At -c "SELECT pg_current_snapshot()"; }
updates() { pgbench -n -h 127.0.0.1 -p "$PORT" -U postgres -f "$DIR/update.sql" -c 8 -j 2 -t "$1" bench >/dev/null; }
S0=$(snap); updates 6; S50=$(snap); updates 125; S1000=$(snap)
psql_ -c "VACUUM ANALYZE" >/dev/null

QUERY=$(python3 -c "
import re; t = open('src/capture/outbox.rs').read()
print(re.search(r'pub const READ_BATCH: &str = r#\"(.*?)\"#;', t, re.S).group(1))")

measure() {  # since upto timing(on|off)
    local n opts="ANALYZE, BUFFERS"
    [ "$3" = off ] && opts="$opts, TIMING OFF"
    n=$(psql_ -At -c "SELECT count(*) FROM pgrelay.batch('$1', '$2')")
    {
        echo "PREPARE rb(text, text, text[]) AS $QUERY;"
        echo '\o /dev/null'
        for _ in 1 2 3 4 5 6 7; do echo "EXECUTE rb('$1', '$2', NULL);"; done
        echo '\o'
        for _ in $(seq "$RUNS"); do echo "EXPLAIN ($opts) EXECUTE rb('$1', '$2', NULL);"; done
    } | psql_ | sed -n 's/.*Execution Time: \([0-9.]*\) ms.*/\1/p' | sort -n |
        awk -v n="$n" -v t="$3" '{a[NR] = $1} END {m = a[int((NR + 1) / 2)];
            printf "| %d | %s | %.2f ms | %.1f µs | %.1f µs |\n", n, t, m, 1000 * m / n, 1000 * a[1] / n}'
}

echo "| changes | per-node timing | median read | median per change | fastest per change |"
echo "|---|---|---|---|---|"
for t in on off; do measure "$S0" "$S50" $t; measure "$S50" "$S1000" $t; done
