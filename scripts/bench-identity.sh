#!/usr/bin/env bash
# Logins as a role of its own (`auth.users = "query"`, the lab's setting), in one run of the lab
# (RTT between regions: PGNEAR_BENCH_RTT, default 100ms):
# - SCRAM logins per second, pgbench -C -S (4 clients, PGNEAR_BENCH_SECS, default 10), direct to
#   the primary vs through the primary region's pgnear, as the lab's role `reporter`;
# - from the far region: a new connection and its first query through that region's pgnear,
#   with the role's verifier not yet cached (the first login) and cached (the next ones).
#   scripts/bench-identity.sh [PGNEAR_BINARY]
set -euo pipefail
bin=${1:-target/release/pgnear}
secs=${PGNEAR_BENCH_SECS:-10}
rtt=${PGNEAR_BENCH_RTT:-100ms}
work=$(mktemp -d)
cleanup() {
    kill $(jobs -p) 2>/dev/null || true
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

"$bin" lab --rtt "$rtt" --regions iad,syd > "$work/lab.out" 2>&1 &
for _ in $(seq 1 240); do grep -q "Try:" "$work/lab.out" && break; sleep 0.5; done
primary=$(sed -n 's/.*primary .*postgres on \([0-9.:]*\).*/\1/p' "$work/lab.out" | head -1)
near=$(sed -n "s/.*iad (primary region): psql '\([^']*\)'.*/\1/p" "$work/lab.out")
far=$(sed -n "s/.*syd (replica region): psql '\([^']*\)'.*/\1/p" "$work/lab.out")
[ -n "$primary" ] && [ -n "$near" ] && [ -n "$far" ] || { cat "$work/lab.out"; exit 1; }
as_reporter() { sed 's|//app:secret@|//reporter:reporter-secret@|' <<< "$1"; }

pgbench -i -q -s 1 "$near" > /dev/null 2>&1
psql -q "$near" -c "GRANT SELECT ON ALL TABLES IN SCHEMA public TO reporter"
# Until the far replica has replayed all that (the WAL shares the relay with pgnear's lookups).
until [ "$(psql -qAt "$far" -c "SELECT has_table_privilege('reporter', 'pgbench_accounts', 'SELECT')")" = t ]; do
    sleep 0.2
done
sleep 2

# A new connection and its first query from the far region, in milliseconds (psql's own start-up,
# a few ms, included).
first_query_ms() {
    local url=$1 start end
    start=$(date +%s%N)
    psql -qAt "$url" -c "SELECT abalance FROM pgbench_accounts WHERE aid = 1" > /dev/null
    end=$(date +%s%N)
    echo $(( (end - start) / 1000000 ))
}
far_reporter=$(as_reporter "$far")
cold=$(first_query_ms "$far_reporter")
warm=$(for _ in 1 2 3 4 5; do first_query_ms "$far_reporter"; done | sort -n | sed -n 3p)
app_warm=$(for _ in 1 2 3 4 5; do first_query_ms "$far"; done | sort -n | sed -n 3p)

# A refused login, in milliseconds: a known role with a wrong password, and an unknown role.
refused_ms() {
    local url=$1 start end
    start=$(date +%s%N)
    psql -qAt "$url" -c "SELECT 1" > /dev/null 2>&1 && { echo "let in: $url" >&2; exit 1; }
    end=$(date +%s%N)
    echo $(( (end - start) / 1000000 ))
}
wrong=$(for _ in 1 2 3 4 5; do refused_ms "$(sed 's|//app:secret@|//reporter:wrong@|' <<< "$far")"; done | sort -n | sed -n 3p)
unknown=$(for _ in 1 2 3 4 5; do refused_ms "$(sed 's|//app:secret@|//nosuchrole:wrong@|' <<< "$far")"; done | sort -n | sed -n 3p)

logins() { # url
    pgbench -C -S -c 4 -j 2 -T "$secs" -n "$1" 2>/dev/null | sed -n 's/^tps = \([0-9.]*\).*/\1/p'
}
direct_url="postgres://reporter:reporter-secret@$primary/app?sslmode=disable"
direct=$(logins "$direct_url")
through=$(logins "$(as_reporter "$near")")

echo "RTT between regions: $rtt"
echo "far region, new connection + first query as reporter: verifier not cached ${cold} ms, cached ${warm} ms (median of 5); the URL's role ${app_warm} ms"
echo "far region, refused login (median of 5): known role, wrong password ${wrong} ms; unknown role ${unknown} ms"
awk -v d="$direct" -v t="$through" 'BEGIN {
    printf "SCRAM logins + one read (pgbench -C -S, 4 clients): direct %.0f/s, through pgnear %.0f/s (%.2fx)\n", d, t, t / d }'
