# A throwaway PostgreSQL for the bench scripts that need only a database (trigger-cost.sh,
# read-cost.sh). Source it from the project's root; it sets BIN, DIR, PORT and AS_PG, starts the
# server with the machine's newest binaries and default (durable) settings plus PG_OPTIONS, and
# stops it and removes DIR when the script exits. (Not arguments: a sourced file without any
# would see the calling script's own.)
#     PG_OPTIONS='-c max_connections=100' . bench/cluster.sh
BIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
DIR=$(mktemp -d /tmp/pgrelay-bench.XXXXXX)
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
AS_PG=()
if [ "$(id -u)" = 0 ]; then
    # Postgres refuses to run as root.
    chown postgres "$DIR"
    AS_PG=(runuser -u postgres --)
fi
cleanup() { "${AS_PG[@]}" "$BIN/pg_ctl" -D "$DIR/data" -m fast stop >/dev/null 2>&1 || true; rm -rf "$DIR"; }
trap cleanup EXIT

"${AS_PG[@]}" "$BIN/initdb" -D "$DIR/data" -A trust -U postgres >/dev/null
"${AS_PG[@]}" "$BIN/pg_ctl" -D "$DIR/data" -l "$DIR/log" -w \
    -o "-p $PORT -c listen_addresses=127.0.0.1 -c unix_socket_directories= ${PG_OPTIONS:-}" start >/dev/null
