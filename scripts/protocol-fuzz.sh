#!/bin/sh
# Runs the protocol-level differential fuzzer (tests/protocol_fuzz.rs) for SECONDS per target
# (default 600), all four targets (primary/replica region x session/transaction pool) at once.
# Extra arguments go to the test binary. PGNEAR_FUZZ_SEED=S starts at seed S;
# PGNEAR_FUZZ_KNOWN_BUGS=1 also generates what triggers the known pgnear bugs.
set -eu
seconds=${1:-600}
[ $# -gt 0 ] && shift
PGNEAR_FUZZ_SECONDS=$seconds exec cargo test --test protocol_fuzz -- \
    --include-ignored --nocapture --test-threads=4 fuzz_ "$@"
