#!/usr/bin/env bash
# What one cycle of each loop costs the client, in instructions and L1 instruction-cache misses,
# counted by callgrind: `pglock-bench cycles LOOP N` at two values of N, the difference divided
# by the difference in N (setup and warm-up cancel out). Deterministic, unlike time.
#
#   bench/instructions.sh [LOOP...]       (default: every loop; needs valgrind)
#
# DATABASE_URL chooses the server, as for the bench.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet -p pglock-bench
bin=target/release/pglock-bench
loops=("$@")
if [ ${#loops[@]} -eq 0 ]; then
    loops=(raw-lock-unlock raw-combined session-lock-unlock session-lock-drop pool-lock-unlock pool-lock-drop)
fi
low=1000
high=3000
# "Collected : Ir ... I1mr ..." with --cache-sim=yes: events Ir Dr Dw I1mr D1mr D1mw ILmr DLmr DLmw.
count() {
    valgrind --tool=callgrind --cache-sim=yes --callgrind-out-file=/dev/null "$bin" cycles "$1" "$2" 2>&1 |
        awk '/Collected/ {print $4, $7}'
}
printf '%-22s %14s %16s\n' loop instructions "L1i misses"
for loop in "${loops[@]}"; do
    read -r ir_low i1_low < <(count "$loop" "$low")
    read -r ir_high i1_high < <(count "$loop" "$high")
    awk -v l="$loop" -v a="$ir_low" -v b="$ir_high" -v c="$i1_low" -v d="$i1_high" -v n=$((high - low)) \
        'BEGIN { printf "%-22s %14.0f %16.0f\n", l, (b - a) / n, (d - c) / n }'
done
