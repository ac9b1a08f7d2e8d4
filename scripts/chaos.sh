#!/usr/bin/env bash
# The chaos run of tests/chaos.rs, longer: mixed load through one pgnear while each upstream is
# frozen, killed and restarted, and partitioned (silently and loudly) on a schedule.
#   scripts/chaos.sh [SECONDS]     (default 600; PGNEAR_CHAOS_SEED changes the schedule)
# It prints its counts at the end and fails on a lost, duplicated or stale write, or an error
# whose SQLSTATE DESIGN.md does not list. Needs root (network namespaces), like the suite.
set -euo pipefail
cd "$(dirname "$0")/.."
export PGNEAR_CHAOS_SECONDS="${1:-600}"
exec cargo test --test chaos -- --nocapture
