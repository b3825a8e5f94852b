#!/usr/bin/env bash
# Runs pglock-bench with the bench and the server's new backends on one CPU.
#
#   bench/pinned.sh [CPU] -- [pglock-bench options...]      (CPU defaults to 0)
#
# On this VM, a round trip between processes on different cores costs a cross-core wake-up,
# slow and erratic (`select_1` 70-90 µs on busy days, against 28 µs on one core). On one core
# a round trip is two context switches and nothing else, so every case is bound by the CPU
# it needs, client and server added up: the stricter test of what pglock adds, and a far
# steadier one.
#
# Needs a local server whose postmaster this user may re-pin (root, or the server's owner):
# its affinity is set to CPU for the run, so that the backends it forks for the bench's
# connections inherit it, and restored on exit. DATABASE_URL chooses the server, as for the
# bench; the data directory is read from it with psql.
set -euo pipefail
cd "$(dirname "$0")/.."
cpu=0
if [ $# -gt 0 ] && [ "$1" != "--" ]; then
    cpu=$1
    shift
fi
[ "${1:-}" = "--" ] && shift
url=${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/test}
data_directory=$(psql "$url" -Atc 'SHOW data_directory')
postmaster=$(head -1 "$data_directory/postmaster.pid")
before=$(taskset -pc "$postmaster" | awk '{print $NF}')
cargo build --release --quiet -p pglock-bench
trap 'taskset -pc "$before" "$postmaster" >/dev/null' EXIT
taskset -pc "$cpu" "$postmaster" >/dev/null
taskset -c "$cpu" target/release/pglock-bench "$@"
