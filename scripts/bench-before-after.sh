#!/usr/bin/env bash
# Side-by-side throughput of two pgnear binaries against the same lab primary, in one run:
# pgbench -S (8 clients, simple and extended) and TPC-B (8 clients), direct to the primary and
# through each binary (primary region, session mode, defaults), interleaved, each run
# PGNEAR_BENCH_SECS long (default 10), ROUNDS times (default 3); prints the median TPS and the
# ratio to direct. With BENCH_REGION=replica, pgnear runs in a replica region (rtt 0) and the
# -S runs compare with direct reads from that replica. CLIENTS (default 8) sets pgbench's
# clients; pgnear's own settings pass through the environment (PGNEAR_POOL_MODE=transaction
# PGNEAR_POOL_PIPELINE=1 for pipelined reads, in a replica region).
#   scripts/bench-before-after.sh OLD_PGNEAR NEW_PGNEAR
set -euo pipefail
old=$1 new=$2
secs=${PGNEAR_BENCH_SECS:-10}
rounds=${ROUNDS:-3}
clients=${CLIENTS:-8}
threads=$((clients < 2 ? clients : 2))
work=$(mktemp -d)
cleanup() {
    kill $(jobs -p) 2>/dev/null || true
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

region=iad
[ "${BENCH_REGION:-primary}" = replica ] && region=lhr
"$new" lab --rtt 0ms --regions "iad,lhr" > "$work/lab.out" 2>&1 &
for _ in $(seq 1 120); do grep -q "lab ready" "$work/lab.out" && break; sleep 0.5; done
primary=$(sed -n 's/.*primary .*postgres on \([0-9.:]*\).*/\1/p' "$work/lab.out" | head -1)
replica=$(sed -n 's/.*replica .*postgres on \([0-9.:]*\).*/\1/p' "$work/lab.out" | head -1)
[ -n "$primary" ] && [ -n "$replica" ] || { cat "$work/lab.out"; exit 1; }
url="postgres://app:secret@$primary/app?sslmode=disable"

start() { # binary port admin-port
    local replica_url=""
    [ "$region" = lhr ] && replica_url="postgres://app:secret@$replica/app?sslmode=disable"
    DATABASE_URL=$url PGNEAR_REPLICA_URL=$replica_url FLY_REGION=$region PRIMARY_REGION=iad PGNEAR_LISTEN=127.0.0.1:$2 \
        PGNEAR_ADMIN_LISTEN=127.0.0.1:$3 PGNEAR_LOG_LEVEL=warn "$1" run > "$work/$2.log" 2>&1 &
}
start "$old" 7601 7701
start "$new" 7602 7702
sleep 2
export PGPASSWORD=secret
pgbench -i -q -s 10 -h "${primary%:*}" -p "${primary#*:}" -U app app > /dev/null 2>&1

tps() { # port args...
    local port=$1; shift
    pgbench -h 127.0.0.1 -p "$port" -U app -c "$clients" -j "$threads" -T "$secs" -n "$@" app 2>/dev/null \
        | sed -n 's/^tps = \([0-9.]*\).*/\1/p'
}
median() { sort -n | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }
for mode in "-S -M simple" "-S -M extended" "-M simple"; do
    name=$([ "$mode" = "-M simple" ] && echo "TPC-B" || echo "pgbench $mode")
    direct_port=${primary#*:}
    [ "$region" = lhr ] && [ "$mode" != "-M simple" ] && direct_port=${replica#*:}
    : > "$work/d"; : > "$work/o"; : > "$work/n"
    for _ in $(seq 1 "$rounds"); do
        # shellcheck disable=SC2086
        tps "$direct_port" $mode >> "$work/d"
        # shellcheck disable=SC2086
        tps 7601 $mode >> "$work/o"
        # shellcheck disable=SC2086
        tps 7602 $mode >> "$work/n"
    done
    d=$(median < "$work/d") o=$(median < "$work/o") n=$(median < "$work/n")
    awk -v name="$name" -v d="$d" -v o="$o" -v n="$n" 'BEGIN {
        printf "%-24s direct %8.0f TPS | before %8.0f (%.2fx) | after %8.0f (%.2fx) | after/before %.3f\n",
            name, d, o, o / d, n, n / d, n / o }'
done
