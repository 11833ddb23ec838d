#!/usr/bin/env bash
# What pgrelay's capture costs the application's writes.
#
# 1. Write throughput: pgbench, a custom script updating one random task per transaction, with
#    1, 8 and 32 clients, for: no triggers; capture with no relay asleep (writers never notify:
#    what writers pay while relays are busy reading, or when none listens); capture with a relay
#    that sleeps for ever (every writer notifies: the worst case, what a NOTIFY costs).
# 2. Bulk: one UPDATE of 100,000 rows with pgrelay's statement-level capture, against an
#    equivalent row-level trigger, and against no trigger.
#
# It starts its own throwaway PostgreSQL with the default (durable) settings, prints a Markdown
# report, and removes everything it made. Run on an otherwise idle machine:
#     bash bench/trigger-cost.sh [seconds per pgbench run, default 15]
set -euo pipefail
cd "$(dirname "$0")/.."

SECONDS_PER_RUN=${1:-15}
PG_OPTIONS='-c max_connections=100' . bench/cluster.sh

psql_() { psql -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$PORT" -U postgres "$@"; }

# A database with the library, the example schema and 1,000 tasks in 10 projects.
make_db() {
    local db=$1 mode=$2
    psql_ -c "CREATE DATABASE $db" >/dev/null
    psql_ -d "$db" -1 -f sql/pgrelay.sql >/dev/null 2>&1
    psql_ -d "$db" -1 -f migrations/001_task_app.sql >/dev/null 2>&1
    psql_ -d "$db" >/dev/null <<'SQL'
INSERT INTO users VALUES ('u1', 'alice');
INSERT INTO projects (name, owner_id) SELECT 'p' || i, 'u1' FROM generate_series(1, 10) i;
INSERT INTO tasks (project_id, title) SELECT 1 + i % 10, 'task ' || i FROM generate_series(1, 1000) i;
SQL
    case $mode in
        none)   psql_ -d "$db" -c "SELECT pgrelay.unwatch(tbl) FROM pgrelay.watches" >/dev/null ;;
        *) ;;
    esac
    psql_ -d "$db" -c "VACUUM ANALYZE" >/dev/null
}

cat > "$DIR/update.sql" <<'SQL'
\set id random(1, 1000)
UPDATE tasks SET priority = coalesce(priority, 0) + 1, updated_at = now() WHERE id = :id;
SQL

echo "## Write throughput (pgbench, ${SECONDS_PER_RUN} s per run, one-row UPDATE of tasks per transaction)"
echo
echo "| clients | no triggers (TPS) | capture, relays busy (TPS) | capture, a relay asleep (TPS) | busy / none | asleep / none |"
echo "|---|---|---|---|---|---|"
for mode in none busy asleep; do make_db "bench_$mode" "$mode"; done
# A relay that sleeps for ever: it holds the "sleeping" advisory lock (see sql/pgrelay.sql), so
# every writer of bench_asleep notifies.
psql_ -d bench_asleep -c "SELECT pg_advisory_lock_shared(1885827692, 1), pg_sleep(100000)" >/dev/null 2>&1 &
SLEEPER=$!
sleep 1
for clients in 1 8 32; do
    declare -A tps=()
    for mode in none busy asleep; do
        jobs=$(( clients < 2 ? clients : 2 ))
        out=$(pgbench -n -h 127.0.0.1 -p "$PORT" -U postgres -f "$DIR/update.sql" \
              -c "$clients" -j "$jobs" -T "$SECONDS_PER_RUN" "bench_$mode" 2>&1)
        tps[$mode]=$(printf '%s\n' "$out" | sed -n 's/^tps = \([0-9.]*\).*/\1/p' | head -n 1)
    done
    printf '| %s | %.0f | %.0f | %.0f | %.0f%% | %.0f%% |\n' "$clients" \
        "${tps[none]}" "${tps[busy]}" "${tps[asleep]}" \
        "$(echo "100 * ${tps[busy]} / ${tps[none]}" | bc -l)" \
        "$(echo "100 * ${tps[asleep]} / ${tps[none]}" | bc -l)"
done
kill "$SLEEPER" 2>/dev/null || true

echo
echo "## Bulk: one UPDATE of 100,000 rows (median of 3)"
echo
bulk_db() {
    local db=$1 mode=$2
    make_db "$db" "$mode"
    psql_ -d "$db" -c "INSERT INTO tasks (project_id, title) SELECT 1, 'bulk ' || i FROM generate_series(1, 100000) i" >/dev/null
    if [ "$mode" = rowlevel ]; then
        # The same record per row, written by a classic row-level trigger instead.
        psql_ -d "$db" >/dev/null <<'SQL'
SELECT pgrelay.unwatch('tasks');
CREATE FUNCTION capture_row() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO pgrelay.changes (gen, tbl, entity, op, rooms, "row", old)
    VALUES ((SELECT last_value % 3 FROM pgrelay.generation), 'tasks', 'task', TG_OP,
            array_remove(ARRAY['project:' || NEW.project_id, 'task:' || NEW.id,
                               CASE WHEN OLD.project_id IS DISTINCT FROM NEW.project_id
                                    THEN 'project:' || OLD.project_id END], NULL),
            to_jsonb(NEW), to_jsonb(OLD));
    RETURN NULL;
END $$;
CREATE TRIGGER capture_row AFTER UPDATE ON tasks FOR EACH ROW EXECUTE FUNCTION capture_row();
SQL
    fi
    psql_ -d "$db" -c "VACUUM ANALYZE" >/dev/null
}
echo "| capture | UPDATE of 100,000 rows (ms) |"
echo "|---|---|"
for mode in none busy rowlevel; do
    bulk_db "bulk_$mode" "$mode"
    times=()
    for run in 1 2 3; do
        ms=$(psql_ -d "bulk_$mode" -c '\timing on' \
             -c "UPDATE tasks SET priority = $run WHERE project_id = 1" | sed -n 's/^Time: \([0-9.]*\) ms.*/\1/p')
        times+=("$ms")
    done
    median=$(printf '%s\n' "${times[@]}" | sort -g | sed -n 2p)
    label=$mode
    [ "$mode" = none ] && label="no triggers"
    [ "$mode" = busy ] && label="pgrelay (statement-level)"
    [ "$mode" = rowlevel ] && label="row-level trigger, same record"
    printf '| %s | %.0f |\n' "$label" "$median"
done
echo
echo "Machine: $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB, PostgreSQL $("$BIN/postgres" --version | awk '{print $3}'), default settings (fsync on, synchronous_commit on)."
