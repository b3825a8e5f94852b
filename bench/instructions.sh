#!/usr/bin/env bash
# What one cycle of each loop costs the client, counted by callgrind: `pglock-bench cycles LOOP N`
# at two values of N, the difference divided by the difference in N (setup and warm-up cancel
# out). Deterministic, unlike time, within a percent or so (how often a read finds its answer
# already in varies). Two figures per loop:
#
# - instructions per cycle;
# - hot code lines: the 64-byte lines of code holding an instruction that runs at least once
#   per cycle. On a CPU shared with the server, whose backend runs between the client's polls
#   and evicts the client's code, each of them is fetched again on every cycle: this predicts
#   the one-core wall clock better than the instruction count does.
#
#   bench/instructions.sh [LOOP...]             (default: every loop; needs valgrind)
#   FUNCTIONS=1 bench/instructions.sh LOOP...   (also: hot lines and instructions per function)
#   FEATURES=metrics bench/instructions.sh      (the bench's features: `metrics` turns pglock's
#                                                metrics on, recorded by the Prometheus exporter;
#                                                with BENCH_RECORDER=none, by no recorder)
#   LOW=2000 HIGH=12000 bench/instructions.sh   (other numbers of cycles; see below)
#
# DATABASE_URL chooses the server, as for the bench.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet -p pglock-bench --features "${FEATURES:-}"
bin=target/release/pglock-bench
loops=("$@")
if [ ${#loops[@]} -eq 0 ]; then
    loops=(raw-lock-unlock raw-combined session-lock-unlock session-lock-drop pool-lock-unlock pool-lock-drop)
fi
# LOW and HIGH change the two values of N: a wider gap averages out work whose amount varies
# from run to run (a clock calibrated once per process, as the Prometheus exporter's).
low=${LOW:-1000}
high=${HIGH:-3000}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# One run: its instruction count on stdout, and per instruction "object@address count function"
# in $work/LOOP.N (positions uncompressed, so that every cost line starts with its address; the
# line after `calls=` is the call's inclusive cost and is skipped).
run() {
    local out="$work/$1.$2.callgrind"
    valgrind --tool=callgrind --dump-instr=yes --compress-pos=no \
        --compress-strings=no --callgrind-out-file="$out" "$bin" cycles "$1" "$2" 2>&1 |
        awk '/Collected/ {print $4}'
    awk '/^ob=/ {ob = substr($0, 4)} /^fn=/ {fn = substr($0, 4)}
         /^calls=/ {skip = 1; next} skip {skip = 0; next}
         /^0x[0-9a-f]+ / {key = ob "@" $1; count[key] += $3; name[key] = fn}
         END {for (k in count) print k "\t" count[k] "\t" name[k]}' "$out" |
        sort -t$'\t' -k1,1 >"$work/$1.$2"
}

printf '%-22s %14s %16s\n' loop instructions "hot code lines"
for loop in "${loops[@]}"; do
    run "$loop" "$low" >"$work/totals"
    read -r ir_low <"$work/totals"
    run "$loop" "$high" >"$work/totals"
    read -r ir_high <"$work/totals"
    # Instructions whose count grew by at least the number of added cycles.
    join -t$'\t' -o 0,1.2,2.2,2.3 "$work/$loop.$low" "$work/$loop.$high" |
        awk -F'\t' -v n=$((high - low)) '$3 - $2 >= n {
            split($1, at, "@"); line = at[1] "@" int(strtonum(at[2]) / 64)
            if (!(line in seen)) { seen[line] = 1; lines[$4]++ }
            runs[$4] += ($3 - $2) / n }
            END { for (f in runs) printf "%d\t%.0f\t%s\n", lines[f], runs[f], f }' |
        sort -t$'\t' -k1,1 -n -r >"$work/$loop.functions"
    hot=$(awk -F'\t' '{s += $1} END {print s + 0}' "$work/$loop.functions")
    awk -v l="$loop" -v a="$ir_low" -v b="$ir_high" -v h="$hot" -v n=$((high - low)) \
        'BEGIN { printf "%-22s %14.0f %16d\n", l, (b - a) / n, h }'
    if [ "${FUNCTIONS:-}" = 1 ]; then
        printf '  %5s %8s  %s\n' lines instrs function
        awk -F'\t' '{printf "  %5d %8d  %s\n", $1, $2, substr($3, 1, 110)}' "$work/$loop.functions"
    fi
done
